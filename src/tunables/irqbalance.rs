//! A running irqbalance (`isolation: {irqs: true, irqbalance: ban | warn}`): it rewrites every
//! IRQ's affinity at each scan and never sees what pvetune did, so it would move the IRQs back
//! onto the VM's CPUs. `warn` (the default) says so; `ban` tells irqbalance over its socket to
//! keep off the VM's CPUs while the VM runs (`Action::Ban`, a composed claim: see
//! `state::ComposeOp::Ban`). Planned in pre-start, right after the IRQs themselves.
//!
//! irqbalance is optional: without its socket (a build without the UI) `ban` falls back to the
//! warning, with the reason; a socket that refuses or does not answer when the ban is applied
//! is a warning there, never a failed start.

use crate::facts::Irqs;
use crate::irqbalance::socket_path;
use crate::plan::{Action, Inputs, Plan, Step};
use crate::profile::IrqbalancePolicy;

const TUNABLE: &str = "irqbalance";

pub fn plan(inp: &Inputs, irqs: &Irqs, plan: &mut Plan) {
    let (Some(pid), Some(cpus)) = (irqs.irqbalance, inp.cpus) else {
        return;
    };
    let cpus = &cpus.value;
    let socket = socket_path(pid);
    let why = match inp.profile.isolation.irqbalance {
        IrqbalancePolicy::Ban if irqs.irqbalance_socket => {
            plan.steps.push(Step {
                tunable: TUNABLE,
                action: Action::Ban {
                    socket,
                    cpus: cpus.clone(),
                },
            });
            plan.notes.push(format!(
                "irqbalance (pid {pid}) is told to ban CPUs {cpus}: it takes effect at its next \
                 scan"
            ));
            return;
        }
        IrqbalancePolicy::Ban => format!(
            "it cannot be told to ban them: {socket} does not exist (irqbalance built without \
             its UI socket)"
        ),
        IrqbalancePolicy::Warn => "set 'irqbalance: ban' in isolation: to ban them over its \
             socket while the VM runs"
            .to_string(),
    };
    plan.notes.push(format!(
        "warning: irqbalance runs (pid {pid}) and will move IRQs back onto CPUs {cpus}; {why}, \
         or stop it (systemctl disable --now irqbalance) or ban the CPUs for good \
         (IRQBALANCE_BANNED_CPULIST in /etc/default/irqbalance)"
    ));
}
