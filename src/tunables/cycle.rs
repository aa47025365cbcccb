//! `isolation.cpu-cycle: true`: each of the VM's CPUs is taken offline and online again in
//! post-start, before the partition is made and before pinning. Offlining migrates what the
//! kernel had put on a CPU (armed timers, kernel threads, per-CPU work, IRQs) elsewhere, so the
//! VM's CPUs start clean; nothing else moves it without a reboot (isolation-facts.md section 8).
//!
//! Offlining breaks IRQ affinities that held only the offlined CPU, so the IRQ steps of
//! `isolation.irqs` come again right after the cycle: each IRQ the VM holds is written back to
//! its composed value if the kernel changed it (and left alone if not). That is why the option
//! needs `irqs: true`. The partition and the pins come after it anyway. A CPU without an
//! `online` file (the boot CPU on x86) cannot go offline and is skipped.
//!
//! Each cycle is a claim on `cpuN/online` with the original `1` (`Action::Cycle`): a failure
//! brings the CPU online before the phase is undone, and a crash between the two writes leaves
//! a ledger whose rollback does.

use crate::plan::{Action, Inputs, Plan, PlanError, Skip, Step};
use crate::root::paths;

const TUNABLE: &str = "cpu-cycle";

/// `cpuN/online`, host-absolute.
pub fn online_path(cpu: u32) -> String {
    format!("{}/cpu{cpu}/online", paths::CPU_DIR)
}

pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    let iso = &inp.profile.isolation;
    match &iso.cpu_cycle {
        Some(cycle) if cycle.value && !iso.irqs => Err(PlanError::at(
            "isolation.cpu-cycle",
            cycle,
            "needs isolation.irqs: true: taking a CPU offline breaks the affinity of IRQs that \
             only had that CPU, and the IRQ steps are what put them back right after the cycle",
        )),
        _ => Ok(()),
    }
}

pub fn plan(inp: &Inputs, plan: &mut Plan) {
    if !inp
        .profile
        .isolation
        .cpu_cycle
        .as_ref()
        .is_some_and(|c| c.value)
    {
        return;
    }
    let Some(cpus) = inp.cpus else {
        return;
    };
    let hotplug = inp.facts.hotplug.clone().unwrap_or_default();
    for cpu in cpus.value.iter() {
        if hotplug.contains(&cpu) {
            plan.steps.push(Step {
                tunable: TUNABLE,
                action: Action::Cycle {
                    path: online_path(cpu),
                },
            });
        } else {
            plan.skipped.push(Skip {
                tunable: TUNABLE,
                reason: format!(
                    "CPU {cpu} cannot be taken offline (no {}: the boot CPU on x86)",
                    online_path(cpu)
                ),
            });
        }
    }
    // The IRQs again, as pre-start set them, read after the cycle: only those it changed are
    // written.
    plan.steps.push(Step {
        tunable: TUNABLE,
        action: Action::Barrier,
    });
    let mut irqs = Plan::default();
    crate::tunables::irqs::plan(inp, &mut irqs);
    plan.steps.extend(irqs.steps);
}
