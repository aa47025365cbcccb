//! Placement: a profile says what the VM needs (`cpus: {count, within, smt, ...}`), pvetune
//! chooses which CPUs of the node it starts on, at pre-start. The result is recorded in the
//! ledger (`VmRecord::cpus`), used exactly by post-start and the isolation steps, and
//! released at post-stop, like an explicit list.
//!
//! Pure: a function of the full topology, the request, the VM's vCPU count, the nodes of its
//! devices and memory, and the CPUs other running VMs hold. Deterministic: the same inputs
//! always give the same CPUs. Every choice is explained ([`Placed::why`]) and a request that
//! does not fit says what was asked, what is free and who holds the rest ([`NoFit`]).

use crate::cpuset::CpuSet;
use crate::profile::{PlaceRequest, SmtPolicy, Within};
use crate::topology::{CpuKind, Topology};
use std::collections::BTreeMap;

pub mod devices;
mod fit;
pub use devices::DeviceNode;
use fit::{LEVELS, Rules, Slot};

/// How many rejected domains an explanation names (a big host has dozens).
const SHOWN_REJECTS: usize = 4;

/// What placement is asked, beyond the profile's request.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub request: &'a PlaceRequest,
    /// vCPUs of the VM config (QEMU's count).
    pub vcpus: u32,
    /// The VM's passthrough devices and their nodes.
    pub devices: &'a [DeviceNode],
    /// Host nodes the VM config binds guest memory to (`numaN: hostnodes=`), if any.
    pub memory_nodes: Option<Vec<u32>>,
}

/// A placement: the CPUs the VM owns, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Every CPU the VM holds (with `smt: isolate`, the idle siblings too).
    pub cpus: CpuSet,
    /// One line per reason, for `plan` and the hook log.
    pub why: Vec<String>,
}

/// Nothing fits: the whole message (what was asked, what is free, who holds the rest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoFit(pub String);

impl Ask<'_> {
    /// CPUs the vCPUs (and the reserved emulator CPUs) need.
    pub fn count(&self) -> usize {
        self.request.count.unwrap_or(self.vcpus).max(1) as usize
            + self.request.emulator_cpus as usize
    }

    fn describe(&self) -> String {
        let r = self.request;
        let unit = if r.smt == SmtPolicy::Isolate {
            "cores (one thread each)"
        } else {
            "CPUs"
        };
        let mut s = format!("{} {unit}", self.count());
        let mut parts = vec![format!("smt {}", r.smt.as_str())];
        if r.within != Within::Any {
            parts.push(format!("within one {}", r.within.as_str()));
        }
        if r.whole_cores {
            parts.push("whole cores".into());
        }
        if r.performance_only {
            parts.push("performance cores only".into());
        }
        s.push_str(&format!(" ({})", parts.join(", ")));
        s
    }
}

/// Places a VM's request: its vCPU count, the nodes of its passthrough devices (read under
/// `root`) and the host nodes its config binds memory to come from its config.
pub fn place_vm(
    root: &crate::root::Root,
    topo: &Topology,
    config: &crate::vmconfig::VmConfig,
    request: &PlaceRequest,
    others: &BTreeMap<u32, CpuSet>,
) -> Result<Placed, NoFit> {
    let devices = devices::read(root, config);
    let ask = Ask {
        request,
        vcpus: config.vcpu_count(),
        devices: &devices,
        memory_nodes: memory_nodes(config),
    };
    place(topo, &ask, others)
}

/// The host nodes of `numaN: ...,hostnodes=` (only with `numa: 1`, as qemu-server reads them).
pub fn memory_nodes(config: &crate::vmconfig::VmConfig) -> Option<Vec<u32>> {
    if !config.numa {
        return None;
    }
    let mut nodes: Vec<u32> = config
        .numa_nodes
        .values()
        .filter_map(|n| n.hostnodes.as_ref())
        .flatten()
        .copied()
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    (!nodes.is_empty()).then_some(nodes)
}

/// Places the request on `topo` (read whole: [`Topology::read`]) around `others`.
pub fn place(topo: &Topology, ask: &Ask, others: &BTreeMap<u32, CpuSet>) -> Result<Placed, NoFit> {
    let r = ask.request;
    let rules = Rules {
        smt: r.smt,
        whole_cores: r.whole_cores,
    };
    let held_by_others = others.values().fold(CpuSet::new(), |a, c| a.union(c));
    let mut why = vec![format!("asked {}", ask.describe())];
    if r.smt == SmtPolicy::Require && topo.smt_width() < 2 {
        return Err(NoFit(format!(
            "asked {}, but this host has no SMT (one thread per core): use smt: prefer or isolate",
            ask.describe()
        )));
    }
    let nodes = allowed_nodes(ask, &mut why)?;
    let cpu0_core = topo
        .cores()
        .into_iter()
        .find(|c| c.contains(0))
        .unwrap_or_default();
    let mut slots = Vec::new();
    let mut excluded: BTreeMap<&str, CpuSet> = BTreeMap::new();
    for core in topo.cores() {
        let first = core.first().unwrap_or(0);
        let Some(cpu) = topo.cpu(first) else { continue };
        let reason = if !r.allow_cpu0_core && core == cpu0_core {
            Some("CPU 0's core, kept for the host unless cpu0-core: allow")
        } else if r.performance_only && cpu.kind == CpuKind::Efficiency {
            Some("E-cores (core-type: performance)")
        } else if nodes
            .as_ref()
            .is_some_and(|n| cpu.node.is_none_or(|id| !n.contains(&id)))
        {
            Some("on other NUMA nodes")
        } else {
            None
        };
        if let Some(reason) = reason {
            let e = excluded.entry(reason).or_default();
            *e = e.union(&core);
            continue;
        }
        slots.push(Slot {
            free: core.difference(&held_by_others),
            keys: [
                cpu.l3.as_ref().and_then(CpuSet::first),
                cpu.node,
                Some(cpu.package),
            ],
            kind: cpu.kind,
            cpus: core,
        });
    }
    for (reason, cpus) in &excluded {
        why.push(format!("not considered: {cpus}: {reason}"));
    }
    for (vmid, cpus) in others.iter().filter(|(_, c)| !c.is_empty()) {
        why.push(format!("held by VM {vmid}: {cpus}"));
    }
    let need = ask.count();
    let members: Vec<usize> = (0..slots.len()).collect();
    let limit = match r.within {
        Within::L3 => 0,
        Within::NumaNode => 1,
        Within::Package => 2,
        Within::Any => 3,
    };
    let mut chosen = None;
    for (level, name) in LEVELS.iter().enumerate().take(limit + 1) {
        let domains = fit::domains(&slots, &members, level, rules);
        match fit::best_fit(&domains, need) {
            Some(d) => {
                let rejected: Vec<String> = domains
                    .iter()
                    .filter(|o| o.key != d.key)
                    .take(SHOWN_REJECTS + 1)
                    .enumerate()
                    .map(|(k, o)| {
                        if k == SHOWN_REJECTS {
                            return format!("and {} more", domains.len() - 1 - SHOWN_REJECTS);
                        }
                        let cpus = union_of(&slots, &o.slots);
                        let verdict = if o.usable < need {
                            "too few free"
                        } else {
                            "fits, but a tighter fit was chosen"
                        };
                        format!("{cpus}: {} usable, {verdict}", o.usable)
                    })
                    .collect();
                if level < 3 {
                    why.push(format!(
                        "chose {name} {} ({} usable){}",
                        union_of(&slots, &d.slots),
                        d.usable,
                        if rejected.is_empty() {
                            String::new()
                        } else {
                            format!("; rejected {}", rejected.join("; "))
                        }
                    ));
                } else {
                    why.push("no single package holds it: spread over the host".into());
                }
                chosen = Some((level, d.slots.clone()));
                break;
            }
            None if level < limit && level < 3 => {
                let best = domains.iter().map(|d| d.usable).max().unwrap_or(0);
                why.push(format!("no {name} has {need} usable (at most {best})"));
            }
            None => {}
        }
    }
    let Some((level, members)) = chosen else {
        return Err(no_fit(ask, &slots, rules, others, &excluded));
    };
    let taken = fit::fill(&slots, &members, level, need, rules);
    let cpus = taken.iter().fold(CpuSet::new(), |a, &(i, n)| {
        a.union(&rules.held(&slots[i], n))
    });
    let l3s: std::collections::BTreeSet<Option<u32>> =
        taken.iter().map(|&(i, _)| slots[i].keys[0]).collect();
    let node_set: std::collections::BTreeSet<Option<u32>> =
        taken.iter().map(|&(i, _)| slots[i].keys[1]).collect();
    why.push(format!(
        "placed on {cpus}: {} core(s), {} L3 domain(s), {} NUMA node(s)",
        taken.len(),
        l3s.len(),
        node_set.len()
    ));
    if r.smt == SmtPolicy::Isolate {
        why.push(
            "smt isolate: one vCPU per core, the sibling threads are held and stay idle".into(),
        );
    }
    check_host_cores(topo, &cpus, &held_by_others, r.host_cores, ask)?;
    Ok(Placed { cpus, why })
}

/// The nodes the request must stay on (devices, memory), `None`: any.
fn allowed_nodes(ask: &Ask, why: &mut Vec<String>) -> Result<Option<Vec<u32>>, NoFit> {
    let mut allowed: Option<Vec<u32>> = None;
    if ask.request.near_devices {
        let known: Vec<u32> = ask.devices.iter().filter_map(|d| d.node).collect();
        for d in ask.devices.iter().filter(|d| d.node.is_none()) {
            why.push(format!("{}: NUMA node unknown, not a constraint", d.device));
        }
        if !known.is_empty() {
            let mut nodes = known.clone();
            nodes.sort_unstable();
            nodes.dedup();
            why.push(format!("near-devices: node {}", join(&nodes)));
            allowed = Some(nodes);
        }
    }
    if ask.request.near_memory
        && let Some(mem) = &ask.memory_nodes
    {
        why.push(format!(
            "near-memory: the VM config binds memory to host node {}",
            join(mem)
        ));
        allowed = Some(match allowed {
            None => mem.clone(),
            Some(dev) => {
                let both: Vec<u32> = dev.iter().filter(|n| mem.contains(n)).copied().collect();
                if both.is_empty() {
                    return Err(NoFit(format!(
                        "asked {}: the passthrough devices are on node {} but the VM config binds memory to node {}; no CPU is near both (set near-devices or near-memory to false, or change numaN: hostnodes=)",
                        ask.describe(),
                        join(&dev),
                        join(mem)
                    )));
                }
                both
            }
        });
    }
    Ok(allowed)
}

/// `host-cores: N`: whole cores that are online, not isolated and held by no VM after this
/// placement.
fn check_host_cores(
    topo: &Topology,
    cpus: &CpuSet,
    others: &CpuSet,
    want: u32,
    ask: &Ask,
) -> Result<(), NoFit> {
    let busy = cpus.union(others).union(&topo.isolated);
    let left = topo.cores().iter().filter(|c| c.is_disjoint(&busy)).count();
    if left < want as usize {
        return Err(NoFit(format!(
            "asked {}: placing it on {cpus} would leave the host {left} whole core(s), and the profile keeps at least {want} (host-cores)",
            ask.describe()
        )));
    }
    Ok(())
}

fn no_fit(
    ask: &Ask,
    slots: &[Slot],
    rules: Rules,
    others: &BTreeMap<u32, CpuSet>,
    excluded: &BTreeMap<&str, CpuSet>,
) -> NoFit {
    let free = slots.iter().fold(CpuSet::new(), |a, s| a.union(&s.free));
    let usable: usize = slots.iter().map(|s| rules.usable(s)).sum();
    let level = match ask.request.within {
        Within::L3 => 0,
        Within::NumaNode => 1,
        Within::Package => 2,
        Within::Any => 3,
    };
    let members: Vec<usize> = (0..slots.len()).collect();
    let largest = fit::domains(slots, &members, level, rules)
        .iter()
        .map(|d| d.usable)
        .max()
        .unwrap_or(0);
    let mut msg = format!(
        "nothing fits: asked {}; this host has {} free ({usable} usable for this request",
        ask.describe(),
        if free.is_empty() {
            "no CPU".to_string()
        } else {
            format!("CPU {free}")
        }
    );
    if level < 3 {
        msg.push_str(&format!(", at most {largest} in one {}", LEVELS[level]));
    }
    msg.push(')');
    let held: Vec<String> = others
        .iter()
        .filter(|(_, c)| !c.is_empty())
        .map(|(vmid, c)| format!("VM {vmid}: {c}"))
        .collect();
    if !held.is_empty() {
        msg.push_str(&format!("; held by running VMs: {}", held.join(", ")));
    }
    for (reason, cpus) in excluded {
        msg.push_str(&format!("; not considered: {cpus} ({reason})"));
    }
    NoFit(msg)
}

fn union_of(slots: &[Slot], members: &[usize]) -> CpuSet {
    members
        .iter()
        .fold(CpuSet::new(), |a, &i| a.union(&slots[i].cpus))
}

fn join(nodes: &[u32]) -> String {
    nodes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
