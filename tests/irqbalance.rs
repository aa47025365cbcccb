//! The irqbalance socket client against a fake irqbalance in a test thread, listening where
//! irqbalance does (`/run/irqbalance/irqbalance<pid>.sock`) under a temp fixture root and
//! speaking as `irqbalance.c` `sock_handle` does (v1.9.2): `SO_PASSCRED` on the listening
//! socket, ONE `recvmsg` of at most 500 bytes per connection, the first control message must be
//! `SCM_CREDENTIALS` of the allowed uid (0 for the real one; the test's own uid here, so the
//! tests also run unprivileged), `setup` answered `SLEEP .. [IRQ ..] BANNED <mask>` in
//! `bitmap_scnprintf`'s layout, `settings cpus` taking the first word (`NULL` resets), no
//! reply to a setting, then close. The real irqbalance is never run: it would move this
//! machine's IRQs.

mod common;

use common::TempDir;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use pvetune::cpuset::CpuSet;
use pvetune::irqbalance::{self, IrqbalanceError, Setting};
use pvetune::root::Root;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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

/// How the fake behaves once it has read a command.
#[derive(Clone, Copy)]
enum Mode {
    /// As irqbalance does.
    Irqbalance,
    /// Reads the command, never answers, waits for the client to leave.
    Silent,
    /// Answers `setup` one byte every 20 ms.
    Trickle,
    /// Answers `setup` with these bytes.
    Garbled(&'static str),
}

/// irqbalance's state as far as the socket shows it.
struct State {
    /// What `setup_banned_cpus` detects (isolcpus ∪ nohz_full, or the environment).
    detected: CpuSet,
    /// The UI ban (`banned_cpumask_from_ui`), the word as received.
    ui: Option<String>,
    /// IRQs banned on the command line (`cl_banned_irqs`).
    banned_irqs: Vec<u32>,
    /// Every command read, as received.
    commands: Vec<String>,
}

impl State {
    /// `banned_cpus` after a rescan (the fake rescans right after every setting; the real one
    /// at its next scan).
    fn banned(&self) -> CpuSet {
        match &self.ui {
            Some(list) => cpulist_parse(list),
            None => self.detected.clone(),
        }
    }
}

/// `bitmap.c` `__bitmap_parselist` into `NR_CPUS` bits: the mask is zeroed first and keeps
/// what was set before an error.
fn cpulist_parse(list: &str) -> CpuSet {
    let mut set = CpuSet::new();
    for region in list.split(',') {
        let (a, b) = region.split_once('-').unwrap_or((region, region));
        let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) else {
            return set;
        };
        if a > b || b >= 4096 {
            return set;
        }
        set.insert_range(a, b + 1);
    }
    set
}

/// `bitmap.c` `bitmap_scnprintf` of a 4096-bit mask: 32-bit chunks of 8 hex digits, most
/// significant first, leading zero chunks left out, the last one always printed.
fn bitmap_scnprintf(set: &CpuSet) -> String {
    let mut chunks = Vec::new();
    for i in (0..128u32).rev() {
        let mut value = 0u32;
        for bit in 0..32 {
            if set.contains(i * 32 + bit) {
                value |= 1 << bit;
            }
        }
        if value != 0 || !chunks.is_empty() || i == 0 {
            chunks.push(format!("{value:08x}"));
        }
    }
    chunks.join(",")
}

/// A fake irqbalance serving `connections` connections, then ending.
struct Fake {
    root: TempDir,
    state: Arc<Mutex<State>>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(tag: &str, mode: Mode, connections: usize, allowed_uid: u32) -> Fake {
        let root = TempDir::new(&format!("irqbalance-{tag}"));
        let dir = root.path().join("run/irqbalance");
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join(format!("irqbalance{PID}.sock"))).unwrap();
        setsockopt(&listener, sockopt::PassCred, &true).unwrap();
        let state = Arc::new(Mutex::new(State {
            detected: "2-3".parse().unwrap(),
            ui: None,
            banned_irqs: Vec::new(),
            commands: Vec::new(),
        }));
        let shared = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            for _ in 0..connections {
                let (stream, _) = listener.accept().unwrap();
                serve(stream, mode, allowed_uid, &shared);
            }
        });
        Fake {
            root,
            state,
            thread: Some(thread),
        }
    }

    fn root(&self) -> Root {
        Root::new(self.root.path())
    }

    /// Waits for the fake to have served all its connections, and returns what it read.
    fn finish(mut self) -> Vec<String> {
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut self.state.lock().unwrap().commands)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        // A test that failed before its connections were made: unblock accept() so the
        // thread can be joined (each connection it then reads is empty and closed).
        if let Some(thread) = self.thread.take() {
            let path = self
                .root
                .path()
                .join(format!("run/irqbalance/irqbalance{PID}.sock"));
            while !thread.is_finished() {
                let _ = UnixStream::connect(&path);
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = thread.join();
        }
    }
}

/// One connection as `sock_handle` handles it.
fn serve(stream: UnixStream, mode: Mode, allowed_uid: u32, state: &Mutex<State>) {
    let mut buff = [0u8; 500];
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    let (recv_size, uid) = {
        let mut iov = [IoSliceMut::new(&mut buff)];
        let Ok(msg) = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) else {
            return;
        };
        let uid = match msg.cmsgs().ok().and_then(|mut c| c.next()) {
            Some(ControlMessageOwned::ScmCredentials(creds)) => Some(creds.uid()),
            _ => None,
        };
        (msg.bytes, uid)
    };
    // "Connection no memory" / "Permission denied for user to connect to socket."
    if uid != Some(allowed_uid) {
        return;
    }
    let command = String::from_utf8_lossy(&buff[..recv_size]).into_owned();
    let mut st = state.lock().unwrap();
    st.commands.push(command.clone());
    if mode_is(mode, Mode::Silent) {
        drop(st);
        let _ = (&stream).read_to_end(&mut Vec::new());
        return;
    }
    if let Some(rest) = command.strip_prefix("settings cpus ") {
        // strtok(cpu_ban_string, " "), then the "NULL" prefix check.
        let word = rest.split(' ').find(|w| !w.is_empty()).unwrap_or("");
        st.ui = (!word.starts_with("NULL")).then(|| word.to_string());
    }
    if command.starts_with("setup") {
        let mut reply = String::from("SLEEP 10 ");
        for irq in &st.banned_irqs {
            reply += &format!("IRQ {irq} LOAD 0 DIFF 0 CLASS 0 ");
        }
        reply += &format!("BANNED {}", bitmap_scnprintf(&st.banned()));
        drop(st);
        let mut stream = stream;
        match mode {
            Mode::Garbled(text) => {
                let _ = stream.write_all(text.as_bytes());
            }
            Mode::Trickle => {
                for byte in reply.as_bytes().iter().cycle().take(10_000) {
                    if stream.write_all(&[*byte]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            _ => {
                let _ = stream.write_all(reply.as_bytes());
            }
        }
    }
}

fn mode_is(mode: Mode, want: Mode) -> bool {
    std::mem::discriminant(&mode) == std::mem::discriminant(&want)
}

fn set(list: &str) -> CpuSet {
    list.parse().unwrap()
}

fn our_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[test]
fn ban_read_back_and_reset() {
    let fake = Fake::start("ban", Mode::Irqbalance, 5, our_uid());
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
    let fake = Fake::start("wide", Mode::Irqbalance, 2, our_uid());
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
    let fake = Fake::start("original", Mode::Irqbalance, 3, our_uid());
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
        let fake = Fake::start(&format!("garbled{n}"), Mode::Garbled(reply), 1, our_uid());
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
    let fake = Fake::start("silent", Mode::Silent, 2, our_uid());
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
    let fake = Fake::start("trickle", Mode::Trickle, 1, our_uid());
    let err = irqbalance::banned(&fake.root(), PID, soon()).unwrap_err();
    assert!(matches!(err, IrqbalanceError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("within the deadline"), "{err}");
    fake.finish();
}

#[test]
fn only_the_allowed_uid_is_answered() {
    // The fake answers another uid only, as irqbalance answers uid 0 only.
    let fake = Fake::start("uid", Mode::Irqbalance, 2, our_uid().wrapping_add(1));
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
