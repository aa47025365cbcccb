//! The ledger: what pvetune holds, per VM and for the node, kept durably under `/run/pvetune`.
//!
//! Host-wide settings are *claims*, not overwrites. A claim on a kernel file keeps the value
//! from before the first claimer (`original`) and every claimer's wanted value in claim order;
//! the file holds the last claimer's value. Releasing one VM's claim writes the value the
//! remaining claimers need, and releasing the last writes `original` back. So two VMs that
//! share a sysctl can stop in any order and the host ends where it started.
//!
//! `/run` is a tmpfs: after a reboot the ledger is gone, and so are the kernel values it
//! described, which is exactly right.
//!
//! # On disk: a snapshot and a journal (format 2)
//!
//! Crash model: pvetune may die at any instruction (kill -9, OOM killer, a bug) and the next
//! run must still know every value it has to put back. So whatever is about to change a kernel
//! file or a thread is durable in the ledger *before* the change (write-ahead), and the ledger
//! on disk is never torn. Cost model: a phase may change thousands of files (one per IRQ), so
//! recording them must cost time linear in the changes, not one full rewrite per change.
//!
//! - `state.json` is a *snapshot*: the whole [`State`], with its format `version` and a
//!   `generation`. It is only ever replaced whole ([`Store::save`]: temp file, fsync, rename,
//!   directory fsync), at most a couple of times per phase (the compaction at its end).
//! - `state.journal` holds the [`Change`]s made since that snapshot: one JSON line per batch
//!   (a phase's whole plan, or a whole rollback), each appended with one write and one
//!   fdatasync ([`Store::append`]). A line names the generation of the snapshot it follows.
//!
//! Loading is the snapshot plus, in order, every journal line of its generation. A change sets
//! one key of the ledger (a claim, a pin, a VM record) to an absolute value, so replaying is
//! exact whatever had happened in memory. Why this is crash-safe:
//!
//! - a line is appended before the kernel writes it describes, so a crash before or during
//!   those writes leaves a ledger that holds every one of them; undo tolerates entries whose
//!   write never happened (restoring the original over an unchanged file writes nothing);
//! - a crash in the middle of an append leaves a last line without its newline: it is ignored
//!   on load (none of its writes had started), and cut off before the next append;
//! - compaction writes the next generation's snapshot, renames it over the old one and only
//!   then removes the journal: a crash in between leaves lines of the old generation, which
//!   the new snapshot already contains and which are therefore ignored;
//! - a journal only counts next to a snapshot: with no snapshot (an empty ledger) the first
//!   batch is a full save, which removes any journal first. An emptied ledger removes the
//!   snapshot, then the journal.
//!
//! A ledger of format 1 (a snapshot only, no journal) loads as generation 0 and is rewritten
//! as format 2 by the next change; a newer format is refused, naming the file.
//!
//! # Input, not truth
//!
//! Rollback writes as root what the ledger says, so what is read is checked: every path a
//! snapshot or a journal line names must be normalized and under [`LEDGER_PATH_PREFIXES`],
//! else the whole ledger is refused (linear in its size); fields this version does not know
//! are kept ([`Extra`]) and written back. The run directory must be a real directory owned by
//! root (or this process's user, for fixture roots), mode 0700, and no file in it is opened
//! through a link (`O_NOFOLLOW`; the temp file with `O_EXCL` after unlinking a stale one).

use crate::cpuset::{CpuFormat, CpuSet, exclude_text};
use crate::root::{Root, paths};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const STATE_FILE: &str = "state.json";
const JOURNAL_FILE: &str = "state.journal";
const LOCK_FILE: &str = "lock";
/// 1: snapshot only, rewritten after every change. 2: snapshot with a generation, plus the
/// journal of changes since it.
pub const FORMAT_VERSION: u32 = 2;
/// How long a hook waits for another pvetune run on this node before giving up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// The kernel file families pvetune writes, host-absolute. The ledger is input, not truth:
/// every path it names (a claim's key: the only path a record holds; pins name threads, not
/// files) must be normalized and lie under one of these, or the whole ledger is refused as
/// corrupt, since rollback would write the `original` it holds there as root. A tunable that
/// writes a new family adds its prefix here (with a trailing `/`).
pub const LEDGER_PATH_PREFIXES: &[&str] = &[
    "/proc/sys/",                // sysctls
    "/proc/irq/",                // IRQ affinities, default_smp_affinity
    "/sys/devices/system/",      // cpufreq governors, CPU and node attributes
    "/sys/fs/cgroup/",           // cpuset partitions
    "/sys/kernel/mm/hugepages/", // hugepage pools
    "/sys/bus/pci/",             // PCI reset, driver binding
];
/// How much of a refused path an error message shows.
const SHOWN_PATH_MAX: usize = 160;

/// Unknown fields of a ledger record, kept as read so that a rewrite by this version does not
/// drop what a newer one recorded.
pub type Extra = BTreeMap<String, serde_json::Value>;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Which snapshot this is: journal lines of another generation do not follow it. 0: no
    /// snapshot on disk (an empty ledger, or one of format 1 not rewritten yet).
    #[serde(default)]
    generation: u64,
    #[serde(deserialize_with = "vms_by_id")]
    pub vms: BTreeMap<u32, VmRecord>,
    /// Host path -> claim.
    pub claims: BTreeMap<String, Claim>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The `vms` map: its keys are VMIDs as JSON strings. Read by hand because a struct with a
/// flattened field buffers its input, and serde then no longer reads integer map keys from
/// strings.
fn vms_by_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, VmRecord>, D::Error> {
    let by_text = BTreeMap::<String, VmRecord>::deserialize(d)?;
    by_text
        .into_iter()
        .map(|(id, rec)| match id.parse::<u32>() {
            Ok(vmid) if id.bytes().all(|b| b.is_ascii_digit()) => Ok((vmid, rec)),
            _ => Err(serde::de::Error::custom(format!(
                "VM id {:?} is not a number",
                shown(&id)
            ))),
        })
        .collect()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// CPUs the VM owns exclusively while it runs (or starts).
    pub cpus: CpuSet,
    /// QEMU's pid and its start time (`/proc/<pid>/stat` field 22): together they identify
    /// the process even after the pid is reused.
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    /// The last phase that ran for this VM.
    pub phase: String,
    pub pins: Vec<PinRecord>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    pub tid: i32,
    pub label: String,
    /// Affinity before pvetune first pinned the thread.
    pub old: CpuSet,
    pub new: CpuSet,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Exact file content before the first claim.
    pub original: String,
    pub holders: Vec<Holder>,
    /// Set for a file whose value is a CPU set composed from every holder (an IRQ's
    /// affinity): each holder's `value` is then the CPUs it takes out, not a value to write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compose: Option<Compose>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// How a composed claim's value is made: the original CPU set minus every holder's CPUs, or
/// `fallback` minus them when that would leave none (see `cpuset::exclude_text`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compose {
    pub format: CpuFormat,
    /// The housekeeping CPUs as the latest claimer saw them.
    pub fallback: CpuSet,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub vmid: u32,
    pub value: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of the journal: sets one key of the ledger to an absolute value (`None`
/// removes it). Absolute, so that replaying a journal gives exactly the ledger that was in
/// memory when it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// The claim on one host file.
    Claim { path: String, claim: Option<Claim> },
    /// One pinned thread of a VM; setting one creates the VM's record if it has none.
    Pin {
        vmid: u32,
        tid: i32,
        pin: Option<PinRecord>,
    },
    /// A VM's whole record, its pins included.
    Vm { vmid: u32, record: Option<VmRecord> },
}

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
    claims: &'a BTreeMap<String, Claim>,
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

/// Why `path` may not be in the ledger, if it may not: it must be absolute and normalized
/// (no empty, `.` or `..` component, no NUL) and lie under one of [`LEDGER_PATH_PREFIXES`].
/// Linear in the path's length.
pub fn path_refusal(path: &str) -> Option<&'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Some("is not absolute");
    };
    if path.contains('\0') {
        return Some("contains a NUL byte");
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some("is not normalized (an empty, '.' or '..' component)");
    }
    if !LEDGER_PATH_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Some("is not a kernel file pvetune writes");
    }
    None
}

/// A path (or any text from the ledger) as a message shows it: at most [`SHOWN_PATH_MAX`]
/// characters, then `...`.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_PATH_MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// The first path of `changes` that may not be in the ledger, with why.
fn refused_change(changes: &[Change]) -> Option<(String, &'static str)> {
    changes.iter().find_map(|c| match c {
        Change::Claim { path, .. } => path_refusal(path).map(|why| (shown(path), why)),
        Change::Pin { .. } | Change::Vm { .. } => None,
    })
}

impl Claim {
    /// The value the file should hold: the original when no holder is left; for a composed
    /// claim, the original minus the CPUs of every holder; else the last claimer's value.
    /// Composing is commutative, so with composed claims the stop order of VMs never matters.
    pub fn effective(&self) -> Cow<'_, str> {
        let Some(last) = self.holders.last() else {
            return Cow::Borrowed(&self.original);
        };
        let Some(compose) = &self.compose else {
            return Cow::Borrowed(&last.value);
        };
        let taken = self
            .holders
            .iter()
            .filter_map(|h| h.value.parse::<CpuSet>().ok())
            .fold(CpuSet::new(), |acc, c| acc.union(&c));
        Cow::Owned(exclude_text(
            &self.original,
            compose.format,
            &taken,
            &compose.fallback,
        ))
    }
}

impl State {
    /// An empty ledger, as an absent `state.json` reads.
    pub fn empty() -> Self {
        State {
            version: FORMAT_VERSION,
            ..State::default()
        }
    }

    /// CPUs owned by every VM in the ledger except `vmid`.
    pub fn owned_by_others(&self, vmid: u32) -> BTreeMap<u32, CpuSet> {
        self.vms
            .iter()
            .filter(|(id, _)| **id != vmid)
            .map(|(id, rec)| (*id, rec.cpus.clone()))
            .collect()
    }

    /// Every VM that pvetune holds anything for (a record or a claim).
    pub fn held_vms(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.vms.keys().copied().collect();
        for claim in self.claims.values() {
            ids.extend(claim.holders.iter().map(|h| h.vmid));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.claims.is_empty()
    }

    /// Applies changes in order, in time linear in their number (replaying a journal, or
    /// mirroring in memory what was just journaled). Pins are looked up by tid through an
    /// index built once per VM touched, not by a search of the pin list per change.
    pub fn apply(&mut self, changes: &[Change]) {
        // vmid -> that VM's pins being edited (None: removed), and tid -> position in them.
        let mut editing: HashMap<u32, PinEdit> = HashMap::new();
        for change in changes {
            match change {
                Change::Claim { path, claim } => match claim {
                    Some(claim) => {
                        self.claims.insert(path.clone(), claim.clone());
                    }
                    None => {
                        self.claims.remove(path);
                    }
                },
                Change::Vm { vmid, record } => {
                    // The whole record, pins included, replaces any edit in progress.
                    editing.remove(vmid);
                    match record {
                        Some(record) => self.vms.insert(*vmid, record.clone()),
                        None => self.vms.remove(vmid),
                    };
                }
                Change::Pin { vmid, tid, pin } => {
                    let edit = match editing.entry(*vmid) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            // Removing a pin of a VM that has no record: nothing to do.
                            if pin.is_none() && !self.vms.contains_key(vmid) {
                                continue;
                            }
                            e.insert(PinEdit::take(self.vms.entry(*vmid).or_default()))
                        }
                    };
                    edit.set(*tid, pin.clone());
                }
            }
        }
        for (vmid, edit) in editing {
            self.vms.entry(vmid).or_default().pins = edit.finish();
        }
    }
}

/// A VM's pins while a batch of changes edits them: removal leaves a hole, filled in at the
/// end, so that neither lookups nor removals search or shift the list.
struct PinEdit {
    pins: Vec<Option<PinRecord>>,
    index: HashMap<i32, usize>,
}

impl PinEdit {
    fn take(record: &mut VmRecord) -> Self {
        let pins: Vec<Option<PinRecord>> = std::mem::take(&mut record.pins)
            .into_iter()
            .map(Some)
            .collect();
        let index = pins
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (p.tid, i)))
            .collect();
        PinEdit { pins, index }
    }

    fn set(&mut self, tid: i32, pin: Option<PinRecord>) {
        match (self.index.get(&tid).copied(), pin) {
            (Some(i), Some(pin)) => self.pins[i] = Some(pin),
            (Some(i), None) => {
                self.pins[i] = None;
                self.index.remove(&tid);
            }
            (None, Some(pin)) => {
                self.index.insert(tid, self.pins.len());
                self.pins.push(Some(pin));
            }
            (None, None) => {}
        }
    }

    fn finish(self) -> Vec<PinRecord> {
        self.pins.into_iter().flatten().collect()
    }
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
    /// Lines appended to the journal (one write and one fdatasync each).
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
        let Some(text) = self.read_if_present(&path)? else {
            return Ok(State::empty());
        };
        let mut state: State =
            serde_json::from_str(&text).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
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
                state.apply(&entry.changes);
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
    /// journal, with one write and one fdatasync, whatever the number of changes. When no
    /// snapshot exists yet (an empty ledger) the journal would have nothing to follow, so the
    /// changes are saved as a new snapshot instead. On error `state` is left as it was.
    pub fn append(&self, state: &mut State, changes: &[Change]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        // What the next load would refuse is never recorded (it would lock the node out).
        if let Some((path, reason)) = refused_change(changes) {
            return Err(StateError::Unrecordable { path, reason });
        }
        if state.generation == 0 {
            let mut next = state.clone();
            next.apply(changes);
            self.save(&mut next)?;
            *state = next;
            return Ok(());
        }
        let path = self.dir.join(JOURNAL_FILE);
        let mut line = serde_json::to_string(&JournalLine {
            v: FORMAT_VERSION,
            generation: state.generation,
            changes,
        })
        .map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        line.push('\n');
        let (mut file, len) = match self.journal.borrow_mut().take() {
            Some(open) => open,
            None => self.open_journal()?,
        };
        let written = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            // Take back what may have reached the file, so that no later line follows a torn
            // or unsynced one; the next append reopens (and checks) it.
            let _ = file.set_len(len);
            return Err(self.io(path)(e));
        }
        *self.journal.borrow_mut() = Some((file, len + line.len() as u64));
        state.apply(changes);
        self.count(|s| {
            s.appends += 1;
            s.changes += changes.len();
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
        let mut text = serde_json::to_string_pretty(&SnapshotRef {
            version: FORMAT_VERSION,
            generation,
            vms: &state.vms,
            claims: &state.claims,
            extra: &state.extra,
        })
        .map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        text.push('\n');
        // A temp file left by a crash is unlinked (a link there is removed, not followed), and
        // the new one is created exclusively.
        remove_if_present(&tmp).map_err(self.io(tmp.clone()))?;
        let mut file = open_in_run_dir(
            OpenOptions::new().write(true).create_new(true).mode(0o600),
            &tmp,
        )?;
        file.write_all(text.as_bytes())
            .map_err(self.io(tmp.clone()))?;
        file.sync_all().map_err(self.io(tmp.clone()))?;
        fs::rename(&tmp, &path).map_err(self.io(path.clone()))?;
        self.sync_dir()?;
        state.version = FORMAT_VERSION;
        state.generation = generation;
        self.count(|s| s.rewrites += 1);
        // Its lines are of the old generation now: ignored if this removal is lost.
        remove_if_present(&journal).map_err(self.io(journal))
    }

    /// Folds the journal into a new snapshot when there is one (the end of a phase): one full
    /// rewrite, so that the journal never outgrows a phase.
    pub fn compact(&self, state: &mut State) -> Result<(), StateError> {
        let journal = self.dir.join(JOURNAL_FILE);
        if self.journal.borrow().is_some() || fs::symlink_metadata(&journal).is_ok() {
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

    /// A ledger file's text (None: absent), never read through a link.
    fn read_if_present(&self, path: &std::path::Path) -> Result<Option<String>, StateError> {
        let mut file = match open_in_run_dir(OpenOptions::new().read(true), path) {
            Ok(file) => file,
            Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(e) => return Err(e),
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
mod tests {
    use super::*;

    #[test]
    fn effective_value_is_the_last_claimers() {
        let mut claim = Claim {
            original: "1\n".into(),
            holders: vec![],
            compose: None,
            extra: Extra::new(),
        };
        assert_eq!(claim.effective(), "1\n");
        claim.holders.push(Holder {
            vmid: 100,
            value: "120".into(),
            extra: Extra::new(),
        });
        claim.holders.push(Holder {
            vmid: 101,
            value: "60".into(),
            extra: Extra::new(),
        });
        assert_eq!(claim.effective(), "60");
    }

    #[test]
    fn a_composed_claim_takes_out_every_holders_cpus_in_any_order() {
        let holder = |vmid, cpus: &str| Holder {
            vmid,
            value: cpus.into(),
            extra: Extra::new(),
        };
        let claim = |original: &str| Claim {
            original: original.into(),
            holders: vec![],
            compose: Some(Compose {
                format: CpuFormat::List,
                fallback: "0-1".parse().unwrap(),
                extra: Extra::new(),
            }),
            extra: Extra::new(),
        };
        let mut irq = claim("0-7\n");
        irq.holders.push(holder(100, "4-5"));
        assert_eq!(irq.effective(), "0-3,6-7");
        irq.holders.push(holder(101, "6-7"));
        irq.holders.push(holder(102, "2-3"));
        assert_eq!(irq.effective(), "0-1");
        // Stopping one VM gives back exactly its CPUs, whatever the order.
        irq.holders.retain(|h| h.vmid != 100);
        assert_eq!(irq.effective(), "0-1,4-5");
        irq.holders.retain(|h| h.vmid != 102);
        assert_eq!(irq.effective(), "0-5");
        irq.holders.clear();
        assert_eq!(irq.effective(), "0-7\n", "the last stop restores the bytes");
        // An IRQ bound to VM CPUs only: when none of its CPUs is left, the fallback.
        let mut bound = claim("4-7");
        bound.holders.push(holder(100, "4-5"));
        assert_eq!(bound.effective(), "6-7");
        bound.holders.push(holder(101, "6-7"));
        assert_eq!(bound.effective(), "0-1");
        bound.holders.retain(|h| h.vmid != 101);
        assert_eq!(bound.effective(), "6-7");
    }

    /// A private ledger directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("pvetune-test-state-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Dir(dir)
        }
        fn store(&self) -> Store {
            Store::new(&Root::new(&self.0))
        }
        fn file(&self, name: &str) -> PathBuf {
            self.0.join("run/pvetune").join(name)
        }
        /// `/run/pvetune` as pvetune creates it: mode 0700.
        fn make_run_dir(&self) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(self.file(""))
                .unwrap();
        }
        /// A ledger with a snapshot (VM 100's record) and one journal line (a claim on `/a`).
        fn with_journal(name: &str) -> (Dir, Store, State) {
            let dir = Dir::new(name);
            let store = dir.store();
            let mut state = store.load().unwrap();
            store.append(&mut state, &[vm_record()]).unwrap();
            store
                .append(&mut state, &[claim("/proc/sys/pvetune/a", 100, "2")])
                .unwrap();
            (dir, store, state)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn claim(path: &str, vmid: u32, value: &str) -> Change {
        Change::Claim {
            path: path.into(),
            claim: Some(Claim {
                original: "1\n".into(),
                holders: vec![Holder {
                    vmid,
                    value: value.into(),
                    extra: Extra::new(),
                }],
                compose: None,
                extra: Extra::new(),
            }),
        }
    }

    fn pin(tid: i32, cpu: u32) -> Change {
        Change::Pin {
            vmid: 100,
            tid,
            pin: Some(PinRecord {
                tid,
                label: format!("t{tid}"),
                old: CpuSet::range(0, 1),
                new: CpuSet::range(cpu, cpu),
                extra: Extra::new(),
            }),
        }
    }

    fn vm_record() -> Change {
        Change::Vm {
            vmid: 100,
            record: Some(VmRecord {
                cpus: CpuSet::range(4, 7),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn save_and_load_round_trip_and_empty_removes_files() {
        let dir = Dir::new("round-trip");
        let store = dir.store();
        let mut state = store.load().unwrap();
        state.vms.insert(
            100,
            VmRecord {
                cpus: CpuSet::range(4, 7),
                ..Default::default()
            },
        );
        store.save(&mut state).unwrap();
        assert_eq!(state.generation, 1);
        assert_eq!(store.load().unwrap(), state);
        store
            .append(&mut state, &[claim("/proc/sys/pvetune/a", 100, "2")])
            .unwrap();
        assert!(dir.file(JOURNAL_FILE).exists());
        store.save(&mut State::empty()).unwrap();
        assert!(!dir.file(STATE_FILE).exists());
        assert!(!dir.file(JOURNAL_FILE).exists());
        let _lock = store.lock().unwrap();
    }

    #[test]
    fn appends_replay_on_load_and_compaction_folds_them() {
        let dir = Dir::new("journal");
        let store = dir.store();
        let mut state = store.load().unwrap();
        // No snapshot yet: the first batch becomes one.
        store.append(&mut state, &[vm_record()]).unwrap();
        assert_eq!(store.stats().rewrites, 1);
        assert!(!dir.file(JOURNAL_FILE).exists());
        let batch: Vec<Change> = (0..50)
            .map(|i| claim(&format!("/proc/irq/{i}/smp_affinity_list"), 100, "3"))
            .chain((0..20).map(|tid| pin(1000 + tid, 2)))
            .collect();
        store.append(&mut state, &batch).unwrap();
        store.append(&mut state, &[pin(1005, 3)]).unwrap();
        assert_eq!(
            store.stats(),
            StoreStats {
                rewrites: 1,
                appends: 2,
                changes: 71
            }
        );
        let loaded = dir.store().load().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.claims.len(), 50);
        assert_eq!(loaded.vms[&100].pins.len(), 20);
        assert_eq!(loaded.vms[&100].pins[5].new, CpuSet::range(3, 3));
        assert_eq!(loaded.vms[&100].cpus, CpuSet::range(4, 7));
        store.compact(&mut state).unwrap();
        assert_eq!(store.stats().rewrites, 2);
        assert!(!dir.file(JOURNAL_FILE).exists());
        assert_eq!(dir.store().load().unwrap(), state);
        // Nothing journaled since: nothing to fold.
        store.compact(&mut state).unwrap();
        assert_eq!(store.stats().rewrites, 2);
    }

    #[test]
    fn pin_changes_keep_order_and_remove_in_place() {
        let mut state = State::empty();
        state.apply(&[pin(1, 0), pin(2, 0), pin(3, 0), pin(2, 1)]);
        let tids = |s: &State| s.vms[&100].pins.iter().map(|p| p.tid).collect::<Vec<_>>();
        assert_eq!(tids(&state), [1, 2, 3]);
        assert_eq!(state.vms[&100].pins[1].new, CpuSet::range(1, 1));
        let remove = |tid| Change::Pin {
            vmid: 100,
            tid,
            pin: None,
        };
        state.apply(&[remove(2), remove(9), pin(4, 0), remove(1)]);
        assert_eq!(tids(&state), [3, 4]);
        state.apply(&[
            Change::Vm {
                vmid: 100,
                record: None,
            },
            remove(3),
        ]);
        assert!(state.is_empty(), "removing a pin creates no record");
        state.apply(&[pin(5, 0), vm_record(), pin(6, 0)]);
        assert_eq!(
            tids(&state),
            [6],
            "a whole record replaces the pins before it"
        );
    }

    #[test]
    fn a_line_torn_by_a_crash_is_ignored_then_cut() {
        let (dir, _, state) = Dir::with_journal("torn");
        let before = state.clone();
        // The process died in the middle of the next append.
        let mut journal = OpenOptions::new()
            .append(true)
            .open(dir.file(JOURNAL_FILE))
            .unwrap();
        journal
            .write_all(b"{\"v\":2,\"generation\":1,\"chan")
            .unwrap();
        let later = dir.store();
        let mut state = later.load().unwrap();
        assert_eq!(state, before);
        later
            .append(&mut state, &[claim("/proc/sys/pvetune/b", 100, "3")])
            .unwrap();
        let text = fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(dir.store().load().unwrap(), state);
        assert_eq!(state.claims.len(), 2);
    }

    #[test]
    fn lines_of_an_older_generation_are_ignored() {
        let (dir, store, mut state) = Dir::with_journal("stale");
        let stale = fs::read(dir.file(JOURNAL_FILE)).unwrap();
        // Compaction, then a change that the stale line would undo if it were replayed.
        store.compact(&mut state).unwrap();
        store
            .append(
                &mut state,
                &[Change::Claim {
                    path: "/proc/sys/pvetune/a".into(),
                    claim: None,
                }],
            )
            .unwrap();
        store.compact(&mut state).unwrap();
        // As if the journal's removal after the rename had been lost.
        fs::write(dir.file(JOURNAL_FILE), &stale).unwrap();
        let loaded = dir.store().load().unwrap();
        assert!(loaded.claims.is_empty());
        assert_eq!(loaded, state);
    }

    #[test]
    fn a_journal_without_snapshot_is_dropped_before_the_next_snapshot() {
        let (dir, store, _) = Dir::with_journal("orphan");
        let orphan = fs::read(dir.file(JOURNAL_FILE)).unwrap();
        store.save(&mut State::empty()).unwrap();
        // As if emptying the ledger had stopped between removing the snapshot and the journal.
        fs::write(dir.file(JOURNAL_FILE), &orphan).unwrap();
        let later = dir.store();
        let mut state = later.load().unwrap();
        assert!(state.is_empty());
        // The next snapshot is generation 1 again: the orphan lines must not follow it.
        later.append(&mut state, &[vm_record()]).unwrap();
        assert!(!dir.file(JOURNAL_FILE).exists());
        assert!(dir.store().load().unwrap().claims.is_empty());
    }

    #[test]
    fn format_1_loads_and_is_rewritten_as_format_2() {
        let dir = Dir::new("v1");
        dir.make_run_dir();
        fs::write(
            dir.file(STATE_FILE),
            r#"{"version":1,"vms":{"100":{"cpus":"4-7","pid":null,"start_time":null,"phase":"pre-start","pins":[]}},
               "claims":{"/proc/sys/vm/stat_interval":{"original":"1\n","holders":[{"vmid":100,"value":"120"}]}}}"#,
        )
        .unwrap();
        let store = dir.store();
        let mut state = store.load().unwrap();
        assert_eq!(state.vms[&100].cpus, CpuSet::range(4, 7));
        assert_eq!(
            state.claims["/proc/sys/vm/stat_interval"].effective(),
            "120"
        );
        store
            .append(&mut state, &[claim("/proc/sys/pvetune/a", 100, "2")])
            .unwrap();
        let text = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        assert_eq!(dir.store().load().unwrap(), state);
    }

    #[test]
    fn newer_or_corrupt_ledgers_are_refused_with_their_path() {
        let dir = Dir::new("refused");
        let store = dir.store();
        let mut state = store.load().unwrap();
        store.append(&mut state, &[vm_record()]).unwrap();
        let snapshot = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
        fs::write(
            dir.file(STATE_FILE),
            snapshot.replace("\"version\": 2", "\"version\": 3"),
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("state.json: ledger format 3 is newer than this pvetune understands (2)"),
            "{err}"
        );
        fs::write(dir.file(STATE_FILE), &snapshot).unwrap();
        fs::write(dir.file(JOURNAL_FILE), "{\"v\":2,\"generation\":1}\n").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("state.journal: corrupt ledger") && err.contains("changes"),
            "{err}"
        );
        fs::write(
            dir.file(JOURNAL_FILE),
            "{\"v\":3,\"generation\":1,\"changes\":[]}\n",
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("state.journal: ledger format 3 is newer"),
            "{err}"
        );
    }

    #[test]
    fn ledger_paths_must_be_kernel_files_pvetune_writes() {
        for good in [
            "/proc/sys/vm/stat_interval",
            "/proc/irq/35/smp_affinity_list",
            "/sys/devices/system/cpu/cpufreq/policy4/scaling_governor",
            "/sys/fs/cgroup/pvetune.slice/cpuset.cpus.partition",
            "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
            "/sys/bus/pci/devices/0000:01:00.0/reset",
        ] {
            assert_eq!(path_refusal(good), None, "{good}");
        }
        for bad in [
            "/etc/shadow",
            "proc/sys/vm/stat_interval",
            "/proc/sys/../../etc/shadow",
            "/proc/sys/./vm/stat_interval",
            "/proc/sys//vm/stat_interval",
            "/proc/sys/vm/",
            "/proc/sys/",
            "/proc/sysrq-trigger",
            "/proc/sys/vm\0/x",
            "",
        ] {
            assert!(path_refusal(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn a_ledger_naming_another_path_is_refused_whole() {
        let (dir, store, _) = Dir::with_journal("bad-path");
        let snapshot = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
        let journal = fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap();
        // In the snapshot.
        let mut bad: serde_json::Value = serde_json::from_str(&snapshot).unwrap();
        bad["claims"]["/etc/shadow"] = serde_json::json!({"original": "x", "holders": []});
        fs::write(dir.file(STATE_FILE), bad.to_string()).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("state.json: corrupt ledger (path \"/etc/shadow\" is not a kernel file"),
            "{err}"
        );
        // In a journal line; the path shown is bounded.
        fs::write(dir.file(STATE_FILE), &snapshot).unwrap();
        let long = format!("/proc/sys/{}/../../../etc/shadow", "x".repeat(5000));
        let line = journal.replace("/proc/sys/pvetune/a", &long);
        fs::write(dir.file(JOURNAL_FILE), format!("{journal}{line}")).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("state.journal: corrupt ledger (path \"/proc/sys/xxx")
                && err.contains("...\" is not normalized"),
            "{err}"
        );
        assert!(err.len() < 400, "{} bytes: {err}", err.len());
        fs::write(
            dir.file(JOURNAL_FILE),
            format!(
                "{journal}{}",
                line.replace("\"generation\":1", "\"generation\":0")
            ),
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("is not normalized"),
            "a line of another generation: {err}"
        );
        // Nor is such a path ever recorded.
        fs::write(dir.file(JOURNAL_FILE), &journal).unwrap();
        let mut state = store.load().unwrap();
        let err = store
            .append(&mut state, &[claim_on("/etc/shadow")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing to record \"/etc/shadow\""), "{err}");
        assert_eq!(fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap(), journal);
    }

    fn claim_on(path: &str) -> Change {
        claim(path, 100, "2")
    }

    #[test]
    fn fields_this_version_does_not_know_survive_a_change_and_compaction() {
        let dir = Dir::new("extra");
        dir.make_run_dir();
        fs::write(
            dir.file(STATE_FILE),
            r#"{"version":2,"generation":4,"future":{"a":[1,2]},
               "vms":{"100":{"cpus":"4-7","pid":null,"start_time":null,"phase":"pre-start",
                             "cgroup":"/qemu.slice/100.scope",
                             "pins":[{"tid":7,"label":"CPU 0","old":"0-7","new":"4","prio":5}]}},
               "claims":{"/proc/irq/9/smp_affinity_list":{"original":"0-7\n",
                   "holders":[{"vmid":100,"value":"4-7","since":"boot"}],
                   "compose":{"format":"list","fallback":"0-3","numa":1},
                   "kind":"irq"}}}"#,
        )
        .unwrap();
        let store = dir.store();
        let mut state = store.load().unwrap();
        store
            .append(
                &mut state,
                &[claim("/proc/sys/vm/stat_interval", 100, "120")],
            )
            .unwrap();
        store.compact(&mut state).unwrap();
        let text = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["generation"], 5, "{text}");
        assert_eq!(json["future"], serde_json::json!({"a": [1, 2]}), "{text}");
        let vm = &json["vms"]["100"];
        assert_eq!(vm["cgroup"], "/qemu.slice/100.scope", "{text}");
        assert_eq!(vm["pins"][0]["prio"], 5, "{text}");
        let irq = &json["claims"]["/proc/irq/9/smp_affinity_list"];
        assert_eq!(irq["kind"], "irq", "{text}");
        assert_eq!(irq["holders"][0]["since"], "boot", "{text}");
        assert_eq!(irq["compose"]["numa"], 1, "{text}");
        assert_eq!(
            json["claims"]["/proc/sys/vm/stat_interval"]["holders"][0]["value"],
            "120"
        );
        assert_eq!(dir.store().load().unwrap(), state);
    }

    /// A file outside the run directory holding `text`, and a link to it planted as `name`.
    fn plant(dir: &Dir, name: &str, text: &str) -> PathBuf {
        let outside = dir.0.join(format!("outside-{name}"));
        fs::write(&outside, text).unwrap();
        let _ = fs::remove_file(dir.file(name));
        std::os::unix::fs::symlink(&outside, dir.file(name)).unwrap();
        outside
    }

    #[test]
    fn a_link_planted_as_the_snapshot_is_not_followed() {
        // A link to a file that would even read as a valid ledger.
        let (dir, _, _) = Dir::with_journal("link-snapshot");
        let text = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
        let outside = plant(&dir, STATE_FILE, &text);
        let err = dir.store().load().unwrap_err().to_string();
        assert!(
            err.contains("state.json is a symbolic link or not a regular file"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&outside).unwrap(), text);
    }

    #[test]
    fn a_link_planted_as_the_journal_is_neither_replayed_nor_appended_to() {
        let (dir, _, mut state) = Dir::with_journal("link-journal");
        let text = fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap();
        let outside = plant(&dir, JOURNAL_FILE, &text);
        let err = dir.store().load().unwrap_err().to_string();
        assert!(err.contains("state.journal is a symbolic link"), "{err}");
        let err = dir
            .store()
            .append(&mut state, &[claim_on("/proc/sys/pvetune/b")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("state.journal is a symbolic link"), "{err}");
        assert_eq!(fs::read_to_string(&outside).unwrap(), text);
    }

    #[test]
    fn a_link_planted_as_the_temp_file_is_removed_not_followed() {
        // As a temp file a crash left: removed, the link not followed, the snapshot written.
        let (dir, store, mut state) = Dir::with_journal("link-temp");
        let outside = plant(&dir, &format!("{STATE_FILE}.tmp"), "precious\n");
        store.compact(&mut state).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious\n");
        assert!(fs::symlink_metadata(dir.file(&format!("{STATE_FILE}.tmp"))).is_err());
        assert!(
            fs::symlink_metadata(dir.file(STATE_FILE))
                .unwrap()
                .is_file()
        );
        assert_eq!(dir.store().load().unwrap(), state);
    }

    #[test]
    fn a_link_planted_as_the_lock_file_is_not_followed() {
        let dir = Dir::new("link-lock");
        dir.make_run_dir();
        let outside = plant(&dir, LOCK_FILE, "precious\n");
        let err = dir.store().lock().err().unwrap().to_string();
        assert!(
            err.contains("run/pvetune/lock is a symbolic link or not a regular file"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious\n");
    }

    #[test]
    fn a_run_directory_others_could_write_or_a_link_is_refused() {
        let (dir, store, _) = Dir::with_journal("dir-mode");
        let run = dir.0.join("run/pvetune");
        assert_eq!(
            fs::metadata(&run).unwrap().mode() & 0o7777,
            0o700,
            "created 0700"
        );
        fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
        for err in [
            store.load().unwrap_err().to_string(),
            store.lock().err().unwrap().to_string(),
        ] {
            assert!(
                err.contains("refused as pvetune's run directory: its mode is 0755"),
                "{err}"
            );
        }
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
        if nix::unistd::geteuid().is_root() {
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            nix::unistd::chown(&run, nobody, None).unwrap();
            let err = store.load().unwrap_err().to_string();
            assert!(err.contains("it is owned by uid 65534"), "{err}");
            nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        }
        assert!(store.load().is_ok());

        // A link to a directory that would pass every other check.
        let real = dir.0.join("elsewhere");
        fs::rename(&run, &real).unwrap();
        std::os::unix::fs::symlink(&real, &run).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("it is a symbolic link"), "{err}");
        let err = store.lock().err().unwrap().to_string();
        assert!(err.contains("it is a symbolic link"), "{err}");
        assert!(!real.join(LOCK_FILE).exists());
    }
}
