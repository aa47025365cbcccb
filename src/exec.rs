//! Executing a plan: write-ahead ledger, apply, and undo, once per primitive action.
//!
//! For every change the old value is put in the ledger and the ledger is saved *before* the
//! change is made. A phase that fails halfway undoes its own changes in reverse; a crash
//! leaves a ledger that a later run (`rollback`, or the reconcile step of any hook) replays.
//! Undo is idempotent: restoring a value that is already there writes nothing.

use crate::cpuset::CpuSet;
use crate::host::Host;
use crate::plan::{Action, Step, ThreadRef};
use crate::root::Root;
use crate::state::{Claim, Holder, PinRecord, State, StateError, Store, VmRecord};
use std::io;

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
    #[error("{thread}: the VM is not running, so its threads cannot be pinned")]
    NotRunning { thread: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What an apply did, for the one-line summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub changed: usize,
    pub unchanged: usize,
    pub vanished: usize,
}

/// One applied change, as needed to take it back if the phase fails later.
enum Undo {
    Claim {
        path: String,
        previous: Option<String>,
    },
    Pin {
        tid: i32,
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

    /// Applies the steps in order. On the first failure, every change made by this call is
    /// undone (in reverse), and the error is returned.
    pub fn apply(&mut self, steps: &[Step]) -> Result<Applied, ExecError> {
        let mut undo = Vec::new();
        let mut applied = Applied::default();
        for step in steps {
            let result = match &step.action {
                Action::Write { path, value } => self.claim(path, value, &mut undo),
                Action::Pin { thread, cpus } => self.pin(thread, cpus, &mut undo),
            };
            match result {
                Ok(Some(true)) => applied.changed += 1,
                Ok(Some(false)) => applied.unchanged += 1,
                Ok(None) => applied.vanished += 1,
                Err(e) => {
                    for entry in undo.into_iter().rev() {
                        if let Err(undo_err) = self.undo(entry) {
                            log::error!("undo after failure: {undo_err}");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(applied)
    }

    /// Claims a host-wide file for this VM and writes the effective value.
    fn claim(
        &mut self,
        path: &str,
        value: &str,
        undo: &mut Vec<Undo>,
    ) -> Result<Option<bool>, ExecError> {
        let current = self.read(path)?;
        let claim = self
            .state
            .claims
            .entry(path.to_string())
            .or_insert_with(|| Claim {
                original: current.clone(),
                holders: Vec::new(),
            });
        let previous = match claim.holders.iter_mut().find(|h| h.vmid == self.vmid) {
            Some(h) => Some(std::mem::replace(&mut h.value, value.to_string())),
            None => {
                claim.holders.push(Holder {
                    vmid: self.vmid,
                    value: value.to_string(),
                });
                None
            }
        };
        let effective = claim.effective().to_string();
        undo.push(Undo::Claim {
            path: path.to_string(),
            previous,
        });
        self.store.save(&self.state)?;
        self.write_if_different(path, &current, &effective)
    }

    /// Pins one thread, keeping its affinity from before pvetune's first pin.
    fn pin(
        &mut self,
        thread: &ThreadRef,
        cpus: &CpuSet,
        undo: &mut Vec<Undo>,
    ) -> Result<Option<bool>, ExecError> {
        let Some(tid) = thread.tid else {
            return Err(ExecError::NotRunning {
                thread: thread.to_string(),
            });
        };
        let current = match self.host.get_affinity(tid) {
            Ok(c) => c,
            // QEMU's worker threads come and go: one that exited is not an error.
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => return Ok(None),
            Err(source) => return Err(pin_error(thread, cpus, source)),
        };
        let record = self.state.vms.entry(self.vmid).or_default();
        let index = record.pins.iter().position(|p| p.tid == tid);
        let previous = index.map(|i| record.pins[i].clone());
        match index {
            Some(i) => record.pins[i].new = cpus.clone(),
            None => record.pins.push(PinRecord {
                tid,
                label: thread.label.clone(),
                old: current.clone(),
                new: cpus.clone(),
            }),
        }
        undo.push(Undo::Pin { tid, previous });
        self.store.save(&self.state)?;
        if current == *cpus {
            return Ok(Some(false));
        }
        match self.host.set_affinity(tid, cpus) {
            Ok(()) => Ok(Some(true)),
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(None),
            Err(source) => Err(pin_error(thread, cpus, source)),
        }
    }

    fn undo(&mut self, entry: Undo) -> Result<(), ExecError> {
        match entry {
            Undo::Claim {
                path,
                previous: None,
            } => self.release_claim(&path),
            Undo::Claim {
                path,
                previous: Some(value),
            } => {
                let current = self.read(&path)?;
                let Some(claim) = self.state.claims.get_mut(&path) else {
                    return Ok(());
                };
                if let Some(h) = claim.holders.iter_mut().find(|h| h.vmid == self.vmid) {
                    h.value = value;
                }
                let effective = claim.effective().to_string();
                self.store.save(&self.state)?;
                self.write_if_different(&path, &current, &effective)
                    .map(drop)
            }
            Undo::Pin { tid, previous } => {
                let record = self.state.vms.entry(self.vmid).or_default();
                let Some(i) = record.pins.iter().position(|p| p.tid == tid) else {
                    return Ok(());
                };
                let target = match &previous {
                    Some(prev) => prev.new.clone(),
                    None => record.pins[i].old.clone(),
                };
                self.restore_affinity(tid, &target)?;
                let record = self.state.vms.entry(self.vmid).or_default();
                match previous {
                    Some(prev) => record.pins[i] = prev,
                    None => {
                        record.pins.remove(i);
                    }
                }
                // A record that only this apply created goes with it.
                if *record == VmRecord::default() {
                    self.state.vms.remove(&self.vmid);
                }
                self.store.save(&self.state)?;
                Ok(())
            }
        }
    }

    /// Takes back everything the ledger holds for this VM: its claims (each file gets the value
    /// the remaining claimers need, or its original) and its thread pins. Every undone entry is
    /// saved at once, so an interrupted rollback resumes where it stopped. Errors do not stop
    /// the rollback; the entries that failed stay in the ledger for a later run.
    pub fn rollback(&mut self, process_alive: bool) -> Vec<ExecError> {
        let mut errors = Vec::new();
        let paths: Vec<String> = self
            .state
            .claims
            .iter()
            .filter(|(_, c)| c.holders.iter().any(|h| h.vmid == self.vmid))
            .map(|(p, _)| p.clone())
            .collect();
        for path in paths.iter().rev() {
            if let Err(e) = self.release_claim(path) {
                errors.push(e);
            }
        }
        let pins = self
            .state
            .vms
            .get(&self.vmid)
            .map(|r| r.pins.clone())
            .unwrap_or_default();
        for pin in pins.iter().rev() {
            // Threads of a QEMU that exited are gone, and their tids may belong to someone
            // else now: only restore threads of the very process that was pinned.
            if process_alive && let Err(e) = self.restore_affinity(pin.tid, &pin.old) {
                errors.push(e);
                continue;
            }
            if let Some(rec) = self.state.vms.get_mut(&self.vmid) {
                rec.pins.retain(|p| p.tid != pin.tid);
            }
            if let Err(e) = self.store.save(&self.state) {
                errors.push(e.into());
            }
        }
        if errors.is_empty() {
            self.state.vms.remove(&self.vmid);
            if let Err(e) = self.store.save(&self.state) {
                errors.push(e.into());
            }
        }
        errors
    }

    /// Drops this VM's claim on a file and writes what the file should now hold. The file is
    /// written before the ledger forgets the claim, so a crash in between is simply redone.
    fn release_claim(&mut self, path: &str) -> Result<(), ExecError> {
        let Some(claim) = self.state.claims.get(path) else {
            return Ok(());
        };
        let current = self.read(path)?;
        if claim.holders.last().is_some_and(|h| h.vmid == self.vmid)
            && !same_value(&current, claim.effective())
        {
            log::warn!(
                "{path} was changed outside pvetune (now '{}', pvetune had set '{}'); restoring anyway",
                current.trim(),
                claim.effective().trim()
            );
        }
        let mut rest = claim.clone();
        rest.holders.retain(|h| h.vmid != self.vmid);
        self.write_if_different(path, &current, rest.effective())?;
        if rest.holders.is_empty() {
            self.state.claims.remove(path);
        } else {
            self.state.claims.insert(path.to_string(), rest);
        }
        self.store.save(&self.state)?;
        Ok(())
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
