//! Giving a profile's `cpus` their CPUs before planning: a cpulist as it is, a placement
//! request from the ledger's record of the VM (placed at its pre-start) or by a new placement;
//! and the host facts of those CPUs.

use super::{Env, Loaded};
use crate::cpuset::CpuSet;
use crate::error::Error;
use crate::facts::HostFacts;
use crate::plan;
use crate::profile::{CpuRequest, Located, Profile};
use crate::state::State;

/// Host facts for the VM's CPUs (cpufreq of those only) and the profile's other keys.
pub(super) fn read_facts(
    env: &Env,
    profile: &Profile,
    cpus: Option<&Located<CpuSet>>,
    irqs: bool,
) -> HostFacts {
    HostFacts::read(
        &env.root,
        &cpus.map(|c| c.value.clone()).unwrap_or_default(),
        profile.sysctl.iter().map(|(name, _)| name.as_str()),
        irqs,
        profile.isolation.partition.is_some(),
        profile
            .isolation
            .cpu_cycle
            .as_ref()
            .is_some_and(|c| c.value),
    )
}

impl Loaded {
    /// Gives a placement request its CPUs: those the ledger recorded for the VM (placed at its
    /// pre-start, used exactly until post-stop releases them), else a new placement around
    /// the CPUs other running VMs hold. An explicit list, or no `cpus`, is left as it is.
    pub fn resolve(&mut self, env: &Env, vmid: u32, state: &State) -> Result<(), Error> {
        let Some(Located {
            value: CpuRequest::Place(request),
            line,
            column,
        }) = &self.profile.cpus
        else {
            return Ok(());
        };
        let (line, column) = (*line, *column);
        let recorded = state
            .vms
            .get(&vmid)
            .map(|r| &r.cpus)
            .filter(|c| !c.is_empty());
        let cpus = match recorded {
            Some(cpus) => {
                self.placed = vec![format!("CPUs {cpus} placed at pre-start (from the ledger)")];
                cpus.clone()
            }
            None => {
                let others = state.owned_by_others(vmid);
                let placed = crate::placement::place_vm(
                    &env.root,
                    &self.topology,
                    &self.config,
                    request,
                    &others,
                )
                .map_err(|e| Error::Plan {
                    path: self.profile.path.clone(),
                    source: plan::PlanError {
                        key: "cpus",
                        line,
                        column,
                        message: e.to_string(),
                    },
                })?;
                self.placed = placed.why;
                placed.cpus
            }
        };
        let cpus = Located {
            value: cpus,
            line,
            column,
        };
        self.facts = read_facts(env, &self.profile, Some(&cpus), self.irq_facts);
        self.cpus = Some(cpus);
        Ok(())
    }
}
