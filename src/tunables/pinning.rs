//! vCPU, iothread and emulator-thread pinning, aware of SMT siblings, L3 domains and P/E cores.
//!
//! QEMU numbers vCPUs socket by socket, core by core, thread by thread: with `threads=2`,
//! vCPU 0 and 1 are the two threads of guest core 0. Host cores are taken in an order that
//! keeps a VM inside as few L3 domains as possible and on performance cores first, so that
//! the guest's idea of "siblings share a core" and "cores share a cache" is true on the host.

use crate::cpuset::CpuSet;
use crate::plan::{Action, Inputs, Plan, PlanError, Step, ThreadRef};
use crate::profile::{CpuRequest, PlaceRequest, Placement, SmtPolicy, VcpuLayout};
use crate::topology::{CpuKind, Topology};
use std::collections::BTreeMap;

pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    if inp.cpus.is_none() {
        return Ok(());
    }
    vcpu_targets(inp)?;
    placement(inp, &inp.profile.emulator.value, "emulator")?;
    placement(inp, &inp.profile.iothreads.value, "iothreads")?;
    Ok(())
}

pub fn plan(inp: &Inputs, plan: &mut Plan) -> Result<(), PlanError> {
    if inp.cpus.is_none() {
        return Ok(());
    }
    let targets = vcpu_targets(inp)?;
    let emulator = placement(inp, &inp.profile.emulator.value, "emulator")?;
    let iothreads = placement(inp, &inp.profile.iothreads.value, "iothreads")?;
    let layout = effective_layout(inp);
    plan.notes.push(format!(
        "vcpus: {} vCPUs, guest {} thread(s) per core, layout {}",
        targets.len(),
        guest_threads(inp),
        layout_name(&layout)
    ));
    plan.notes.extend(numa_mismatches(inp, &targets));
    plan.notes.extend(guest_smt_missing(inp));
    if let Some(affinity) = &inp.config.affinity {
        plan.notes.push(format!(
            "VM config sets affinity {affinity} for the whole process; the per-thread pinning below replaces it"
        ));
    }
    let pin = |label: String, pid: Option<i32>, tid: Option<i32>, cpus: &CpuSet| Step {
        tunable: "pinning",
        action: Action::Pin {
            thread: ThreadRef { pid, tid, label },
            cpus: cpus.clone(),
        },
    };
    match inp.running {
        Some(vm) => {
            let mut vcpus = vm.vcpus.clone();
            vcpus.sort_by_key(|v| v.index);
            for (v, &cpu) in vcpus.iter().zip(&targets) {
                let label = format!("vCPU {}", v.index);
                plan.steps.push(pin(
                    label,
                    Some(vm.pid),
                    Some(v.tid),
                    &CpuSet::range(cpu, cpu),
                ));
            }
            for io in &vm.iothreads {
                let label = format!("iothread {}", io.id);
                plan.steps
                    .push(pin(label, Some(vm.pid), Some(io.tid), &iothreads));
            }
            for t in &vm.emulator {
                let label = format!("emulator {}", t.comm);
                plan.steps
                    .push(pin(label, Some(vm.pid), Some(t.tid), &emulator));
            }
        }
        None => {
            for (i, &cpu) in targets.iter().enumerate() {
                plan.steps.push(pin(
                    format!("vCPU {i}"),
                    None,
                    None,
                    &CpuSet::range(cpu, cpu),
                ));
            }
            plan.steps
                .push(pin("iothreads".into(), None, None, &iothreads));
            plan.steps
                .push(pin("emulator threads".into(), None, None, &emulator));
        }
    }
    Ok(())
}

/// Guest NUMA nodes whose memory is bound to host nodes (`numaN: ...,hostnodes=H`) but whose
/// vCPUs would run on CPUs of other nodes: every memory access of those vCPUs would be remote.
fn numa_mismatches(inp: &Inputs, targets: &[u32]) -> Vec<String> {
    if !inp.config.numa {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (guest_node, spec) in &inp.config.numa_nodes {
        let Some(hostnodes) = &spec.hostnodes else {
            continue;
        };
        let remote: CpuSet = spec
            .cpus
            .iter()
            .filter_map(|&vcpu| targets.get(vcpu as usize))
            .filter(|&&cpu| {
                inp.topology
                    .node_of(cpu)
                    .is_some_and(|n| !hostnodes.contains(&n))
            })
            .copied()
            .collect();
        if !remote.is_empty() {
            let nodes: Vec<String> = hostnodes.iter().map(u32::to_string).collect();
            out.push(format!(
                "warning: guest NUMA node {guest_node} has its memory on host node {} but its vCPUs would run on CPU {remote} of another node (remote memory); choose cpus on that node",
                nodes.join(",")
            ));
        }
    }
    out
}

/// Number of vCPUs: the running threads if QEMU runs, else the config's count.
fn vcpu_count(inp: &Inputs) -> usize {
    match inp.running {
        Some(vm) if !vm.vcpus.is_empty() => vm.vcpus.len(),
        _ => inp.config.vcpu_count() as usize,
    }
}

/// Guest threads per core: from QMP's `props` when known (the truth), else from `args: -smp`.
fn guest_threads(inp: &Inputs) -> usize {
    if let Some(vm) = inp.running {
        let mut per_core: BTreeMap<(Option<u32>, Option<u32>), usize> = BTreeMap::new();
        for v in &vm.vcpus {
            if v.core.is_some() {
                *per_core.entry((v.socket, v.core)).or_default() += 1;
            }
        }
        if let Some(max) = per_core.values().max() {
            return *max;
        }
    }
    inp.config.threads_per_core().max(1) as usize
}

fn effective_layout(inp: &Inputs) -> VcpuLayout {
    // `smt: isolate` holds whole cores but runs one vCPU on each: their first threads.
    let isolate = matches!(
        inp.profile.cpus.as_ref().map(|c| &c.value),
        Some(CpuRequest::Place(PlaceRequest {
            smt: SmtPolicy::Isolate,
            ..
        }))
    );
    match &inp.profile.vcpus.value {
        VcpuLayout::Auto if isolate => VcpuLayout::CoresFirst,
        VcpuLayout::Auto if guest_threads(inp) >= 2 && inp.topology.smt_width() >= 2 => {
            VcpuLayout::SmtPairs
        }
        VcpuLayout::Auto => VcpuLayout::CoresFirst,
        other => other.clone(),
    }
}

fn layout_name(layout: &VcpuLayout) -> &'static str {
    match layout {
        VcpuLayout::Auto => "auto",
        VcpuLayout::Sequential => "sequential",
        VcpuLayout::SmtPairs => "smt-pairs",
        VcpuLayout::CoresFirst => "cores-first",
        VcpuLayout::Explicit(_) => "explicit",
    }
}

/// Host cores within `cpus`, best first: performance cores, then by L3 domain, then by number.
fn ordered_cores(topo: &Topology, cpus: &CpuSet) -> Vec<CpuSet> {
    let mut cores = topo.cores_in(cpus);
    cores.sort_by_key(|core| {
        let first = core.first().unwrap_or(0);
        let cpu = topo.cpu(first);
        let efficiency = cpu.is_some_and(|c| c.kind == CpuKind::Efficiency);
        let l3 = cpu.and_then(|c| c.l3.as_ref()).and_then(CpuSet::first);
        (efficiency, l3, first)
    });
    cores
}

/// The host CPU of each vCPU, in vCPU order.
pub fn vcpu_targets(inp: &Inputs) -> Result<Vec<u32>, PlanError> {
    let Some(located) = inp.cpus else {
        return Ok(Vec::new());
    };
    let cpus = &located.value;
    let n = vcpu_count(inp);
    let fail = |msg: String| PlanError::at("vcpus", &inp.profile.vcpus, msg);
    if n > cpus.len() {
        return Err(PlanError::at(
            "cpus",
            located,
            format!(
                "the VM has {n} vCPUs but cpus ({cpus}) has only {} CPUs",
                cpus.len()
            ),
        ));
    }
    let cores = ordered_cores(inp.topology, cpus);
    let order: Vec<u32> = match effective_layout(inp) {
        VcpuLayout::Sequential => cpus.iter().collect(),
        VcpuLayout::Explicit(list) => {
            if list.len() < n {
                return Err(fail(format!("lists {} CPUs for {n} vCPUs", list.len())));
            }
            list
        }
        VcpuLayout::SmtPairs => {
            // Consecutive vCPUs (a guest core's threads) fill one host core before the next.
            let threads = guest_threads(inp);
            let full = cores.iter().filter(|c| c.len() >= threads).count();
            if full * threads < n && threads > 1 {
                return Err(fail(format!(
                    "smt-pairs needs {} host cores with {threads} threads inside cpus, found {}",
                    n.div_ceil(threads),
                    full
                )));
            }
            let (whole, partial): (Vec<&CpuSet>, Vec<&CpuSet>) =
                cores.iter().partition(|c| c.len() >= threads);
            whole
                .into_iter()
                .chain(partial)
                .flat_map(CpuSet::iter)
                .collect()
        }
        VcpuLayout::CoresFirst | VcpuLayout::Auto => {
            let width = cores.iter().map(CpuSet::len).max().unwrap_or(1);
            (0..width)
                .flat_map(|t| cores.iter().filter_map(move |c| c.iter().nth(t)))
                .collect()
        }
    };
    Ok(order.into_iter().take(n).collect())
}

/// Resolves `emulator:` / `iothreads:` to CPUs.
pub fn placement(inp: &Inputs, which: &Placement, key: &'static str) -> Result<CpuSet, PlanError> {
    let place = if key == "emulator" {
        &inp.profile.emulator
    } else {
        &inp.profile.iothreads
    };
    let cpus = match which {
        // With CPUs reserved for them (`cpus: {emulator-cpus: N}`), the VM's CPUs that no
        // vCPU runs on; else all of the VM's CPUs.
        Placement::VmCpus => {
            let own = inp.cpus.map(|c| c.value.clone()).unwrap_or_default();
            let reserved = matches!(
                inp.profile.cpus.as_ref().map(|c| &c.value),
                Some(CpuRequest::Place(r)) if r.emulator_cpus > 0
            );
            let rest = own.difference(&vcpu_targets(inp)?.into_iter().collect());
            if reserved && !rest.is_empty() {
                rest
            } else {
                own
            }
        }
        Placement::Cpus(set) => {
            let missing = set.difference(&inp.topology.online);
            if !missing.is_empty() {
                return Err(PlanError::at(
                    key,
                    place,
                    format!("CPU {missing} does not exist or is offline on this host"),
                ));
            }
            set.clone()
        }
        Placement::Housekeeping => housekeeping(inp),
    };
    if cpus.is_empty() {
        return Err(PlanError::at(
            key,
            place,
            "no housekeeping CPU left: every online CPU is isolated or owned by a VM".to_string(),
        ));
    }
    Ok(cpus)
}

/// Online CPUs that are not isolated and not owned by this or another running VM.
pub fn housekeeping(inp: &Inputs) -> CpuSet {
    let owned = inp.others.values().fold(
        inp.cpus.map(|c| c.value.clone()).unwrap_or_default(),
        |acc, c| acc.union(c),
    );
    inp.topology
        .online
        .difference(&inp.topology.isolated)
        .difference(&owned)
}

/// Two vCPUs on the threads of one host core while the guest sees no SMT (no
/// `args: -smp ...,threads=2`): the guest schedules them as independent cores, and its
/// scheduler cannot know that they compete for one core.
pub fn guest_smt_missing(inp: &Inputs) -> Option<String> {
    if guest_threads(inp) >= 2 {
        return None;
    }
    let targets = vcpu_targets(inp).ok()?;
    let cores = inp.topology.cores();
    let shared = cores
        .iter()
        .filter(|core| targets.iter().filter(|c| core.contains(**c)).count() >= 2)
        .count();
    if shared == 0 {
        return None;
    }
    let n = targets.len();
    Some(format!(
        "warning: {shared} host core(s) run two of this VM's vCPUs on their sibling threads, but \
         the guest sees no SMT: add `args: -smp {n},sockets=1,cores={},threads=2` to the VM \
         config (and `-cpu host,topoext=on` on AMD) so the guest knows which vCPUs share a core",
        n.div_ceil(2)
    ))
}
