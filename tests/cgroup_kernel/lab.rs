//! A fixture host for isolation tests: the two-socket Xeon example tree with a live cgroup tree
//! ([`CgroupKernel`]), three VM profiles, and what qemu-server and systemd do around the hooks
//! (the scope, QEMU with four vCPU threads and a QMP socket that names them, QEMU's exit).
#![allow(dead_code)]

use super::CgroupKernel;
use crate::fixture::{self, host_copy, read, snapshot, write};
use pvetune::cpuset::CpuSet;
use pvetune::hook::{Env, run_hook_with};
use pvetune::host::Host;
use pvetune::plan::Phase;
use pvetune::root::Root;
use pvetune::state::Store;
use std::collections::BTreeMap;
use std::path::Path;

/// The VMs on the two-socket Xeon fixture (32 CPUs; siblings are N and N+16): each takes four
/// cores with their siblings, CPUs 0-3,16-19 stay the host's.
pub const VMS: [(u32, &str); 3] = [
    (100, "8-11,24-27"),
    (101, "12-15,28-31"),
    (102, "4-7,20-23"),
];
pub const ALL: &str = "0-31";

pub fn set(s: &str) -> CpuSet {
    s.parse().unwrap()
}

/// Every order of `items` (the stop orders of several VMs).
pub fn permutations(items: &[u32]) -> Vec<Vec<u32>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for (i, &first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            out.push(tail);
        }
    }
    out
}

pub struct Lab {
    pub dir: fixture::Root,
    pub kernel: CgroupKernel,
    pub env: Env,
}

impl Lab {
    pub fn new(kernel_release: &str) -> Lab {
        let dir = host_copy("xeon-2s");
        write(
            &dir.path,
            "/proc/sys/kernel/osrelease",
            &format!("{kernel_release}\n"),
        );
        let mut kernel = CgroupKernel::new(&dir.path, &set(ALL));
        kernel.v6_8 = kernel_release.starts_with("6.8.");
        let env = Env {
            root: Root::new(dir.path.clone()),
            profile: None,
        };
        for (vmid, cpus) in VMS {
            write(
                &dir.path,
                &format!("/etc/pve/pvetune/{vmid}.yaml"),
                &format!("cpus: {cpus}\nvcpus: sequential\nisolation:\n  partition: isolated\n"),
            );
            write(
                &dir.path,
                &format!("/etc/pve/qemu-server/{vmid}.conf"),
                "cores: 4\nmemory: 512\n",
            );
        }
        Lab { dir, kernel, env }
    }

    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    pub fn hook(&self, host: &impl Host, vmid: u32, phase: Phase) -> Result<String, String> {
        let store = Store::new(&self.env.root);
        run_hook_with(&self.env, host, &store, vmid, phase).map_err(|e| format!("{e:#}"))
    }

    pub fn pid(vmid: u32) -> i32 {
        vmid as i32 * 100
    }

    /// What qemu-server and systemd do between pre-start and post-start: the scope, then QEMU
    /// in it with four vCPU threads, a main thread and a worker.
    pub fn qemu_starts(&self, vmid: u32) {
        let scope = format!("qemu.slice/{vmid}.scope");
        self.kernel
            .mkdir(&self.path().join("sys/fs/cgroup").join(&scope))
            .unwrap();
        let pid = Self::pid(vmid);
        let pidfile = format!("/var/run/qemu-server/{vmid}.pid");
        write(self.path(), &pidfile, &format!("{pid}\n"));
        let names = [
            "kvm",
            "CPU 0/KVM",
            "CPU 1/KVM",
            "CPU 2/KVM",
            "CPU 3/KVM",
            "worker",
        ];
        let threads: Vec<(i32, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (pid + i as i32, *n))
            .collect();
        let id = vmid.to_string();
        let cmdline = ["/usr/bin/kvm", "-id", &id, "-pidfile", &pidfile];
        self.kernel.spawn(pid, &cmdline, &threads, &scope);
        let vcpus: Vec<(u32, i32)> = (0..4).map(|i| (i, pid + 1 + i as i32)).collect();
        fixture::fake_qmp_vcpus(self.path(), vmid, &vcpus);
    }

    pub fn start(&self, vmid: u32) {
        self.hook(&self.kernel, vmid, Phase::PreStart)
            .expect("pre-start");
        self.qemu_starts(vmid);
        self.hook(&self.kernel, vmid, Phase::PostStart)
            .expect("post-start");
    }

    /// QEMU exits, systemd trims the scope (or not: `trim`), then post-stop.
    pub fn stop(&self, vmid: u32, trim: bool) {
        self.kernel.exit(Self::pid(vmid));
        if trim {
            self.kernel.trim(&format!("qemu.slice/{vmid}.scope"));
        }
        self.hook(&self.kernel, vmid, Phase::PostStop)
            .expect("post-stop");
    }

    /// `pvetune rollback` of a running VM, as the hook library does it: it must succeed and
    /// take the `vcpus` cgroup away.
    pub fn rollback_running(&self, vmid: u32) {
        let store = Store::new(&self.env.root);
        let mut state = store.load().unwrap();
        let out = pvetune::hook::rollback_vm(&self.env, &self.kernel, &store, &mut state, vmid);
        assert!(out.is_ok(), "{out:?}");
        let vcpus = format!("sys/fs/cgroup/qemu.slice/{vmid}.scope/vcpus");
        assert!(!self.path().join(vcpus).exists());
    }

    pub fn cgroups(&self) -> BTreeMap<String, Vec<u8>> {
        snapshot(&self.path().join("sys/fs/cgroup"))
    }

    /// VM `vmid` is isolated: its partition valid, its vCPU threads alone in it and pinned
    /// inside it, its other threads in the scope on housekeeping CPUs.
    pub fn assert_isolated(&self, vmid: u32, cpus: &str, running: &[u32]) {
        let scope = format!("qemu.slice/{vmid}.scope");
        let vcpus = format!("{scope}/vcpus");
        assert_eq!(self.kernel.partition_of(&vcpus), "isolated", "VM {vmid}");
        let pid = Self::pid(vmid);
        for i in 0..4 {
            let tid = pid + 1 + i;
            assert_eq!(self.kernel.cgroup_of(tid).as_deref(), Some(vcpus.as_str()));
            let cpu = set(cpus).iter().nth(i as usize).unwrap();
            assert_eq!(
                self.kernel.get_affinity(tid).unwrap(),
                CpuSet::range(cpu, cpu)
            );
        }
        let taken = running
            .iter()
            .map(|v| VMS.iter().find(|(id, _)| id == v).unwrap().1)
            .fold(CpuSet::new(), |acc, c| acc.union(&set(c)));
        for tid in [pid, pid + 5] {
            assert_eq!(self.kernel.cgroup_of(tid).as_deref(), Some(scope.as_str()));
            let aff = self.kernel.get_affinity(tid).unwrap();
            assert!(
                aff.intersection(&taken).is_empty(),
                "emulator thread {tid} on {aff}"
            );
        }
        // Host slices lose every partition's CPUs by themselves.
        assert_eq!(
            self.kernel.effective_of("system.slice"),
            set(ALL).difference(&taken)
        );
        let exclusive = read(
            self.path(),
            "/sys/fs/cgroup/qemu.slice/cpuset.cpus.exclusive",
        );
        assert_eq!(
            set(exclusive.trim()),
            taken,
            "qemu.slice holds every running VM's CPUs"
        );
    }
}
