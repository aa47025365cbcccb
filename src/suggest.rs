//! `pvetune suggest <vmid>`: for the VM and this host, a portable profile (what the VM needs,
//! no host CPU numbers) and the Proxmox VM config lines that match it, each explained. It
//! places the VM as its pre-start would (around the VMs the ledger holds) to show where it
//! would land here, and changes nothing: it never runs `qm set`.

use crate::cpuset::CpuSet;
use crate::error::Error;
use crate::facts::HostFacts;
use crate::hook::Env;
use crate::placement::{self, Ask, NoFit, Placed};
use crate::plan::{Inputs, PlanError};
use crate::profile::{self, Located, PlaceRequest, Placement, Within};
use crate::state::Store;
use crate::topology::Topology;
use crate::tunables::pinning;
use crate::vmconfig::{NumaPolicy, NumaSpec, VmConfig};
use std::path::Path;

/// The lines to print.
pub fn command(env: &Env, vmid: u32) -> Result<Vec<String>, Error> {
    let config = VmConfig::read(env.root.base(), vmid)?;
    let topo = Topology::read(env.root.base())?;
    let state = Store::new(&env.root).load()?;
    let others = state.owned_by_others(vmid);
    let devices = placement::devices::read(&env.root, &config);
    let vendor_amd = is_amd(&env.root);
    let n = config.vcpu_count();
    let threads = if topo.smt_width() >= 2 && n.is_multiple_of(2) {
        2
    } else {
        1
    };
    let near_devices = devices.iter().any(|d| d.node.is_some());
    let memory = placement::memory_nodes(&config);
    // The tightest level that holds the VM here: the profile asks for it, so the VM keeps it
    // on every node (and a node where it cannot is refused with the reason).
    let mut last: Option<NoFit> = None;
    let mut found: Option<(Within, Placed)> = None;
    for within in [Within::L3, Within::NumaNode, Within::Package, Within::Any] {
        let request = PlaceRequest {
            within,
            near_devices,
            ..PlaceRequest::default()
        };
        let ask = Ask {
            request: &request,
            vcpus: n,
            devices: &devices,
            memory_nodes: memory.clone(),
        };
        match placement::place(&topo, &ask, &others) {
            Ok(placed) => {
                found = Some((within, placed));
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some((within, placed)) = found else {
        let why = last.map_or_else(String::new, |e| e.to_string());
        return Err(Error::Usage(format!(
            "VM {vmid}: its {n} vCPUs do not fit on this host now: {why}"
        )));
    };
    let profile_text = profile_yaml(within, near_devices);
    // The suggestion is checked as pvetune would check it at pre-start.
    let path = Path::new("(suggested profile)");
    let profile = profile::parse(path, &profile_text)?;
    let suggested = suggested_config(&config, n, threads, &topo, &placed.cpus);
    let located = Located {
        value: placed.cpus.clone(),
        line: 0,
        column: 0,
    };
    let facts = HostFacts::default();
    let (memory, devices) = Default::default();
    let inputs = Inputs {
        vmid,
        profile: &profile,
        cpus: Some(&located),
        topology: &topo,
        facts: &facts,
        config: &suggested,
        running: None,
        others: &others,
        memory: &memory,
        devices: &devices,
    };
    let plan_error = |source: PlanError| Error::Plan {
        path: path.to_path_buf(),
        source,
    };
    let targets = pinning::vcpu_targets(&inputs).map_err(plan_error)?;
    let housekeeping =
        pinning::placement(&inputs, &Placement::Housekeeping, "emulator").map_err(plan_error)?;

    let name = config.name.as_deref().unwrap_or("unnamed");
    let mut out = vec![
        format!(
            "# pvetune suggest {vmid}: VM '{name}', {n} vCPUs, on this host ({} CPUs online, {} thread(s) per core)",
            topo.online.len(),
            topo.smt_width()
        ),
        format!(
            "# Profile: /etc/pve/pvetune/{vmid}.yaml (on pmxcfs: the same file fits every node)"
        ),
    ];
    out.extend(profile_text.lines().map(str::to_string));
    out.push("#".into());
    out.push(format!(
        "# Where it lands on this host now: CPUs {}",
        placed.cpus
    ));
    for line in &placed.why {
        out.push(format!("#   {line}"));
    }
    let pins: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(v, cpu)| format!("vCPU {v} -> {cpu}"))
        .collect();
    for chunk in pins.chunks(6) {
        out.push(format!("#   {}", chunk.join(", ")));
    }
    out.push(format!(
        "#   emulator threads and iothreads -> {housekeeping}"
    ));
    out.push("#".into());
    out.push(format!(
        "# VM config lines for /etc/pve/qemu-server/{vmid}.conf (pvetune changes nothing, never runs qm set):"
    ));
    out.extend(config_lines(
        &suggested,
        n,
        threads,
        vendor_amd,
        &placed.cpus,
    ));
    Ok(out)
}

fn profile_yaml(within: Within, near_devices: bool) -> String {
    let why = match within {
        Within::L3 => "all vCPUs in one L3 domain (an AMD CCD/CCX): they share its cache",
        Within::NumaNode => "no L3 domain holds them: all in one NUMA node",
        Within::Package => "no NUMA node holds them: all in one package",
        Within::Any => "no package holds them: as few L3 domains and nodes as possible",
    };
    let within = format!("  within: {}", within.as_str());
    let mut lines = vec![
        ("cpus:", ""),
        (within.as_str(), why),
        (
            "  smt: prefer",
            "guest sibling threads on host sibling threads",
        ),
    ];
    if near_devices {
        lines.push((
            "  near-devices: true",
            "on the NUMA node of the passthrough devices",
        ));
    }
    lines.extend([
        (
            "vcpus: auto",
            "smt-pairs when the guest sees SMT (args below)",
        ),
        (
            "emulator: housekeeping",
            "emulator threads off the VM's CPUs",
        ),
        (
            "iothreads: housekeeping",
            "disk I/O threads off the VM's CPUs",
        ),
    ]);
    lines
        .into_iter()
        .map(|(line, why)| match why {
            "" => format!("{line}\n"),
            why => format!("{line:<26}# {why}\n"),
        })
        .collect()
}

/// The VM config as it would be with the suggested lines.
fn suggested_config(
    config: &VmConfig,
    n: u32,
    threads: u32,
    topo: &Topology,
    cpus: &CpuSet,
) -> VmConfig {
    let mut nodes: Vec<u32> = cpus.iter().filter_map(|c| topo.node_of(c)).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut suggested = config.clone();
    suggested.cores = n / threads;
    suggested.sockets = 1;
    suggested.vcpus = None;
    suggested.smp_cpus = Some(n);
    suggested.smp_threads = Some(threads);
    suggested.numa = true;
    suggested.numa_nodes = [(
        0,
        NumaSpec {
            cpus: (0..n).collect(),
            hostnodes: (!nodes.is_empty()).then_some(nodes),
            memory_mib: Some(config.memory_mib),
            policy: Some(NumaPolicy::Bind),
        },
    )]
    .into();
    suggested.affinity = Some(cpus.clone());
    suggested
}

fn config_lines(
    suggested: &VmConfig,
    n: u32,
    threads: u32,
    amd: bool,
    cpus: &CpuSet,
) -> Vec<String> {
    let mut out = vec![
        format!(
            "# {} guest cores of {threads} thread(s) in one socket = {n} vCPUs, as the host CPUs they run on",
            suggested.cores
        ),
        format!("cores: {}", suggested.cores),
        "sockets: 1".to_string(),
        "# guest NUMA: needed for numa0 (and for hugepages)".to_string(),
        "numa: 1".to_string(),
    ];
    let numa = &suggested.numa_nodes[&0];
    match &numa.hostnodes {
        Some(nodes) => {
            let nodes: Vec<String> = nodes.iter().map(u32::to_string).collect();
            let nodes = nodes.join(";");
            out.push(format!(
                "# guest memory bound to host node {nodes}, where its CPUs are (host-specific: the node this host gives it)"
            ));
            out.push(format!(
                "numa0: cpus=0-{},hostnodes={nodes},memory={},policy=bind",
                n - 1,
                suggested.memory_mib
            ));
        }
        None => out.push(format!(
            "numa0: cpus=0-{},memory={}",
            n - 1,
            suggested.memory_mib
        )),
    }
    out.push(
        "# what QEMU runs on from its start until post-start pins each thread (host-specific)"
            .into(),
    );
    out.push(format!("affinity: {cpus}"));
    let cpu_flag = if amd && threads > 1 {
        "-cpu host,topoext=on "
    } else {
        ""
    };
    out.push(if threads > 1 {
        format!(
            "# the guest sees {threads} threads per core, so its scheduler knows which vCPUs share a core{}",
            if amd {
                "; topoext: AMD guests see threads only with it"
            } else {
                ""
            }
        )
    } else {
        "# the guest topology: one thread per core".to_string()
    });
    out.push(format!(
        "args: {cpu_flag}-smp {n},sockets=1,cores={},threads={threads},maxcpus={n}",
        suggested.cores
    ));
    out
}

/// Whether `/proc/cpuinfo` names an AMD CPU (`vendor_id : AuthenticAMD`).
fn is_amd(root: &crate::root::Root) -> bool {
    crate::attr::read_at_most(&root.path("/proc/cpuinfo"), 64 << 10)
        .map(|text| {
            text.lines()
                .find(|l| l.starts_with("vendor_id"))
                .is_some_and(|l| l.contains("AuthenticAMD"))
        })
        .unwrap_or(false)
}
