//! The executor's primitives for the `Ban` claim: irqbalance's banned CPUs, read and set over
//! its control socket (`crate::irqbalance`) instead of a file.
//!
//! - The claim's first holder reads irqbalance's setting ([`irqbalance::current`]) and records
//!   it as `original` (`NULL` or the explicit list) with its CPUs as `base`; every later
//!   holding and release composes from that record, never from a fresh read: irqbalance's
//!   `BANNED` lags a scan behind what was sent, and already holds the VMs' CPUs.
//! - So a send is never skipped because a read says it is in place: every apply and release
//!   sends its list (or `NULL`).
//! - Each exchange has one deadline, [`EXCHANGE_DEADLINE`] from its start: a busy or hung
//!   irqbalance costs a hook at most that, per exchange.
//! - irqbalance is optional. A ban it refuses or does not answer is a warning and a skip (the
//!   claim goes back to what it was); a release of a claim whose irqbalance is gone (the pid
//!   is no irqbalance any more, the socket is absent or refuses) drops the claim with a warning:
//!   there is nothing to give back, a restarted irqbalance detects afresh. A release that an
//!   irqbalance still running does not take in time (unconfirmed included: sending it again
//!   is harmless) stays held, with a warning, for the next hook's reconcile or a rollback to
//!   retry: it never fails a stop.

use super::{ExecError, Executor, Intent};
use crate::cpuset::CpuSet;
use crate::host::Host;
use crate::irqbalance::{self, IrqbalanceError, pid_of_socket, restore_arg_of};
use crate::root::{Root, paths};
use crate::state::{Change, Claim, Compose, ComposeOp, Holders};
use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

/// The most one exchange with irqbalance (connect, command, reply or close) may take.
pub const EXCHANGE_DEADLINE: Duration = Duration::from_secs(1);

fn deadline() -> Instant {
    Instant::now() + EXCHANGE_DEADLINE
}

/// What irqbalance bans now, as its socket `path` reports it (`setup`'s `BANNED`, a cpulist;
/// empty for none). A socket that is absent or refuses (irqbalance gone) reads as NotFound.
pub fn read_banned(root: &Root, path: &str) -> io::Result<String> {
    let pid = socket_pid(path)?;
    irqbalance::banned(root, pid, deadline())
        .map(|set| set.to_string())
        .map_err(to_io)
}

fn socket_pid(path: &str) -> io::Result<u32> {
    pid_of_socket(path).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path} is not an irqbalance socket path"),
        )
    })
}

fn to_io(e: IrqbalanceError) -> io::Error {
    let kind = match e {
        IrqbalanceError::Absent { .. } | IrqbalanceError::Refused { .. } => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A `settings cpus` sent whose close did not come in time: it may still take effect.
fn unconfirmed(e: &ExecError) -> bool {
    let ExecError::Write { source, .. } = e else {
        return false;
    };
    source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<IrqbalanceError>())
        .is_some_and(|inner| matches!(inner, IrqbalanceError::Unconfirmed { .. }))
}

/// Whether the irqbalance of a claim is gone: its pid is no irqbalance process any more.
fn process_gone(root: &Root, pid: u32) -> bool {
    let comm = root.path(format!("{}/{pid}/comm", paths::PROC));
    !crate::attr::read(&comm).is_ok_and(|c| c.trim_end() == "irqbalance")
}

impl<H: Host> Executor<'_, H> {
    /// The claim this VM's ban of `cpus` leads to, and the intent to send it (see the module
    /// doc); None when there is nothing to do: irqbalance already bans every one of `cpus` and
    /// nobody holds the claim, or irqbalance cannot be read (a warning).
    pub(super) fn ban_intent<'s>(
        &self,
        socket: &'s str,
        cpus: &CpuSet,
        (claims, seq): (&super::prepare::Batch, &Cell<u64>),
        applied: &mut super::Applied,
    ) -> Option<(Claim, Intent<'s>)> {
        let previous = claims
            .claim(socket)
            .or_else(|| self.state.claim(socket))
            .cloned();
        let (current, mut claim) = match &previous {
            Some(claim) => (claim.effective().into_owned(), claim.clone()),
            None => {
                let setting = socket_pid(socket)
                    .map_err(|e| e.to_string())
                    .and_then(|pid| {
                        irqbalance::current(self.root, pid, deadline()).map_err(|e| e.to_string())
                    });
                let setting = match setting {
                    Ok(setting) => setting,
                    Err(e) => {
                        log::warn!(
                            "{e}: CPUs {cpus} not banned in irqbalance (the IRQs are moved; \
                             irqbalance may move them back)"
                        );
                        return None;
                    }
                };
                if cpus.is_subset(setting.cpus()) {
                    applied.unchanged += 1;
                    return None;
                }
                let claim = Claim {
                    original: setting.original_text().into(),
                    holders: Holders::new(),
                    compose: Some(Compose {
                        base: setting.cpus().clone(),
                        ..Compose::of(ComposeOp::Ban)
                    }),
                    extra: Default::default(),
                };
                (claim.original.to_string(), claim)
            }
        };
        self.hold(&mut claim, cpus.to_string(), seq);
        let intent = Intent::Write {
            path: socket.into(),
            current,
            effective: claim.effective().into_owned(),
            previous: previous.map(Box::new),
            refusable: true,
            op: Some(ComposeOp::Ban),
        };
        Some((claim, intent))
    }

    /// Sends `target` (a cpulist, or `NULL`) to irqbalance, whatever it reports now (it lags).
    /// A command sent whose close did not come in time may still take effect: it counts as
    /// sent, so that the claim stays and its release puts irqbalance back.
    pub(super) fn put_ban(&self, path: &str, target: &str) -> Result<Option<bool>, ExecError> {
        match self.send_ban(path, target) {
            Err(e) if unconfirmed(&e) => {
                log::warn!("{e}");
                Ok(Some(true))
            }
            sent => sent.map(|()| Some(true)),
        }
    }

    /// `settings cpus <target>`; an error is an `ExecError::Write` whose source holds the
    /// [`IrqbalanceError`] (of kind NotFound when irqbalance is gone).
    fn send_ban(&self, path: &str, target: &str) -> Result<(), ExecError> {
        let write_error = |source| ExecError::Write {
            path: path.to_string(),
            value: format!("settings cpus {target}"),
            source,
        };
        let pid = socket_pid(path).map_err(write_error)?;
        let Some(arg) = restore_arg_of(target) else {
            return Err(write_error(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("'{target}' is neither NULL nor a cpulist"),
            )));
        };
        irqbalance::ban(self.root, pid, arg.as_ref(), deadline()).map_err(|e| write_error(to_io(e)))
    }

    /// Releases this VM's ban (see the module doc): the ledger entry to journal, None to keep
    /// the claim held for a later retry.
    pub(super) fn release_ban(&self, path: &str, claim: &Claim) -> Option<Change> {
        let mut rest = claim.clone();
        rest.holders.retain(|h| h.vmid != self.vmid);
        let drop_it = Some(Change::Claim {
            path: path.to_string(),
            claim: (!rest.holders.is_empty()).then(|| Box::new(rest.clone())),
        });
        let gone = |why: &str| {
            log::warn!(
                "irqbalance {path}: {why}: VM {}'s ban dropped, nothing to give back (a \
                 restarted irqbalance detects its ban afresh)",
                self.vmid
            );
        };
        if pid_of_socket(path).is_none_or(|pid| process_gone(self.root, pid)) {
            gone("the process is gone");
            return drop_it;
        }
        // Unconfirmed too stays held: a release sent again is the same release.
        match self.send_ban(path, &rest.effective()) {
            Ok(()) => drop_it,
            Err(ExecError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                gone(&source.to_string());
                drop_it
            }
            Err(e) => {
                log::warn!(
                    "{e}: VM {}'s ban stays held; the next hook on this node retries",
                    self.vmid
                );
                None
            }
        }
    }
}
