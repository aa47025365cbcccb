//! A fake irqbalance for tests: a thread of the test process listening where irqbalance does
//! (`/run/irqbalance/irqbalance<pid>.sock`) under a fixture root and speaking as `irqbalance.c`
//! `sock_handle` does (v1.9.2): `SO_PASSCRED` on the listening socket, ONE `recvmsg` of at
//! most 500 bytes per connection, the first control message must be `SCM_CREDENTIALS` of the
//! allowed uid (0 for the real one; the test's own uid here, so the tests also run
//! unprivileged), `setup` answered `SLEEP .. [IRQ ..] BANNED <mask>` in `bitmap_scnprintf`'s
//! layout, `settings cpus` taking the first word (`NULL` resets), no reply to a setting, then
//! close. It rescans right after every setting (the real one at its next scan). The real
//! irqbalance is never run: it would move this machine's IRQs.
//!
//! The listener is polled, so stopping (drop) never depends on the socket file still being
//! there: the thread is always joined.
#![allow(dead_code)]

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use pvetune::cpuset::CpuSet;
use std::io::{ErrorKind, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the fake behaves once it has read a command.
#[derive(Clone, Copy)]
pub enum Mode {
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
pub struct State {
    /// What `setup_banned_cpus` detects (isolcpus ∪ nohz_full, or the environment).
    pub detected: CpuSet,
    /// The UI ban (`banned_cpumask_from_ui`), the word as received.
    pub ui: Option<String>,
    /// IRQs banned on the command line (`cl_banned_irqs`).
    pub banned_irqs: Vec<u32>,
    /// Every command read, as received.
    pub commands: Vec<String>,
}

impl State {
    /// `banned_cpus` after a rescan.
    pub fn banned(&self) -> CpuSet {
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

/// The test's own uid: the fake answers it as irqbalance answers uid 0.
pub fn our_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// A fake irqbalance serving `connections` connections (None: until stopped), then ending.
pub struct Fake {
    pub socket: PathBuf,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Serves a given number of connections (else until stopped).
    limited: bool,
}

impl Fake {
    /// Listens at `<root>/run/irqbalance/irqbalance<pid>.sock`, detecting `detected`.
    pub fn start(
        root: &Path,
        pid: u32,
        detected: &str,
        mode: Mode,
        connections: Option<usize>,
        allowed_uid: u32,
    ) -> Fake {
        let dir = root.join("run/irqbalance");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join(format!("irqbalance{pid}.sock"));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        setsockopt(&listener, sockopt::PassCred, &true).unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State {
            detected: detected.parse().unwrap(),
            ui: None,
            banned_irqs: Vec::new(),
            commands: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stopped) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            while connections.is_none_or(|n| served < n) && !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        serve(stream, mode, allowed_uid, &shared, &stopped);
                        served += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Fake {
            socket,
            state,
            stop,
            thread: Some(thread),
            limited: connections.is_some(),
        }
    }

    /// What irqbalance bans now.
    pub fn banned(&self) -> CpuSet {
        self.state.lock().unwrap().banned()
    }

    /// The commands read so far.
    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().commands.clone()
    }

    /// Waits for the fake to have served all its connections (stops one serving until
    /// stopped), and returns what it read. The socket file stays, as after a `kill -9`.
    pub fn finish(mut self) -> Vec<String> {
        self.join(!self.limited);
        std::mem::take(&mut self.state.lock().unwrap().commands)
    }

    fn join(&mut self, stop: bool) {
        if let Some(thread) = self.thread.take() {
            if stop {
                self.stop.store(true, Ordering::SeqCst);
            }
            let _ = thread.join();
        }
    }
}

impl Drop for Fake {
    /// A test that failed before its connections were made, or a fake serving until stopped:
    /// the thread sees the stop flag within a poll and is joined.
    fn drop(&mut self) {
        self.join(true);
    }
}

/// One connection as `sock_handle` handles it.
fn serve(
    stream: UnixStream,
    mode: Mode,
    allowed_uid: u32,
    state: &Mutex<State>,
    stop: &AtomicBool,
) {
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
    if matches!(mode, Mode::Silent) {
        drop(st);
        // Until the client leaves, or the test stops the fake.
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::SeqCst) {
            match (&stream).read(&mut buf) {
                Ok(0) => return,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Ok(_) => {}
                Err(_) => return,
            }
        }
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
                    if stop.load(Ordering::SeqCst) || stream.write_all(&[*byte]).is_err() {
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
