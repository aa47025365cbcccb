//! The dry run as data: each step of a phase with its target's value now and after.

use super::undo_plan;
use crate::error::Error;
use crate::exec::same_value;
use crate::hook::{Env, load, plan_for};
use crate::host::Host;
use crate::plan::{Action, Phase, Plan};
use crate::state::{ComposeOp, Store};

/// One step of a phase's dry run: its target with the value it holds now and would hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    Change {
        tunable: &'static str,
        /// The action's kind (`write`, `pin`, `exclude`, ...; docs/json.md).
        kind: &'static str,
        target: String,
        before: String,
        after: String,
        unchanged: bool,
    },
    /// A read-back check (`Action::Expect`): `now` is `None` when the file is not there yet.
    Check {
        path: String,
        value: String,
        now: Option<String>,
    },
}

/// The dry run of every phase asked for; `profile` is `None` for post-stop alone.
pub struct PlanRows {
    pub profile: Option<std::path::PathBuf>,
    pub phases: Vec<PhaseRows>,
}

/// The dry run of one phase, as data.
pub struct PhaseRows {
    pub phase: Phase,
    pub plan: Plan,
    pub rows: Vec<Row>,
}

/// The dry run of `phases`; `Ok(None)`: the VM has no profile. The ledger, the profile, the
/// host and the VM are read once for all of them. Reads only.
pub fn plan_rows<H: Host>(
    env: &Env,
    host: &H,
    vmid: u32,
    phases: &[Phase],
) -> Result<Option<PlanRows>, Error> {
    let state = Store::new(&env.root).load()?;
    // Post-stop is the undo of the ledger: it needs neither profile nor VM.
    let loaded = if phases.iter().any(|&p| p != Phase::PostStop) {
        let Some(mut loaded) = load(env, vmid, true)? else {
            return Ok(None);
        };
        loaded.resolve(env, vmid, &state)?;
        Some(loaded)
    } else {
        None
    };
    let others = state.owned_by_others(vmid);
    let mut out = Vec::new();
    for &phase in phases {
        let plan = match &loaded {
            Some(loaded) if phase != Phase::PostStop => plan_for(loaded, vmid, &others, phase)?,
            _ => undo_plan(&state, vmid),
        };
        let rows = step_rows(env, host, &plan);
        out.push(PhaseRows { phase, plan, rows });
    }
    Ok(Some(PlanRows {
        profile: loaded.map(|l| l.profile.path),
        phases: out,
    }))
}

fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::Write { .. } => "write",
        Action::Pin { .. } => "pin",
        Action::Exclude { .. } => "exclude",
        Action::Include { .. } => "include",
        Action::Enable { .. } => "enable",
        Action::Mkdir { .. } => "mkdir",
        Action::Move { .. } => "move",
        Action::Ban { .. } => "ban",
        Action::Expect { .. } => "expect",
        Action::Cycle { .. } => "cycle",
        Action::Reserve { .. } => "reserve",
        Action::Trigger { .. } => "trigger",
        Action::Sync => "sync",
        Action::RemoveRescan { .. } => "remove-rescan",
        Action::Barrier => "barrier",
    }
}

/// One phase's plan: each step with the value its target holds now.
fn step_rows<H: Host>(env: &Env, host: &H, plan: &Plan) -> Vec<Row> {
    let mut out = Vec::new();
    for step in &plan.steps {
        // A file of a cgroup that the plan creates first reads as empty.
        let read = |path: &str| match host.read(&env.root.path(path)) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => format!("<unreadable: {e}>"),
        };
        let before = match &step.action {
            Action::Write { path, .. }
            | Action::Exclude { path, .. }
            | Action::Include { path, .. }
            | Action::Enable { path, .. }
            | Action::Cycle { path } => read(path),
            Action::Reserve { node, size_kb, .. } => {
                read(&crate::memory::pool_file(*node, *size_kb, "nr_hugepages"))
            }
            // Write-only: there is no value before.
            Action::Trigger { .. } => "(trigger)".to_string(),
            Action::Sync => "dirty pages".to_string(),
            Action::RemoveRescan { functions, .. } => functions
                .iter()
                .map(|(id, driver)| format!("{id} present ({})", crate::pci::driver_name(driver)))
                .collect::<Vec<_>>()
                .join(", "),
            Action::Barrier => continue,
            Action::Ban { socket, .. } => {
                crate::exec::read_claimed(host, &env.root, socket, Some(ComposeOp::Ban), &[])
                    .unwrap_or_else(|e| format!("<unreadable: {e}>"))
            }
            Action::Expect { path, value } => {
                let now = Some(read(path)).filter(|now| !now.is_empty());
                out.push(Row::Check {
                    path: path.clone(),
                    value: value.clone(),
                    now,
                });
                continue;
            }
            Action::Mkdir { path, .. } => match read(&format!("{path}/cgroup.type")).as_str() {
                "" => crate::state::DIR_ABSENT.to_string(),
                kind => kind.to_string(),
            },
            Action::Pin { thread, .. } => match thread.tid {
                Some(tid) => host
                    .get_affinity(tid)
                    .map(|c| c.to_string())
                    .unwrap_or_else(|e| format!("<{e}>")),
                None => "-".to_string(),
            },
            Action::Move { thread, .. } => match (thread.pid, thread.tid) {
                (Some(pid), Some(tid)) => host
                    .read(&env.root.path(crate::cgroup::thread_cgroup_path(pid, tid)))
                    .ok()
                    .and_then(|t| crate::cgroup::unified_path(&t))
                    .unwrap_or_else(|| "-".to_string()),
                _ => "-".to_string(),
            },
        };
        let after = step.action.after(&before);
        out.push(Row::Change {
            tunable: step.tunable,
            kind: action_kind(&step.action),
            target: step.action.to_string(),
            unchanged: same_value(&before, &after),
            before: before.trim().to_string(),
            after: after.trim().to_string(),
        });
    }
    out
}
