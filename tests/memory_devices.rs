//! `hugepages:`, `ksm:` and `pci-reset:` on the Xeon fixture (examples/hosts/xeon-2s, VM 201:
//! 16 GiB of 1 GiB pages on node 0, the GPU at 0b:00 with two functions), through a model of
//! the kernel's side ([`Kernel`]): a pool gives at most `limit` pages and says nothing, a
//! function's `remove` takes its sysfs entry away and `rescan` brings every removed one back.
//! The real kernels are scenario `60-memory-devices.sh`'s job.

mod fixture;

use fixture::{host_copy, pvetune, read, snapshot, stderr, stdout, write};
use pvetune::hook::{self, Env};
use pvetune::host::{Host, RealHost};
use pvetune::plan::Phase;
use pvetune::root::Root;
use std::cell::{Cell, RefCell};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const POOL0: &str = "/sys/devices/system/node/node0/hugepages/hugepages-1048576kB/nr_hugepages";
const KSM: &str = "/sys/kernel/mm/ksm/run";
const GPU: [&str; 2] = ["0000:0b:00.0", "0000:0b:00.1"];

struct Kernel {
    root: PathBuf,
    stash: fixture::Root,
    /// The most pages a pool can hold (memory that is short or fragmented).
    limit: Option<u64>,
    /// The next rescans to fail with EIO.
    fail_rescans: Cell<u32>,
    /// Every write, as (host path, value).
    log: RefCell<Vec<(String, String)>>,
}

impl Kernel {
    fn new(root: &Path) -> Kernel {
        Kernel {
            root: root.to_path_buf(),
            stash: fixture::temp_dir("pci-stash"),
            limit: None,
            fail_rescans: Cell::new(0),
            log: RefCell::new(Vec::new()),
        }
    }

    fn writes_to(&self, suffix: &str) -> Vec<String> {
        self.log
            .borrow()
            .iter()
            .filter(|(p, _)| p.ends_with(suffix))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

impl Host for Kernel {
    fn read(&self, path: &Path) -> io::Result<String> {
        RealHost.read(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let host = Root::new(&self.root).host_path(path);
        let host = host.to_string_lossy().into_owned();
        self.log
            .borrow_mut()
            .push((host.clone(), value.trim().to_string()));
        if host.starts_with("/sys/bus/pci/devices/") && host.ends_with("/remove") {
            let dev = path.parent().unwrap();
            return fs::rename(dev, self.stash.path.join(dev.file_name().unwrap()));
        }
        if host == "/sys/bus/pci/rescan" {
            if self.fail_rescans.get() > 0 {
                self.fail_rescans.set(self.fail_rescans.get() - 1);
                return Err(io::Error::from_raw_os_error(nix::libc::EIO));
            }
            for e in fs::read_dir(&self.stash.path)? {
                let e = e?;
                fs::rename(
                    e.path(),
                    self.root.join("sys/bus/pci/devices").join(e.file_name()),
                )?;
            }
            return Ok(());
        }
        // Write-only triggers: they run, and there is nothing to read back.
        if ["/compact", "/compact_memory", "/drop_caches", "/reset"]
            .iter()
            .any(|t| host.ends_with(t))
        {
            return Ok(());
        }
        if let (Some(limit), true) = (self.limit, host.ends_with("/nr_hugepages")) {
            let asked: u64 = value.trim().parse().unwrap();
            return RealHost.write(path, &format!("{}\n", asked.min(limit)));
        }
        RealHost.write(path, value)
    }
    fn get_affinity(&self, tid: i32) -> io::Result<pvetune::cpuset::CpuSet> {
        RealHost.get_affinity(tid)
    }
    fn set_affinity(&self, tid: i32, cpus: &pvetune::cpuset::CpuSet) -> io::Result<()> {
        RealHost.set_affinity(tid, cpus)
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        RealHost.mkdir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        RealHost.rmdir(path)
    }
}

fn env(root: &Path) -> Env {
    Env {
        root: Root::new(root),
        profile: None,
    }
}

fn hook(root: &Path, kernel: &Kernel, vmid: u32, phase: Phase) -> Result<String, String> {
    hook::run_hook(&env(root), kernel, vmid, phase).map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })
}

/// qemu-server holds the VM's config lock for its whole start: the VM counts as starting,
/// so other VMs' hooks do not reconcile it away.
struct Starting {
    _lock: nix::fcntl::Flock<fs::File>,
}

fn starting(root: &Path, vmid: u32) -> Starting {
    let dir = root.join("var/lock/qemu-server");
    fs::create_dir_all(&dir).unwrap();
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("lock-{vmid}.conf")))
        .unwrap();
    Starting {
        _lock: nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).unwrap(),
    }
}

fn pool(root: &Path) -> String {
    read(root, POOL0).trim().to_string()
}

/// VM 202: like 201 with 8 GiB, on node 0 as well, no devices, and a profile of memory keys
/// only (no `cpus`: the VM owns no CPUs, the CPU tunables do nothing for it).
fn second_vm(root: &Path) {
    let conf = read(root, "/etc/pve/qemu-server/201.conf")
        .replace("memory=16384", "memory=8192")
        .replace("memory: 16384", "memory: 8192")
        .replace("cores: 6", "cores: 2")
        .replace("cpus=0-5", "cpus=0-1")
        .replace("hostpci0: 0b:00,pcie=1,x-vga=1\n", "");
    write(root, "/etc/pve/qemu-server/202.conf", &conf);
    write(
        root,
        "/etc/pve/pvetune/202.yaml",
        "hugepages:\n  reserve: true\nksm:\n  pause: true\n",
    );
}

type Tree = std::collections::BTreeMap<String, Vec<u8>>;

/// The tree without the run-time files a test adds (locks).
fn tree(root: &Path) -> Tree {
    let mut t = snapshot(root);
    t.retain(|k, _| !k.starts_with("var/lock"));
    t
}

/// Fails naming the files that differ (not dumping both trees).
fn assert_same(after: &Tree, before: &Tree, what: &str) {
    let differ: Vec<(&String, String)> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            let show = |t: &Tree| {
                t.get(k).map_or("(absent)".into(), |v| {
                    String::from_utf8_lossy(v).into_owned()
                })
            };
            (k, format!("{:?} -> {:?}", show(before), show(after)))
        })
        .collect();
    assert!(differ.is_empty(), "{what}: {differ:?}");
}

#[test]
fn plan_shows_every_memory_and_device_step_as_before_and_after() {
    let host = host_copy("xeon-2s");
    let out = pvetune(&host.path, &["plan", "201", "--phase", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "  PCI 0000:0b:00.0 0000:0b:00.1 remove, rescan: 0000:0b:00.0 present (vfio-pci), \
         0000:0b:00.1 present (vfio-pci) -> 0000:0b:00.0 back (vfio-pci), 0000:0b:00.1 back \
         (vfio-pci)",
        "  sync (dirty pages written back): dirty pages -> written back",
        "  /proc/sys/vm/drop_caches: (trigger) -> 1",
        "  /sys/devices/system/node/node0/compact: (trigger) -> 1",
        &format!("  {POOL0} (+16 for this VM): 0 -> 16"),
        "  /sys/kernel/mm/ksm/run: 1 -> 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let check = pvetune(&host.path, &["check", "201"]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        stdout(&check).contains("prefer 'allow-ksm: 0'"),
        "{}",
        stdout(&check)
    );
    // A qemu-server without the switch: pausing is the way.
    let pm = "/usr/share/perl5/PVE/QemuServer.pm";
    write(
        &host.path,
        pm,
        "my $confdesc = {\n    affinity => {},\n};\n",
    );
    let check = pvetune(&host.path, &["check", "201"]);
    assert!(
        stdout(&check).contains("this qemu-server has no 'allow-ksm'"),
        "{}",
        stdout(&check)
    );
    write(&host.path, pm, "    'allow-ksm' => {\n");
    let check = pvetune(&host.path, &["check", "201"]);
    assert!(
        stdout(&check).contains("prefer 'allow-ksm: 0'"),
        "{}",
        stdout(&check)
    );
}

#[test]
fn reservations_of_two_vms_add_up_and_are_released_in_either_order() {
    for first_stop in [201, 202] {
        let host = host_copy("xeon-2s");
        second_vm(&host.path);
        let before = tree(&host.path);
        let kernel = Kernel::new(&host.path);
        let a = starting(&host.path, 201);
        hook(&host.path, &kernel, 201, Phase::PreStart).unwrap();
        assert_eq!(pool(&host.path), "16");
        assert_eq!(read(&host.path, KSM).trim(), "0");
        let b = starting(&host.path, 202);
        hook(&host.path, &kernel, 202, Phase::PreStart).unwrap();
        assert_eq!(pool(&host.path), "24", "the two reservations add up");
        // Compaction ran for each start, on node 0 only (where the pages come from).
        assert_eq!(kernel.writes_to("/compact").len(), 2);
        assert!(kernel.writes_to("node1/compact").is_empty());
        let (first, second, left) = if first_stop == 201 {
            (201, 202, "8")
        } else {
            (202, 201, "16")
        };
        // The first one stops (its lock goes), the other still runs (holds its lock).
        let (first_lock, second_lock) = if first == 201 { (a, b) } else { (b, a) };
        drop(first_lock);
        hook(&host.path, &kernel, first, Phase::PostStop).unwrap();
        assert_eq!(pool(&host.path), left, "{first} stopped first");
        assert_eq!(
            read(&host.path, KSM).trim(),
            "0",
            "KSM stays paused for {second}"
        );
        drop(second_lock);
        hook(&host.path, &kernel, second, Phase::PostStop).unwrap();
        assert_same(
            &tree(&host.path),
            &before,
            &format!("{first} stopped first"),
        );
    }
}

#[test]
fn a_shortfall_fails_pre_start_and_leaves_the_pool_as_it_was() {
    let host = host_copy("xeon-2s");
    let before = tree(&host.path);
    let mut kernel = Kernel::new(&host.path);
    kernel.limit = Some(10);
    let err = hook(&host.path, &kernel, 201, Phase::PreStart).unwrap_err();
    assert!(
        err.contains("node 0, 1 GiB pages: the kernel gave 10 of the 16 pages"),
        "{err}"
    );
    assert!(err.contains("pvetune reserve"), "what to do: {err}");
    assert_eq!(pool(&host.path), "0", "the pool as it was");
    // The devices were reset before the reservation failed: back, and nothing held.
    assert_same(&tree(&host.path), &before, "after the shortfall");
    let status = pvetune::report::status(&env(&host.path), Some(201)).unwrap();
    assert!(!status.join("\n").contains("nr_hugepages"), "{status:?}");
}

#[test]
fn the_preflight_refuses_a_start_that_cannot_succeed_before_anything_changes() {
    let host = host_copy("xeon-2s");
    let meminfo = "/sys/devices/system/node/node0/meminfo";
    let text = read(&host.path, meminfo).replace("50331648 kB", "  4194304 kB");
    write(&host.path, meminfo, &text);
    let before = tree(&host.path);
    let out = pvetune(&host.path, &["201", "pre-start"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("node 0: the VM needs 16 pages of 1 GiB there (16384 MiB)"),
        "{err}"
    );
    assert!(err.contains("room for at most 8 more"), "{err}");
    assert_same(&tree(&host.path), &before, "after the refusal");
}

#[test]
fn a_release_never_raises_a_pool_qemu_server_shrank() {
    let host = host_copy("xeon-2s");
    write(&host.path, POOL0, "4\n");
    let kernel = Kernel::new(&host.path);
    hook(&host.path, &kernel, 201, Phase::PreStart).unwrap();
    assert_eq!(pool(&host.path), "20");
    // keephugepages 0: qemu-server shrank the pool after the start, the VM's pages went
    // back when it stopped.
    write(&host.path, POOL0, "1\n");
    hook(&host.path, &kernel, 201, Phase::PostStop).unwrap();
    assert_eq!(pool(&host.path), "1", "not raised back to 4");
}

#[test]
fn what_qemu_server_refuses_is_refused_with_the_profile_place() {
    let host = host_copy("xeon-2s");
    let conf = "/etc/pve/qemu-server/201.conf";
    let original = read(&host.path, conf);
    for (edit, says) in [
        (("numa: 1\n", ""), "not 'numa: 1'"),
        (("hugepages: 1024\n", ""), "has no 'hugepages:'"),
        (("hostnodes=0", "hostnodes=0-1"), "more than one host node"),
        (("hostnodes=0", "hostnodes=7"), "host node 7"),
    ] {
        write(&host.path, conf, &original.replace(edit.0, edit.1));
        let out = pvetune(&host.path, &["check", "201"]);
        assert_eq!(out.status.code(), Some(2), "{edit:?}");
        let err = stderr(&out);
        assert!(err.contains("201.yaml:6:3: hugepages:"), "{err}");
        assert!(err.contains(says), "{edit:?}: {err}");
    }
    write(&host.path, conf, &original);
    let cpuinfo = read(&host.path, "/proc/cpuinfo").replace(" pdpe1gb", "");
    write(&host.path, "/proc/cpuinfo", &cpuinfo);
    let out = pvetune(&host.path, &["check", "201"]);
    assert!(stderr(&out).contains("no pdpe1gb flag"), "{}", stderr(&out));
}

#[test]
fn remove_rescan_removes_function_0_last_and_waits_for_every_function() {
    let host = host_copy("xeon-2s");
    let before = tree(&host.path);
    let kernel = Kernel::new(&host.path);
    let profile = "cpus: 2-7\npci-reset: {}\n";
    write(&host.path, "/etc/pve/pvetune/201.yaml", profile);
    hook(&host.path, &kernel, 201, Phase::PreStart).unwrap();
    let pci: Vec<String> = kernel
        .log
        .borrow()
        .iter()
        .map(|(p, _)| p.clone())
        .filter(|p| p.starts_with("/sys/bus/pci"))
        .collect();
    assert_eq!(
        pci,
        [
            "/sys/bus/pci/devices/0000:0b:00.1/remove",
            "/sys/bus/pci/devices/0000:0b:00.0/remove",
            "/sys/bus/pci/rescan",
        ]
    );
    let status = pvetune::report::status(&env(&host.path), None).unwrap();
    assert!(
        !status.join("\n").contains("rescan"),
        "released: {status:?}"
    );
    hook(&host.path, &kernel, 201, Phase::PostStop).unwrap();
    let mut before = before;
    before.insert(
        "etc/pve/pvetune/201.yaml".into(),
        profile.as_bytes().to_vec(),
    );
    assert_same(&tree(&host.path), &before, "after post-stop");
}

#[test]
fn a_removal_that_did_not_come_back_is_rescanned_by_the_next_rollback() {
    let host = host_copy("xeon-2s");
    write(
        &host.path,
        "/etc/pve/pvetune/201.yaml",
        "cpus: 2-7\npci-reset:\n  timeout: 1\n",
    );
    let kernel = Kernel::new(&host.path);
    // The rescan fails, and so does the undo's: the functions stay removed, and the ledger
    // says so.
    kernel.fail_rescans.set(2);
    let err = hook(&host.path, &kernel, 201, Phase::PreStart).unwrap_err();
    assert!(err.contains("/sys/bus/pci/rescan"), "{err}");
    for f in GPU {
        assert!(!host.path.join(format!("sys/bus/pci/devices/{f}")).exists());
    }
    let status = pvetune::report::status(&env(&host.path), Some(201)).unwrap();
    assert!(
        status.join("\n").contains("not rescanned yet"),
        "{status:?}"
    );
    pvetune::hook::rollback_command(&env(&host.path), &kernel, 201).unwrap();
    for f in GPU {
        assert!(
            host.path.join(format!("sys/bus/pci/devices/{f}")).exists(),
            "{f}"
        );
    }
    let status = pvetune::report::status(&env(&host.path), Some(201)).unwrap();
    assert!(!status.join("\n").contains("rescan"), "{status:?}");
}

#[test]
fn absent_devices_and_host_drivers_are_refused_before_anything_changes() {
    let host = host_copy("xeon-2s");
    let before = tree(&host.path);
    for (devices, says) in [
        (
            "[0000:0b:00.0, 0000:0e:00.0]",
            "PCI 0000:0e:00.0 (profile) is not present",
        ),
        (
            "[0000:01:00.0]",
            "bound to the host driver nvme, not vfio-pci",
        ),
        ("[0000:0b:00]", "invalid PCI address '0000:0b:00'"),
        ("[0000:0B:00.0]", "invalid PCI address"),
    ] {
        let profile = format!("cpus: 2-7\npci-reset:\n  devices: {devices}\n");
        write(&host.path, "/etc/pve/pvetune/201.yaml", &profile);
        let out = pvetune(&host.path, &["201", "pre-start"]);
        assert_eq!(out.status.code(), Some(2), "{devices}");
        let err = stderr(&out);
        assert!(err.contains("201.yaml:"), "{err}");
        assert!(err.contains(says), "{devices}: {err}");
    }
    let original = before["etc/pve/pvetune/201.yaml"].clone();
    write(
        &host.path,
        "/etc/pve/pvetune/201.yaml",
        &String::from_utf8(original).unwrap(),
    );
    assert_same(&tree(&host.path), &before, "after the refusals");
    // Allowed by the switch: reset, and a warning.
    let profile = "cpus: 2-7\npci-reset:\n  devices: [0000:01:00.0]\n  allow-host-driver: true\n";
    write(&host.path, "/etc/pve/pvetune/201.yaml", profile);
    let out = pvetune(&host.path, &["plan", "201", "--phase", "pre-start"]);
    assert!(stdout(&out).contains("warning: PCI 0000:01:00.0 is bound to the host driver nvme"));
}

#[test]
fn a_mapping_resolves_to_this_nodes_functions() {
    let host = host_copy("xeon-2s");
    write(&host.path, "/proc/sys/kernel/hostname", "pve2\n");
    write(
        &host.path,
        "/etc/pve/mapping/pci.cfg",
        "gpu\n\tmap id=10de:2204,node=pve1,path=0000:0c:00.0\n\
         \tmap id=10de:2204,node=pve2,path=0000:0b:00\n\n\
         nic\n\tmap id=8086:1533,node=pve2,path=0000:01:00.0\n",
    );
    let conf = read(&host.path, "/etc/pve/qemu-server/201.conf").replace(
        "hostpci0: 0b:00,pcie=1,x-vga=1",
        "hostpci0: mapping=gpu,pcie=1",
    );
    write(&host.path, "/etc/pve/qemu-server/201.conf", &conf);
    write(
        &host.path,
        "/etc/pve/pvetune/201.yaml",
        "cpus: 2-7\npci-reset: {}\n",
    );
    let out = pvetune(&host.path, &["plan", "201", "--phase", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("PCI 0000:0b:00.0 0000:0b:00.1 remove, rescan"),
        "{}",
        stdout(&out)
    );
    write(&host.path, "/proc/sys/kernel/hostname", "pve3\n");
    let out = pvetune(&host.path, &["check", "201"]);
    assert!(
        stderr(&out).contains("mapping 'gpu' has no device for node 'pve3'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ksmtuned_is_warned_about() {
    let host = host_copy("xeon-2s");
    // A process named ksmtuned: this test's own pid linked in with that comm.
    let fake = host.path.join("proc/4242");
    fs::create_dir_all(&fake).unwrap();
    fs::write(fake.join("comm"), "ksmtuned\n").unwrap();
    let out = pvetune(&host.path, &["check", "201"]);
    assert!(
        stdout(&out).contains("warning: ksm: ksmtuned runs (pid 4242)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn reserve_at_boot_keeps_the_pages_for_the_vm_across_its_stops() {
    let host = host_copy("xeon-2s");
    let before = tree(&host.path);
    let profile = "cpus: 2-7\nhugepages:\n  boot: true\n";
    write(&host.path, "/etc/pve/pvetune/201.yaml", profile);
    second_vm(&host.path);
    let out = pvetune(&host.path, &["reserve"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("VM 201: node 0: 16 x 1 GiB reserved at boot (pool now 16)"),
        "{}",
        stdout(&out)
    );
    // 202's profile does not ask: nothing for it.
    assert!(!stdout(&out).contains("VM 202"), "{}", stdout(&out));
    assert_eq!(pool(&host.path), "16");
    let again = pvetune(&host.path, &["reserve"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(pool(&host.path), "16", "a second run adds nothing");
    let kernel = Kernel::new(&host.path);
    hook(&host.path, &kernel, 201, Phase::PreStart).unwrap();
    assert_eq!(pool(&host.path), "16", "the start finds its pages reserved");
    hook(&host.path, &kernel, 201, Phase::PostStop).unwrap();
    assert_eq!(pool(&host.path), "16", "kept after the stop");
    // Another VM's hook reconciles: the boot reservation is not a leftover.
    let b = starting(&host.path, 202);
    hook(&host.path, &kernel, 202, Phase::PreStart).unwrap();
    assert_eq!(pool(&host.path), "24");
    drop(b);
    hook(&host.path, &kernel, 202, Phase::PostStop).unwrap();
    assert_eq!(pool(&host.path), "16");
    let status = pvetune::report::status(&env(&host.path), None).unwrap();
    assert!(
        status.join("\n").contains("(VM 201 reserves 16)"),
        "{status:?}"
    );
    let out = pvetune(&host.path, &["rollback", "201"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(pool(&host.path), "0");
    let mut before = before;
    for (k, v) in tree(&host.path) {
        if k.contains("202.") || k == "etc/pve/pvetune/201.yaml" {
            before.insert(k, v);
        }
    }
    assert_same(&tree(&host.path), &before, "after rollback");
}

#[test]
fn reserve_warns_without_keephugepages_and_reports_a_vm_it_cannot_reserve() {
    let host = host_copy("xeon-2s");
    let conf = read(&host.path, "/etc/pve/qemu-server/201.conf").replace("keephugepages: 1\n", "");
    write(&host.path, "/etc/pve/qemu-server/201.conf", &conf);
    write(
        &host.path,
        "/etc/pve/pvetune/201.yaml",
        "cpus: 2-7\nhugepages:\n  boot: true\n",
    );
    let out = pvetune(&host.path, &["reserve"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("warning: VM 201: no 'keephugepages: 1'"),
        "{}",
        stdout(&out)
    );
    pvetune(&host.path, &["rollback", "201"]);
    write(
        &host.path,
        "/etc/pve/pvetune/200.yaml",
        "cpus: 8\nbogus: 1\n",
    );
    let out = pvetune(&host.path, &["reserve"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("1 VM(s) not reserved"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pool(&host.path), "16", "VM 201 reserved all the same");
}

#[test]
fn a_failure_at_any_change_of_pre_start_leaves_the_host_as_it_was() {
    // VM 201's whole pre-start: two removes, the rescan, drop_caches, compaction, the
    // reservation, KSM. Each mutation in turn fails (EIO); the host ends as it was, every
    // function back, and the ledger holds no claim.
    let mut failed_somewhere = 0;
    for k in 1.. {
        let host = host_copy("xeon-2s");
        let before = tree(&host.path);
        let kernel = pvetune::host::FailAt::new(Kernel::new(&host.path), k);
        let result = hook::run_hook(&env(&host.path), &kernel, 201, Phase::PreStart);
        if result.is_ok() {
            assert!(k > 5, "pre-start has more than {k} changes");
            break;
        }
        failed_somewhere += 1;
        let mut after = tree(&host.path);
        after.retain(|k, _| k.starts_with("sys/") || k.starts_with("proc/"));
        let mut want = before.clone();
        want.retain(|k, _| k.starts_with("sys/") || k.starts_with("proc/"));
        assert_same(&after, &want, &format!("failure at change {k}"));
        let state = pvetune::state::Store::new(&Root::new(&host.path))
            .load()
            .unwrap();
        assert!(state.claims.is_empty(), "change {k}: {:?}", state.claims);
    }
    assert!(failed_somewhere >= 6, "{failed_somewhere}");
}

#[test]
fn a_vm_joining_a_pool_counts_what_it_holds_now_not_when_the_first_reserved() {
    let host = host_copy("xeon-2s");
    second_vm(&host.path);
    // 10 pages of another VM (started by qemu-server without pvetune) when 201 reserves.
    write(&host.path, POOL0, "10\n");
    let kernel = Kernel::new(&host.path);
    let _a = starting(&host.path, 201);
    hook(&host.path, &kernel, 201, Phase::PreStart).unwrap();
    assert_eq!(pool(&host.path), "26");
    // That VM stopped: its 10 pages went back to the kernel.
    write(&host.path, POOL0, "16\n");
    let b = starting(&host.path, 202);
    hook(&host.path, &kernel, 202, Phase::PreStart).unwrap();
    assert_eq!(
        pool(&host.path),
        "24",
        "16 of 201's and 202's 8, not the 10 gone"
    );
    drop(b);
    hook(&host.path, &kernel, 202, Phase::PostStop).unwrap();
    assert_eq!(pool(&host.path), "16");
    drop(_a);
    hook(&host.path, &kernel, 201, Phase::PostStop).unwrap();
    assert_eq!(pool(&host.path), "0");
}
