//! The read-only verifier of kernel threads and unbound workqueues (`pvetune::kthreads`) on
//! fixture trees shaped like the kernel's: `/proc/<pid>/stat` lines and `status` files as
//! 6.x prints them (flags copied from real kthreadd, kswapd, kworker, ksoftirqd and user
//! processes), `/sys/devices/virtual/workqueue` as 6.8+ and 6.7 have it. The VM's CPUs are
//! 4-7 of 0-7 throughout, the lab's layout (docs/kernel-facts.md).

mod common;

use common::TempDir;
use pvetune::cpuset::CpuSet;
use pvetune::kthreads::{self, KthreadOnCpus, KthreadScan, WorkqueueCheck};
use pvetune::root::Root;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

// `stat` field 9 as real kernels print it (include/linux/sched.h).
/// kthreadd, khungtaskd, rcu_preempt, IRQ threads: PF_KTHREAD | PF_NOFREEZE | PF_FORKNOEXEC.
const KTHREADD: u32 = 0x0020_8040;
/// kswapd: PF_KTHREAD | PF_KSWAPD | PF_MEMALLOC | PF_FORKNOEXEC (freezable).
const KSWAPD: u32 = 0x0022_0840;
/// A workqueue worker, bound or unbound: KTHREADD | PF_NO_SETAFFINITY | PF_WQ_WORKER.
const KWORKER: u32 = 0x0420_8060;
/// ksoftirqd, migration, cpuhp (smpboot threads): KTHREADD | PF_NO_SETAFFINITY.
const PERCPU: u32 = 0x0420_8040;
/// systemd, bash: PF_RANDOMIZE | PF_SUPERPRIV, no PF_KTHREAD.
const USER: u32 = 0x0040_0100;

#[test]
fn flags_are_the_kernels_decimal_values() {
    // What `cat /proc/<pid>/stat` shows for them on a 6.x kernel.
    assert_eq!(
        [KTHREADD, KSWAPD, KWORKER, PERCPU, USER],
        [2129984, 2230336, 69238880, 69238848, 4194560]
    );
}

fn set(s: &str) -> CpuSet {
    s.parse().unwrap()
}

fn vm_cpus() -> CpuSet {
    set("4-7")
}

fn write(root: &Path, host_path: &str, text: &str) {
    let path = root.join(host_path.trim_start_matches('/'));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// A kernel thread's `stat` line, byte for byte the kernel's format (do_task_stat): ppid 2,
/// no tty, 52 fields, start time in field 22.
fn kthread_stat(pid: i32, comm: &str, flags: u32, start: u64) -> String {
    format!(
        "{pid} ({comm}) S 2 0 0 0 -1 {flags} 0 0 0 0 0 63 0 0 20 0 1 0 {start} 0 0 \
         18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
    )
}

/// A user process's `stat` line (a shell's, as the kernel printed it).
fn user_stat(pid: i32, comm: &str, flags: u32, start: u64) -> String {
    format!(
        "{pid} ({comm}) S 1 {pid} {pid} 0 -1 {flags} 9057 194335 0 461 2 9 349 156 20 0 1 0 \
         {start} 5251072 1025 18446744073709551615 94608891 94609875 140733 0 0 0 65536 \
         3686404 1266761467 0 0 0 17 1 0 0 0 0 0 94610 94611 94612 140734 140735 140736 \
         140737 0\n"
    )
}

/// A `status` (a kernel thread's lines, which a user process has more of), with the lines
/// that surround `Cpus_allowed_list` on 6.x.
fn status(pid: i32, comm: &str, kthread: bool, allowed: &str) -> String {
    let kthread = u8::from(kthread);
    let mask = pvetune::cpuset::CpuFormat::Mask.render(&set(allowed), "ff");
    format!(
        "Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\nNgid:\t0\nPid:\t{pid}\n\
         PPid:\t2\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t64\nGroups:\t \n\
         NStgid:\t{pid}\nNSpid:\t{pid}\nNSpgid:\t0\nNSsid:\t0\nKthread:\t{kthread}\nThreads:\t1\n\
         SigQ:\t0/96365\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n\
         SigBlk:\t0000000000000000\nSigIgn:\tffffffffffffffff\nSigCgt:\t0000000000000000\n\
         CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
         CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\n\
         Seccomp_filters:\t0\nSpeculation_Store_Bypass:\tvulnerable\n\
         SpeculationIndirectBranch:\talways enabled\nCpus_allowed:\t{mask}\n\
         Cpus_allowed_list:\t{allowed}\nMems_allowed:\t00000000,00000003\n\
         Mems_allowed_list:\t0-1\nvoluntary_ctxt_switches:\t292\n\
         nonvoluntary_ctxt_switches:\t0\n"
    )
}

/// A process in the fixture: its `stat`, and a `status` allowing `allowed`.
fn process(root: &Path, pid: i32, comm: &str, flags: u32, allowed: &str) {
    let start = 30 + pid as u64;
    let kthread = flags & 0x0020_0000 != 0;
    let stat = if kthread {
        kthread_stat(pid, comm, flags, start)
    } else {
        user_stat(pid, comm, flags, start)
    };
    let status = status(pid, comm, kthread, allowed);
    entry(root, &pid.to_string(), &stat, Some(&status));
}

/// `/proc/<name>/stat` and, if given, `status`, as they are.
fn entry(root: &Path, name: &str, stat: &str, status: Option<&str>) {
    write(root, &format!("/proc/{name}/stat"), stat);
    if let Some(status) = status {
        write(root, &format!("/proc/{name}/status"), status);
    }
}

/// The /proc of a host whose CPUs 4-7 are an isolated partition: most kernel threads moved
/// off (as kthreadd and kswapd0 do), per-CPU threads still on them (they cannot move), and a
/// few movable ones still allowed there.
fn host_proc(root: &Path) {
    process(root, 1, "systemd", USER, "0-7");
    process(root, 2, "kthreadd", KTHREADD, "0-3");
    process(root, 3, "pool_workqueue_release", KTHREADD, "0-3");
    process(root, 10, "kworker/0:0H-events_highpri", KWORKER, "0");
    process(root, 14, "ksoftirqd/0", PERCPU, "0");
    process(root, 40, "ksoftirqd/4", PERCPU, "4");
    process(root, 41, "kworker/4:0-events", KWORKER, "4");
    process(root, 45, "kswapd0", KSWAPD, "0-3");
    // Node 1 is CPUs 4-7: kswapd1 put back on them (a CPU that came online on 6.14/6.17).
    process(root, 46, "kswapd1", KSWAPD, "4-7");
    // An IRQ thread follows its IRQ, still on CPU 6.
    process(root, 50, "irq/24-nvme0q1", KTHREADD, "6");
    process(root, 60, "kworker/u16:3-events_unbound", KWORKER, "0-3");
    // User processes, whatever they are called or allowed: never kernel threads.
    process(root, 700, "a) (b c", USER, "4-7");
    process(root, 701, "kworker/5:1", USER, "5");
    // A comm that fools a parser splitting at the first ')' or at every space.
    process(root, 800, "kw) (x y", KTHREADD, "4");
    // Not pids: never read.
    write(root, "/proc/uptime", "1234.56 4321.00\n");
    write(root, "/proc/irq/default_smp_affinity", "ff\n");
    let zero = kthread_stat(42, "leading-zero", KTHREADD, 1);
    entry(
        root,
        "042",
        &zero,
        Some(&status(42, "leading-zero", true, "4")),
    );
    std::os::unix::fs::symlink("1", root.join("proc/self")).unwrap();
}

fn on(pid: i32, comm: &str, allowed: &str) -> KthreadOnCpus {
    KthreadOnCpus {
        pid,
        start_time: 30 + pid as u64,
        comm: comm.into(),
        allowed: set(allowed),
    }
}

#[test]
fn reports_the_movable_kthreads_still_on_the_cpus_and_counts_the_rest() {
    let dir = TempDir::new("kthreads-scan");
    host_proc(dir.path());
    let scan = kthreads::scan(&Root::new(dir.path()), &vm_cpus());
    assert_eq!(
        scan,
        KthreadScan {
            // 2, 3, 10, 14, 40, 41, 45, 46, 50, 60, 800
            total: 11,
            // 10, 14, 40, 41, 60: on CPUs 4-7 or not, they cannot move.
            fixed: 5,
            on_cpus: vec![
                on(46, "kswapd1", "4-7"),
                on(50, "irq/24-nvme0q1", "6"),
                on(800, "kw) (x y", "4"),
            ],
        }
    );
    assert!(!scan.verified());
    assert_eq!(
        scan.summary(&vm_cpus()),
        "kthreads: 11 kernel threads, 5 per-CPU or workqueue workers left alone (they cannot \
         move), 3 movable ones still allowed on CPUs 4-7: kswapd1 (pid 46, allowed 4-7), \
         irq/24-nvme0q1 (pid 50, allowed 6), kw) (x y (pid 800, allowed 4)"
    );

    // The same host seen from CPUs 0-3: kthreadd and the others are on those.
    let low = kthreads::scan(&Root::new(dir.path()), &set("0-3"));
    let pids: Vec<i32> = low.on_cpus.iter().map(|k| k.pid).collect();
    assert_eq!(pids, [2, 3, 45]);
    assert_eq!((low.total, low.fixed), (11, 5));
}

#[test]
fn kthreads_moved_off_are_not_reported() {
    let dir = TempDir::new("kthreads-moved");
    let root = dir.path();
    process(root, 1, "systemd", USER, "0-3");
    process(root, 2, "kthreadd", KTHREADD, "0-3");
    process(root, 46, "kswapd1", KSWAPD, "0-3");
    process(root, 47, "kcompactd1", KTHREADD, "0-3");
    process(root, 61, "ksoftirqd/5", PERCPU, "5");
    let scan = kthreads::scan(&Root::new(root), &vm_cpus());
    assert_eq!((scan.total, scan.fixed), (4, 1));
    assert!(scan.on_cpus.is_empty());
    assert!(scan.verified());
    assert_eq!(
        scan.summary(&vm_cpus()),
        "kthreads: 4 kernel threads, 1 per-CPU or workqueue worker left alone (it cannot move), \
         none of the movable ones on CPUs 4-7"
    );
}

#[test]
fn vanished_and_garbled_processes_are_skipped() {
    let dir = TempDir::new("kthreads-garbled");
    let root = dir.path();
    process(root, 2, "kthreadd", KTHREADD, "4-7");
    // Gone before its stat was read: an empty directory.
    fs::create_dir_all(root.join("proc/900")).unwrap();
    // Gone between its stat and its status.
    entry(root, "901", &kthread_stat(901, "k901", KTHREADD, 9), None);
    // A cut line, one without flags, flags that are no number.
    let movable = |pid| kthread_stat(pid, &format!("k{pid}"), KTHREADD, 1);
    let allowed_4 = |pid| status(pid, &format!("k{pid}"), true, "4");
    entry(root, "902", "902 (kthrea", None);
    entry(root, "903", "903 (short) S 2 0 0 0 -1\n", None);
    let hex_flags = movable(904).replace("2129984", "0x208040");
    entry(root, "904", &hex_flags, Some(&allowed_4(904)));
    // A line about another pid.
    entry(root, "905", &movable(9050), Some(&allowed_4(9050)));
    // A status without Cpus_allowed_list, one whose list is no cpulist.
    entry(
        root,
        "906",
        &movable(906),
        Some("Name:\tk906\nKthread:\t1\n"),
    );
    let cut_list = allowed_4(907).replace("Cpus_allowed_list:\t4", "Cpus_allowed_list:\t4-");
    entry(root, "907", &movable(907), Some(&cut_list));
    // Far longer than any stat or status: not read whole, not taken.
    let long_comm = kthread_stat(908, &"x".repeat(10_000), KTHREADD, 1);
    entry(root, "908", &long_comm, Some(&allowed_4(908)));
    let long_status = format!("{}{}", "Groups:\t0\n".repeat(20_000), allowed_4(909));
    entry(root, "909", &movable(909), Some(&long_status));
    // Not UTF-8.
    fs::create_dir_all(root.join("proc/910")).unwrap();
    fs::write(
        root.join("proc/910/stat"),
        b"910 (\xff) S 2 0 0 0 -1 2129984\n",
    )
    .unwrap();

    let scan = kthreads::scan(&Root::new(root), &vm_cpus());
    assert_eq!(
        scan,
        KthreadScan {
            total: 1,
            fixed: 0,
            on_cpus: vec![on(2, "kthreadd", "4-7")],
        }
    );
    assert_eq!(
        scan.summary(&vm_cpus()),
        "kthreads: 1 kernel thread, 0 per-CPU or workqueue workers left alone (they cannot \
         move), 1 movable one still allowed on CPUs 4-7: kthreadd (pid 2, allowed 4-7)"
    );
}

#[test]
fn names_five_and_counts_the_others() {
    let dir = TempDir::new("kthreads-many");
    let root = dir.path();
    for pid in (100..107).rev() {
        process(root, pid, &format!("kthread{pid}"), KTHREADD, "0-7");
    }
    let scan = kthreads::scan(&Root::new(root), &vm_cpus());
    let pids: Vec<i32> = scan.on_cpus.iter().map(|k| k.pid).collect();
    assert_eq!(pids, [100, 101, 102, 103, 104, 105, 106]);
    assert_eq!(
        scan.summary(&vm_cpus()),
        "kthreads: 7 kernel threads, 0 per-CPU or workqueue workers left alone (they cannot \
         move), 7 movable ones still allowed on CPUs 4-7: kthread100 (pid 100, allowed 0-7), \
         kthread101 (pid 101, allowed 0-7), kthread102 (pid 102, allowed 0-7), kthread103 \
         (pid 103, allowed 0-7), kthread104 (pid 104, allowed 0-7) and 2 more"
    );
}

#[test]
fn no_proc_is_not_verified() {
    let dir = TempDir::new("kthreads-noproc");
    let scan = kthreads::scan(&Root::new(dir.path()), &vm_cpus());
    assert_eq!(scan, KthreadScan::default());
    assert!(!scan.verified());
    assert_eq!(
        scan.summary(&vm_cpus()),
        "kthreads: no kernel thread found in /proc: not verified"
    );
}

const WQ: &str = "/sys/devices/virtual/workqueue";

/// A workqueue directory: `cpumask`, then `cpumask_isolated` and `cpumask_requested` where
/// given (6.8 on), with the writeback workqueue's own directory beside them.
fn workqueue_dir(root: &Path, mask: &str, isolated: Option<&str>, requested: Option<&str>) {
    write(root, &format!("{WQ}/cpumask"), &format!("{mask}\n"));
    if let Some(iso) = isolated {
        write(root, &format!("{WQ}/cpumask_isolated"), &format!("{iso}\n"));
    }
    if let Some(req) = requested {
        write(
            root,
            &format!("{WQ}/cpumask_requested"),
            &format!("{req}\n"),
        );
    }
    write(root, &format!("{WQ}/writeback/cpumask"), "ff\n");
    write(root, &format!("{WQ}/uevent"), "");
}

fn check(mask: &str, isolated: Option<&str>, requested: Option<&str>) -> WorkqueueCheck {
    let dir = TempDir::new("kthreads-wq");
    workqueue_dir(dir.path(), mask, isolated, requested);
    kthreads::workqueues(&Root::new(dir.path()), &vm_cpus())
}

#[test]
fn workqueue_mask_the_kernel_took_the_cpus_out_of() {
    // What all three lab kernels showed (docs/kernel-facts.md).
    let wq = check("0f", Some("f0"), Some("ff"));
    assert_eq!(
        wq,
        WorkqueueCheck {
            mask: Some(set("0-3")),
            isolated: Some(set("4-7")),
            requested: Some(set("0-7")),
        }
    );
    assert!(wq.verified(&vm_cpus()));
    assert!(!wq.verified(&set("3-4")));
    assert_eq!(
        wq.summary(&vm_cpus()),
        "workqueues: unbound mask 0-3 (the kernel took CPUs 4-7 out: cpumask_isolated 4-7); \
         nothing written"
    );
}

#[test]
fn workqueue_mask_on_a_64_cpu_host() {
    // nr_cpu_ids 64: two 32-bit words; the VM has CPUs 8-11 and 40.
    let wq = check(
        "fffffeff,fffff0ff",
        Some("00000100,00000f00"),
        Some("ffffffff,ffffffff"),
    );
    assert_eq!(wq.mask, Some(set("0-7,12-39,41-63")));
    let cpus = set("8-11,40");
    assert!(wq.verified(&cpus));
    assert_eq!(
        wq.summary(&cpus),
        "workqueues: unbound mask 0-7,12-39,41-63 (the kernel took CPUs 8-11,40 out: \
         cpumask_isolated 8-11,40); nothing written"
    );
}

#[test]
fn workqueue_mask_written_after_the_partition_is_not_verified() {
    // A user write applies isolated CPUs as written, until the next partition change.
    let wq = check("ff", Some("f0"), Some("ff"));
    assert!(!wq.verified(&vm_cpus()));
    assert_eq!(
        wq.summary(&vm_cpus()),
        "workqueues: unbound mask 0-7 still holds CPUs 4-7, which cpumask_isolated 4-7 takes \
         out: cpumask was written after the partition was made (cpumask_requested 0-7); the \
         next partition change takes them out; nothing written"
    );
}

#[test]
fn workqueue_mask_without_isolation_is_not_verified() {
    // The partition is invalid or a member: nothing isolated.
    let wq = check("ff", Some("00"), Some("ff"));
    assert_eq!(wq.isolated, Some(CpuSet::new()));
    assert!(!wq.verified(&vm_cpus()));
    assert_eq!(
        wq.summary(&vm_cpus()),
        "workqueues: unbound mask 0-7 still holds CPUs 4-7: the kernel does not count them as \
         isolated (cpumask_isolated none): their partition is not a valid isolated one; \
         nothing written"
    );
    // Someone wrote the mask without the CPUs: they are out, but not by isolation.
    let wq = check("0f", Some("00"), Some("0f"));
    assert!(wq.verified(&vm_cpus()));
    assert_eq!(
        wq.summary(&vm_cpus()),
        "workqueues: unbound mask 0-3, none of CPUs 4-7 (left out by the mask itself, not by \
         isolation: cpumask_isolated none); nothing written"
    );
}

#[test]
fn workqueue_files_of_a_6_7_kernel() {
    // Before 6.8 there is only `cpumask`, and partitions leave it alone.
    let wq = check("ff", None, None);
    assert_eq!(
        wq,
        WorkqueueCheck {
            mask: Some(set("0-7")),
            isolated: None,
            requested: None,
        }
    );
    assert!(!wq.verified(&vm_cpus()));
    assert_eq!(
        wq.summary(&vm_cpus()),
        "workqueues: unbound mask 0-7 still holds CPUs 4-7: this kernel has no \
         cpumask_isolated (before 6.8, isolated partitions leave the workqueue mask alone); \
         nothing written"
    );
    let wq = check("0f", None, None);
    assert!(wq.verified(&vm_cpus()));
    assert_eq!(
        wq.summary(&vm_cpus()),
        "workqueues: unbound mask 0-3, none of CPUs 4-7 (this kernel has no cpumask_isolated \
         to say why); nothing written"
    );
}

#[test]
fn absent_or_garbled_workqueue_files_are_not_verified() {
    let dir = TempDir::new("kthreads-nowq");
    let wq = kthreads::workqueues(&Root::new(dir.path()), &vm_cpus());
    assert_eq!(wq, WorkqueueCheck::default());
    assert!(!wq.verified(&vm_cpus()));
    let absent = "workqueues: /sys/devices/virtual/workqueue/cpumask cannot be read: unbound \
                  workqueues not verified; nothing written";
    assert_eq!(wq.summary(&vm_cpus()), absent);

    let wq = check("0-3", Some("f0"), Some("zz"));
    assert_eq!(
        wq,
        WorkqueueCheck {
            mask: None,
            isolated: Some(set("4-7")),
            requested: None,
        }
    );
    assert!(!wq.verified(&vm_cpus()));
    assert_eq!(wq.summary(&vm_cpus()), absent);
}

/// Every file under `root` with its bytes.
fn contents(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                let name = entry.path().to_string_lossy().into_owned();
                out.insert(name, fs::read(entry.path()).unwrap());
            }
        }
    }
    out
}

#[test]
fn nothing_is_written() {
    let dir = TempDir::new("kthreads-readonly");
    host_proc(dir.path());
    workqueue_dir(dir.path(), "ff", Some("f0"), Some("ff"));
    let before = contents(dir.path());
    let root = Root::new(dir.path());
    let scan = kthreads::scan(&root, &vm_cpus());
    let wq = kthreads::workqueues(&root, &vm_cpus());
    assert_eq!(scan.on_cpus.len(), 3);
    assert!(!wq.verified(&vm_cpus()));
    assert_eq!(contents(dir.path()), before);
}
