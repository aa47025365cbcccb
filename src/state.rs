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
//!   directory fsync), at most a couple of times per phase (the compaction at its end, once
//!   the journal is a quarter of the snapshot's size: `Store::compact`).
//! - `state.journal` holds the [`Change`]s made since that snapshot: one JSON line per batch
//!   (a phase's whole plan, or a whole rollback), each appended with one fdatasync
//!   ([`Store::append`]; serialized into the file in 64 KiB writes, never built whole in
//!   memory). A line names the generation of the snapshot it follows.
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

use crate::cpuset::CpuSet;
use crate::root::{Root, paths};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod claim;
mod store;
pub use claim::{Claim, Compose, ComposeOp, DIR_ABSENT, Holder, Holders, KEPT, Text};
pub use store::{NodeLock, StateError, Store, StoreStats, config_lock_held};

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
    "/sys/kernel/mm/ksm/",       // KSM paused while a VM runs
    // irqbalance's control socket (`/run/irqbalance/irqbalance<pid>.sock`): not a file that
    // is written but the key of the `Ban` claim; rollback talks to it (`exec/irqbalance.rs`).
    "/run/irqbalance/",
];
/// How much of a refused path an error message shows.
const SHOWN_PATH_MAX: usize = 160;

/// Unknown fields of a ledger record, kept as read so that a rewrite by this version does not
/// drop what a newer one recorded. Boxed, and absent when there are none (every record this
/// version writes): a claim has three places for them (itself, its `compose`, each holder),
/// and the ledger holds a claim per IRQ.
#[derive(Debug, Clone, Default)]
// The box is the point: a word where an empty map takes three.
#[allow(clippy::box_collection)]
pub struct Extra(Option<Box<BTreeMap<String, serde_json::Value>>>);

impl Extra {
    pub fn new() -> Self {
        Extra(None)
    }

    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.as_ref()?.get(key)
    }

    pub fn insert(&mut self, key: String, value: serde_json::Value) -> Option<serde_json::Value> {
        self.0.get_or_insert_default().insert(key, value)
    }

    pub fn is_empty(&self) -> bool {
        self.fields().is_none()
    }

    fn fields(&self) -> Option<&BTreeMap<String, serde_json::Value>> {
        self.0.as_deref().filter(|m| !m.is_empty())
    }
}

impl PartialEq for Extra {
    fn eq(&self, other: &Self) -> bool {
        self.fields() == other.fields()
    }
}

impl Eq for Extra {}

impl Serialize for Extra {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.fields().into_iter().flatten())
    }
}

impl<'de> Deserialize<'de> for Extra {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        Ok(Extra((!fields.is_empty()).then(|| Box::new(fields))))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Which snapshot this is: journal lines of another generation do not follow it. 0: no
    /// snapshot on disk (an empty ledger, or one of format 1 not rewritten yet).
    #[serde(default)]
    generation: u64,
    #[serde(deserialize_with = "vms_by_id")]
    pub vms: BTreeMap<u32, VmRecord>,
    /// Host path -> claim. Boxed: a map node keeps room for eleven entries and is about half
    /// full after inserts in order, so the entries it holds inline are kept to two words.
    #[serde(deserialize_with = "claims_in_full_nodes")]
    pub claims: BTreeMap<String, Box<Claim>>,
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
    /// Files the kernel refused to change for this VM (managed IRQs), with the errno, as the
    /// last phase found them: for `status`, nothing to undo.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<(String, String)>,
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
    /// The thread's own start time (`/proc/<pid>/task/<tid>/stat` field 22) when it was first
    /// pinned: with the VM's pid and process start time, what proves that a tid from the
    /// ledger is still that thread before it is touched again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of the journal: sets one key of the ledger to an absolute value (`None`
/// removes it). Absolute, so that replaying a journal gives exactly the ledger that was in
/// memory when it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// The claim on one host file. Boxed, as the record and the pin are: a batch holds a
    /// change per IRQ, and a removal (a rollback's) is then a few words, not a whole claim.
    Claim {
        path: String,
        claim: Option<Box<Claim>>,
    },
    /// One pinned thread of a VM; setting one creates the VM's record if it has none.
    Pin {
        vmid: u32,
        tid: i32,
        pin: Option<Box<PinRecord>>,
    },
    /// A VM's whole record, its pins included.
    Vm {
        vmid: u32,
        record: Option<Box<VmRecord>>,
    },
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

/// The claims map, built from its entries in one go: a map filled by inserts in key order (as
/// serde's map visitor does) leaves its nodes about half full, one built from a sorted list
/// fills them. As serde's map does, a key that comes twice keeps its last value.
fn claims_in_full_nodes<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Box<Claim>>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<(String, Box<Claim>)>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of paths to claims")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    Ok(d.deserialize_map(Entries)?.into_iter().collect())
}

impl State {
    /// An empty ledger, as an absent `state.json` reads.
    pub fn empty() -> Self {
        State {
            version: FORMAT_VERSION,
            ..State::default()
        }
    }

    /// The claim on `path`, if any.
    pub fn claim(&self, path: &str) -> Option<&Claim> {
        self.claims.get(path).map(|c| &**c)
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
            ids.extend(claim.holders.iter().filter(|h| !h.kept()).map(|h| h.vmid));
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
    /// The changes are moved into the ledger, not copied (a pre-start's batch holds a claim
    /// per IRQ).
    pub fn apply(&mut self, changes: Vec<Change>) {
        // vmid -> that VM's pins being edited (None: removed), and tid -> position in them.
        let mut editing: HashMap<u32, PinEdit> = HashMap::new();
        for change in changes {
            match change {
                Change::Claim { path, claim } => match claim {
                    Some(claim) => {
                        self.claims.insert(path, claim);
                    }
                    None => {
                        self.claims.remove(&path);
                    }
                },
                Change::Vm { vmid, record } => {
                    // The whole record, pins included, replaces any edit in progress.
                    editing.remove(&vmid);
                    match record {
                        Some(record) => self.vms.insert(vmid, *record),
                        None => self.vms.remove(&vmid),
                    };
                }
                Change::Pin { vmid, tid, pin } => {
                    let edit = match editing.entry(vmid) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            // Removing a pin of a VM that has no record: nothing to do.
                            if pin.is_none() && !self.vms.contains_key(&vmid) {
                                continue;
                            }
                            e.insert(PinEdit::take(self.vms.entry(vmid).or_default()))
                        }
                    };
                    edit.set(tid, pin.map(|p| *p));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuset::CpuFormat;

    /// The ledger holds a claim per IRQ, a batch a change per IRQ: none may grow unnoticed
    /// (tests/ledger_memory.rs counts the bytes a claim costs on the heap).
    #[test]
    fn a_claim_and_a_change_stay_small() {
        use std::mem::size_of;
        let sizes = [
            // Its first holder in place (48 bytes) instead of a pointer to a list of them.
            ("Claim", size_of::<Claim>(), 136),
            ("Holder", size_of::<Holder>(), 48),
            ("Compose", size_of::<Compose>(), 48),
            ("Change", size_of::<Change>(), 32),
            ("Extra", size_of::<Extra>(), 8),
            ("CpuSet", size_of::<CpuSet>(), 16),
        ];
        for (name, size, most) in sizes {
            assert!(size <= most, "{name}: {size} bytes, more than {most}");
        }
    }

    /// The claims map is built from its entries in one go: in any order, and a path that
    /// comes twice keeps its last claim, as a map filled by inserts did.
    #[test]
    fn claims_read_in_any_order_keep_the_last_of_a_path() {
        let claim = |original: &str| format!(r#"{{"original":"{original}","holders":[]}}"#);
        let text = format!(
            r#"{{"version":2,"vms":{{}},"claims":{{"/proc/sys/b":{},"/proc/sys/a":{},"/proc/sys/b":{}}}}}"#,
            claim("1"),
            claim("2"),
            claim("3")
        );
        let state: State = serde_json::from_str(&text).unwrap();
        let read: Vec<(&str, &str)> = state
            .claims
            .iter()
            .map(|(p, c)| (p.as_str(), c.original.as_str()))
            .collect();
        assert_eq!(read, [("/proc/sys/a", "2"), ("/proc/sys/b", "3")]);
    }

    #[test]
    fn effective_value_is_the_last_claimers() {
        let mut claim = Claim {
            original: "1\n".into(),
            holders: Holders::new(),
            compose: None,
            extra: Extra::new(),
        };
        assert_eq!(claim.effective(), "1\n");
        claim.holders.push(Holder {
            vmid: 100,
            value: "120".into(),
            seq: 0,
            extra: Extra::new(),
        });
        claim.holders.push(Holder {
            vmid: 101,
            value: "60".into(),
            seq: 0,
            extra: Extra::new(),
        });
        assert_eq!(claim.effective(), "60");
    }

    #[test]
    fn a_composed_claim_takes_out_every_holders_cpus_in_any_order() {
        let holder = |vmid, cpus: &str| Holder {
            vmid,
            value: cpus.into(),
            seq: 0,
            extra: Extra::new(),
        };
        let claim = |original: &str| Claim {
            original: original.into(),
            holders: Holders::new(),
            compose: Some(Compose {
                op: ComposeOp::Exclude,
                format: CpuFormat::List,
                fallback: "0-1".parse().unwrap(),
                base: CpuSet::new(),
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

    #[test]
    fn a_ban_is_the_recorded_base_plus_every_holders_cpus() {
        let holder = |vmid, cpus: &str| Holder {
            vmid,
            value: cpus.into(),
            seq: 1,
            extra: Extra::new(),
        };
        let mut ban = Claim {
            original: "NULL".into(),
            holders: smallvec::smallvec![holder(100, "6-11"), holder(101, "3-5")],
            compose: Some(Compose {
                base: "2".parse().unwrap(),
                ..Compose::of(ComposeOp::Ban)
            }),
            extra: Extra::new(),
        };
        assert_eq!(ban.effective(), "2-11");
        ban.holders.retain(|h| h.vmid != 100);
        assert_eq!(ban.effective(), "2-5");
        ban.holders.clear();
        assert_eq!(ban.effective(), "NULL", "irqbalance detects again");
        // As the ledger has it: the op by name, the base beside it.
        let json = serde_json::to_string(ban.compose.as_ref().unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"op":"ban","format":"list","fallback":"","base":"2"}"#
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
            "/sys/bus/pci/rescan",
            "/sys/kernel/mm/ksm/run",
            "/run/irqbalance/irqbalance812.sock",
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
}
