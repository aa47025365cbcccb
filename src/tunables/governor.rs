//! CPU frequency governor of the VM's CPUs (`scaling_governor`), once per cpufreq policy.

use crate::cpuset::CpuSet;
use crate::plan::{Action, Inputs, Plan, PlanError, Skip, Step};
use std::collections::BTreeSet;

pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    let (Some(governor), Some(cpus)) = (&inp.profile.governor, inp.cpus) else {
        return Ok(());
    };
    for cpu in cpus.value.iter() {
        if let Some(freq) = inp.facts.cpufreq.get(&cpu)
            && !freq.available.is_empty()
            && !freq.available.contains(&governor.value)
        {
            return Err(PlanError::at(
                "governor",
                governor,
                format!(
                    "'{}' is not available on CPU {cpu} (available: {})",
                    governor.value,
                    freq.available.join(" ")
                ),
            ));
        }
    }
    Ok(())
}

pub fn plan(inp: &Inputs, plan: &mut Plan) {
    let (Some(governor), Some(cpus)) = (&inp.profile.governor, inp.cpus) else {
        return;
    };
    let cpus = &cpus.value;
    let without: CpuSet = cpus
        .iter()
        .filter(|c| !inp.facts.cpufreq.contains_key(c))
        .collect();
    if !without.is_empty() {
        plan.skipped.push(Skip {
            tunable: "governor",
            reason: format!(
                "no cpufreq on CPU {without}: governor '{}' not set there",
                governor.value
            ),
        });
    }
    let mut seen = BTreeSet::new();
    for cpu in cpus.iter() {
        if let Some(freq) = inp.facts.cpufreq.get(&cpu)
            && seen.insert(freq.governor_path.clone())
        {
            plan.steps.push(Step {
                tunable: "governor",
                action: Action::Write {
                    path: freq.governor_path.clone(),
                    value: governor.value.clone(),
                },
            });
        }
    }
}
