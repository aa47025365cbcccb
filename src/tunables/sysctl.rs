//! Sysctls (`vm.stat_interval: 120`): a write under /proc/sys, shared host-wide.

use crate::plan::{Action, Inputs, Plan, PlanError, Step};
use crate::profile::sysctl_path;

pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    for (name, value) in &inp.profile.sysctl {
        if inp.facts.sysctls.get(name) != Some(&true) {
            return Err(PlanError::at(
                "sysctl",
                value,
                format!(
                    "{name}: no such sysctl on this host ({} does not exist)",
                    sysctl_path(name)
                ),
            ));
        }
    }
    Ok(())
}

pub fn plan(inp: &Inputs, plan: &mut Plan) {
    for (name, value) in &inp.profile.sysctl {
        plan.steps.push(Step {
            tunable: "sysctl",
            action: Action::Write {
                path: sysctl_path(name),
                value: value.value.clone(),
            },
        });
    }
}
