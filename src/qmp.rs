//! `Qmp`: a small, bounded client for a VM's QEMU Machine Protocol socket
//! (`/var/run/qemu-server/<vmid>.qmp`), enough to ask QEMU which host thread runs which vCPU
//! and iothread.
//!
//! QEMU serves one QMP client at a time. A second client's `connect()` still succeeds (the
//! kernel queues it in the listen backlog), but QEMU sends it nothing until the first client
//! leaves. qemu-server talks to this socket during a VM start, so "busy" shows up as a missing
//! greeting, not as a refused connection: [`Qmp::connect`] waits for the greeting for a short,
//! fixed budget and then gives up with [`QmpError::Busy`] so the caller can fall back to `/proc`.
//!
//! A session has ONE deadline ([`SESSION_DEADLINE`] from the start of [`Qmp::connect`]) for
//! everything it does: the connect, the greeting, and every command after it. Each read and
//! write gets only the time left until that deadline (a per-read timeout would let a peer that
//! sends one byte every half second hold the hook for ever), and every reply has a line cap, so
//! a misbehaving peer cannot hang a VM start (hookscripts run without a timeout, under the VM's
//! config lock).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

/// How long [`Qmp::connect`] tries to get a greeting: long enough for qemu-server to finish a
/// short exchange, short enough not to delay the VM start noticeably.
pub const CONNECT_BUDGET: Duration = Duration::from_secs(1);
/// The whole session's deadline, counted from the start of [`Qmp::connect`]: connect, greeting
/// and every command together. QEMU answers the queries used here in well under a millisecond.
pub const SESSION_DEADLINE: Duration = Duration::from_secs(3);
/// Pause between connection attempts while the socket does not exist yet or refuses.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Events QEMU may interleave before a reply; more than this means something is wrong.
const MAX_LINES_PER_REPLY: usize = 256;
/// A reply line longer than this is not one QEMU sends for the commands used here.
const MAX_LINE_BYTES: u64 = 4 << 20;

/// Why talking to QEMU failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: is the VM running?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "QMP socket {path} is busy: no greeting within {waited_ms} ms, another client \
         (qemu-server, a backup job) holds it"
    )]
    Busy { path: PathBuf, waited_ms: u64 },
    #[error(
        "QMP socket {path}: no reply to '{command}' within the session deadline of {deadline_ms} ms"
    )]
    Timeout {
        path: PathBuf,
        command: String,
        deadline_ms: u64,
    },
    #[error("QMP socket {path}: I/O error during '{command}'")]
    Io {
        path: PathBuf,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path}: QEMU closed the connection during '{command}'")]
    Closed { path: PathBuf, command: String },
    #[error("QMP socket {path}: unexpected reply to '{command}': {detail}")]
    Protocol {
        path: PathBuf,
        command: String,
        detail: String,
    },
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// One vCPU from `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpCpu {
    pub cpu_index: u32,
    /// The host thread (tid) running this vCPU.
    pub thread_id: i32,
    pub socket_id: Option<u32>,
    pub core_id: Option<u32>,
    /// SMT sibling index inside the core (`props.thread-id`), not a host thread id.
    pub thread_id_in_core: Option<u32>,
    pub die_id: Option<u32>,
}

/// One iothread from `query-iothreads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpIothread {
    pub id: String,
    pub thread_id: i32,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawCpu {
    cpu_index: u32,
    thread_id: i64,
    #[serde(default)]
    props: RawProps,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct RawProps {
    socket_id: Option<u32>,
    core_id: Option<u32>,
    thread_id: Option<u32>,
    die_id: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawIothread {
    id: String,
    thread_id: i64,
}

/// The socket of a session: every read and write waits at most until `deadline`.
struct Bounded {
    stream: UnixStream,
    deadline: Instant,
}

impl Bounded {
    /// The time left, or `TimedOut` when none is: a socket timeout of zero would mean "none".
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connected QMP session in command mode.
pub struct Qmp {
    path: PathBuf,
    /// The session socket; its `deadline` is the session's.
    stream: BufReader<Bounded>,
    session: Duration,
    next_id: u64,
}

impl Qmp {
    /// Connects with [`CONNECT_BUDGET`] for the greeting and [`SESSION_DEADLINE`] for the
    /// whole session, and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Qmp::connect_with(path, CONNECT_BUDGET, SESSION_DEADLINE)
    }

    /// Connects, reads the greeting within `budget` and leaves capabilities negotiation mode;
    /// everything this session does from now on (this included) ends within `session`.
    pub fn connect_with(path: &Path, budget: Duration, session: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let deadline = start + session;
        let greeting_deadline = (start + budget).min(deadline);
        let stream = connect_until(path, greeting_deadline)?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            stream: BufReader::new(Bounded {
                stream,
                // The greeting is what a busy socket withholds: wait for it only until then.
                deadline: greeting_deadline,
            }),
            session,
            next_id: 1,
        };
        let greeting = match qmp.read_message("greeting") {
            Ok(greeting) => greeting,
            Err(QmpError::Timeout { .. }) => {
                return Err(QmpError::Busy {
                    path: path.to_path_buf(),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            Err(e) => return Err(e),
        };
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("greeting", "no 'QMP' greeting: is this a QMP socket?"));
        }
        qmp.stream.get_mut().deadline = deadline;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value; QEMU's `error` becomes
    /// [`QmpError::Command`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|source| self.io_error(command, source))?;

        for _ in 0..MAX_LINES_PER_REPLY {
            let mut message = self.read_message(command)?;
            // Asynchronous events (e.g. RESUME, RTC_CHANGE) may arrive at any time.
            if message.get("event").is_some() {
                continue;
            }
            // A reply to an earlier request that timed out on our side is not this one's.
            if message.get("id").is_some_and(|got| *got != json!(id)) {
                continue;
            }
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                let text = |key| error.get(key).and_then(Value::as_str).unwrap_or("");
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class").to_string(),
                    desc: text("desc").to_string(),
                });
            }
            return Err(self.protocol(command, &format!("neither return nor error: {message}")));
        }
        Err(self.protocol(
            command,
            &format!("more than {MAX_LINES_PER_REPLY} lines without a reply"),
        ))
    }

    /// `query-cpus-fast`: every vCPU with its host thread and topology position.
    pub fn query_cpus_fast(&mut self) -> Result<Vec<QmpCpu>, QmpError> {
        const COMMAND: &str = "query-cpus-fast";
        let value = self.execute(COMMAND, None)?;
        let raw: Vec<RawCpu> =
            serde_json::from_value(value).map_err(|e| self.protocol(COMMAND, &e.to_string()))?;
        raw.into_iter()
            .map(|cpu| {
                Ok(QmpCpu {
                    cpu_index: cpu.cpu_index,
                    thread_id: self.tid(COMMAND, cpu.thread_id)?,
                    socket_id: cpu.props.socket_id,
                    core_id: cpu.props.core_id,
                    thread_id_in_core: cpu.props.thread_id,
                    die_id: cpu.props.die_id,
                })
            })
            .collect()
    }

    /// `query-iothreads`: every `-object iothread` with its host thread.
    pub fn query_iothreads(&mut self) -> Result<Vec<QmpIothread>, QmpError> {
        const COMMAND: &str = "query-iothreads";
        let value = self.execute(COMMAND, None)?;
        let raw: Vec<RawIothread> =
            serde_json::from_value(value).map_err(|e| self.protocol(COMMAND, &e.to_string()))?;
        raw.into_iter()
            .map(|io| {
                Ok(QmpIothread {
                    thread_id: self.tid(COMMAND, io.thread_id)?,
                    id: io.id,
                })
            })
            .collect()
    }

    /// Reads one JSON object from one line, with the line length capped.
    fn read_message(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let read = (&mut self.stream)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) => Err(QmpError::Closed {
                path: self.path.clone(),
                command: command.to_string(),
            }),
            Ok(_) if !line.ends_with(b"\n") && line.len() as u64 >= MAX_LINE_BYTES => {
                Err(self.protocol(command, "a reply line longer than 4 MiB"))
            }
            Ok(_) => serde_json::from_slice::<Value>(&line)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| {
                    let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                    self.protocol(command, &format!("not a JSON object: {shown:?}"))
                }),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(QmpError::Timeout {
                    path: self.path.clone(),
                    command: command.to_string(),
                    deadline_ms: self.session.as_millis() as u64,
                })
            }
            Err(source) => Err(self.io_error(command, source)),
        }
    }

    fn tid(&self, command: &str, raw: i64) -> Result<i32, QmpError> {
        i32::try_from(raw)
            .ok()
            .filter(|tid| *tid > 0)
            .ok_or_else(|| self.protocol(command, &format!("thread-id {raw} is not a Linux tid")))
    }

    fn protocol(&self, command: &str, detail: &str) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            command: command.to_string(),
            detail: detail.to_string(),
        }
    }

    fn io_error(&self, command: &str, source: std::io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            command: command.to_string(),
            source,
        }
    }
}

/// `UnixStream::connect` until `deadline`. A blocking connect to a socket whose listen backlog
/// is full waits inside the kernel with no timeout, and std has no `connect_timeout` for unix
/// sockets, so the connect runs in a helper thread: when the deadline passes first, the hook
/// goes on without it (the thread ends when the kernel gives up, or with the process, which is
/// short-lived).
fn connect_until(path: &Path, deadline: Instant) -> Result<UnixStream, QmpError> {
    let (tx, rx) = mpsc::channel();
    let target = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("qmp-connect".into())
        .spawn(move || {
            let result = loop {
                match UnixStream::connect(&target) {
                    // Not there yet (QEMU still starting): try again.
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::NotFound
                                | ErrorKind::ConnectionRefused
                                | ErrorKind::WouldBlock
                        ) && Instant::now() + RETRY_PAUSE < deadline =>
                    {
                        std::thread::sleep(RETRY_PAUSE);
                    }
                    other => break other,
                }
            };
            let _ = tx.send(result);
        });
    let connect_error = |source| QmpError::Connect {
        path: path.to_path_buf(),
        source,
    };
    spawned.map_err(connect_error)?;
    let wait = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(wait) {
        Ok(result) => result.map_err(connect_error),
        Err(_) => Err(QmpError::Busy {
            path: path.to_path_buf(),
            waited_ms: wait.as_millis() as u64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const GREETING: &str = "{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n";

    /// Removes a fake server's directory when the test ends.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A listening socket `vm.qmp` in a fresh temp dir of its own.
    fn listen(name: &str) -> (UnixListener, PathBuf, TempDir) {
        let dir =
            std::env::temp_dir().join(format!("pvetune-test-qmp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.qmp");
        let listener = UnixListener::bind(&path).unwrap();
        (listener, path, TempDir(dir))
    }

    /// A fake QEMU: sends `greeting`, then answers each request line with the next scripted
    /// reply (several lines each).
    fn fake(name: &str, greeting: &'static str, replies: Vec<&'static str>) -> (PathBuf, TempDir) {
        let (listener, path, dir) = listen(name);
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            writer.write_all(greeting.as_bytes()).unwrap();
            let mut reader = BufReader::new(stream);
            for reply in replies {
                let mut request = String::new();
                if reader.read_line(&mut request).unwrap_or(0) == 0 {
                    return;
                }
                let _ = writer.write_all(reply.as_bytes());
            }
            // Hold the connection open until the client leaves.
            let _ = reader.read_to_end(&mut Vec::new());
        });
        (path, dir)
    }

    #[test]
    fn events_are_skipped_and_errors_mapped() {
        let (path, _dir) = fake(
            "events",
            GREETING,
            vec![
                "{\"return\": {}, \"id\": 1}\n",
                "{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": [{\"id\": \"io0\", \"thread-id\": 42, \"poll-max-ns\": 0}], \"id\": 2}\n",
                "{\"id\": 3, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\n",
            ],
        );
        let mut qmp = Qmp::connect(&path).unwrap();
        let io = qmp.query_iothreads().unwrap();
        assert_eq!(
            io,
            [QmpIothread {
                id: "io0".into(),
                thread_id: 42
            }]
        );
        match qmp.execute("bogus", None) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => assert_eq!(
                (&*command, &*class, &*desc),
                ("bogus", "CommandNotFound", "nope")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn silent_server_is_busy_within_the_budget() {
        let (path, _dir) = fake("busy", "", vec![]);
        let start = Instant::now();
        let err = Qmp::connect_with(&path, Duration::from_millis(300), SESSION_DEADLINE).err();
        assert!(matches!(err, Some(QmpError::Busy { .. })), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn missing_socket_is_a_connect_error_after_retries() {
        let path = std::env::temp_dir().join("pvetune-test-qmp-does-not-exist.qmp");
        let start = Instant::now();
        let err = Qmp::connect_with(&path, Duration::from_millis(200), SESSION_DEADLINE).err();
        assert!(matches!(err, Some(QmpError::Connect { .. })), "{err:?}");
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn endless_events_and_garbage_are_bounded() {
        let events: &'static str = "{\"event\": \"X\"}\n"
            .repeat(MAX_LINES_PER_REPLY + 1)
            .leak();
        let (path, _dir) = fake("flood", GREETING, vec!["{\"return\": {}}\n", events]);
        let mut qmp = Qmp::connect(&path).unwrap();
        let err = qmp.query_cpus_fast().unwrap_err();
        assert!(matches!(err, QmpError::Protocol { .. }), "{err:?}");

        let (path, _dir) = fake("garbage", GREETING, vec!["{\"return\": {}}\n", "[1, 2]\n"]);
        let mut qmp = Qmp::connect(&path).unwrap();
        let err = qmp.query_cpus_fast().unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");

        let (path, _dir) = fake("notqmp", "{\"hello\": 1}\n", vec![]);
        let err = Qmp::connect(&path).err().unwrap();
        assert!(err.to_string().contains("QMP socket?"), "{err}");
    }

    /// A peer that dribbles bytes of a `qmp_capabilities` reply that never ends (one byte every
    /// 300 ms, each read gets one within any per-read timeout) and then closes after `bytes`.
    fn dribbler(name: &str, greeting: &'static str, bytes: usize) -> (PathBuf, TempDir) {
        let (listener, path, dir) = listen(name);
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            if stream.write_all(greeting.as_bytes()).is_err() {
                return;
            }
            let _ = stream.write_all(b"{");
            for _ in 0..bytes {
                std::thread::sleep(Duration::from_millis(300));
                if stream.write_all(b" ").is_err() {
                    return;
                }
            }
        });
        (path, dir)
    }

    #[test]
    fn a_dribbling_peer_is_cut_off_at_the_session_deadline() {
        let session = Duration::from_millis(1500);
        // 40 bytes at 300 ms: 12 s, far past the deadline.
        let (path, _dir) = dribbler("dribble-reply", GREETING, 40);
        let start = Instant::now();
        let err = Qmp::connect_with(&path, Duration::from_millis(500), session).err();
        let elapsed = start.elapsed();
        assert!(matches!(err, Some(QmpError::Timeout { .. })), "{err:?}");
        assert!(elapsed < session + Duration::from_secs(1), "{elapsed:?}");

        // A greeting dribbled the same way is a busy socket, within the greeting budget.
        let (path, _dir) = dribbler("dribble-greeting", "", 40);
        let start = Instant::now();
        let err = Qmp::connect_with(&path, Duration::from_millis(500), session).err();
        let elapsed = start.elapsed();
        assert!(matches!(err, Some(QmpError::Busy { .. })), "{err:?}");
        assert!(
            elapsed < Duration::from_millis(500) + Duration::from_secs(1),
            "{elapsed:?}"
        );
    }

    #[test]
    fn cpu_props_are_optional() {
        let (path, _dir) = fake(
            "cpus",
            GREETING,
            vec![
                "{\"return\": {}}\n",
                "{\"return\": [{\"cpu-index\": 0, \"thread-id\": 7, \"props\": {\"core-id\": 1, \"thread-id\": 0, \"socket-id\": 0, \"die-id\": 0}, \"target\": \"x86_64\"}, {\"cpu-index\": 1, \"thread-id\": 8, \"target\": \"s390x\"}]}\n",
            ],
        );
        let cpus = Qmp::connect(&path).unwrap().query_cpus_fast().unwrap();
        assert_eq!(
            cpus,
            [
                QmpCpu {
                    cpu_index: 0,
                    thread_id: 7,
                    socket_id: Some(0),
                    core_id: Some(1),
                    thread_id_in_core: Some(0),
                    die_id: Some(0)
                },
                QmpCpu {
                    cpu_index: 1,
                    thread_id: 8,
                    socket_id: None,
                    core_id: None,
                    thread_id_in_core: None,
                    die_id: None
                }
            ]
        );
    }
}
