//! Taking changes back: a failed batch's, in reverse (`undo`), and everything a VM holds
//! (`rollback`: its claims, last taken first, then its pins, each thread proved to be the one
//! that was pinned).

use super::{ExecError, Executor, Intent, gone, managed_words, pin_error, same_value};
use crate::cpuset::CpuSet;
use crate::host::Host;
use crate::plan::ThreadRef;
use crate::state::{Change, Claim, ComposeOp, Holder, PinRecord};
use std::io;

impl<H: Host> Executor<'_, H> {
    /// Takes back a batch whose intent `failed` failed, last intent first: the ledger gets
    /// back its entries from before the batch, in one append, and each file and thread up to
    /// `failed` (the later ones were not touched) the bytes or affinity it had before. An
    /// entry whose undo fails stays as the batch recorded it, for a later rollback.
    pub(super) fn undo(&mut self, intents: &[Intent], failed: usize) {
        let mut changes = Vec::new();
        for (i, intent) in intents.iter().enumerate().rev() {
            let undone = match intent {
                Intent::Write { path, previous, .. } if i > failed => Ok(Change::Claim {
                    path: path.to_string(),
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
                            path: path.to_string(),
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
                Intent::Move { .. } | Intent::Expect { .. } | Intent::Trigger { .. } => continue,
                Intent::RemoveRescan { previous, .. } if i > failed => Ok(Change::Claim {
                    path: super::PCI_RESCAN.to_string(),
                    claim: previous.clone(),
                }),
                Intent::RemoveRescan {
                    functions,
                    previous,
                    ..
                } => {
                    // What was removed comes back; a reset cannot be taken back.
                    let ids: Vec<_> = functions.iter().map(|(id, _)| *id).collect();
                    self.rescan_missing(&ids).map(|()| Change::Claim {
                        path: super::PCI_RESCAN.to_string(),
                        claim: previous.clone(),
                    })
                }
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
                // Kept in the ledger as the batch recorded it; a later rollback gives it back.
                Err(e) if deferrable(&e) => log::info!("undo after failure: {e} (for now)"),
                Err(e) => log::error!("undo after failure: {e}"),
            }
        }
        if let Err(e) = self.journal(changes) {
            log::error!("undo after failure: {e}");
        }
    }

    /// Takes back the new claims on composed CPU set files that batches of this apply made
    /// (this VM their only holder, its number in the claim order above `before`), whose
    /// intents were not kept (see [`Intent::released_by_ledger`]): last taken first, each
    /// released as a rollback releases it (its original written back). One append forgets
    /// them; one whose release fails stays for a later rollback.
    pub(super) fn release_new(&mut self, before: u64) {
        let paths = self.held_last_first(|c, h| {
            c.op() == Some(ComposeOp::Exclude) && c.holders.len() == 1 && h.seq > before
        });
        let mut changes = Vec::new();
        for path in paths {
            match self.release_claim(path) {
                Ok(change) => changes.extend(change),
                Err(e) => log::error!("undo after failure: {e}"),
            }
        }
        if let Err(e) = self.journal(changes) {
            log::error!("undo after failure: {e}");
        }
    }

    /// The paths of the claims this VM holds that `keep` selects, last taken first (by
    /// [`Holder::seq`]; ties, from ledgers without an order: reverse path order).
    fn held_last_first(&self, keep: impl Fn(&Claim, &Holder) -> bool) -> Vec<&String> {
        let mut paths: Vec<(u64, &String)> = self
            .state
            .claims
            .iter()
            .filter_map(|(p, c)| {
                c.holder(self.vmid)
                    .filter(|h| keep(c, h))
                    .map(|h| (h.seq, p))
            })
            .collect();
        paths.sort_unstable();
        paths.into_iter().rev().map(|(_, p)| p).collect()
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
        let _hugepages = self
            .state
            .claims
            .values()
            .any(|c| c.op() == Some(ComposeOp::Add) && c.holder(self.vmid).is_some())
            .then(|| super::memory::hugepage_lock(self.root));
        let _hugepages = match _hugepages.transpose() {
            Ok(lock) => lock,
            Err(e) => return vec![e],
        };
        let paths = self.held_last_first(|_, h| self.release_kept || !h.kept());
        let mut deferred = Vec::new();
        for path in paths {
            match self.release_claim(path) {
                Ok(change) => changes.extend(change),
                Err(e) if deferrable(&e) => deferred.push(path),
                Err(e) => errors.push(e),
            }
        }
        // Once more after the rest: the cgroup may have emptied meanwhile (its threads went
        // to the parent with the `vcpus` cgroup) or be gone.
        for path in deferred {
            match self.release_claim(path) {
                Ok(change) => changes.extend(change),
                Err(e) if deferrable(&e) => log::info!(
                    "VM {}: {path} keeps its CPUs for now: the kernel refuses to empty \
                     cpuset.cpus while the cgroup has tasks (ENOSPC, kernels before 6.12); \
                     the claim stays and the next pvetune run on this node gives it back once \
                     the cgroup is empty",
                    self.vmid
                ),
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
        if let Err(e) = self.store.append(&mut self.state, changes) {
            errors.push(e.into());
        }
        errors
    }

    /// Writes what a file should hold once this VM's claim on it is dropped, and returns the
    /// ledger entry that drops it (to be journaled after the write: a crash in between leaves
    /// the claim, and the release is simply done again).
    fn release_claim(&self, path: &str) -> Result<Option<Change>, ExecError> {
        let Some(claim) = self.state.claim(path) else {
            return Ok(None);
        };
        if claim.op() == Some(ComposeOp::Ban) {
            return Ok(self.release_ban(path, claim));
        }
        let mut rest = claim.clone();
        rest.holders.retain(|h| h.vmid != self.vmid);
        let released = || Change::Claim {
            path: path.to_string(),
            claim: (!rest.holders.is_empty()).then(|| Box::new(rest.clone())),
        };
        if claim.op() == Some(ComposeOp::Rescan) {
            // A removal a crash interrupted: bring back whatever is missing.
            let held = claim.holder(self.vmid).map(|h| h.value.as_str());
            self.rescan_missing(&super::memory::listed_functions(held.unwrap_or("")))?;
            return Ok(Some(released()));
        }
        if claim.op() == Some(ComposeOp::Exclude) {
            // IRQ affinities, thousands per VM: written back without reading them first, as
            // the value to put back depends only on the claim (a file that no longer holds
            // what pvetune set is shown by `status` while the VM runs). An IRQ freed since is
            // gone with its file.
            return match self.write_if_different(path, "", &rest.effective()) {
                Err(ExecError::Write { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    log::debug!("{path} is gone: nothing to restore");
                    Ok(Some(released()))
                }
                Err(e) => Err(e),
                Ok(_) => Ok(Some(released())),
            };
        }
        let current = match self.read_as(path, claim.op(), &managed_words(claim)) {
            Ok(current) => current,
            // A file that is gone went with its cgroup (systemd removes a VM's scope when
            // QEMU exits) or its IRQ: there is nothing left to put back.
            Err(ExecError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                log::debug!("{path} is gone: nothing to restore");
                return Ok(Some(released()));
            }
            Err(e) => return Err(e),
        };
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
        let mut target = rest.effective().into_owned();
        if claim.op() == Some(ComposeOp::Add)
            && let (Ok(now), Ok(want)) =
                (current.trim().parse::<u64>(), target.trim().parse::<u64>())
            && now < want
        {
            // qemu-server shrank the pool after the start (`keephugepages: 0`), or the VM's
            // pages went back with it: a release never allocates.
            target = current.clone();
        }
        self.put(path, &current, &target, claim.op())?;
        Ok(Some(released()))
    }

    /// A thread's start time (field 22 of its stat), None when it is gone or unreadable.
    pub(super) fn thread_start(&self, pid: i32, tid: i32) -> Option<u64> {
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
}

/// A release the kernel refuses for now, not for good: emptying `cpuset.cpus` of a cgroup
/// that has tasks is ENOSPC up to 6.17 (and pvetune writes `cpuset.cpus` only on 6.8-era
/// kernels). The claim stays in the ledger and a later run gives it back, once the cgroup is
/// empty or gone; until then it holds what pvetune set, every online CPU, which is what an
/// empty `cpuset.cpus` means to the tasks in it.
fn deferrable(e: &ExecError) -> bool {
    matches!(e, ExecError::Write { path, value, source }
        if path.ends_with(&format!("/{}", crate::cgroup::CPUS))
            && value.trim().is_empty()
            && source.raw_os_error() == Some(nix::libc::ENOSPC))
}
