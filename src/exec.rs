//! Executing a plan: write-ahead ledger, apply, and undo, one batch at a time.
//!
//! Crash model (the ledger's side is in `state.rs`): pvetune may die at any point, and a later
//! run (`rollback`, or the reconcile step of any hook) must still put every file back byte for
//! byte and every thread back on its CPUs. Cost model: a batch of thousands of changes (one
//! per IRQ) must cost time linear in its size, and memory bounded by the ledger. So a batch
//! (a stage of [`Executor::apply`] between barriers, at most [`CHUNK`] steps) goes:
//!
//! 1. plan: read every target once (the file's bytes, the thread's affinity) and work out the
//!    ledger entries the batch leads to; nothing changes yet, and a read that fails here
//!    fails the batch before anything happened;
//! 2. record: append those entries, with the old values, to the ledger's journal: one line
//!    (streamed in 64 KiB writes) and one fdatasync for the whole batch (write-ahead);
//! 3. change: make the writes and pins in order, skipping those already in place.
//!
//! A crash after 2 leaves a ledger that claims files some of which were never written: undo
//! writes the original over an unchanged file, which is a no-op. A failure in 3 undoes the
//! batch in reverse (each file back to the bytes read in 1) and journals the ledger entries as
//! they were before (one more append). [`Executor::rollback`] makes its writes first and
//! journals what it released after them: a crash in between leaves the claims in the ledger,
//! and the next rollback finds their files already restored. Undo is idempotent throughout.
//! Per change: one read and at most one write; per batch: a constant number of ledger writes.
//!
//! The parts: `prepare` (step 1), this file (steps 2 and 3, the batch and its stages between
//! barriers), `undo` (a failed batch, and `rollback`), `cgroup` and `irqbalance` (targets that
//! are not written as plain text).

use crate::cpuset::CpuSet;
use crate::host::Host;
use crate::plan::{Action, Step, ThreadRef};
use crate::root::Root;
use crate::state::{Change, Claim, ComposeOp, PinRecord, State, StateError, Store, VmRecord};
use std::borrow::Cow;
use std::cell::Cell;
use std::io;

/// The most steps of a stage made as one batch (a journal line and a sync each): what a batch
/// holds in memory beside the ledger is bounded by it, whatever the number of IRQs.
pub const CHUNK: usize = 1024;

/// The batches of `steps`: its stages between [`Action::Barrier`]s (which go), each cut in
/// batches of at most [`CHUNK`] steps. Each batch is a `Vec` of its own, so that it is freed
/// once made.
fn batches(steps: Vec<Step>) -> Vec<Vec<Step>> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let total = steps.len();
    for step in steps {
        if step.action == Action::Barrier {
            out.push(std::mem::take(&mut batch));
            continue;
        }
        if batch.len() == CHUNK {
            out.push(std::mem::take(&mut batch));
        }
        if batch.capacity() == 0 {
            batch.reserve_exact(CHUNK.min(total));
        }
        batch.push(step);
    }
    out.push(batch);
    for batch in &mut out {
        batch.shrink_to_fit();
    }
    out
}

mod cgroup;
mod irqbalance;
mod memory;
mod prepare;
mod undo;
pub use cgroup::read_claimed;
pub use irqbalance::EXCHANGE_DEADLINE;
pub use memory::{PCI_DEVICES, PCI_RESCAN, device_dir, driver_of};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write '{value}' to {path}: {source}")]
    Write {
        path: String,
        value: String,
        source: io::Error,
    },
    #[error("cannot pin {thread} to CPUs {cpus}: {source}{hint}")]
    Pin {
        thread: String,
        cpus: CpuSet,
        source: io::Error,
        hint: &'static str,
    },
    #[error("{thread}: the VM is not running, so its threads cannot be pinned or moved")]
    NotRunning { thread: String },
    #[error("cannot move {thread} into {cgroup}: {source}")]
    Move {
        thread: String,
        cgroup: String,
        source: io::Error,
    },
    #[error("{path} reads '{got}' after pvetune wrote '{wanted}' (the kernel's verdict)")]
    Expect {
        path: String,
        wanted: String,
        got: String,
    },
    #[error(
        "hugepages, {place}: the kernel gave {got} of the {wanted} pages pvetune asked for \
         ({path}); the pool is put back as it was and the VM does not start. Memory there is \
         short or too fragmented: free memory on that node (stop another VM; \
         hugepages.drop-caches and compaction help), bind the VM to another node (numaN: \
         hostnodes=), or reserve the pages at boot (pvetune reserve)"
    )]
    Shortfall {
        path: String,
        wanted: u64,
        got: u64,
        place: String,
    },
    #[error("PCI {device}: {message}")]
    Device { device: String, message: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What an apply did, for the one-line summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub changed: usize,
    pub unchanged: usize,
    pub vanished: usize,
    /// Writes the kernel refused where it may (a managed IRQ): the path and the errno.
    pub refused: Vec<(String, String)>,
}

/// One change of a batch, as planned before anything is changed. `'s`: the steps it was
/// planned from, whose paths it borrows (a batch has an intent per IRQ).
#[derive(Debug)]
enum Intent<'s> {
    /// Claim `path` for this VM: the file holds `current` and is to hold `effective`.
    Write {
        path: Cow<'s, str>,
        current: String,
        effective: String,
        /// The claim before this change (None: there was none), what undo puts back. Boxed:
        /// most writes are new claims (one per IRQ), and an intent is kept per write.
        previous: Option<Box<Claim>>,
        /// The kernel may refuse this write (see `Action::Exclude`): a skip, not a failure.
        refusable: bool,
        /// How the file is read and written (`Words` and `Dir` are not plain text writes).
        op: Option<ComposeOp>,
    },
    /// Move a thread from the cgroup `from` into `to`; no ledger entry (the cgroup's own
    /// claim takes it back out when the cgroup is removed).
    Move {
        thread: ThreadRef,
        tid: i32,
        from: String,
        to: String,
    },
    /// Fail unless `path` reads `value`.
    Expect { path: String, value: String },
    /// Write `0`, then `1`, to a CPU's `online` (claimed as `1` beforehand).
    Cycle { path: String },
    /// Write a trigger file, or `sync(2)` (`path` None); nothing to undo.
    Trigger { path: Option<String>, value: String },
    /// Remove and rescan PCI functions; `previous` is the `Rescan` claim before this batch
    /// (what the ledger gets back once the functions are back).
    RemoveRescan {
        functions: Vec<(crate::pci::PciId, Option<String>)>,
        timeout: std::time::Duration,
        /// Boxed as `Write::previous` is (it would make every intent of a batch this big).
        previous: Option<Box<Claim>>,
    },
    Pin {
        thread: ThreadRef,
        tid: i32,
        cpus: CpuSet,
        current: CpuSet,
        /// Boxed as `Write::previous` is: an intent is kept per change of a batch.
        previous: Option<Box<PinRecord>>,
    },
}

impl Intent<'_> {
    /// A made intent whose undo the ledger does as well: a new claim on a composed CPU set
    /// file, whose release writes back its original (the bytes this intent read) without
    /// depending on any other file (see [`Executor::release_new`]).
    fn released_by_ledger(&self) -> bool {
        matches!(
            self,
            Intent::Write {
                previous: None,
                op: Some(ComposeOp::Exclude),
                ..
            }
        )
    }

    /// The intent without its borrow of the steps (kept after they are freed).
    fn into_owned(self) -> Intent<'static> {
        match self {
            Intent::Write {
                path,
                current,
                effective,
                previous,
                refusable,
                op,
            } => Intent::Write {
                path: Cow::Owned(path.into_owned()),
                current,
                effective,
                previous,
                refusable,
                op,
            },
            Intent::Move {
                thread,
                tid,
                from,
                to,
            } => Intent::Move {
                thread,
                tid,
                from,
                to,
            },
            Intent::Expect { path, value } => Intent::Expect { path, value },
            Intent::Cycle { path } => Intent::Cycle { path },
            Intent::Trigger { path, value } => Intent::Trigger { path, value },
            Intent::RemoveRescan {
                functions,
                timeout,
                previous,
            } => Intent::RemoveRescan {
                functions,
                timeout,
                previous,
            },
            Intent::Pin {
                thread,
                tid,
                cpus,
                current,
                previous,
            } => Intent::Pin {
                thread,
                tid,
                cpus,
                current,
                previous,
            },
        }
    }
}

pub struct Executor<'a, H: Host> {
    pub root: &'a Root,
    pub host: &'a H,
    pub store: &'a Store,
    pub state: State,
    pub vmid: u32,
    /// Whether a rollback also releases boot-time reservations (`state::KEPT`): only an
    /// explicit `pvetune rollback <vmid>` does.
    pub release_kept: bool,
}

impl<'a, H: Host> Executor<'a, H> {
    pub fn new(root: &'a Root, host: &'a H, store: &'a Store, state: State, vmid: u32) -> Self {
        Executor {
            root,
            host,
            store,
            state,
            vmid,
            release_kept: false,
        }
    }

    /// Applies the steps in order, as one batch (see the module doc) per stage between
    /// [`Action::Barrier`]s, a stage of more than [`CHUNK`] steps (a step per IRQ) in batches
    /// of that many. On the first failure, every change made by this call is undone (in
    /// reverse, the batches before included), and the error is returned.
    ///
    /// Memory stays bounded by the ledger (docs/performance.md): the steps are taken, not
    /// lent, and each batch's are freed once it is made; of a batch made, only the intents
    /// that the ledger cannot take back are kept. A new claim on a composed CPU set file (an
    /// IRQ's affinity: [`ComposeOp::Exclude`]) is such a claim's release, which writes back its
    /// original, the bytes the batch read: so a failure later in the call releases those
    /// claims from the ledger (see [`Executor::release_new`]) instead of keeping an intent per
    /// IRQ.
    pub fn apply(&mut self, steps: Vec<Step>) -> Result<Applied, ExecError> {
        let mut applied = Applied::default();
        let seq = Cell::new(self.last_seq());
        let before = seq.get();
        let mut done: Vec<Vec<Intent<'static>>> = Vec::new();
        for batch in batches(steps) {
            match self.apply_stage(&batch, &mut applied, &seq) {
                Ok(intents) => {
                    let mut kept: Vec<_> = intents
                        .into_iter()
                        .filter(|i| !i.released_by_ledger())
                        .map(Intent::into_owned)
                        .collect();
                    // Collected in place, into the batch's whole buffer: most batches keep
                    // nothing.
                    kept.shrink_to_fit();
                    done.push(kept);
                }
                Err(e) => {
                    for intents in done.iter().rev() {
                        self.undo(intents, intents.len());
                    }
                    self.release_new(before);
                    return Err(e);
                }
            }
        }
        Ok(applied)
    }

    /// The highest number in this VM's claim order (see [`crate::state::Holder::seq`]).
    fn last_seq(&self) -> u64 {
        self.state
            .claims
            .values()
            .filter_map(|c| c.holder(self.vmid))
            .map(|h| h.seq)
            .max()
            .unwrap_or(0)
    }

    /// One batch: prepare, record, change. A failure undoes this batch and is returned.
    fn apply_stage<'s>(
        &mut self,
        steps: &'s [Step],
        applied: &mut Applied,
        seq: &Cell<u64>,
    ) -> Result<Vec<Intent<'s>>, ExecError> {
        // qemu-server allocates under this lock: a pool is never changed beside it.
        let _hugepages = steps
            .iter()
            .any(|s| matches!(s.action, Action::Reserve { .. }))
            .then(|| memory::hugepage_lock(self.root))
            .transpose()?;
        let (intents, changes) = self.prepare(steps, applied, seq)?;
        self.store.append(&mut self.state, changes)?;
        let mut gone = Vec::new();
        for (i, intent) in intents.iter().enumerate() {
            match self.perform(intent) {
                Ok(Some(true)) => {
                    applied.changed += 1;
                    if let Intent::RemoveRescan { previous, .. } = intent {
                        // Every function is back: nothing is left for a rollback to mend.
                        gone.push(Change::Claim {
                            path: PCI_RESCAN.to_string(),
                            claim: previous.clone(),
                        });
                    }
                }
                Ok(Some(false)) => applied.unchanged += 1,
                Ok(None) => {
                    applied.vanished += 1;
                    if let Intent::Pin { tid, .. } = intent {
                        // It exited before its pin: there is nothing to put back for it.
                        gone.push(Change::Pin {
                            vmid: self.vmid,
                            tid: *tid,
                            pin: None,
                        });
                    }
                }
                Err(e) => match refused(intent, &e) {
                    Some((path, errno, previous)) => {
                        // The file is as it was: the claim goes back to what it was.
                        gone.push(Change::Claim {
                            path: path.to_string(),
                            claim: previous.clone(),
                        });
                        if is_ban(intent) {
                            // Not the kernel's: irqbalance, which is optional.
                            log::warn!("{e}: irqbalance may move IRQs back onto the VM's CPUs");
                        } else {
                            applied.refused.push((path.to_string(), errno));
                        }
                    }
                    None => {
                        self.undo(&intents, i);
                        return Err(e);
                    }
                },
            }
        }
        // Only tidies the ledger: a failure here undoes nothing, and a later rollback finds the
        // threads gone anyway.
        if let Err(e) = self.journal(gone) {
            log::warn!("ledger: {e}");
        }
        Ok(intents)
    }

    /// Step 3 of a batch, for one intent: Some(changed?), or None for a thread that exited.
    fn perform(&self, intent: &Intent) -> Result<Option<bool>, ExecError> {
        match intent {
            Intent::Write {
                path,
                current,
                effective,
                op,
                ..
            } => {
                let done = self.put(path, current, effective, *op)?;
                if *op == Some(ComposeOp::Add) {
                    // The kernel allocates what it can and says nothing: the count it reads
                    // back is the verdict.
                    self.verify_pool(path, effective)?;
                }
                Ok(done)
            }
            Intent::Trigger { path: None, .. } => {
                self.host.sync().map_err(|source| ExecError::Write {
                    path: "sync(2)".into(),
                    value: String::new(),
                    source,
                })?;
                Ok(Some(true))
            }
            Intent::Trigger {
                path: Some(path),
                value,
            } => {
                self.trigger(path, value)?;
                Ok(Some(true))
            }
            Intent::RemoveRescan {
                functions, timeout, ..
            } => {
                self.remove_rescan(functions, *timeout)?;
                Ok(Some(true))
            }
            Intent::Move {
                thread,
                tid,
                from,
                to,
            } => {
                if from == to {
                    return Ok(Some(false));
                }
                match self.move_thread(*tid, to) {
                    Ok(()) => Ok(Some(true)),
                    Err(e) if gone(&e) => Ok(None),
                    Err(source) => Err(ExecError::Move {
                        thread: thread.to_string(),
                        cgroup: to.clone(),
                        source,
                    }),
                }
            }
            Intent::Cycle { path } => {
                // The CPU must end online whatever fails: the undo writes 1 again.
                self.write_if_different(path, "1", "0")?;
                self.write_if_different(path, "0", "1")?;
                Ok(Some(true))
            }
            Intent::Expect { path, value } => {
                let got = self.read(path)?;
                if same_value(&got, value) {
                    Ok(Some(false))
                } else {
                    Err(ExecError::Expect {
                        path: path.clone(),
                        wanted: value.clone(),
                        got: got.trim().to_string(),
                    })
                }
            }
            Intent::Pin {
                thread,
                tid,
                cpus,
                current,
                ..
            } => {
                if current == cpus {
                    return Ok(Some(false));
                }
                match self.host.set_affinity(*tid, cpus) {
                    Ok(()) => Ok(Some(true)),
                    Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(None),
                    Err(source) => Err(pin_error(thread, cpus, source)),
                }
            }
        }
    }

    /// Journals changes of this VM's entries; a VM record left with nothing in it (one that
    /// only pins of this batch had created) goes with them.
    fn journal(&mut self, changes: Vec<Change>) -> Result<(), StateError> {
        self.store.append(&mut self.state, changes)?;
        if self
            .state
            .vms
            .get(&self.vmid)
            .is_some_and(|r| *r == VmRecord::default())
        {
            let drop = vec![Change::Vm {
                vmid: self.vmid,
                record: None,
            }];
            self.store.append(&mut self.state, drop)?;
        }
        Ok(())
    }

    fn read(&self, path: &str) -> Result<String, ExecError> {
        self.host
            .read(&self.root.path(path))
            .map_err(|source| ExecError::Read {
                path: path.to_string(),
                source,
            })
    }

    /// Writes `value` unless the file already holds it. Values from the ledger's `original`
    /// are written back byte for byte; new values get the newline sysfs prints.
    fn write_if_different(
        &self,
        path: &str,
        current: &str,
        value: &str,
    ) -> Result<Option<bool>, ExecError> {
        if same_value(current, value) {
            return Ok(Some(false));
        }
        let bytes = if value.ends_with('\n') {
            value.to_string()
        } else {
            format!("{value}\n")
        };
        self.host
            .write(&self.root.path(path), &bytes)
            .map_err(|source| ExecError::Write {
                path: path.to_string(),
                value: value.trim().to_string(),
                source,
            })?;
        Ok(Some(true))
    }
}

/// A write the kernel refused where the action allows it (`Action::Exclude` of an IRQ): the
/// path, the errno's name and the claim to go back to. IRQs refuse with EIO (6.8) or EPERM
/// (6.14 on, and the 6.12 lab kernel) when managed or per-CPU, with ENOSPC when the target
/// CPUs have no vectors left, EBUSY while an earlier move is still pending (x86), ENOENT when
/// the IRQ was freed meanwhile: an IRQ that cannot be moved never stops a VM from starting.
fn refused<'i>(
    intent: &'i Intent,
    error: &ExecError,
) -> Option<(&'i str, String, &'i Option<Box<Claim>>)> {
    let (
        Intent::Write {
            path,
            previous,
            refusable: true,
            ..
        },
        ExecError::Write { source, .. },
    ) = (intent, error)
    else {
        return None;
    };
    let errno = match source.raw_os_error() {
        Some(raw) => format!("{:?}", nix::errno::Errno::from_raw(raw)),
        // irqbalance's socket: any failure to ban is a skip (`exec/irqbalance.rs`).
        None if is_ban(intent) => source.to_string(),
        None => return None,
    };
    Some((path, errno, previous))
}

fn is_ban(intent: &Intent) -> bool {
    matches!(
        intent,
        Intent::Write {
            op: Some(ComposeOp::Ban),
            ..
        }
    )
}

/// The words a `Words` claim manages (its original's and every holder's); empty for others.
pub fn managed_words(claim: &Claim) -> Vec<String> {
    if claim.op() != Some(ComposeOp::Words) {
        return Vec::new();
    }
    claim
        .original
        .split_whitespace()
        .map(str::to_string)
        .chain(claim.holders.iter().map(|h| h.value.to_string()))
        .collect()
}

/// A thread or file that no longer exists: a thread that exited, a cgroup removed.
fn gone(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::ESRCH) || e.kind() == io::ErrorKind::NotFound
}

/// Kernel files print what was written with different white space (`4096 87380` as
/// `4096\t87380\n`); compare words.
pub fn same_value(a: &str, b: &str) -> bool {
    a.split_whitespace().eq(b.split_whitespace())
}

fn pin_error(thread: &ThreadRef, cpus: &CpuSet, source: io::Error) -> ExecError {
    let hint = if source.raw_os_error() == Some(nix::libc::EINVAL) {
        " (the thread's cgroup cpuset does not allow these CPUs)"
    } else {
        ""
    };
    ExecError::Pin {
        thread: thread.to_string(),
        cpus: cpus.clone(),
        source,
        hint,
    }
}

#[cfg(test)]
mod size_tests {
    /// A batch keeps an intent per change (one per IRQ): no variant may make them all big.
    #[test]
    fn an_intent_stays_small() {
        assert!(
            std::mem::size_of::<super::Intent>() <= 112,
            "{}",
            std::mem::size_of::<super::Intent>()
        );
    }
}
