//! A bounded client for irqbalance's control socket: which CPUs irqbalance keeps IRQs off
//! (`setup`), and changing that set at run time (`settings cpus`), without restarting it.
//!
//! irqbalance rewrites `/proc/irq/*/smp_affinity` every 10 s and never sees cpuset partitions:
//! it bans only what it detects (`cputree.c` `setup_banned_cpus`: `IRQBALANCE_BANNED_CPUS` (a
//! mask), else `IRQBALANCE_BANNED_CPULIST`, else `/sys/devices/system/cpu/isolated` ∪
//! `nohz_full`), at start and at each rescan. What follows was read in irqbalance's source,
//! tags v1.9.2 (Debian bookworm), v1.9.4 (trixie), v1.9.5 and master of 2026-03 (the same
//! commands and replies in all; where they differ is said; `irqbalance.c` `init_socket` and
//! `sock_handle`, `ui/irqbalance-ui.c`):
//!
//! - **Socket**: a stream socket bound at `SOCKET_TMPFS "/" SOCKET_PATH "<pid>.sock"`, i.e.
//!   `/run/irqbalance/irqbalance<pid>.sock` (`irqbalance.h`; the unit's
//!   `RuntimeDirectory=irqbalance/` makes the directory). Only when that bind fails does it
//!   fall back to an abstract address of all zero bytes, the same for every pid, which any
//!   process could bind first: this client uses the file only. `listen(fd, 1)`: one pending
//!   connection; a second `connect` meets a full backlog (EAGAIN here, retried until the
//!   deadline). The socket exists only in builds with the UI (`HAVE_IRQBALANCEUI`, the
//!   configure default `--with-irqbalance-ui=yes`).
//! - **Credentials**: `SO_PASSCRED` on the listening socket; the first control message of the
//!   one `recvmsg` must be `SCM_CREDENTIALS` with uid 0, else the connection is closed with no
//!   reply (logged "Permission denied for user to connect to socket"). This client sends its
//!   credentials explicitly, as `irqbalance-ui` does (`create_credentials_msg`). Only root gets
//!   anything; a `settings` command refused that way looks exactly like one accepted.
//! - **One read per connection**: the server reads the command with ONE `recvmsg` into a buffer
//!   of 500 bytes (1.9.2, 1.9.4; a longer command is cut there) or 16384 (1.9.5 and later,
//!   which refuse a command that fills it), answers (or not) and closes. So the command goes
//!   out in one `sendmsg` of at most [`MAX_COMMAND_BYTES`], without newline or NUL.
//! - **`setup`** answers `SLEEP <s> ` then, per IRQ banned with `--banirq` or `settings ban
//!   irqs`, `IRQ <n> LOAD <u64> DIFF <u64> CLASS <n> `, then `BANNED <mask>`, and closes.
//!   `<mask>` is `cpumask_scnprintf` of `banned_cpus` (`bitmap.c` `bitmap_scnprintf`): hex in
//!   32-bit chunks of 8 digits, most significant first, separated by commas, leading zero
//!   chunks left out (`0000000c` for CPUs 2-3, `00000000` for none), `NR_CPUS` 4096 bits.
//!   No newline at the end.
//! - **`settings cpus <cpulist>`**: the first space-separated word of the rest is kept as the
//!   UI ban; at the next rescan `setup_banned_cpus` parses it with `cpulist_parse` (zeroes the
//!   mask, then `a`, `a-b` joined by commas; ERANGE from CPU 4096) and uses it INSTEAD of the
//!   environment and isolated/nohz_full: it replaces the detected ban, it does not merge with
//!   it. `NULL` (any word starting with it) drops the UI ban: the next rescan detects again.
//!   Either sets `need_rescan`, so the change takes effect at the next scan (up to the sleep
//!   interval, 10 s by default, later); until then `setup` still answers the old set. There is
//!   no reply. An empty list crashes 1.9.2 and 1.9.4 (`strtok` gives NULL, then
//!   `strncmp(NULL, ...)`; 1.9.5 checks and resets), so this client never sends one. With the
//!   thermal build (`HAVE_THERMAL`, the configure default on x86_64) the CPUs the thermal code
//!   bans are added to every result. Up to 1.9.3, a rescan sleeps one sleep interval inside
//!   the main loop (`scan`, `sleep_approx`): for that long the socket is not served, and a
//!   `setup` then runs into the deadline.
//!
//! Every exchange has ONE deadline for connect, send and reply, each wait getting only the
//! time left, as in [`crate::qmp`]: a peer that never answers or sends one byte at a time
//! cannot hold a hook past it. The reply is capped at [`MAX_REPLY_BYTES`]; anything that is
//! not the format above is an error, never a panic.

use std::io::{ErrorKind, IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, UnixCredentials,
    connect, sendmsg, socket,
};

use crate::cpuset::CpuSet;
use crate::excerpt::excerpt;
use crate::root::Root;

/// `SOCKET_TMPFS` (`irqbalance.h`): where irqbalance binds its socket.
pub const SOCKET_DIR: &str = "/run/irqbalance";
/// `NR_CPUS` of irqbalance's `cpumask.h`: the width of every mask it keeps. A cpulist naming
/// a CPU at or above it is refused by `cpulist_parse` (ERANGE, after zeroing the mask).
pub const NR_CPUS: u32 = 4096;
/// The longest command sent: 1.9.2 and 1.9.4 read 500 bytes at most and cut what fills the
/// buffer (1.9.5 reads 16384 and refuses what fills it).
pub const MAX_COMMAND_BYTES: usize = 499;
/// The longest `setup` reply read. The mask is at most 1,151 bytes (128 chunks); the rest is
/// about 60 bytes per banned IRQ, so this holds some 17,000 banned IRQs.
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// The largest pid Linux hands out (`PID_MAX_LIMIT` on 64-bit).
pub const PID_MAX: u32 = 4_194_304;
/// What `settings cpus` is sent to drop the UI ban (`sock_handle`).
pub const RESET: &str = "NULL";
/// The longest `/proc/<pid>/environ` read when working out what irqbalance would detect.
const MAX_ENVIRON_BYTES: u64 = 1 << 20;
/// Pause between connection attempts while the listen backlog (one) is full.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Why talking to irqbalance failed. Every message names the socket (host-absolute).
#[derive(Debug, thiserror::Error)]
pub enum IrqbalanceError {
    #[error("irqbalance pid {pid} is not a process id (1..={PID_MAX})")]
    Pid { pid: u32 },
    #[error("irqbalance socket {path} does not exist: is irqbalance (built with its UI) running?")]
    Absent { path: String },
    #[error("irqbalance socket {path} refuses connections: irqbalance is gone (a stale socket)")]
    Refused { path: String },
    #[error("irqbalance socket {path}: cannot connect")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("irqbalance socket {path}: {what} not done within the deadline")]
    Timeout { path: String, what: &'static str },
    #[error("irqbalance socket {path}: I/O error during {what}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "irqbalance socket {path}: closed without answering 'setup' (irqbalance answers only \
         uid 0, checked with SCM_CREDENTIALS)"
    )]
    NoReply { path: String },
    #[error("irqbalance socket {path}: unexpected reply to '{command}': {detail}")]
    Protocol {
        path: String,
        command: &'static str,
        detail: String,
    },
    #[error("irqbalance socket {path}: refusing to send 'settings cpus {cpus}': {reason}")]
    Refuse {
        path: String,
        cpus: String,
        reason: &'static str,
    },
    #[error(
        "irqbalance socket {path}: 'settings cpus {cpus}' was sent but irqbalance did not \
         close the connection within the deadline: it may still take effect"
    )]
    Unconfirmed { path: String, cpus: String },
    #[error("irqbalance pid {pid}: cannot read {path}")]
    Detect {
        pid: u32,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The host-absolute path of irqbalance's socket for `pid` (`init_socket`).
pub fn socket_path(pid: u32) -> String {
    format!("{SOCKET_DIR}/irqbalance{pid}.sock")
}

/// The pids of the irqbalance sockets in [`SOCKET_DIR`] (`irqbalance<pid>.sock`), ascending;
/// none when the directory does not exist. A socket may be stale (irqbalance killed hard).
pub fn socket_pids(root: &Root) -> std::io::Result<Vec<u32>> {
    let entries = match std::fs::read_dir(root.path(SOCKET_DIR)) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        other => other?,
    };
    let mut pids = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        pids.extend(name.to_str().and_then(pid_of_name));
    }
    pids.sort_unstable();
    Ok(pids)
}

/// The pid in a socket's host-absolute path as [`socket_path`] makes it; `None` for any other.
pub fn pid_of_socket(path: &str) -> Option<u32> {
    pid_of_name(path.strip_prefix(SOCKET_DIR)?.strip_prefix('/')?)
}

/// The pid of a socket's file name `irqbalance<pid>.sock` (canonical digits, 1..=[`PID_MAX`]).
fn pid_of_name(name: &str) -> Option<u32> {
    name.strip_prefix("irqbalance")
        .and_then(|n| n.strip_suffix(".sock"))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|p| (1..=PID_MAX).contains(p))
}

/// What irqbalance's `setup` command answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// The sleep interval between scans, in seconds (`SLEEP`).
    pub sleep: u32,
    /// IRQs banned by `--banirq` or `settings ban irqs` (`IRQ`), in the order sent.
    pub banned_irqs: Vec<u32>,
    /// The CPUs irqbalance keeps IRQs off now (`BANNED`).
    pub banned_cpus: CpuSet,
}

/// Parses a `setup` reply exactly as `sock_handle` writes it (see the module doc). `Err` holds
/// what is wrong.
pub fn parse_setup(reply: &str) -> Result<Setup, String> {
    let mut words = reply.split(' ');
    let sleep = small(
        keyed(&mut words, "SLEEP", "sleep interval")?,
        "sleep interval",
    )?;
    let mut banned_irqs = Vec::new();
    loop {
        match words.next() {
            Some("IRQ") => {
                banned_irqs.push(small(number(words.next(), "IRQ number")?, "IRQ number")?);
                keyed(&mut words, "LOAD", "load")?;
                keyed(&mut words, "DIFF", "count")?;
                keyed(&mut words, "CLASS", "class")?;
            }
            Some("BANNED") => break,
            Some(w) => return Err(format!("'{}' where IRQ or BANNED was expected", excerpt(w))),
            None => return Err("ends where BANNED was expected".into()),
        }
    }
    let mask = words
        .next()
        .ok_or("ends where the BANNED mask was expected")?;
    if let Some(extra) = words.next() {
        return Err(format!("'{}' after the BANNED mask", excerpt(extra)));
    }
    Ok(Setup {
        sleep,
        banned_irqs,
        banned_cpus: parse_banned_mask(mask)?,
    })
}

/// `<key> <number>`, the number as `%d` or `%PRIu64` print it (no sign for the values here).
fn keyed<'a>(
    words: &mut impl Iterator<Item = &'a str>,
    key: &str,
    what: &str,
) -> Result<u64, String> {
    match words.next() {
        Some(w) if w == key => number(words.next(), what),
        Some(w) => Err(format!("'{}' where {key} was expected", excerpt(w))),
        None => Err(format!("ends where {key} was expected")),
    }
}

fn number(word: Option<&str>, what: &str) -> Result<u64, String> {
    let w = word.ok_or_else(|| format!("ends where the {what} was expected"))?;
    if w.is_empty() || w.len() > 20 || !w.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} '{}' is not a number", excerpt(w)));
    }
    w.parse()
        .map_err(|_| format!("{what} '{}' is out of range", excerpt(w)))
}

fn small(value: u64, what: &str) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| format!("{what} {value} is out of range"))
}

/// `bitmap_scnprintf`'s output: 1 to [`NR_CPUS`]/32 chunks of 1 to 8 hex digits, by commas.
fn parse_banned_mask(mask: &str) -> Result<CpuSet, String> {
    let bad = |why: &str| format!("BANNED mask '{}' {why}", excerpt(mask));
    let chunks = mask.split(',');
    let mut n = 0;
    for chunk in chunks {
        n += 1;
        if n > NR_CPUS / 32 {
            return Err(bad("has more chunks than irqbalance's 4096 CPUs"));
        }
        if chunk.is_empty() || chunk.len() > 8 || !chunk.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("is not a hex cpumask"));
        }
    }
    CpuSet::parse_mask(mask, NR_CPUS).map_err(|e| bad(&e.to_string()))
}

/// The CPUs irqbalance bans now (`setup`'s `BANNED`).
pub fn banned(root: &Root, pid: u32, deadline: Instant) -> Result<CpuSet, IrqbalanceError> {
    Ok(setup(root, pid, deadline)?.banned_cpus)
}

/// irqbalance's answer to `setup`: one connection, one command, the reply up to EOF, all by
/// `deadline`.
pub fn setup(root: &Root, pid: u32, deadline: Instant) -> Result<Setup, IrqbalanceError> {
    let mut session = Session::open(root, pid, deadline)?;
    session.send(b"setup", "'setup'")?;
    let reply = session.read_to_end("setup", "the reply to 'setup'")?;
    let path = session.host_path;
    if reply.is_empty() {
        return Err(IrqbalanceError::NoReply { path });
    }
    let protocol = |detail: String| IrqbalanceError::Protocol {
        path: path.clone(),
        command: "setup",
        detail,
    };
    let text = std::str::from_utf8(&reply).map_err(|_| protocol("not ASCII".into()))?;
    parse_setup(text).map_err(protocol)
}

/// Sends `settings cpus <cpulist>` (`Some`) or `settings cpus NULL` (`None`: irqbalance's own
/// detection again), then waits until irqbalance closes the connection, which it does once it
/// has read the command. The new ban takes effect at irqbalance's next scan. An empty set, or a
/// CPU irqbalance cannot hold (4096 and up), is refused before connecting.
pub fn ban(
    root: &Root,
    pid: u32,
    cpus: Option<&CpuSet>,
    deadline: Instant,
) -> Result<(), IrqbalanceError> {
    let list = match cpus {
        None => RESET.to_string(),
        Some(set) => set.to_string(),
    };
    let command = format!("settings cpus {list}");
    let refuse = |reason| IrqbalanceError::Refuse {
        path: socket_path(pid),
        cpus: excerpt(&list),
        reason,
    };
    if let Some(set) = cpus {
        if set.is_empty() {
            return Err(refuse(
                "an empty list crashes irqbalance 1.9.2 and 1.9.4; reset with NULL instead",
            ));
        }
        if set.last().is_some_and(|cpu| cpu >= NR_CPUS) {
            return Err(refuse(
                "irqbalance holds CPUs 0-4095 only (NR_CPUS), and bans nothing for a list beyond",
            ));
        }
    }
    if command.len() > MAX_COMMAND_BYTES {
        return Err(refuse(
            "longer than the 499 bytes irqbalance 1.9.2 and 1.9.4 read whole in one command",
        ));
    }
    let mut session = Session::open(root, pid, deadline)?;
    session.send(command.as_bytes(), "'settings cpus'")?;
    match session.read_to_end("settings cpus", "the close after 'settings cpus'") {
        Ok(reply) if reply.is_empty() => Ok(()),
        Ok(reply) => Err(IrqbalanceError::Protocol {
            path: session.host_path,
            command: "settings cpus",
            detail: format!(
                "irqbalance answers nothing, this peer sent '{}'",
                excerpt(&String::from_utf8_lossy(&reply))
            ),
        }),
        Err(IrqbalanceError::Timeout { path, .. }) => Err(IrqbalanceError::Unconfirmed {
            path,
            cpus: excerpt(&list),
        }),
        Err(e) => Err(e),
    }
}

/// irqbalance's ban as pvetune records it before changing it, to give it back exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// No explicit setting: what irqbalance detects by itself. Given back with `settings cpus
    /// NULL`, so irqbalance detects again. Recorded as [`RESET`] (`NULL`).
    Detected(CpuSet),
    /// A list set over the socket by someone else (`irqbalance-ui`, a script). Given back by
    /// sending it again. Recorded as the cpulist.
    Explicit(CpuSet),
}

impl Setting {
    /// The CPUs irqbalance bans with this setting.
    pub fn cpus(&self) -> &CpuSet {
        match self {
            Setting::Detected(set) | Setting::Explicit(set) => set,
        }
    }

    /// The ledger's text: `NULL` or the cpulist, which is exactly the argument of the
    /// `settings cpus` that gives this setting back.
    pub fn original_text(&self) -> String {
        match self {
            Setting::Detected(_) => RESET.to_string(),
            Setting::Explicit(set) => set.to_string(),
        }
    }

    /// The argument of [`ban`] that gives this setting back.
    pub fn restore_arg(&self) -> Option<&CpuSet> {
        match self {
            Setting::Detected(_) => None,
            Setting::Explicit(set) => Some(set),
        }
    }

    /// What pvetune sends while VMs hold CPUs: this setting's CPUs and theirs. `settings cpus`
    /// replaces irqbalance's detection, so the detected CPUs must be in the list too.
    pub fn composed(&self, held: &CpuSet) -> CpuSet {
        self.cpus().union(held)
    }
}

/// Reads an [`Setting::original_text`] back: `NULL` is "restore with NULL", anything else must
/// be a cpulist (`None` when it is not one). The CPUs of a `NULL` are not recorded; they are
/// what irqbalance detects.
pub fn restore_arg_of(text: &str) -> Option<Option<CpuSet>> {
    if text == RESET {
        return Some(None);
    }
    let set = CpuSet::parse_list(text, NR_CPUS).ok()?;
    (!set.is_empty()).then_some(Some(set))
}

/// What irqbalance bans now, and whether that is its own detection or an explicit setting.
///
/// The socket does not say whether a UI ban is in effect, so the answer compares `BANNED` with
/// what `setup_banned_cpus` would detect for this process: `IRQBALANCE_BANNED_CPUS` (a mask)
/// or else `IRQBALANCE_BANNED_CPULIST` from `/proc/<pid>/environ` when set and not empty, else
/// `/sys/devices/system/cpu/isolated` ∪ `nohz_full` (a missing or unparsable file counts as
/// none, as there). Equal, or nothing banned at all (an explicit ban is never empty): detected.
/// A thermal ban (`HAVE_THERMAL`) makes a detected ban look explicit; restoring it then sends
/// those CPUs as well.
pub fn current(root: &Root, pid: u32, deadline: Instant) -> Result<Setting, IrqbalanceError> {
    let now = banned(root, pid, deadline)?;
    let detected = detect(root, pid)?;
    if now.is_empty() || now == detected {
        Ok(Setting::Detected(now))
    } else {
        Ok(Setting::Explicit(now))
    }
}

/// What `setup_banned_cpus` detects for irqbalance `pid` (without a UI ban or thermal bans).
pub fn detect(root: &Root, pid: u32) -> Result<CpuSet, IrqbalanceError> {
    let environ = format!("/proc/{pid}/environ");
    let mut bytes = Vec::new();
    std::fs::File::open(root.path(&environ))
        .and_then(|f| f.take(MAX_ENVIRON_BYTES).read_to_end(&mut bytes))
        .map_err(|source| IrqbalanceError::Detect {
            pid,
            path: environ.clone(),
            source,
        })?;
    let var = |name: &str| -> Option<String> {
        bytes.split(|b| *b == 0).find_map(|entry| {
            let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
            Some(String::from_utf8_lossy(value).into_owned())
        })
    };
    // A value irqbalance fails to parse leaves its zeroed mask: none.
    if let Some(mask) = var("IRQBALANCE_BANNED_CPUS").filter(|v| !v.is_empty()) {
        return Ok(CpuSet::parse_mask(&mask, NR_CPUS).unwrap_or_default());
    }
    if let Some(list) = var("IRQBALANCE_BANNED_CPULIST").filter(|v| !v.is_empty()) {
        return Ok(CpuSet::parse_list(&list, NR_CPUS).unwrap_or_default());
    }
    let file = |name: &str| {
        let path = root.path(format!("{}/{name}", crate::root::paths::CPU_DIR));
        crate::attr::read(&path)
            .ok()
            .and_then(|text| CpuSet::parse_list(text.trim_end(), NR_CPUS).ok())
            .unwrap_or_default()
    };
    Ok(file("isolated").union(&file("nohz_full")))
}

/// One connection to irqbalance: every wait ends at `deadline`.
struct Session {
    stream: UnixStream,
    /// The socket's host-absolute path, for messages.
    host_path: String,
    deadline: Instant,
}

impl Session {
    /// Connects by `deadline`. A full backlog (irqbalance busy with another client or inside a
    /// scan) is retried; a missing or refusing socket fails at once.
    fn open(root: &Root, pid: u32, deadline: Instant) -> Result<Session, IrqbalanceError> {
        if !(1..=PID_MAX).contains(&pid) {
            return Err(IrqbalanceError::Pid { pid });
        }
        let host_path = socket_path(pid);
        let path: PathBuf = root.path(&host_path);
        let connect_error = |source: std::io::Error| IrqbalanceError::Connect {
            path: host_path.clone(),
            source,
        };
        let addr = UnixAddr::new(&path).map_err(|e| connect_error(e.into()))?;
        loop {
            let fd: OwnedFd = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| connect_error(e.into()))?;
            match connect(fd.as_raw_fd(), &addr) {
                Ok(()) => {
                    let stream = UnixStream::from(fd);
                    stream.set_nonblocking(false).map_err(connect_error)?;
                    return Ok(Session {
                        stream,
                        host_path,
                        deadline,
                    });
                }
                Err(Errno::ENOENT) => return Err(IrqbalanceError::Absent { path: host_path }),
                Err(Errno::ECONNREFUSED) => {
                    return Err(IrqbalanceError::Refused { path: host_path });
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(IrqbalanceError::Timeout {
                            path: host_path,
                            what: "connect",
                        });
                    }
                    std::thread::sleep(left.min(RETRY_PAUSE));
                }
                Err(e) => return Err(connect_error(e.into())),
            }
        }
    }

    /// The time left, or a timeout when none is (a socket timeout of zero would mean "none").
    fn left(&self, what: &'static str) -> Result<Duration, IrqbalanceError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout(what));
        }
        Ok(left)
    }

    fn timeout(&self, what: &'static str) -> IrqbalanceError {
        IrqbalanceError::Timeout {
            path: self.host_path.clone(),
            what,
        }
    }

    fn io(&self, what: &'static str, source: std::io::Error) -> IrqbalanceError {
        if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            return self.timeout(what);
        }
        IrqbalanceError::Io {
            path: self.host_path.clone(),
            what,
            source,
        }
    }

    /// The whole command in one `sendmsg` with our `SCM_CREDENTIALS` (the server reads once).
    fn send(&mut self, command: &[u8], what: &'static str) -> Result<(), IrqbalanceError> {
        let creds = UnixCredentials::new();
        let cmsgs = [ControlMessage::ScmCredentials(&creds)];
        loop {
            let left = self.left(what)?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|e| self.io(what, e))?;
            match sendmsg::<()>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(command)],
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) if n == command.len() => return Ok(()),
                Ok(n) => {
                    return Err(IrqbalanceError::Io {
                        path: self.host_path.clone(),
                        what,
                        source: std::io::Error::other(format!(
                            "sent {n} of {} bytes, and irqbalance reads one message",
                            command.len()
                        )),
                    });
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(self.io(what, e.into())),
            }
        }
    }

    /// Everything up to the peer's close after `command`, at most [`MAX_REPLY_BYTES`].
    fn read_to_end(
        &mut self,
        command: &'static str,
        what: &'static str,
    ) -> Result<Vec<u8>, IrqbalanceError> {
        let mut reply = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let left = self.left(what)?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(what, e))?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(reply),
                Ok(n) => {
                    if reply.len() + n > MAX_REPLY_BYTES {
                        return Err(IrqbalanceError::Protocol {
                            path: self.host_path.clone(),
                            command,
                            detail: format!("a reply longer than {MAX_REPLY_BYTES} bytes"),
                        });
                    }
                    reply.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(what, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_replies_parse_as_sock_handle_writes_them() {
        let s = parse_setup("SLEEP 10 BANNED 00000000").unwrap();
        assert_eq!((s.sleep, s.banned_irqs.len()), (10, 0));
        assert!(s.banned_cpus.is_empty());
        let s = parse_setup(
            "SLEEP 10 IRQ 24 LOAD 0 DIFF 18446744073709551615 CLASS 4 IRQ 7 LOAD 3 DIFF 0 \
             CLASS 0 BANNED 00000002,00f000f0",
        )
        .unwrap();
        assert_eq!(s.banned_irqs, vec![24, 7]);
        assert_eq!(s.banned_cpus.to_string(), "4-7,20-23,33");
    }

    #[test]
    fn garbled_setup_replies_are_errors() {
        for bad in [
            "",
            "SLEEP",
            "SLEEP x BANNED 0",
            "SLEEP 10",
            "SLEEP 10 BANNED",
            "SLEEP 10 BANNED 0000000g",
            "SLEEP 10 BANNED 0,,1",
            "SLEEP 10 BANNED 123456789",
            "SLEEP 10 BANNED 0 extra",
            "SLEEP 10 IRQ 5 LOAD 1 BANNED 0",
            "SLEEP 10 IRQ -5 LOAD 1 DIFF 2 CLASS 3 BANNED 0",
            "SLEEP 99999999999 BANNED 0",
            "SLEEP  10 BANNED 0",
            "BANNED 0",
        ] {
            assert!(parse_setup(bad).is_err(), "{bad:?} accepted");
        }
        let wide = format!("SLEEP 1 BANNED {}", vec!["0"; 129].join(","));
        assert!(parse_setup(&wide).is_err());
    }

    #[test]
    fn the_recorded_text_says_how_to_restore() {
        let set: CpuSet = "2-5".parse().unwrap();
        assert_eq!(Setting::Detected(set.clone()).original_text(), "NULL");
        assert_eq!(Setting::Explicit(set.clone()).original_text(), "2-5");
        assert_eq!(restore_arg_of("NULL"), Some(None));
        assert_eq!(restore_arg_of("2-5"), Some(Some(set.clone())));
        assert_eq!(restore_arg_of(""), None);
        assert_eq!(restore_arg_of("junk"), None);
        let held: CpuSet = "8-9".parse().unwrap();
        assert_eq!(
            Setting::Detected(set).composed(&held).to_string(),
            "2-5,8-9"
        );
    }

    #[test]
    fn socket_path_is_irqbalances() {
        assert_eq!(socket_path(812), "/run/irqbalance/irqbalance812.sock");
        assert_eq!(pid_of_socket(&socket_path(812)), Some(812));
        for bad in [
            "/run/irqbalance/irqbalance.sock",
            "/run/irqbalance/irqbalance0.sock",
            "/run/irqbalance/x/irqbalance8.sock",
            "/run/irqbalanceirqbalance8.sock",
            "/proc/irq/8",
        ] {
            assert_eq!(pid_of_socket(bad), None, "{bad}");
        }
    }
}
