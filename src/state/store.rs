//! The ledger on disk (see the parent module for the format and the crash argument): the
//! snapshot, the journal, their checked opening in the run directory, the node lock, and
//! qemu-server's config-lock probe.

use super::*;

/// One line of the journal, as written.
#[derive(Serialize)]
struct JournalLine<'a> {
    v: u32,
    generation: u64,
    changes: &'a [Change],
}

/// A snapshot, as written (borrowing the ledger rather than copying it).
#[derive(Serialize)]
struct SnapshotRef<'a> {
    version: u32,
    generation: u64,
    vms: &'a BTreeMap<u32, VmRecord>,
    claims: &'a BTreeMap<String, Box<Claim>>,
    #[serde(flatten)]
    extra: &'a Extra,
}

/// One line of the journal, as read.
#[derive(Deserialize)]
struct JournalEntry {
    v: u32,
    generation: u64,
    changes: Vec<Change>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: corrupt ledger ({source}); it is kept as is: inspect it, undo by hand, then remove it"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{file}: corrupt ledger (path {path:?} {reason}); it is kept as is: inspect it, undo by \
         hand, then remove it"
    )]
    BadPath {
        file: PathBuf,
        path: String,
        reason: &'static str,
    },
    #[error("refusing to record {path:?} in the ledger: it {reason}")]
    Unrecordable { path: String, reason: &'static str },
    #[error(
        "{path}: ledger format {found} is newer than this pvetune understands ({FORMAT_VERSION}); \
         run the pvetune that wrote it (or a newer one) to roll back"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "{path} is a symbolic link or not a regular file; pvetune never follows links in its \
         run directory: remove it (and find out who put it there)"
    )]
    NotRegular { path: PathBuf },
    #[error(
        "{path}: refused as pvetune's run directory: {reason} (it must be a real directory, \
         owned by root, mode 0700)"
    )]
    UnsafeDir { path: PathBuf, reason: String },
    #[error("another pvetune run held {path} for {}s; giving up", LOCK_TIMEOUT.as_secs())]
    LockTimeout { path: PathBuf },
}

/// How often a [`Store`] wrote, for the one-line debug summary and for tests that prove a
/// phase costs a constant number of full rewrites whatever its size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Full rewrites of `state.json` (or its removal, for an emptied ledger).
    pub rewrites: usize,
    /// Lines appended to the journal (one fdatasync each).
    pub appends: usize,
    /// Changes those lines carried.
    pub changes: usize,
}

/// Where the ledger lives, and its durable updates: journal appends and whole rewrites.
pub struct Store {
    dir: PathBuf,
    /// The journal, open for appending, once this store has appended to it, with its length
    /// up to the end of the last complete line.
    journal: RefCell<Option<(File, u64)>>,
    stats: Cell<StoreStats>,
}

/// The node-wide lock; released on drop.
pub struct NodeLock {
    _lock: nix::fcntl::Flock<File>,
}

impl Store {
    pub fn new(root: &Root) -> Self {
        Store {
            dir: root.path(paths::STATE_DIR),
            journal: RefCell::new(None),
            stats: Cell::new(StoreStats::default()),
        }
    }

    /// The run directory the ledger lives in (under the root prefix).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn stats(&self) -> StoreStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut StoreStats)) {
        let mut stats = self.stats.get();
        f(&mut stats);
        self.stats.set(stats);
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(std::io::Error) -> StateError {
        move |source| StateError::Io { path, source }
    }

    /// Reads the ledger: the snapshot, then the journal lines that follow it. An absent one is
    /// empty.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.dir.join(STATE_FILE);
        // A journal without a snapshot is left from emptying the ledger: nothing to replay.
        if !self.check_dir()? {
            return Ok(State::empty());
        }
        let Some(file) = self.open_if_present(&path)? else {
            return Ok(State::empty());
        };
        // Parsed as it is read, a buffer's worth at a time: the text of a snapshot with a
        // claim per IRQ is megabytes, which would be held beside the ledger it parses into.
        let reader = std::io::BufReader::with_capacity(1 << 16, file);
        let mut state: State = serde_json::from_reader(reader).map_err(|source| {
            if source.is_io() {
                self.io(path.clone())(source.into())
            } else {
                StateError::Corrupt {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        if state.version > FORMAT_VERSION {
            return Err(StateError::Version {
                path,
                found: state.version,
            });
        }
        if let Some((bad, reason)) = state
            .claims
            .keys()
            .find_map(|p| path_refusal(p).map(|why| (shown(p), why)))
        {
            return Err(StateError::BadPath {
                file: path,
                path: bad,
                reason,
            });
        }
        if state.version < FORMAT_VERSION {
            log::info!(
                "{}: ledger format {} is read as is and rewritten as format {FORMAT_VERSION} by the next change",
                path.display(),
                state.version
            );
            state.version = FORMAT_VERSION;
        }
        if state.generation > 0 {
            self.replay(&mut state)?;
        }
        Ok(state)
    }

    /// Applies the journal lines of the snapshot's generation, in order.
    fn replay(&self, state: &mut State) -> Result<(), StateError> {
        let path = self.dir.join(JOURNAL_FILE);
        let Some(text) = self.read_if_present(&path)? else {
            return Ok(());
        };
        let (complete, torn) = match text.rfind('\n') {
            Some(end) => text.split_at(end + 1),
            None => ("", text.as_str()),
        };
        if !torn.is_empty() {
            // An append cut short by a crash (none of the writes it announced had started), or
            // one still being written while this run reads without the node lock (`status`).
            log::info!(
                "{}: ignoring a last line without its newline ({} bytes)",
                path.display(),
                torn.len()
            );
        }
        let mut replayed = 0;
        for line in complete.lines() {
            let entry: JournalEntry =
                serde_json::from_str(line).map_err(|source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                })?;
            if entry.v > FORMAT_VERSION {
                return Err(StateError::Version {
                    path,
                    found: entry.v,
                });
            }
            // Every line, of any generation: a line naming such a path was not written by
            // pvetune.
            if let Some((bad, reason)) = refused_change(&entry.changes) {
                return Err(StateError::BadPath {
                    file: path,
                    path: bad,
                    reason,
                });
            }
            if entry.generation == state.generation {
                state.apply(entry.changes);
                replayed += 1;
            }
        }
        if replayed > 0 {
            log::debug!(
                "{}: replayed {replayed} batches not compacted yet (an earlier run stopped before the end of its phase)",
                path.display()
            );
        }
        Ok(())
    }

    /// Makes `changes` durable, then applies them to `state`: one line appended to the
    /// journal, with one fdatasync, whatever the number of changes. When no
    /// snapshot exists yet (an empty ledger) the journal would have nothing to follow, so the
    /// changes are saved as a new snapshot instead. On error `state` is left as it was.
    pub fn append(&self, state: &mut State, changes: Vec<Change>) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        // What the next load would refuse is never recorded (it would lock the node out).
        if let Some((path, reason)) = refused_change(&changes) {
            return Err(StateError::Unrecordable { path, reason });
        }
        if state.generation == 0 {
            if state.is_empty() {
                // The usual first batch (a pre-start's claim per IRQ on an empty ledger): made
                // in place, without a copy of the ledger, as the ledger before it is known.
                let before = State {
                    version: state.version,
                    extra: state.extra.clone(),
                    ..State::default()
                };
                state.apply(changes);
                return self.save(state).inspect_err(|_| *state = before);
            }
            let mut next = state.clone();
            next.apply(changes);
            self.save(&mut next)?;
            *state = next;
            return Ok(());
        }
        let path = self.dir.join(JOURNAL_FILE);
        let (file, len) = match self.journal.borrow_mut().take() {
            Some(open) => open,
            None => self.open_journal()?,
        };
        // Serialized straight into the file, a buffer's worth at a time, not into a copy of the
        // whole line in memory first: a pre-start's line holds a claim per IRQ (megabytes).
        // Compact JSON has no raw newline, so until the last byte is written the file ends in a
        // line without its newline, which load ignores (a crash at any point in between loses
        // nothing: none of the writes it announces has started).
        let line = JournalLine {
            v: FORMAT_VERSION,
            generation: state.generation,
            changes: &changes,
        };
        let written = write_line(&file, &line)
            .and_then(|n| file.sync_data().map(|()| n).map_err(LineError::Io));
        let written = match written {
            Ok(n) => n,
            Err(e) => {
                // Take back what may have reached the file, so that no later line follows a
                // torn or unsynced one; the next append reopens (and checks) it.
                let _ = file.set_len(len);
                return Err(match e {
                    LineError::Io(e) => self.io(path)(e),
                    LineError::Json(source) => StateError::Corrupt { path, source },
                });
            }
        };
        *self.journal.borrow_mut() = Some((file, len + written));
        let count = changes.len();
        state.apply(changes);
        self.count(|s| {
            s.appends += 1;
            s.changes += count;
        });
        Ok(())
    }

    /// Opens the journal for appending, first cutting a last line that a crash left without
    /// its newline (load ignored it; a new line must not be glued to it).
    fn open_journal(&self) -> Result<(File, u64), StateError> {
        let path = self.dir.join(JOURNAL_FILE);
        let io = |e| StateError::Io {
            path: path.clone(),
            source: e,
        };
        self.ensure_dir()?;
        let existed = fs::symlink_metadata(&path).is_ok();
        let mut file = open_in_run_dir(
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .mode(0o600),
            &path,
        )?;
        if !existed {
            self.sync_dir()?;
        }
        let len = file.metadata().map_err(io)?.len();
        let mut last = [0u8; 1];
        if len == 0 || (file.read_at(&mut last, len - 1).map_err(io)? == 1 && last[0] == b'\n') {
            return Ok((file, len));
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let good = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i as u64 + 1);
        file.set_len(good).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok((file, good))
    }

    /// Replaces the ledger by `state` atomically and durably (write, fsync, rename, fsync the
    /// directory), as the next generation, then drops the journal it supersedes: after a crash
    /// the ledger is either the old or the new one, never a torn one. An empty ledger is
    /// removed (snapshot first, then journal).
    pub fn save(&self, state: &mut State) -> Result<(), StateError> {
        self.ensure_dir()?;
        let path = self.dir.join(STATE_FILE);
        let journal = self.dir.join(JOURNAL_FILE);
        self.journal.borrow_mut().take();
        if state.is_empty() {
            remove_if_present(&path).map_err(self.io(path.clone()))?;
            remove_if_present(&journal).map_err(self.io(journal.clone()))?;
            state.generation = 0;
            self.count(|s| s.rewrites += 1);
            return self.sync_dir();
        }
        if state.generation == 0 {
            // No snapshot to follow: a journal here is left from an emptied ledger, and its
            // generations could repeat the new snapshot's.
            remove_if_present(&journal).map_err(self.io(journal.clone()))?;
        }
        let generation = state.generation + 1;
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        // A temp file left by a crash is unlinked (a link there is removed, not followed), and
        // the new one is created exclusively.
        remove_if_present(&tmp).map_err(self.io(tmp.clone()))?;
        let file = open_in_run_dir(
            OpenOptions::new().write(true).create_new(true).mode(0o600),
            &tmp,
        )?;
        // Serialized straight into the file (a buffer's worth at a time), not into a copy of
        // the whole snapshot in memory first: it is megabytes with a claim per IRQ. A failure
        // halfway leaves only the temp file, which is never renamed.
        let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
        let snapshot = SnapshotRef {
            version: FORMAT_VERSION,
            generation,
            vms: &state.vms,
            claims: &state.claims,
            extra: &state.extra,
        };
        serde_json::to_writer(&mut out, &snapshot).map_err(|source| {
            if source.is_io() {
                // The write's own error (ENOSPC, EIO), as `io::Error` keeps it.
                self.io(tmp.clone())(source.into())
            } else {
                StateError::Corrupt {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        out.write_all(b"\n").map_err(self.io(tmp.clone()))?;
        let file = out
            .into_inner()
            .map_err(|e| self.io(tmp.clone())(e.into_error()))?;
        file.sync_all().map_err(self.io(tmp.clone()))?;
        fs::rename(&tmp, &path).map_err(self.io(path.clone()))?;
        self.sync_dir()?;
        state.version = FORMAT_VERSION;
        state.generation = generation;
        self.count(|s| s.rewrites += 1);
        // Its lines are of the old generation now: ignored if this removal is lost.
        remove_if_present(&journal).map_err(self.io(journal))
    }

    /// At the end of a phase: folds the journal into a new snapshot once the journal has grown
    /// to a quarter of the snapshot's size (or the ledger is empty: its files go). Journal
    /// lines are compact JSON, the snapshot is pretty-printed: a quarter of its bytes is about
    /// half its entries. So a phase of a few changes on a big ledger (a post-start's pins next
    /// to 16,000 IRQ claims) appends one line instead of rewriting megabytes, every full
    /// rewrite is paid for by a journal of a quarter its size, and loading replays at most that
    /// much: amortised linear cost.
    pub fn compact(&self, state: &mut State) -> Result<(), StateError> {
        let journal = self.dir.join(JOURNAL_FILE);
        let Ok(journal) = fs::symlink_metadata(&journal) else {
            return Ok(());
        };
        let snapshot = fs::symlink_metadata(self.dir.join(STATE_FILE)).map_or(0, |m| m.len());
        if state.is_empty() || journal.len().saturating_mul(4) >= snapshot {
            self.save(state)?;
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StateError> {
        OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
            .open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io(self.dir.clone()))
    }

    /// Whether the run directory exists, after checking that it is one pvetune may trust: a
    /// real directory (not a link), owned by root (or by this process's user, for fixture
    /// roots), mode 0700. Anything else is refused: whoever can write there could make
    /// pvetune read a ledger of their making, or write through a link.
    fn check_dir(&self) -> Result<bool, StateError> {
        let meta = match fs::symlink_metadata(&self.dir) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.io(self.dir.clone())(e)),
        };
        let unsafe_dir = |reason: String| StateError::UnsafeDir {
            path: self.dir.clone(),
            reason,
        };
        if meta.file_type().is_symlink() {
            return Err(unsafe_dir("it is a symbolic link".into()));
        }
        if !meta.is_dir() {
            return Err(unsafe_dir("it is not a directory".into()));
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != me {
            return Err(unsafe_dir(format!("it is owned by uid {}", meta.uid())));
        }
        if meta.mode() & 0o7777 != 0o700 {
            return Err(unsafe_dir(format!(
                "its mode is {:04o}",
                meta.mode() & 0o7777
            )));
        }
        Ok(true)
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        if self.check_dir()? {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(self.io(self.dir.clone()))?;
        // Just created (by this run, or a concurrent one): 0700 whatever the umask took away.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(self.io(self.dir.clone()))?;
        self.check_dir().map(|_| ())
    }

    /// A ledger file open for reading (None: absent), never through a link.
    fn open_if_present(&self, path: &std::path::Path) -> Result<Option<File>, StateError> {
        match open_in_run_dir(OpenOptions::new().read(true), path) {
            Ok(file) => Ok(Some(file)),
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A ledger file's text (None: absent), never read through a link.
    fn read_if_present(&self, path: &std::path::Path) -> Result<Option<String>, StateError> {
        let Some(mut file) = self.open_if_present(path)? else {
            return Ok(None);
        };
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(self.io(path.to_path_buf()))?;
        Ok(Some(text))
    }

    /// Serializes pvetune runs on this node (qemu-server runs hooks of different VMs in
    /// parallel). Waits up to a minute, polling, so a stuck run cannot hang a start forever.
    pub fn lock(&self) -> Result<NodeLock, StateError> {
        use nix::fcntl::{Flock, FlockArg};
        self.ensure_dir()?;
        let path = self.dir.join(LOCK_FILE);
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            let file = open_in_run_dir(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600),
                &path,
            )?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(NodeLock { _lock: lock }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StateError::LockTimeout { path });
                }
                Err((_, errno)) => return Err(self.io(path)(errno.into())),
            }
        }
    }
}

/// Why a journal line could not be written.
enum LineError {
    Io(std::io::Error),
    Json(serde_json::Error),
}

/// Writes `line` and its newline at the end of `file` (open for appending) through a buffer,
/// and returns how many bytes it wrote.
fn write_line(file: &File, line: &JournalLine) -> Result<u64, LineError> {
    // Counted under the buffer: once per 64 KiB written, not once per JSON token.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, Counted { file, bytes: 0 });
    serde_json::to_writer(&mut out, line).map_err(|e| {
        if e.is_io() {
            LineError::Io(e.into())
        } else {
            LineError::Json(e)
        }
    })?;
    out.write_all(b"\n").map_err(LineError::Io)?;
    let counted = out
        .into_inner()
        .map_err(|e| LineError::Io(e.into_error()))?;
    Ok(counted.bytes)
}

/// A file that counts the bytes written to it.
struct Counted<'f> {
    file: &'f File,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Opens a file of the run directory without following a link there (`O_NOFOLLOW`: a link
/// fails with ELOOP) and without blocking on a FIFO (`O_NONBLOCK`, no effect on a regular
/// file), and refuses anything but a regular file.
fn open_in_run_dir(opts: &mut OpenOptions, path: &std::path::Path) -> Result<File, StateError> {
    let not_regular = || StateError::NotRegular {
        path: path.to_path_buf(),
    };
    let file = opts
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(nix::libc::ELOOP) => not_regular(),
            _ => StateError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Ok(file)
}

fn remove_if_present(path: &std::path::Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether qemu-server holds the VM's config lock right now (a start, with its hooks, runs
/// under it). Probed with a non-blocking flock that is released at once.
pub fn config_lock_held(root: &Root, vmid: u32) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let path = root.path(format!("{}/lock-{vmid}.conf", paths::QEMU_LOCK_DIR));
    let Ok(file) = File::open(path) else {
        return false;
    };
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
