//! The top-level error, and the one place that maps errors to exit codes.

use crate::exec::ExecError;
use crate::plan::{Phase, PlanError};
use crate::profile::ProfileError;
use crate::state::StateError;
use crate::topology::TopologyError;
use crate::vm::VmError;
use crate::vmconfig::VmConfigError;
use std::io;
use std::path::PathBuf;

/// Exit codes (also in `--help` and docs/operations.md).
pub mod exit {
    pub const OK: i32 = 0;
    /// Something failed while applying; the phase's own changes were undone.
    pub const FAILED: i32 = 1;
    /// Bad input: command line, profile, VM config; nothing was changed.
    pub const INVALID: i32 = 2;
    /// A rollback could not undo everything; what is left is in the ledger.
    pub const ROLLBACK_INCOMPLETE: i32 = 3;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("{}: {source}", place(path, source))]
    Plan { path: PathBuf, source: PlanError },
    #[error("VM config: {0}")]
    VmConfig(#[from] VmConfigError),
    #[error("host topology: {0}")]
    Topology(#[from] TopologyError),
    #[error("VM {vmid}: {source}")]
    Vm { vmid: u32, source: VmError },
    #[error("VM {vmid} is not running (no live QEMU process behind its pidfile)")]
    NotRunning { vmid: u32 },
    #[error("ledger: {0}")]
    State(#[from] StateError),
    /// The ledger cannot be read in a hook of a VM with a profile: nothing is changed, and a
    /// pre-start fails (pvetune cannot tell what it holds, so it cannot tune safely).
    #[error(
        "ledger: {source}; VM {vmid} {phase} stopped before any change. To recover: `pvetune \
         status` shows what the ledger holds, `pvetune rollback <vmid>` undoes a VM; if they \
         fail too, inspect {dir}/state.json and {dir}/state.journal, put back by hand what \
         they list, then remove both",
        dir = dir.display()
    )]
    Ledger {
        vmid: u32,
        phase: Phase,
        dir: PathBuf,
        source: StateError,
    },
    #[error("{phase} failed: {source}; every change of this phase was undone")]
    Apply { phase: Phase, source: ExecError },
    #[error("rollback of VM {vmid} incomplete, the rest stays in the ledger for the next run: {}", errors.join("; "))]
    Rollback { vmid: u32, errors: Vec<String> },
    /// Writing the command's output failed. A closed pipe is not a failure: it is how
    /// `pvetune plan | head`, or a pager quit early, ends a command (see [`Error::is_quiet`]).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
    /// The hookscript chained after pvetune's (`pvetune enable --chain`) failed; its exit code
    /// is passed on (in pre-start qemu-server then aborts the start).
    #[error("{phase}: chained hookscript {volid} exited with code {code}")]
    Chained {
        volid: String,
        phase: Phase,
        code: i32,
    },
    /// `pvetune doctor` found something that would make a start fail (the findings are on
    /// stdout already).
    #[error("doctor: {count} finding(s) would make a start fail")]
    Findings { count: usize },
    /// `pvetune enable`/`disable`: `qm` failed or the setup does not allow it.
    #[error("{0}")]
    Admin(String),
}

fn place(path: &std::path::Path, e: &PlanError) -> String {
    if e.line == 0 {
        path.display().to_string()
    } else {
        format!("{}:{}:{}", path.display(), e.line, e.column)
    }
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Output(_) if self.is_quiet() => exit::OK,
            Error::Usage(_) | Error::Profile(_) | Error::Plan { .. } | Error::VmConfig(_) => {
                exit::INVALID
            }
            Error::Rollback { .. } => exit::ROLLBACK_INCOMPLETE,
            Error::Chained { code, .. } => (*code).clamp(1, 255),
            Error::Findings { .. } => exit::INVALID,
            Error::Admin(_) => exit::FAILED,
            Error::Topology(_)
            | Error::Vm { .. }
            | Error::NotRunning { .. }
            | Error::State(_)
            | Error::Ledger { .. }
            | Error::Apply { .. }
            | Error::Output(_) => exit::FAILED,
        }
    }

    /// The reader of the output went away (EPIPE): the command ends with exit 0 and says
    /// nothing, like any command-line tool whose output is cut short.
    pub fn is_quiet(&self) -> bool {
        matches!(self, Error::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}
