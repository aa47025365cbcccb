//! `Qmp` and `vm::discover` against a real QEMU started paused (`-S`) the way qemu-server
//! starts it (`-daemonize`, `-pidfile`, `-qmp unix:...`, `-name ...,debug-threads=on`), in a
//! temp root whose `proc` links to the real `/proc`.
//!
//! Without `qemu-system-x86_64` these tests fail (CI installs `qemu-system-x86`); set
//! `PVETUNE_LAB=skip` to skip them on a machine that cannot have it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::QemuGuard;
use pvetune::qmp::{Qmp, QmpError};
use pvetune::vm::{self, IoThread, ThreadSource};

const QEMU: &str = "qemu-system-x86_64";
const IOTHREAD_ID: &str = "iothread-virtioscsi0";

/// A paused QEMU; dropping it (also on a panic) kills the process and removes its temp root.
struct Qemu {
    root: PathBuf,
    vmid: u32,
    pid: i32,
    _guard: QemuGuard,
}

impl Qemu {
    /// Starts QEMU for `vmid` in a fresh root named after the test, or `None` when the lab
    /// is explicitly skipped.
    fn start(test: &str, vmid: u32) -> Option<Qemu> {
        Qemu::start_named(test, vmid, "pvetune-test-qmp,debug-threads=on")
    }

    /// As [`Qemu::start`], with the given `-name` argument.
    fn start_named(test: &str, vmid: u32, name: &str) -> Option<Qemu> {
        if Command::new(QEMU).arg("--version").output().is_err() {
            if std::env::var("PVETUNE_LAB").as_deref() == Ok("skip") {
                println!("skipped: {QEMU} is missing and PVETUNE_LAB=skip");
                return None;
            }
            panic!(
                "{QEMU} not found: install qemu-system-x86 (apt-get install qemu-system-x86), \
                 or set PVETUNE_LAB=skip to skip the real-QEMU tests"
            );
        }
        let root = std::env::temp_dir().join(format!(
            "{}qemu-{}-{test}",
            common::TEST_PREFIX,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        // Before anything that can panic: no QEMU naming this root outlives the test.
        let guard = QemuGuard { root: root.clone() };
        std::fs::create_dir_all(root.join(vm::RUN_DIR)).unwrap();
        std::os::unix::fs::symlink("/proc", root.join("proc")).unwrap();

        // KVM starts vCPU threads without booting anything (`-S`); TCG where KVM is missing.
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let accel = if kvm { "kvm" } else { "tcg,thread=multi" };
        let pidfile = vm::pidfile_path(&root, vmid);
        let qmp = vm::qmp_path(&root, vmid);
        let started = Instant::now();
        let output = Command::new(QEMU)
            .args(["-accel", accel, "-machine", "q35", "-m", "64"])
            .args(["-smp", "4,sockets=1,cores=2,threads=2"])
            .args(["-object", &format!("iothread,id={IOTHREAD_ID}")])
            .args(["-nographic", "-nodefaults", "-S", "-daemonize"])
            .arg("-pidfile")
            .arg(&pidfile)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(["-name", name])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{QEMU} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        println!("QEMU pid {pid} ({accel}) up in {:?}", started.elapsed());
        Some(Qemu {
            root,
            vmid,
            pid,
            _guard: guard,
        })
    }

    fn comm(&self, tid: i32) -> String {
        let path = format!("/proc/{}/task/{tid}/comm", self.pid);
        std::fs::read_to_string(path)
            .unwrap()
            .trim_end()
            .to_string()
    }
}

#[test]
fn discover_maps_vcpus_iothread_and_emulator_from_qmp() {
    let Some(qemu) = Qemu::start("qmp", 9101) else {
        return;
    };
    let started = Instant::now();
    let vm = vm::discover(&qemu.root, qemu.vmid)
        .unwrap()
        .expect("VM runs");
    println!("discover via QMP took {:?}: {vm:#?}", started.elapsed());

    assert_eq!(
        (vm.vmid, vm.pid, vm.source),
        (qemu.vmid, qemu.pid, ThreadSource::Qmp)
    );
    assert_eq!(
        Some(vm.start_time),
        vm::process_start_time(&qemu.root, qemu.pid)
    );
    let positions: Vec<_> = vm
        .vcpus
        .iter()
        .map(|v| (v.index, v.socket, v.core, v.thread))
        .collect();
    // QEMU numbers vCPUs socket by socket, core by core, thread by thread: 0 and 1 are siblings.
    assert_eq!(
        positions,
        [
            (0, Some(0), Some(0), Some(0)),
            (1, Some(0), Some(0), Some(1)),
            (2, Some(0), Some(1), Some(0)),
            (3, Some(0), Some(1), Some(1)),
        ]
    );
    for vcpu in &vm.vcpus {
        let comm = qemu.comm(vcpu.tid);
        let kvm = format!("CPU {}/KVM", vcpu.index);
        let tcg = format!("CPU {}/TCG", vcpu.index);
        assert!(
            comm == kvm || comm == tcg,
            "vCPU {} has comm {comm:?}",
            vcpu.index
        );
    }

    assert_eq!(vm.iothreads.len(), 1, "{:?}", vm.iothreads);
    let IoThread { id, tid } = &vm.iothreads[0];
    assert_eq!(id, IOTHREAD_ID);
    // `IO iothread-virtioscsi0` does not fit in 15 characters, so the thread keeps its
    // inherited name: only QMP can tell it from the main thread.
    let iothread_comm = qemu.comm(*tid);
    assert!(!iothread_comm.starts_with("IO "), "{iothread_comm}");

    let emulator: Vec<i32> = vm.emulator.iter().map(|t| t.tid).collect();
    assert!(
        emulator.contains(&qemu.pid),
        "main thread missing: {emulator:?}"
    );
    assert!(vm.emulator.iter().any(|t| t.comm == "call_rcu"));
    assert!(!emulator.contains(tid));
    assert!(vm.vcpus.iter().all(|v| !emulator.contains(&v.tid)));
    let all = std::fs::read_dir(format!("/proc/{}/task", qemu.pid))
        .unwrap()
        .count();
    assert_eq!(vm.vcpus.len() + vm.iothreads.len() + vm.emulator.len(), all);
}

#[test]
fn busy_qmp_socket_falls_back_to_thread_names() {
    let Some(qemu) = Qemu::start("busy", 9102) else {
        return;
    };
    let exact = vm::discover(&qemu.root, qemu.vmid).unwrap().unwrap();
    assert_eq!(exact.source, ThreadSource::Qmp);

    // Another client (as qemu-server during a start) holds the one QMP connection.
    let holder = hold(&vm::qmp_path(&qemu.root, qemu.vmid));
    let started = Instant::now();
    let vm = vm::discover(&qemu.root, qemu.vmid).unwrap().unwrap();
    let waited = started.elapsed();
    println!("fallback took {waited:?}");
    assert_eq!(vm.source, ThreadSource::Proc);
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    let by_name: Vec<(u32, i32)> = vm.vcpus.iter().map(|v| (v.index, v.tid)).collect();
    let by_qmp: Vec<(u32, i32)> = exact.vcpus.iter().map(|v| (v.index, v.tid)).collect();
    assert_eq!(by_name, by_qmp);
    assert!(
        vm.vcpus
            .iter()
            .all(|v| v.socket.is_none() && v.core.is_none())
    );
    // The iothread is not recognisable by name, so it lands among the emulator threads.
    assert!(vm.iothreads.is_empty());
    let iothread_tid = exact.iothreads[0].tid;
    assert!(vm.emulator.iter().any(|t| t.tid == iothread_tid));

    // Once the other client leaves, QMP answers again.
    drop(holder);
    let again = vm::discover(&qemu.root, qemu.vmid).unwrap().unwrap();
    assert_eq!(again.source, ThreadSource::Qmp);
}

/// Connects and waits for the greeting, so this connection is the one QEMU serves.
fn hold(path: &Path) -> UnixStream {
    use std::io::Read;
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).unwrap();
    stream
}

#[test]
fn qmp_errors_and_busy_state_are_reported() {
    let Some(qemu) = Qemu::start("errors", 9103) else {
        return;
    };
    let path = vm::qmp_path(&qemu.root, qemu.vmid);
    {
        let mut qmp = Qmp::connect(&path).unwrap();
        match qmp.execute("no-such-command", None) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(
                    (command.as_str(), class.as_str()),
                    ("no-such-command", "CommandNotFound")
                );
                assert!(desc.contains("no-such-command"), "{desc}");
            }
            other => panic!("{other:?}"),
        }
        let err = qmp
            .execute("query-iothreads", Some(serde_json::json!({ "bogus": 1 })))
            .unwrap_err();
        assert!(
            matches!(err, QmpError::Command { ref class, .. } if class == "GenericError"),
            "{err}"
        );
        // The session is still usable after errors.
        assert_eq!(qmp.query_cpus_fast().unwrap().len(), 4);

        // While this session is open, a second client gets no greeting.
        let started = Instant::now();
        let second = Qmp::connect(&path).err();
        assert!(matches!(second, Some(QmpError::Busy { .. })), "{second:?}");
        println!("busy detected after {:?}", started.elapsed());
    }
    // Closed: the socket serves a new client at once.
    assert_eq!(
        Qmp::connect(&path)
            .unwrap()
            .query_iothreads()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn without_thread_names_only_qmp_finds_vcpus() {
    // qemu-server 9.2 no longer passes `debug-threads=on`; before QEMU 11 every thread then
    // keeps the process name.
    let Some(qemu) = Qemu::start_named("noname", 9104, "pvetune-test-noname") else {
        return;
    };
    let vm = vm::discover(&qemu.root, qemu.vmid).unwrap().unwrap();
    assert_eq!(
        (vm.source, vm.vcpus.len(), vm.iothreads.len()),
        (ThreadSource::Qmp, 4, 1)
    );
    let names: Vec<String> = vm.vcpus.iter().map(|v| qemu.comm(v.tid)).collect();
    println!("vCPU thread names without debug-threads: {names:?}");

    let _holder = hold(&vm::qmp_path(&qemu.root, qemu.vmid));
    let blind = vm::discover(&qemu.root, qemu.vmid).unwrap().unwrap();
    assert_eq!(blind.source, ThreadSource::Proc);
    if names.iter().all(|n| !n.starts_with("CPU ")) {
        assert!(blind.vcpus.is_empty(), "{:?}", blind.vcpus);
    }
}

#[test]
fn a_test_that_panics_leaves_no_qemu_and_no_temp_root() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(qemu) = Qemu::start("panics", 9105) else {
            return;
        };
        seen = Some((qemu.pid, qemu.root.clone()));
        panic!("an assertion fails while QEMU {} runs", qemu.pid);
    }));
    let Some((pid, root)) = seen else {
        return; // skipped: no QEMU here
    };
    assert!(result.is_err());
    let marker = root.to_string_lossy().into_owned();
    assert_eq!(common::qemu_pids(&marker), Vec::<i32>::new(), "QEMU {pid}");
    assert!(!root.exists(), "{}", root.display());
}
