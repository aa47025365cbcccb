//! The hook against a real QEMU, exactly as Proxmox calls it: `pvetune --root R <vmid>
//! post-start` pins the vCPU, iothread and emulator threads of a paused QEMU (`-S`), each
//! thread's `Cpus_allowed_list` in the real `/proc` is checked, and `post-stop` restores
//! every thread's original affinity.
//!
//! The fixture root holds a host tree shaped like sysfs with as many CPUs as this test may
//! use, so the pins are real; governor and sysctl writes land in the fixture. Only
//! `/proc/<qemu pid>` of the real /proc is linked into it. Without `qemu-system-x86_64` the
//! test fails (CI installs `qemu-system-x86`) unless `PVETUNE_LAB=skip` is set.

mod common;
mod fixture;

use common::QemuGuard;
use common::hostgen::{self, CpuFreqSpec, HostSpec, NodeSpec, Numbering, write_host};
use fixture::{pvetune, read, snapshot, stderr, stdout, temp_dir, write};
use pvetune::cpuset::CpuSet;
use pvetune::qmp::Qmp;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const QEMU: &str = "qemu-system-x86_64";

/// A running QEMU; dropping it (also on a panic) kills it and removes the fixture root.
struct Vm {
    pid: i32,
    _guard: QemuGuard,
}

/// The CPUs this test process may run on: the host the fixture pretends to be.
fn usable_cpus() -> CpuSet {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    list.trim().parse().unwrap()
}

/// A fixture host with the first two usable CPUs as one SMT core (CPU 0 and 1 here).
fn fixture_root(name: &str) -> Option<fixture::Root> {
    if Command::new(QEMU).arg("--version").output().is_err() {
        if std::env::var("PVETUNE_LAB").as_deref() == Ok("skip") {
            println!("skipped: {QEMU} missing and PVETUNE_LAB=skip");
            return None;
        }
        panic!("{QEMU} not found: apt-get install qemu-system-x86 (or PVETUNE_LAB=skip)");
    }
    let cpus = usable_cpus();
    assert!(
        cpus.contains(0) && cpus.contains(1),
        "needs CPUs 0 and 1, may use {cpus}"
    );
    let root = temp_dir(name);
    write_host(
        &root.path,
        &HostSpec {
            packages: 1,
            cores_per_package: 1,
            threads_per_core: 2,
            numbering: Numbering::Interleaved,
            cores_per_l3: 1,
            nodes: vec![NodeSpec {
                cores: vec![0],
                mem_total_kib: 4 << 20,
                hugepages: vec![(2048, 0)],
            }],
            cpufreq: Some(CpuFreqSpec {
                driver: "acpi-cpufreq",
                governors: &["ondemand", "performance", "schedutil"],
                governor: "schedutil",
            }),
            isolated: CpuSet::new(),
            offline: CpuSet::new(),
            hybrid: None,
            kernel: hostgen::PVE9_KERNEL,
        },
    );
    Some(root)
}

/// Starts QEMU paused, the way qemu-server does, with its pidfile and QMP socket in the root.
fn start_qemu(root: &Path, vmid: u32) -> Vm {
    // Before the spawn: whatever panics from here on, no QEMU naming this root survives.
    let guard = QemuGuard {
        root: root.to_path_buf(),
    };
    let run = root.join("var/run/qemu-server");
    std::fs::create_dir_all(&run).unwrap();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let output = Command::new(QEMU)
        .args(["-accel", if kvm { "kvm" } else { "tcg,thread=multi" }])
        .args([
            "-machine",
            "q35",
            "-m",
            "64",
            "-smp",
            "2,sockets=1,cores=1,threads=2",
        ])
        .args(["-object", "iothread,id=iothread-virtioscsi0"])
        .args(["-nographic", "-nodefaults", "-S", "-daemonize"])
        .arg("-pidfile")
        .arg(run.join(format!("{vmid}.pid")))
        .arg("-qmp")
        .arg(format!(
            "unix:{}/{vmid}.qmp,server=on,wait=off",
            run.display()
        ))
        .args(["-name", "pvetune-test-hook,debug-threads=on"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pid: i32 = std::fs::read_to_string(run.join(format!("{vmid}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::os::unix::fs::symlink(format!("/proc/{pid}"), root.join(format!("proc/{pid}"))).unwrap();
    Vm { pid, _guard: guard }
}

/// tid -> (comm, Cpus_allowed_list) of every thread of the process, from the real /proc.
fn threads(pid: i32) -> BTreeMap<i32, (String, String)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid: i32 = entry.file_name().to_string_lossy().parse().unwrap();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.insert(tid, (comm.trim().to_string(), allowed));
    }
    out
}

fn iothread_tid(root: &Path, vmid: u32) -> i32 {
    let mut qmp = Qmp::connect(&root.join(format!("var/run/qemu-server/{vmid}.qmp"))).unwrap();
    let io = qmp.query_iothreads().unwrap();
    io.iter()
        .find(|t| t.id == "iothread-virtioscsi0")
        .unwrap()
        .thread_id
}

#[test]
fn post_start_pins_real_qemu_threads_and_post_stop_restores_them() {
    let Some(tree) = fixture_root("qemu-hook") else {
        return;
    };
    let root = tree.path.clone();
    let vmid = 9301;
    write(
        &root,
        &format!("/etc/pve/qemu-server/{vmid}.conf"),
        "cores: 1\nsockets: 1\nmemory: 64\nargs: -smp 2,sockets=1,cores=1,threads=2\n",
    );
    // vCPU 0 -> CPU 1 and vCPU 1 -> CPU 0: a mapping that default affinities cannot fake.
    write(
        &root,
        &format!("/etc/pvetune/profiles/{vmid}.yaml"),
        "cpus: 0-1\nvcpus: [1, 0]\nemulator: 0\niothreads: 1\ngovernor: performance\nsysctl:\n  vm.stat_interval: 120\n",
    );
    let before_tree = snapshot(&root);
    let id = vmid.to_string();
    let out = pvetune(&root, &[&id, "pre-start"]);
    assert!(out.status.success(), "pre-start: {}", stderr(&out));
    let vm = start_qemu(&root, vmid);
    let before = threads(vm.pid);

    let out = pvetune(&root, &[&id, "post-start"]);
    assert!(out.status.success(), "post-start: {}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("pvetune: VM {vmid} post-start:")),
        "{}",
        stdout(&out)
    );
    let io = iothread_tid(&root, vmid);
    let after = threads(vm.pid);
    let mut vcpus = 0;
    for (tid, (comm, allowed)) in &after {
        let expected = match comm.as_str() {
            "CPU 0/KVM" | "CPU 0/TCG" => "1",
            "CPU 1/KVM" | "CPU 1/TCG" => "0",
            _ if *tid == io => "1",
            _ => "0",
        };
        vcpus += usize::from(comm.starts_with("CPU "));
        assert_eq!(allowed, expected, "thread {tid} ({comm})");
    }
    assert_eq!(vcpus, 2, "{after:?}");
    assert_eq!(read(&root, "/proc/sys/vm/stat_interval"), "120\n");
    assert_eq!(
        read(
            &root,
            "/sys/devices/system/cpu/cpufreq/policy0/scaling_governor"
        ),
        "performance\n"
    );

    // post-stop while QEMU still runs (as the issue asks): every thread gets its old affinity.
    let out = pvetune(&root, &[&id, "post-stop"]);
    assert!(out.status.success(), "post-stop: {}", stderr(&out));
    let restored = threads(vm.pid);
    for (tid, (comm, allowed)) in &restored {
        if let Some((_, old)) = before.get(tid) {
            assert_eq!(allowed, old, "thread {tid} ({comm}) not restored");
        }
    }
    assert_eq!(snapshot(&root), before_tree);
}

#[test]
fn auto_layout_pairs_guest_siblings_on_a_host_core() {
    let Some(tree) = fixture_root("qemu-auto") else {
        return;
    };
    let root = tree.path.clone();
    let vmid = 9302;
    write(
        &root,
        &format!("/etc/pve/qemu-server/{vmid}.conf"),
        "cores: 1\nmemory: 64\nargs: -smp 2,sockets=1,cores=1,threads=2\n",
    );
    write(
        &root,
        &format!("/etc/pvetune/profiles/{vmid}.yaml"),
        "cpus: 0-1\nemulator: vm\niothreads: vm\n",
    );
    let id = vmid.to_string();
    assert!(pvetune(&root, &[&id, "pre-start"]).status.success());
    let vm = start_qemu(&root, vmid);
    let plan = stdout(&pvetune(&root, &["plan", &id, "--phase", "post-start"]));
    assert!(plan.contains("layout smt-pairs"), "{plan}");
    let out = pvetune(&root, &[&id, "post-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (tid, (comm, allowed)) in threads(vm.pid) {
        let expected = match comm.as_str() {
            "CPU 0/KVM" | "CPU 0/TCG" => "0",
            "CPU 1/KVM" | "CPU 1/TCG" => "1",
            _ => "0-1",
        };
        assert_eq!(allowed, expected, "thread {tid} ({comm})");
    }
    let status = stdout(&pvetune(&root, &["status", &id]));
    assert!(
        status.contains(&format!("VM {vmid}: running (pid {})", vm.pid)),
        "{status}"
    );
    assert!(pvetune(&root, &[&id, "post-stop"]).status.success());
}
