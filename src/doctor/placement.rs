//! The doctor's placement checks: where the vCPUs land (the profile's pinning, as the hook
//! would compute it) against the guest's NUMA memory binding and its SMT topology.

use super::Severity;
use super::checks::Out;
use crate::cpuset::CpuSet;
use crate::vmconfig::VmConfig;
use std::collections::BTreeMap;

pub(super) fn numa(
    out: &mut Out,
    config: &VmConfig,
    topo: &crate::topology::Topology,
    targets: &[u32],
) {
    for (guest, spec) in &config.numa_nodes {
        let Some(hostnodes) = &spec.hostnodes else {
            continue;
        };
        let missing: Vec<String> = hostnodes
            .iter()
            .filter(|n| !topo.nodes.is_empty() && !topo.nodes.contains_key(n))
            .map(u32::to_string)
            .collect();
        if !missing.is_empty() {
            out.push(
                Severity::Error,
                "numa-node-missing",
                format!(
                    "numa{guest}: hostnodes={} does not exist on this host (nodes: {})",
                    missing.join(";"),
                    topo.nodes
                        .keys()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                format!("set numa{guest}'s hostnodes to a node of this host"),
            );
            continue;
        }
        if !config.numa {
            continue;
        }
        let remote: CpuSet = spec
            .cpus
            .iter()
            .filter_map(|&v| targets.get(v as usize).copied())
            .filter(|&cpu| topo.node_of(cpu).is_some_and(|n| !hostnodes.contains(&n)))
            .collect();
        if !remote.is_empty() {
            let nodes: Vec<String> = hostnodes.iter().map(u32::to_string).collect();
            out.push(
                Severity::Warning,
                "numa-memory-remote",
                format!("numa{guest} binds its memory to host node {} but its vCPUs run on CPU {remote} of another node: every memory access is remote", nodes.join(",")),
                format!("choose cpus on node {}, or set numa{guest}'s hostnodes to the node of the cpus", nodes.join(",")),
            );
        }
    }
}

pub(super) fn guest_topology(
    out: &mut Out,
    config: &VmConfig,
    topo: &crate::topology::Topology,
    targets: &[u32],
) {
    let vmid = out.vmid;
    let siblings = |a: u32, b: u32| a != b && topo.cpu(a).is_some_and(|c| c.siblings.contains(b));
    let threads = config.threads_per_core() as usize;
    if threads <= 1 {
        let mut by_core: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (vcpu, &cpu) in targets.iter().enumerate() {
            let first = topo
                .cpu(cpu)
                .and_then(|c| c.siblings.first())
                .unwrap_or(cpu);
            by_core.entry(first).or_default().push(vcpu);
        }
        let shared: Vec<String> = by_core
            .values()
            .filter(|v| v.len() > 1)
            .map(|v| {
                v.iter()
                    .map(|i| format!("vCPU {i}"))
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect();
        if !shared.is_empty() {
            out.push(
                Severity::Warning,
                "guest-topology-mismatch",
                format!("the guest has threads=1 but {} share a host core (SMT siblings): the guest schedules them as independent cores", shared.join(", ")),
                format!("give the guest SMT (`args: -smp {},sockets=1,cores={},threads=2`), or cpus with one thread per core", targets.len(), targets.len().div_ceil(2)),
            );
        }
    } else {
        let split: Vec<String> = targets
            .chunks(threads)
            .enumerate()
            .filter(|(_, c)| c.iter().skip(1).any(|&t| !siblings(c[0], t)))
            .map(|(core, c)| {
                format!(
                    "guest core {core} on CPU {}",
                    c.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                )
            })
            .collect();
        if !split.is_empty() {
            out.push(
                Severity::Warning,
                "guest-topology-mismatch",
                format!("the guest has {threads} threads per core but {} are not SMT siblings of one host core", split.join("; ")),
                format!("give VM {vmid} cpus with whole SMT cores (both threads) and `vcpus: auto` or `smt-pairs`"),
            );
        }
    }
}
