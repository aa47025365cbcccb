//! `isolation.cpu-cycle`: in post-start each of the VM's CPUs goes offline and online again
//! before the partition and the pins, the IRQs the cycle disturbed get their composed value
//! back, and a CPU the kernel will not take offline fails the phase with every CPU online and
//! everything undone. The host is the Xeon fixture with a live cgroup tree
//! (tests/cgroup_kernel); the hotplug side is modelled by [`Hotplug`] below.

mod cgroup_kernel;
mod fixture;

use cgroup_kernel::lab::{Lab, VMS, set};
use fixture::{read, write};
use pvetune::cpuset::CpuSet;
use pvetune::host::Host;
use pvetune::plan::Phase;
use std::cell::RefCell;
use std::io;
use std::path::Path;

/// The kernel's CPU hotplug, as far as the test needs it: `cpuN/online` takes 0 and 1, a CPU
/// can be made to refuse going offline (EBUSY), and offlining breaks IRQ 24's affinity (the
/// kernel resets an IRQ that loses its CPUs to every CPU).
struct Hotplug<'a> {
    lab: &'a Lab,
    writes: RefCell<Vec<(u32, String)>>,
    refuse: Option<u32>,
}

impl Hotplug<'_> {
    fn cpu_of(path: &Path) -> Option<u32> {
        let name = path.parent()?.file_name()?.to_str()?;
        (path.file_name()? == "online")
            .then(|| name.strip_prefix("cpu")?.parse().ok())
            .flatten()
    }
}

impl Host for Hotplug<'_> {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.lab.kernel.read(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        if let Some(cpu) = Self::cpu_of(path) {
            if value.trim() == "0" && self.refuse == Some(cpu) {
                return Err(io::Error::from_raw_os_error(nix::libc::EBUSY));
            }
            self.writes
                .borrow_mut()
                .push((cpu, value.trim().to_string()));
            if value.trim() == "0" {
                write(self.lab.path(), "/proc/irq/24/smp_affinity_list", "0-31\n");
            }
        }
        self.lab.kernel.write(path, value)
    }
    fn get_affinity(&self, tid: i32) -> io::Result<CpuSet> {
        self.lab.kernel.get_affinity(tid)
    }
    fn set_affinity(&self, tid: i32, cpus: &CpuSet) -> io::Result<()> {
        self.lab.kernel.set_affinity(tid, cpus)
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        self.lab.kernel.mkdir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        self.lab.kernel.rmdir(path)
    }
}

const PROFILE: &str = "cpus: 8-11,24-27\nvcpus: sequential\nisolation:\n  irqs: true\n  partition: isolated\n  cpu-cycle: true\n";

fn lab() -> Lab {
    let lab = Lab::new("6.17.13+deb13-cloud-amd64");
    write(lab.path(), "/etc/pve/pvetune/100.yaml", PROFILE);
    lab
}

fn online(lab: &Lab, cpu: u32) -> String {
    read(
        lab.path(),
        &format!("/sys/devices/system/cpu/cpu{cpu}/online"),
    )
    .trim()
    .to_string()
}

#[test]
fn every_vm_cpu_goes_offline_and_online_before_the_partition_and_irqs_are_put_back() {
    let lab = lab();
    let host = Hotplug {
        lab: &lab,
        writes: RefCell::default(),
        refuse: None,
    };
    lab.hook(&host, 100, Phase::PreStart).expect("pre-start");
    let irq24 = read(lab.path(), "/proc/irq/24/smp_affinity_list");
    assert_eq!(set(irq24.trim()), set("0-7,12-23,28-31"));
    lab.qemu_starts(100);
    lab.hook(&host, 100, Phase::PostStart).expect("post-start");
    let want: Vec<(u32, String)> = set(VMS[0].1)
        .iter()
        .flat_map(|cpu| [(cpu, "0".to_string()), (cpu, "1".to_string())])
        .collect();
    assert_eq!(
        *host.writes.borrow(),
        want,
        "each CPU offline, then online, in turn"
    );
    for cpu in set(VMS[0].1).iter() {
        assert_eq!(online(&lab, cpu), "1", "CPU {cpu}");
    }
    assert_eq!(
        read(lab.path(), "/proc/irq/24/smp_affinity_list"),
        irq24,
        "the IRQ the cycle disturbed has its composed value back"
    );
    lab.assert_isolated(100, VMS[0].1, &[100]);
    lab.stop(100, true);
}

#[test]
fn a_cpu_that_will_not_go_offline_fails_post_start_with_every_cpu_online() {
    let lab = lab();
    let host = Hotplug {
        lab: &lab,
        writes: RefCell::default(),
        refuse: Some(10),
    };
    lab.hook(&host, 100, Phase::PreStart).expect("pre-start");
    lab.qemu_starts(100);
    let before = lab.cgroups();
    let err = lab.hook(&host, 100, Phase::PostStart).unwrap_err();
    assert!(
        err.contains("cpu10/online") && err.contains("busy"),
        "{err}"
    );
    for cpu in set(VMS[0].1).iter() {
        assert_eq!(online(&lab, cpu), "1", "CPU {cpu}");
    }
    assert_eq!(lab.cgroups(), before, "no partition was made");
    assert!(
        !host
            .writes
            .borrow()
            .iter()
            .any(|(cpu, _)| *cpu > 10 && *cpu < 24)
    );
}

#[test]
fn cpu_cycle_needs_irqs_and_skips_cpus_without_an_online_file() {
    let lab = lab();
    write(
        lab.path(),
        "/etc/pve/pvetune/100.yaml",
        "cpus: 8-11\nisolation:\n  cpu-cycle: true\n",
    );
    let err = pvetune::hook::check(&lab.env, 100).unwrap_err().to_string();
    assert!(
        err.contains("isolation.cpu-cycle") && err.contains("irqs"),
        "{err}"
    );
    write(
        lab.path(),
        "/etc/pve/pvetune/100.yaml",
        "cpus: 0-3\nisolation:\n  irqs: true\n  cpu-cycle: true\n",
    );
    let plan = pvetune::report::render_plan(&lab.env, &lab.kernel, 100, &[Phase::PostStart])
        .unwrap()
        .join("\n");
    assert!(
        plan.contains("skip cpu-cycle: CPU 0 cannot be taken offline"),
        "{plan}"
    );
    assert!(
        plan.contains("/sys/devices/system/cpu/cpu1/online: 1 -> 0 -> 1"),
        "{plan}"
    );
}
