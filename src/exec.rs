//! Executing a plan: write-ahead ledger, apply, and undo, one batch at a time.
//!
//! Crash model (the ledger's side is in `state.rs`): pvetune may die at any point, and a later
//! run (`rollback`, or the reconcile step of any hook) must still put every file back byte for
//! byte and every thread back on its CPUs. Cost model: a batch of thousands of changes (one
//! per IRQ) must cost time linear in its size. So a batch (one [`Executor::apply`]) goes:
//!
//! 1. plan: read every target once (the file's bytes, the thread's affinity) and work out the
//!    ledger entries the batch leads to; nothing changes yet, and a read that fails here
//!    fails the batch before anything happened;
//! 2. record: append those entries, with the old values, to the ledger's journal: one write
//!    and one fdatasync for the whole batch (write-ahead);
//! 3. change: make the writes and pins in order, skipping those already in place.
//!
//! A crash after 2 leaves a ledger that claims files some of which were never written: undo
//! writes the original over an unchanged file, which is a no-op. A failure in 3 undoes the
//! batch in reverse (each file back to the bytes read in 1) and journals the ledger entries as
//! they were before (one more append). [`Executor::rollback`] makes its writes first and
//! journals what it released after them: a crash in between leaves the claims in the ledger,
//! and the next rollback finds their files already restored. Undo is idempotent throughout.
//! Per change: one read and at most one write; per batch: a constant number of ledger writes.

use crate::cpuset::CpuSet;
use crate::host::Host;
use crate::plan::{Action, Step, ThreadRef};
use crate::root::Root;
use crate::state::{
    Change, Claim, Compose, ComposeOp, Holder, PinRecord, State, StateError, Store, VmRecord,
};
use std::cell::Cell;
use std::collections::HashMap;
use std::io;

mod cgroup;
mod irqbalance;
pub use cgroup::read_claimed;
pub use irqbalance::EXCHANGE_DEADLINE;

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

/// One change of a batch, as planned before anything is changed.
enum Intent {
    /// Claim `path` for this VM: the file holds `current` and is to hold `effective`.
    Write {
        path: String,
        current: String,
        effective: String,
        /// The claim before this change (None: there was none), what undo puts back.
        previous: Option<Claim>,
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
    Pin {
        thread: ThreadRef,
        tid: i32,
        cpus: CpuSet,
        current: CpuSet,
        previous: Option<PinRecord>,
    },
}

pub struct Executor<'a, H: Host> {
    pub root: &'a Root,
    pub host: &'a H,
    pub store: &'a Store,
    pub state: State,
    pub vmid: u32,
}

impl<'a, H: Host> Executor<'a, H> {
    pub fn new(root: &'a Root, host: &'a H, store: &'a Store, state: State, vmid: u32) -> Self {
        Executor {
            root,
            host,
            store,
            state,
            vmid,
        }
    }

    /// Applies the steps in order, as one batch (see the module doc) per stage between
    /// [`Action::Barrier`]s. On the first failure, every change made by this call is undone
    /// (in reverse, the stages before included), and the error is returned.
    pub fn apply(&mut self, steps: &[Step]) -> Result<Applied, ExecError> {
        let mut applied = Applied::default();
        let mut done: Vec<Vec<Intent>> = Vec::new();
        for stage in steps.split(|s| s.action == Action::Barrier) {
            match self.apply_stage(stage, &mut applied) {
                Ok(intents) => done.push(intents),
                Err(e) => {
                    for intents in done.iter().rev() {
                        self.undo(intents, intents.len());
                    }
                    return Err(e);
                }
            }
        }
        Ok(applied)
    }

    /// One batch: prepare, record, change. A failure undoes this batch and is returned.
    fn apply_stage(
        &mut self,
        steps: &[Step],
        applied: &mut Applied,
    ) -> Result<Vec<Intent>, ExecError> {
        let (intents, changes) = self.prepare(steps, applied)?;
        self.store.append(&mut self.state, &changes)?;
        let mut gone = Vec::new();
        for (i, intent) in intents.iter().enumerate() {
            match self.perform(intent) {
                Ok(Some(true)) => applied.changed += 1,
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
                            path: path.clone(),
                            claim: previous.clone(),
                        });
                        if is_ban(intent) {
                            // Not the kernel's: irqbalance, which is optional.
                            log::warn!("{e}: irqbalance may move IRQs back onto the VM's CPUs");
                        } else {
                            applied.refused.push((path.clone(), errno));
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

    /// Step 1 of a batch: reads every target once and works out the intents and the ledger
    /// entries they lead to, without changing anything (the ledger in memory included).
    fn prepare(
        &self,
        steps: &[Step],
        applied: &mut Applied,
    ) -> Result<(Vec<Intent>, Vec<Change>), ExecError> {
        let mut intents = Vec::with_capacity(steps.len());
        let mut changes = Vec::with_capacity(steps.len());
        // Entries as this batch leaves them so far: a path or thread that comes twice sees its
        // first change, and the value it will hold by then, without a lookup in a list.
        let mut claims: HashMap<&str, Claim> = HashMap::new();
        let mut pins: HashMap<i32, PinRecord> = HashMap::new();
        // The order of this VM's claims, which its rollback reverses (see `Holder::seq`).
        let seq = Cell::new(
            self.state
                .claims
                .values()
                .filter_map(|c| c.holder(self.vmid))
                .map(|h| h.seq)
                .max()
                .unwrap_or(0),
        );
        let held: HashMap<i32, &PinRecord> = self
            .state
            .vms
            .get(&self.vmid)
            .map(|r| r.pins.iter().map(|p| (p.tid, p)).collect())
            .unwrap_or_default();
        for step in steps {
            match &step.action {
                Action::Write { path, value } => {
                    let Some(intent) = self.claim_intent(
                        path,
                        value.clone(),
                        None,
                        false,
                        (&claims, &seq),
                        applied,
                    )?
                    else {
                        continue;
                    };
                    record(path, intent, &mut claims, &mut changes, &mut intents);
                }
                Action::Exclude {
                    path,
                    cpus,
                    format,
                    fallback,
                    refusable,
                } => {
                    let compose = Compose {
                        op: ComposeOp::Exclude,
                        format: *format,
                        fallback: fallback.clone(),
                        base: CpuSet::new(),
                        extra: Default::default(),
                    };
                    let Some(intent) = self.claim_intent(
                        path,
                        cpus.to_string(),
                        Some(compose),
                        *refusable,
                        (&claims, &seq),
                        applied,
                    )?
                    else {
                        continue;
                    };
                    record(path, intent, &mut claims, &mut changes, &mut intents);
                }
                Action::Include { .. } | Action::Enable { .. } | Action::Mkdir { .. } => {
                    let (path, op, value) = match &step.action {
                        Action::Include { path, cpus } => {
                            (path, ComposeOp::Include, cpus.to_string())
                        }
                        Action::Enable { path, controller } => {
                            (path, ComposeOp::Words, controller.to_string())
                        }
                        Action::Mkdir { path, kind } => (path, ComposeOp::Dir, kind.to_string()),
                        _ => unreachable!("matched above"),
                    };
                    let planned = (&claims, &seq);
                    let compose = Some(Compose::of(op));
                    if let Some(intent) =
                        self.claim_intent(path, value, compose, false, planned, applied)?
                    {
                        record(path, intent, &mut claims, &mut changes, &mut intents);
                    }
                }
                Action::Ban { socket, cpus } => {
                    let planned = (&claims, &seq);
                    if let Some(intent) = self.ban_intent(socket, cpus, planned, applied) {
                        record(socket, intent, &mut claims, &mut changes, &mut intents);
                    }
                }
                Action::Move { thread, cgroup } => {
                    let Some(tid) = thread.tid else {
                        return Err(ExecError::NotRunning {
                            thread: thread.to_string(),
                        });
                    };
                    let from = match self.thread_cgroup(thread.pid.unwrap_or(tid), tid) {
                        Ok(from) => from,
                        Err(e) if gone(&e) => {
                            applied.vanished += 1;
                            continue;
                        }
                        Err(source) => {
                            return Err(ExecError::Move {
                                thread: thread.to_string(),
                                cgroup: cgroup.clone(),
                                source,
                            });
                        }
                    };
                    intents.push(Intent::Move {
                        thread: thread.clone(),
                        tid,
                        from,
                        to: cgroup.clone(),
                    });
                }
                Action::Expect { path, value } => intents.push(Intent::Expect {
                    path: path.clone(),
                    value: value.clone(),
                }),
                Action::Cycle { path } => {
                    let planned = (&claims, &seq);
                    let found =
                        self.claim_intent(path, "1".into(), None, false, planned, applied)?;
                    if let Some((claim, _)) = found {
                        changes.push(Change::Claim {
                            path: path.clone(),
                            claim: Some(claim.clone()),
                        });
                        claims.insert(path, claim);
                    }
                    intents.push(Intent::Cycle { path: path.clone() });
                }
                Action::Barrier => {}
                Action::Pin { thread, cpus } => {
                    let Some(tid) = thread.tid else {
                        return Err(ExecError::NotRunning {
                            thread: thread.to_string(),
                        });
                    };
                    let previous = pins.get(&tid).or_else(|| held.get(&tid).copied()).cloned();
                    let current = match (&previous, pins.contains_key(&tid)) {
                        (Some(prev), true) => prev.new.clone(),
                        _ => match self.host.get_affinity(tid) {
                            Ok(c) => c,
                            // QEMU's worker threads come and go: one that exited is not an
                            // error.
                            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => {
                                applied.vanished += 1;
                                continue;
                            }
                            Err(source) => return Err(pin_error(thread, cpus, source)),
                        },
                    };
                    let record = PinRecord {
                        tid,
                        label: previous
                            .as_ref()
                            .map_or_else(|| thread.label.clone(), |p| p.label.clone()),
                        old: previous
                            .as_ref()
                            .map_or_else(|| current.clone(), |p| p.old.clone()),
                        new: cpus.clone(),
                        start_time: match &previous {
                            Some(p) => p.start_time,
                            None => thread.pid.and_then(|pid| self.thread_start(pid, tid)),
                        },
                        extra: previous
                            .as_ref()
                            .map(|p| p.extra.clone())
                            .unwrap_or_default(),
                    };
                    changes.push(Change::Pin {
                        vmid: self.vmid,
                        tid,
                        pin: Some(record.clone()),
                    });
                    pins.insert(tid, record);
                    intents.push(Intent::Pin {
                        thread: thread.clone(),
                        tid,
                        cpus: cpus.clone(),
                        current,
                        previous,
                    });
                }
            }
        }
        Ok((intents, changes))
    }

    /// The claim this VM's write of `value` to `path` leads to, and the intent to make it:
    /// `claims` holds what this batch already planned. None when nothing is to be done: a
    /// composed file this VM leaves as it is and nobody holds (no claim needed; one that another
    /// VM holds is joined even unchanged, so that this VM's CPUs stay out when that VM stops),
    /// or a refusable target that vanished (an IRQ torn down since /proc/irq was listed).
    fn claim_intent(
        &self,
        path: &str,
        value: String,
        compose: Option<Compose>,
        refusable: bool,
        (claims, seq): (&HashMap<&str, Claim>, &Cell<u64>),
        applied: &mut Applied,
    ) -> Result<Option<(Claim, Intent)>, ExecError> {
        let op = compose.as_ref().map(|c| c.op);
        let (current, previous) = match claims.get(path) {
            Some(claim) => (claim.effective().into_owned(), Some(claim.clone())),
            None => {
                let previous = self.state.claims.get(path).cloned();
                let mut words = previous.as_ref().map(managed_words).unwrap_or_default();
                words.push(value.clone());
                match self.read_as(path, op, &words) {
                    Ok(current) => (current, previous),
                    Err(_) if refusable && !self.root.path(path).exists() => {
                        applied.vanished += 1;
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let mut claim = previous.clone().unwrap_or_else(|| Claim {
            original: current.clone(),
            holders: Vec::new(),
            compose: None,
            extra: Default::default(),
        });
        let composed = compose.is_some();
        if let Some(mut compose) = compose {
            // Fields a newer pvetune recorded stay (see `state::Extra`).
            compose.extra = claim.compose.take().map(|c| c.extra).unwrap_or_default();
            claim.compose = Some(compose);
        }
        self.hold(&mut claim, value, seq);
        let effective = claim.effective().into_owned();
        if composed && previous.is_none() && same_value(&current, &effective) {
            applied.unchanged += 1;
            return Ok(None);
        }
        let intent = Intent::Write {
            path: path.to_string(),
            current,
            effective,
            previous,
            refusable,
            op,
        };
        Ok(Some((claim, intent)))
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
            } => self.put(path, current, effective, *op),
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

    /// Takes back a batch whose intent `failed` failed, last intent first: the ledger gets
    /// back its entries from before the batch, in one append, and each file and thread up to
    /// `failed` (the later ones were not touched) the bytes or affinity it had before. An
    /// entry whose undo fails stays as the batch recorded it, for a later rollback.
    fn undo(&mut self, intents: &[Intent], failed: usize) {
        let mut changes = Vec::new();
        for (i, intent) in intents.iter().enumerate().rev() {
            let undone = match intent {
                Intent::Write { path, previous, .. } if i > failed => Ok(Change::Claim {
                    path: path.clone(),
                    claim: previous.clone(),
                }),
                Intent::Pin { tid, previous, .. } if i > failed => Ok(Change::Pin {
                    vmid: self.vmid,
                    tid: *tid,
                    pin: previous.clone(),
                }),
                Intent::Write {
                    path,
                    current: before,
                    effective,
                    previous,
                    op,
                    ..
                } => {
                    let words = [before, effective]
                        .iter()
                        .flat_map(|w| w.split_whitespace())
                        .map(str::to_string)
                        .collect::<Vec<_>>();
                    // irqbalance's ban is sent whatever it reports (see `exec/irqbalance.rs`).
                    let now = match op {
                        Some(ComposeOp::Ban) => Ok(String::new()),
                        _ => self.read_as(path, *op, &words),
                    };
                    now.and_then(|now| self.put(path, &now, before, *op))
                        .map(|_| Change::Claim {
                            path: path.clone(),
                            claim: previous.clone(),
                        })
                }
                Intent::Move { tid, from, .. } if i < failed => {
                    // Back where it was; the cgroup it was moved to goes later in this undo.
                    if let Err(e) = self.move_thread(*tid, from)
                        && !gone(&e)
                    {
                        log::error!(
                            "undo after failure: cannot move thread {tid} back to {from}: {e}"
                        );
                    }
                    continue;
                }
                Intent::Cycle { path } => {
                    // Online again, whatever the cycle got to (its claim stays for rollback
                    // if even that fails).
                    if let Err(e) = self
                        .read(path)
                        .and_then(|now| self.write_if_different(path, &now, "1"))
                    {
                        log::error!("undo after failure: {e}");
                    }
                    continue;
                }
                Intent::Move { .. } | Intent::Expect { .. } => continue,
                Intent::Pin {
                    tid,
                    current: before,
                    previous,
                    ..
                } => self.restore_affinity(*tid, before).map(|()| Change::Pin {
                    vmid: self.vmid,
                    tid: *tid,
                    pin: previous.clone(),
                }),
            };
            match undone {
                Ok(change) => changes.push(change),
                Err(e) => log::error!("undo after failure: {e}"),
            }
        }
        if let Err(e) = self.journal(changes) {
            log::error!("undo after failure: {e}");
        }
    }

    /// Journals changes of this VM's entries; a VM record left with nothing in it (one that
    /// only pins of this batch had created) goes with them.
    fn journal(&mut self, changes: Vec<Change>) -> Result<(), StateError> {
        self.store.append(&mut self.state, &changes)?;
        if self
            .state
            .vms
            .get(&self.vmid)
            .is_some_and(|r| *r == VmRecord::default())
        {
            let drop = [Change::Vm {
                vmid: self.vmid,
                record: None,
            }];
            self.store.append(&mut self.state, &drop)?;
        }
        Ok(())
    }

    /// Takes back everything the ledger holds for this VM: its claims (each file gets the value
    /// the remaining claimers need, or its original) and its thread pins. The writes come
    /// first, then one journal append forgets what was undone, so an interrupted rollback is
    /// simply done again (finding the files already restored). Errors do not stop the
    /// rollback; the entries that failed stay in the ledger for a later run.
    pub fn rollback(&mut self, process_alive: bool) -> Vec<ExecError> {
        let mut errors = Vec::new();
        let mut changes = Vec::new();
        // Last taken, first released: a cgroup's files before the cgroup, a child before its
        // parent (ties, from ledgers without an order: reverse path order, as before).
        let mut paths: Vec<(u64, &String)> = self
            .state
            .claims
            .iter()
            .filter_map(|(p, c)| c.holder(self.vmid).map(|h| (h.seq, p)))
            .collect();
        paths.sort_unstable();
        let paths: Vec<String> = paths.into_iter().map(|(_, p)| p.clone()).collect();
        for path in paths.iter().rev() {
            match self.release_claim(path) {
                Ok(change) => changes.extend(change),
                Err(e) => errors.push(e),
            }
        }
        let mut unpinned = Vec::new();
        if let Some(record) = self.state.vms.get(&self.vmid) {
            for pin in record.pins.iter().rev() {
                // Threads of a QEMU that exited are gone, and their tids may belong to someone
                // else now: only restore threads of the very process that was pinned, each
                // proved to be the thread that was pinned.
                let ours = process_alive && record.pid.is_none_or(|pid| self.still_ours(pid, pin));
                if ours && let Err(e) = self.restore_affinity(pin.tid, &pin.old) {
                    errors.push(e);
                    continue;
                }
                unpinned.push(Change::Pin {
                    vmid: self.vmid,
                    tid: pin.tid,
                    pin: None,
                });
            }
        }
        if errors.is_empty() {
            // The whole record goes, pins included.
            changes.push(Change::Vm {
                vmid: self.vmid,
                record: None,
            });
        } else {
            changes.extend(unpinned);
        }
        if let Err(e) = self.store.append(&mut self.state, &changes) {
            errors.push(e.into());
        }
        errors
    }

    /// Makes this VM a holder of `claim` with `value` (replacing its earlier value); a new
    /// holding takes the next number of this VM's claim order.
    fn hold(&self, claim: &mut Claim, value: String, seq: &Cell<u64>) {
        match claim.holders.iter_mut().find(|h| h.vmid == self.vmid) {
            Some(h) => h.value = value,
            None => {
                seq.set(seq.get() + 1);
                claim.holders.push(Holder {
                    vmid: self.vmid,
                    value,
                    seq: seq.get(),
                    extra: Default::default(),
                })
            }
        }
    }

    /// Writes what a file should hold once this VM's claim on it is dropped, and returns the
    /// ledger entry that drops it (to be journaled after the write: a crash in between leaves
    /// the claim, and the release is simply done again).
    fn release_claim(&self, path: &str) -> Result<Option<Change>, ExecError> {
        let Some(claim) = self.state.claims.get(path) else {
            return Ok(None);
        };
        if claim.op() == Some(ComposeOp::Ban) {
            return Ok(self.release_ban(path, claim));
        }
        let current = match self.read_as(path, claim.op(), &managed_words(claim)) {
            Ok(current) => current,
            // A file that is gone went with its cgroup (systemd removes a VM's scope when
            // QEMU exits) or its IRQ: there is nothing left to put back.
            Err(ExecError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                log::debug!("{path} is gone: nothing to restore");
                let mut rest = claim.clone();
                rest.holders.retain(|h| h.vmid != self.vmid);
                return Ok(Some(Change::Claim {
                    path: path.to_string(),
                    claim: (!rest.holders.is_empty()).then_some(rest),
                }));
            }
            Err(e) => return Err(e),
        };
        let mut rest = claim.clone();
        rest.holders.retain(|h| h.vmid != self.vmid);
        // A file that already holds what it is to hold is a release done again after a crash.
        if claim.holders.last().is_some_and(|h| h.vmid == self.vmid)
            && !same_value(&current, &claim.effective())
            && !same_value(&current, &rest.effective())
        {
            log::warn!(
                "{path} was changed outside pvetune (now '{}', pvetune had set '{}'); restoring anyway",
                current.trim(),
                claim.effective().trim()
            );
        }
        self.put(path, &current, &rest.effective(), claim.op())?;
        Ok(Some(Change::Claim {
            path: path.to_string(),
            claim: (!rest.holders.is_empty()).then_some(rest),
        }))
    }

    /// A thread's start time (field 22 of its stat), None when it is gone or unreadable.
    fn thread_start(&self, pid: i32, tid: i32) -> Option<u64> {
        let text = self
            .host
            .read(&self.root.path(format!("/proc/{pid}/task/{tid}/stat")))
            .ok()?;
        crate::procstat::Stat::parse(text)?.start_time()
    }

    /// Whether the ledger's pin still names the thread it pinned: the tid is listed under the
    /// VM's QEMU process (whose pid and start time the caller has checked) and, when its own
    /// start time was recorded, has that start time. A thread that fails is never touched;
    /// its pin is dropped with a log line.
    fn still_ours(&self, pid: i32, pin: &PinRecord) -> bool {
        let now = self.thread_start(pid, pin.tid);
        let ours = match (pin.start_time, now) {
            (_, None) => false,
            (Some(recorded), Some(now)) => recorded == now,
            (None, Some(_)) => true,
        };
        if !ours {
            log::warn!(
                "VM {}: thread {} ({}) is no longer the thread of QEMU pid {pid} that was pinned \
                 (exited, or its tid reused): left alone, its pin is dropped",
                self.vmid,
                pin.tid,
                pin.label
            );
        }
        ours
    }

    fn restore_affinity(&self, tid: i32, cpus: &CpuSet) -> Result<(), ExecError> {
        let thread = ThreadRef {
            pid: None,
            tid: Some(tid),
            label: "restore".into(),
        };
        match self.host.get_affinity(tid) {
            Ok(current) if current == *cpus => Ok(()),
            Ok(_) => match self.host.set_affinity(tid, cpus) {
                Err(e) if e.raw_os_error() != Some(nix::libc::ESRCH) => {
                    Err(pin_error(&thread, cpus, e))
                }
                _ => Ok(()),
            },
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(()),
            Err(e) => Err(pin_error(&thread, cpus, e)),
        }
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

/// Adds a planned claim to the batch: its ledger entry, and what later steps of the batch on
/// the same path see.
fn record<'s>(
    path: &'s str,
    (claim, intent): (Claim, Intent),
    claims: &mut HashMap<&'s str, Claim>,
    changes: &mut Vec<Change>,
    intents: &mut Vec<Intent>,
) {
    changes.push(Change::Claim {
        path: path.to_string(),
        claim: Some(claim.clone()),
    });
    claims.insert(path, claim);
    intents.push(intent);
}

/// A write the kernel refused where the action allows it (`Action::Exclude` of an IRQ): the
/// path, the errno's name and the claim to go back to. IRQs refuse with EIO (6.8) or EPERM
/// (6.14 on, and the 6.12 lab kernel) when managed or per-CPU, with ENOSPC when the target
/// CPUs have no vectors left, EBUSY while an earlier move is still pending (x86), ENOENT when
/// the IRQ was freed meanwhile: an IRQ that cannot be moved never stops a VM from starting.
fn refused<'i>(
    intent: &'i Intent,
    error: &ExecError,
) -> Option<(&'i String, String, &'i Option<Claim>)> {
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
        .chain(claim.holders.iter().map(|h| h.value.clone()))
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
