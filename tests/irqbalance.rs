//! The irqbalance socket client against a fake irqbalance (tests/fake_irqbalance) in a test
//! thread, under a temp fixture root. The real irqbalance is never run: it would move this
//! machine's IRQs.

mod common;
mod fake_irqbalance;

use common::TempDir;
use fake_irqbalance::{Fake, Mode, State, our_uid};
use pvetune::cpuset::CpuSet;
use pvetune::irqbalance::{self, IrqbalanceError, Setting};
use pvetune::root::Root;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The pid in the socket's name: nothing runs with it, the fixture root holds everything.
const PID: u32 = 4242;

/// A deadline short enough that a test that waits for it stays quick.
fn soon() -> Instant {
    Instant::now() + Duration::from_millis(200)
}

/// A deadline no healthy exchange with the fake comes near.
fn later() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A fake irqbalance in its own temp root. Fields drop in order: the fake (its thread
/// joined) before the root it listens in.
struct Served {
    fake: Fake,
    state: Arc<Mutex<State>>,
    root: TempDir,
}

impl Served {
    fn start(tag: &str, mode: Mode, connections: usize, allowed_uid: u32) -> Served {
        let root = TempDir::new(&format!("irqbalance-{tag}"));
        let fake = Fake::start(
            root.path(),
            PID,
            "2-3",
            mode,
            Some(connections),
            allowed_uid,
        );
        Served {
            state: Arc::clone(&fake.state),
            fake,
            root,
        }
    }

    fn root(&self) -> Root {
        Root::new(self.root.path())
    }

    /// Waits for the fake to have served all its connections, and returns what it read.
    fn finish(self) -> Vec<String> {
        let Served { fake, root, .. } = self;
        let commands = fake.finish();
        drop(root);
        commands
    }
}

fn set(list: &str) -> CpuSet {
    list.parse().unwrap()
}

#[test]
fn ban_read_back_and_reset() {
    let fake = Served::start("ban", Mode::Irqbalance, 5, our_uid());
    let root = fake.root();
    assert_eq!(irqbalance::banned(&root, PID, later()).unwrap(), set("2-3"));
    irqbalance::ban(&root, PID, Some(&set("2-3,6-11,18-23")), later()).unwrap();
    assert_eq!(
        irqbalance::banned(&root, PID, later()).unwrap(),
        set("2-3,6-11,18-23")
    );
    irqbalance::ban(&root, PID, None, later()).unwrap();
    let setup = irqbalance::setup(&root, PID, later()).unwrap();
    assert_eq!(setup.banned_cpus, set("2-3"));
    assert_eq!(setup.sleep, 10);
    assert_eq!(
        fake.finish(),
        [
            "setup",
            "settings cpus 2-3,6-11,18-23",
            "setup",
            "settings cpus NULL",
            "setup"
        ]
    );
}

#[test]
fn high_cpus_and_banned_irqs_read_back() {
    let fake = Served::start("wide", Mode::Irqbalance, 2, our_uid());
    fake.state.lock().unwrap().banned_irqs = vec![24, 131];
    let root = fake.root();
    irqbalance::ban(&root, PID, Some(&set("0,33,4095")), later()).unwrap();
    let setup = irqbalance::setup(&root, PID, later()).unwrap();
    assert_eq!(setup.banned_irqs, [24, 131]);
    assert_eq!(setup.banned_cpus, set("0,33,4095"));
    fake.finish();
}

#[test]
fn the_original_setting_is_detected_or_explicit() {
    let fake = Served::start("original", Mode::Irqbalance, 3, our_uid());
    let root = fake.root();
    let cpu = fake.root.path().join("sys/devices/system/cpu");
    std::fs::create_dir_all(&cpu).unwrap();
    std::fs::write(cpu.join("isolated"), "2\n").unwrap();
    std::fs::write(cpu.join("nohz_full"), "3\n").unwrap();
    let proc = fake.root.path().join(format!("proc/{PID}"));
    std::fs::create_dir_all(&proc).unwrap();
    std::fs::write(proc.join("environ"), b"PATH=/usr/bin\0IRQBALANCE_ARGS=\0").unwrap();

    // isolated ∪ nohz_full: irqbalance's own detection, given back with NULL.
    let original = irqbalance::current(&root, PID, later()).unwrap();
    assert_eq!(original, Setting::Detected(set("2-3")));
    assert_eq!(original.original_text(), "NULL");
    assert_eq!(original.restore_arg(), None);
    let composed = original.composed(&set("6-11"));
    assert_eq!(composed, set("2-3,6-11"));

    // Someone set a list with irqbalance-ui: given back as that list.
    irqbalance::ban(&root, PID, Some(&set("1-3")), later()).unwrap();
    let original = irqbalance::current(&root, PID, later()).unwrap();
    assert_eq!(original, Setting::Explicit(set("1-3")));
    assert_eq!(original.original_text(), "1-3");
    assert_eq!(
        irqbalance::restore_arg_of(&original.original_text()),
        Some(Some(set("1-3")))
    );

    // The environment overrides the files, as in setup_banned_cpus.
    std::fs::write(
        proc.join("environ"),
        b"IRQBALANCE_BANNED_CPULIST=1-3\0PATH=/usr/bin\0",
    )
    .unwrap();
    assert_eq!(irqbalance::detect(&root, PID).unwrap(), set("1-3"));
    std::fs::write(proc.join("environ"), b"IRQBALANCE_BANNED_CPUS=f0\0").unwrap();
    assert_eq!(irqbalance::detect(&root, PID).unwrap(), set("4-7"));
    fake.finish();
}

#[test]
fn a_garbled_reply_is_an_error() {
    for (n, reply) in [
        "SLEEP 10 BANNED zz",
        "SLEEP 10 IRQ 3 BANNED 0",
        "\u{0}\u{ff}garbage",
        "SLEEP 10 BANNED 0000000c trailing",
    ]
    .into_iter()
    .enumerate()
    {
        let fake = Served::start(&format!("garbled{n}"), Mode::Garbled(reply), 1, our_uid());
        let err = irqbalance::banned(&fake.root(), PID, later()).unwrap_err();
        assert!(
            matches!(err, IrqbalanceError::Protocol { .. }),
            "{reply:?}: {err}"
        );
        assert!(err.to_string().contains("irqbalance4242.sock"), "{err}");
        fake.finish();
    }
}

#[test]
fn a_silent_server_is_cut_off_at_the_deadline() {
    let fake = Served::start("silent", Mode::Silent, 2, our_uid());
    let root = fake.root();
    let err = irqbalance::banned(&root, PID, soon()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::Timeout { .. }), "{err}");
    // A setting with no close: sent, maybe applied, not confirmed.
    let err = irqbalance::ban(&root, PID, Some(&set("4")), soon()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::Unconfirmed { .. }), "{err}");
    assert!(err.to_string().contains("may still take effect"), "{err}");
    assert_eq!(fake.finish(), ["setup", "settings cpus 4"]);
}

#[test]
fn a_trickling_server_is_cut_off_at_the_deadline() {
    let fake = Served::start("trickle", Mode::Trickle, 1, our_uid());
    let err = irqbalance::banned(&fake.root(), PID, soon()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("within the deadline"), "{err}");
    fake.finish();
}

#[test]
fn only_the_allowed_uid_is_answered() {
    // The fake answers another uid only, as irqbalance answers uid 0 only.
    let fake = Served::start("uid", Mode::Irqbalance, 2, our_uid().wrapping_add(1));
    let root = fake.root();
    let err = irqbalance::banned(&root, PID, later()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::NoReply { .. }), "{err}");
    // A refused setting closes the same way an accepted one does: the protocol cannot tell.
    irqbalance::ban(&root, PID, Some(&set("4")), later()).unwrap();
    assert!(fake.finish().is_empty());
}

#[test]
fn an_absent_or_stale_socket_fails_at_once() {
    let root = TempDir::new("irqbalance-absent");
    let fixture = Root::new(root.path());
    let err = irqbalance::banned(&fixture, PID, later()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::Absent { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("/run/irqbalance/irqbalance4242.sock"),
        "{err}"
    );
    assert!(irqbalance::socket_pids(&fixture).unwrap().is_empty());

    // irqbalance killed hard: the file stays, nobody listens.
    let dir = root.path().join("run/irqbalance");
    std::fs::create_dir_all(&dir).unwrap();
    drop(UnixListener::bind(dir.join(format!("irqbalance{PID}.sock"))).unwrap());
    std::fs::write(dir.join("irqbalance12x.sock"), "").unwrap();
    assert_eq!(irqbalance::socket_pids(&fixture).unwrap(), [PID]);
    let err = irqbalance::ban(&fixture, PID, None, later()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::Refused { .. }), "{err}");

    let err = irqbalance::banned(&fixture, 0, later()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::Pid { pid: 0 }), "{err}");
}

#[test]
fn what_irqbalance_cannot_take_is_never_sent() {
    // No server: a refusal must come before any connect.
    let root = TempDir::new("irqbalance-refuse");
    let fixture = Root::new(root.path());
    let every_other: CpuSet = (0..4000).step_by(2).collect();
    for cpus in [CpuSet::new(), set("4096"), every_other] {
        let err = irqbalance::ban(&fixture, PID, Some(&cpus), later()).unwrap_err();
        assert!(matches!(err, IrqbalanceError::Refuse { .. }), "{err}");
    }
}

#[test]
fn a_full_backlog_is_retried_until_the_deadline() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
    };
    // irqbalance listens with a backlog of one and accepts nothing while it scans.
    let root = TempDir::new("irqbalance-backlog");
    let dir = root.path().join("run/irqbalance");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("irqbalance{PID}.sock"));
    let listener = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&listener, Backlog::new(1).unwrap()).unwrap();
    // Fill the backlog (the kernel queues one more than the backlog).
    let mut queued = Vec::new();
    for _ in 0..8 {
        let s = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        if connect(s.as_raw_fd(), &UnixAddr::new(&path).unwrap()).is_err() {
            break;
        }
        queued.push(s);
    }
    let err = irqbalance::banned(&Root::new(root.path()), PID, soon()).unwrap_err();
    assert!(
        matches!(
            err,
            IrqbalanceError::Timeout {
                what: "connect",
                ..
            }
        ),
        "{err}"
    );
}
