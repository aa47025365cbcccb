//! Step 1 of a batch: every target read once, the intents and the ledger entries worked out,
//! nothing changed yet (see the module doc of `exec`).

use super::{Applied, ExecError, Executor, Intent, gone, managed_words, pin_error, same_value};
use crate::cpuset::CpuSet;
use crate::host::Host;
use crate::plan::{Action, Step};
use crate::state::{Change, Claim, Compose, ComposeOp, Holder, Holders, PinRecord, Text};
use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;

impl<H: Host> Executor<'_, H> {
    /// Step 1 of a batch: reads every target once and works out the intents and the ledger
    /// entries they lead to, without changing anything (the ledger in memory included).
    pub(super) fn prepare<'s>(
        &self,
        steps: &'s [Step],
        applied: &mut Applied,
        seq: &Cell<u64>,
    ) -> Result<(Vec<Intent<'s>>, Vec<Change>), ExecError> {
        let mut intents = Vec::with_capacity(steps.len());
        // Entries as this batch leaves them so far: a path or thread that comes twice sees its
        // first change, and the value it will hold by then, without a lookup in a list.
        let mut claims = Batch::with_capacity(steps.len());
        let mut pins: HashMap<i32, PinRecord> = HashMap::new();
        // `seq`: the order of this VM's claims, which its rollback reverses (see
        // `Holder::seq`), counted on from the batches before.
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
                        (&claims, seq),
                        applied,
                    )?
                    else {
                        continue;
                    };
                    record(path, intent, &mut claims, &mut intents);
                }
                Action::Exclude {
                    path,
                    cpus,
                    format,
                    fallback,
                    refusable,
                } => {
                    // The CPUs of the VMs that hold the claim already stay in its fallback
                    // (the value takes them out anyway): the latest claimer's housekeeping has
                    // them out, and recording only that would keep an IRQ that had only VM
                    // CPUs off a holder's CPUs after that holder stopped. Each claimer's own
                    // usable CPUs are in its fallback (tunables/irqs.rs), so by induction the
                    // old fallback has every holder's.
                    let fallback = match claims.claim(path).or_else(|| self.state.claim(path)) {
                        Some(Claim {
                            compose: Some(old),
                            holders,
                            ..
                        }) if old.op == ComposeOp::Exclude => {
                            let held = holders
                                .iter()
                                .filter_map(|h| h.value.parse::<CpuSet>().ok())
                                .fold(CpuSet::new(), |acc, c| acc.union(&c));
                            fallback.union(&old.fallback.intersection(&held))
                        }
                        _ => fallback.clone(),
                    };
                    let compose = Compose {
                        op: ComposeOp::Exclude,
                        format: *format,
                        fallback,
                        base: CpuSet::new(),
                        extra: Default::default(),
                    };
                    let Some(intent) = self.claim_intent(
                        path,
                        cpus.to_string(),
                        Some(compose),
                        *refusable,
                        (&claims, seq),
                        applied,
                    )?
                    else {
                        continue;
                    };
                    record(path, intent, &mut claims, &mut intents);
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
                    let planned = (&claims, seq);
                    let compose = Some(Compose::of(op));
                    if let Some(intent) =
                        self.claim_intent(path, value, compose, false, planned, applied)?
                    {
                        record(path, intent, &mut claims, &mut intents);
                    }
                }
                Action::Ban { socket, cpus } => {
                    let planned = (&claims, seq);
                    if let Some(intent) = self.ban_intent(socket, cpus, planned, applied) {
                        record(socket, intent, &mut claims, &mut intents);
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
                    let planned = (&claims, seq);
                    let found =
                        self.claim_intent(path, "1".into(), None, false, planned, applied)?;
                    if let Some((claim, _)) = found {
                        claims.push_claim(path, claim);
                    }
                    intents.push(Intent::Cycle { path: path.clone() });
                }
                Action::Barrier => {}
                Action::Trigger { path, value } => intents.push(Intent::Trigger {
                    path: Some(path.clone()),
                    value: value.clone(),
                }),
                Action::Sync => intents.push(Intent::Trigger {
                    path: None,
                    value: String::new(),
                }),
                Action::Reserve {
                    node,
                    size_kb,
                    pages,
                    keep,
                } => {
                    let path = crate::memory::pool_file(*node, *size_kb, "nr_hugepages");
                    let planned = (&claims, seq);
                    let compose = Some(Compose::of(ComposeOp::Add));
                    let value = pages.to_string();
                    if let Some((mut claim, intent)) =
                        self.claim_intent(path.clone(), value, compose, false, planned, applied)?
                    {
                        if *keep
                            && let Some(h) = claim.holders.iter_mut().find(|h| h.vmid == self.vmid)
                        {
                            h.extra.insert(crate::state::KEPT.into(), true.into());
                        }
                        claims.changes.push(Change::Claim {
                            path: path.clone(),
                            claim: Some(Box::new(claim)),
                        });
                        // Keyed by the path in the batch's map, which borrows from `steps`:
                        // a reservation is one step per node and size, so no later step of
                        // the batch looks it up.
                        intents.push(intent);
                    }
                }
                Action::RemoveRescan {
                    functions,
                    timeout_ms,
                } => {
                    let previous = self.state.claim(super::PCI_RESCAN).cloned();
                    let mut claim = previous.clone().unwrap_or_else(|| Claim {
                        original: Text::new(""),
                        holders: Holders::new(),
                        compose: Some(Compose::of(ComposeOp::Rescan)),
                        extra: Default::default(),
                    });
                    let names: Vec<String> =
                        functions.iter().map(|(id, _)| id.to_string()).collect();
                    self.hold(&mut claim, names.join(" "), seq);
                    claims.changes.push(Change::Claim {
                        path: super::PCI_RESCAN.to_string(),
                        claim: Some(Box::new(claim)),
                    });
                    intents.push(Intent::RemoveRescan {
                        functions: functions.clone(),
                        timeout: std::time::Duration::from_millis(*timeout_ms),
                        previous: previous.map(Box::new),
                    });
                }
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
                    claims.changes.push(Change::Pin {
                        vmid: self.vmid,
                        tid,
                        pin: Some(Box::new(record.clone())),
                    });
                    pins.insert(tid, record);
                    intents.push(Intent::Pin {
                        thread: thread.clone(),
                        tid,
                        cpus: cpus.clone(),
                        current,
                        previous: previous.map(Box::new),
                    });
                }
            }
        }
        Ok((intents, claims.changes))
    }

    /// The claim this VM's write of `value` to `path` leads to, and the intent to make it:
    /// `claims` holds what this batch already planned. None when nothing is to be done: a
    /// composed file this VM leaves as it is and nobody holds (no claim needed; one that another
    /// VM holds is joined even unchanged, so that this VM's CPUs stay out when that VM stops),
    /// or a refusable target that vanished (an IRQ torn down since /proc/irq was listed).
    fn claim_intent<'s>(
        &self,
        path: impl Into<Cow<'s, str>>,
        value: String,
        compose: Option<Compose>,
        refusable: bool,
        (claims, seq): (&Batch, &Cell<u64>),
        applied: &mut Applied,
    ) -> Result<Option<(Claim, Intent<'s>)>, ExecError> {
        // The intent keeps the path as the step has it (borrowed: an intent per IRQ).
        let key = path.into();
        let path: &str = &key;
        let op = compose.as_ref().map(|c| c.op);
        let (current, previous) = match claims.claim(path) {
            Some(claim) => (claim.effective().into_owned(), Some(claim.clone())),
            None => {
                let previous = self.state.claim(path).cloned();
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
            original: current.as_str().into(),
            holders: Holders::new(),
            compose: None,
            extra: Default::default(),
        });
        if op == Some(ComposeOp::Add) && claim.holder(self.vmid).is_none() {
            rebase_pool(&mut claim, &current);
        }
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
            path: key,
            current,
            effective,
            previous: previous.map(Box::new),
            refusable,
            op,
        };
        Ok(Some((claim, intent)))
    }

    /// Makes this VM a holder of `claim` with `value` (replacing its earlier value); a new
    /// holding takes the next number of this VM's claim order.
    pub(super) fn hold(&self, claim: &mut Claim, value: impl Into<Text>, seq: &Cell<u64>) {
        let value = value.into();
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
}

/// The ledger entries of a batch being prepared, and where each path's claim is among them:
/// what a later step on the same path sees, without a copy of the claim.
pub(super) struct Batch<'s> {
    pub(super) changes: Vec<Change>,
    at: HashMap<&'s str, usize>,
}

impl<'s> Batch<'s> {
    fn with_capacity(steps: usize) -> Self {
        Batch {
            changes: Vec::with_capacity(steps),
            at: HashMap::new(),
        }
    }

    /// The claim on `path` as this batch leaves it so far (None: not planned yet).
    pub(super) fn claim(&self, path: &str) -> Option<&Claim> {
        match self.changes.get(*self.at.get(path)?)? {
            Change::Claim { claim, .. } => claim.as_deref(),
            _ => None,
        }
    }

    fn push_claim(&mut self, path: &'s str, claim: Claim) {
        self.at.insert(path, self.changes.len());
        self.changes.push(Change::Claim {
            path: path.to_string(),
            claim: Some(Box::new(claim)),
        });
    }
}

/// A VM joining a hugepage pool that other VMs reserved in: the part of the pool that is not
/// theirs is taken from what the pool holds now, not from when the first of them reserved
/// (another VM's pages may have been allocated or freed since: qemu-server's own, or the
/// surplus of a VM that stopped), so that the pool is raised by this VM's pages and no more.
/// Recorded before the write like every claim: a crash in between leaves a claim whose release
/// writes back what the pool held.
fn rebase_pool(claim: &mut Claim, current: &str) {
    let held: u64 = claim
        .holders
        .iter()
        .filter_map(|h| h.value.trim().parse::<u64>().ok())
        .sum();
    if let Ok(now) = current.trim().parse::<u64>()
        && !claim.holders.is_empty()
        && now >= held
    {
        claim.original = compact_str::format_compact!("{}\n", now - held);
    }
}

/// Adds a planned claim to the batch: its ledger entry, and what later steps of the batch on
/// the same path see.
fn record<'s>(
    path: &'s str,
    (claim, intent): (Claim, Intent<'s>),
    claims: &mut Batch<'s>,
    intents: &mut Vec<Intent<'s>>,
) {
    claims.push_claim(path, claim);
    intents.push(intent);
}
