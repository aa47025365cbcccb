//! `kill -9` at every mutating system call of the real binary, for real: strace's fault
//! injection (`-e inject=<syscall>:signal=KILL:when=<n>`) kills `pvetune` on entry to its k-th
//! mutating call (the call itself never runs), for every k of a full profile's pre-start,
//! post-start, post-stop and rollback; then the recovery runs as it would on a host (the phase
//! retried as qemu-server does, post-stop, or `pvetune rollback`), and every file of the
//! fixture tree must be back byte for byte, every thread's affinity as it was, and the ledger
//! as before. No test-only code in pvetune.
//!
//! "Mutating" is taken from a first, uninjected run under strace: every `write`/`writev`/
//! `pwrite64` except to stdout and stderr, every `openat` that creates, truncates or opens for
//! writing, and every rename, unlink, mkdir, rmdir, fsync, fdatasync, ftruncate and
//! `sched_setaffinity`. strace counts invocations per system call, so the k-th mutating call
//! of the whole run is addressed as "the n-th call of that system call".
//!
//! The host is the Ryzen 5900X fixture. VM 100 (CPUs 1,13; one vCPU, so that its pin lands on
//! a CPU this machine has) claims every IRQ's affinity and the default affinity, a sysctl and
//! two governors, and pins the threads of a stand-in QEMU with real threads (a threaded perl,
//! linked into the root's /proc). VM 101 runs beside it the whole time and holds the same
//! claims, so each recovery must give back exactly VM 100's share.

mod fixture;

use fixture::{FakeVm, fake_qmp_vcpus, host_copy, pvetune, snapshot, start_vm, stderr, stdout};
use pvetune::cpuset::CpuSet;
use pvetune::host::{Host, RealHost};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The system calls traced; which of their invocations count as mutating is decided per line.
const TRACED: &str = "write,writev,pwrite64,pwritev,openat,rename,renameat,renameat2,unlink,\
                      unlinkat,mkdir,mkdirat,rmdir,fsync,fdatasync,ftruncate,sched_setaffinity";

fn strace_present() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `false` (with the reason printed) when strace is missing and nothing requires it; a
/// missing strace fails the test when `PVETUNE_REQUIRE_STRACE` is set, as `.ci/run` does.
fn strace_or_skip(test: &str) -> bool {
    if strace_present() {
        return true;
    }
    assert!(
        std::env::var_os("PVETUNE_REQUIRE_STRACE").is_none(),
        "{test}: strace is not installed, and PVETUNE_REQUIRE_STRACE is set"
    );
    eprintln!(
        "SKIPPED {test}: strace is not installed (apt-get install strace; set \
         PVETUNE_REQUIRE_STRACE=1 to make this a failure)"
    );
    false
}

/// A stand-in QEMU with real threads: a perl with two more threads that sleep, carrying
/// `-pidfile .../<vmid>.pid` on its command line as QEMU does, its pidfile and `/proc/<pid>`
/// in the root. Killed on drop.
struct FakeQemu {
    /// The process, killed when dropped.
    _process: FakeVm,
    /// The main thread first, then the two others.
    tids: Vec<i32>,
}

impl FakeQemu {
    fn start(root: &Path, vmid: u32) -> FakeQemu {
        let pidfile = format!("/var/run/qemu-server/{vmid}.pid");
        let child = Command::new("perl")
            .args([
                "-Mthreads",
                "-e",
                "threads->create(sub { sleep 1000 while 1 })->detach for 1..2; sleep 1000 while 1",
                "--",
                "-pidfile",
                &pidfile,
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn perl");
        let pid = child.id() as i32;
        let mut vm = FakeQemu {
            _process: FakeVm { child, pid },
            tids: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            if tids.len() == 3 {
                tids.sort_by_key(|&t| (t != pid, t));
                vm.tids = tids;
                break;
            }
            assert!(Instant::now() < deadline, "perl {pid}: threads {tids:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
        fixture::write(root, &pidfile, &format!("{pid}\n"));
        fs::create_dir_all(root.join("proc")).unwrap();
        symlink(format!("/proc/{pid}"), root.join(format!("proc/{pid}"))).unwrap();
        // vCPU 0 is the second thread; the main thread and the third are emulator threads.
        fake_qmp_vcpus(root, vmid, &[(0, vm.tids[1])]);
        vm
    }

    fn affinities(&self) -> Vec<(i32, CpuSet)> {
        self.tids
            .iter()
            .map(|&t| (t, RealHost.get_affinity(t).expect("affinity")))
            .collect()
    }
}

/// A fixture host with VM 101 running and VM 100's QEMU up (between its hooks).
struct Host100 {
    root: fixture::Root,
    qemu: FakeQemu,
    _other: FakeVm,
    files: BTreeMap<String, Vec<u8>>,
    affinities: Vec<(i32, CpuSet)>,
    status: String,
}

fn profile(cpus: &str, interval: u32) -> String {
    format!(
        "cpus: {cpus}\nvcpus: sequential\nemulator: housekeeping\ngovernor: performance\n\
         sysctl:\n  vm.stat_interval: {interval}\nisolation:\n  irqs: true\n"
    )
}

fn host100() -> Host100 {
    let root = host_copy("ryzen-5900x");
    let r = &root.path;
    fixture::write(r, "/etc/pve/pvetune/100.yaml", &profile("1,13", 120));
    fixture::write(
        r,
        "/etc/pve/qemu-server/100.conf",
        "cores: 1\nmemory: 512\n",
    );
    fixture::write(r, "/etc/pve/pvetune/101.yaml", &profile("6-11,18-23", 60));
    fixture::write(
        r,
        "/etc/pve/qemu-server/101.conf",
        "cores: 2\nmemory: 512\n",
    );
    let other = start_vm(r, 101);
    let qemu = FakeQemu::start(r, 100);
    let files = snapshot(r);
    let affinities = qemu.affinities();
    let status = stdout(&pvetune(r, &["status"]));
    assert!(status.contains("101"), "{status}");
    Host100 {
        root,
        qemu,
        _other: other,
        files,
        affinities,
        status,
    }
}

impl Host100 {
    fn path(&self) -> &Path {
        &self.root.path
    }

    fn run(&self, args: &[&str]) {
        let out = pvetune(self.path(), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }

    fn strace(
        &self,
        args: &[&str],
        inject: Option<&Point>,
        trace: &Path,
    ) -> std::process::ExitStatus {
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-o"]).arg(trace);
        match inject {
            Some(p) => cmd
                .args(["-e", &format!("trace={}", p.syscall), "-e"])
                .arg(format!("inject={}:signal=KILL:when={}", p.syscall, p.nth)),
            None => cmd.args(["-e", &format!("trace={TRACED}")]),
        };
        cmd.arg(env!("CARGO_BIN_EXE_pvetune"))
            .arg("--root")
            .arg(self.path())
            .arg("-q")
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("PVETUNE_ROOT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run strace")
    }

    /// The host as it was before: files, the QEMU's thread affinities, the ledger.
    fn check(&self, what: &str) {
        let now = snapshot(self.path());
        if now != self.files {
            let keys: std::collections::BTreeSet<&String> =
                self.files.keys().chain(now.keys()).collect();
            let differ: Vec<String> = keys
                .into_iter()
                .filter(|k| self.files.get(*k) != now.get(*k))
                .map(|k| {
                    let show = |v: Option<&Vec<u8>>| {
                        v.map_or("(absent)".into(), |b| {
                            String::from_utf8_lossy(b).into_owned()
                        })
                    };
                    format!(
                        "{k}: {:?} -> {:?}",
                        show(self.files.get(k)),
                        show(now.get(k))
                    )
                })
                .collect();
            panic!("{what}: files differ:\n{}", differ.join("\n"));
        }
        assert_eq!(
            self.qemu.affinities(),
            self.affinities,
            "{what}: thread affinities"
        );
        let status = stdout(&pvetune(self.path(), &["status"]));
        assert_eq!(status, self.status, "{what}: the ledger");
    }
}

/// The k-th mutating call of a run: the `nth` invocation of `syscall` (as strace counts).
struct Point {
    syscall: String,
    nth: usize,
    line: String,
}

/// The mutating calls of a strace log, in order.
fn mutating_points(log: &str) -> Vec<Point> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut points = Vec::new();
    for line in log.lines() {
        let Some((_pid, call)) = line.trim_start().split_once(char::is_whitespace) else {
            continue;
        };
        let call = call.trim_start();
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        if name.starts_with('<') || name.contains(' ') {
            continue; // "<... write resumed>", signals, exits
        }
        let nth = seen.entry(name.to_string()).or_default();
        *nth += 1;
        let mutating = match name {
            "write" | "writev" | "pwrite64" | "pwritev" => {
                !matches!(args.split(',').next(), Some("1" | "2"))
            }
            "openat" => ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                .iter()
                .any(|f| args.contains(f)),
            _ => true,
        };
        if mutating {
            points.push(Point {
                syscall: name.to_string(),
                nth: *nth,
                line: line.to_string(),
            });
        }
    }
    points
}

/// One phase under test: what brings VM 100 to just before it, the phase, and the recovery.
struct Case {
    name: &'static str,
    prepare: &'static [&'static [&'static str]],
    run: &'static [&'static str],
    recover: &'static [&'static [&'static str]],
}

const PRE_START: Case = Case {
    name: "pre-start",
    prepare: &[],
    run: &["100", "pre-start"],
    // qemu-server retries the start (pre-start again); the VM is then stopped by hand.
    recover: &[&["100", "pre-start"], &["rollback", "100"]],
};
const POST_START: Case = Case {
    name: "post-start",
    prepare: &[&["100", "pre-start"]],
    run: &["100", "post-start"],
    recover: &[&["100", "post-stop"]],
};
const POST_STOP: Case = Case {
    name: "post-stop",
    prepare: &[&["100", "pre-start"], &["100", "post-start"]],
    run: &["100", "post-stop"],
    recover: &[&["100", "post-stop"]],
};
const ROLLBACK: Case = Case {
    name: "rollback",
    prepare: &[&["100", "pre-start"], &["100", "post-start"]],
    run: &["rollback", "100"],
    recover: &[&["rollback", "100"]],
};

/// Kills `case.run` at each of its mutating calls in turn, recovers, checks (or skips, see
/// [`strace_or_skip`]).
fn crash_at_every_call(case: &Case) {
    if !strace_or_skip(case.name) {
        return;
    }
    let host = host100();
    let t0 = Instant::now();
    let trace = host.path().join("strace.log");
    let recover = |what: &str| {
        for args in case.recover {
            host.run(args);
        }
        host.check(what);
    };
    // The uninjected run: it completes, and names the calls to kill at.
    for args in case.prepare {
        host.run(args);
    }
    let status = host.strace(case.run, None, &trace);
    assert!(status.success(), "{}: uninjected run {status}", case.name);
    let points = mutating_points(&fs::read_to_string(&trace).unwrap());
    fs::remove_file(&trace).unwrap();
    assert!(
        points.len() > 10,
        "{}: {} mutating calls",
        case.name,
        points.len()
    );
    recover(&format!("{} uninjected", case.name));
    for (k, point) in points.iter().enumerate() {
        let what = format!(
            "{} killed at mutating call {}/{} ({})",
            case.name,
            k + 1,
            points.len(),
            point.line
        );
        for args in case.prepare {
            host.run(args);
        }
        let status = host.strace(case.run, Some(point), Path::new("/dev/null"));
        assert_eq!(
            status.signal(),
            Some(9),
            "{what}: not killed ({status}): the run took another path than the uninjected one"
        );
        recover(&what);
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &points {
        *kinds.entry(p.syscall.as_str()).or_default() += 1;
    }
    println!(
        "{}: killed at each of its {} mutating calls (k = 1..={}: {kinds:?}), recovered, in {:.1} s",
        case.name,
        points.len(),
        points.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn kill_9_at_every_mutating_call_of_pre_start_is_recovered() {
    crash_at_every_call(&PRE_START);
}

#[test]
fn kill_9_at_every_mutating_call_of_post_start_is_recovered() {
    crash_at_every_call(&POST_START);
}

#[test]
fn kill_9_at_every_mutating_call_of_post_stop_is_recovered() {
    crash_at_every_call(&POST_STOP);
}

#[test]
fn kill_9_at_every_mutating_call_of_a_rollback_is_recovered() {
    crash_at_every_call(&ROLLBACK);
}
