//! The checks of `pvetune doctor`: the host once (`Node`), then each VM's config and profile.

use super::{Finding, Severity};
use crate::cpuset::CpuSet;
use crate::enable::storage;
use crate::hook::{Env, Loaded};
use crate::profile::IrqbalancePolicy;
use crate::root::{Root, paths};
use crate::state::State;
use crate::vmconfig::VmConfig;
use std::collections::BTreeSet;

/// HA resources (`vm: <vmid>` sections): the cluster manager may start them on any node.
const HA_RESOURCES: &str = "/etc/pve/ha/resources.cfg";
const CPUINFO: &str = "/proc/cpuinfo";

/// What doctor reads of the host once, for every VM.
pub struct Node {
    pub irqbalance: Option<u32>,
    pub ksmtuned: Option<u32>,
    pub amd: bool,
    pub ha: BTreeSet<u32>,
}

impl Node {
    pub fn read(root: &Root) -> Node {
        let ha = std::fs::read_to_string(root.path(HA_RESOURCES))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("vm:"))
            .filter_map(|id| crate::cli::parse_vmid(id.trim()).ok())
            .collect();
        let amd = crate::attr::read(&root.path(CPUINFO)).is_ok_and(|text| {
            text.lines()
                .find(|l| l.starts_with("vendor_id"))
                .is_some_and(|l| l.ends_with("AuthenticAMD"))
        });
        Node {
            irqbalance: crate::facts::find_process(root, "irqbalance"),
            ksmtuned: crate::facts::find_process(root, "ksmtuned"),
            amd,
            ha,
        }
    }
}

/// Whether a hookscript volume is pvetune's snippet.
pub fn is_pvetune_hook(volid: &str) -> bool {
    storage::split_volume(volid).is_some_and(|(_, f)| f == crate::enable::SNIPPET)
}

pub(super) struct Out {
    pub(super) vmid: u32,
    list: Vec<Finding>,
}

impl Out {
    pub(super) fn push(
        &mut self,
        severity: Severity,
        code: &'static str,
        message: String,
        fix: String,
    ) {
        self.list.push(Finding {
            vmid: self.vmid,
            severity,
            code,
            message,
            fix,
        });
    }
}

/// Every finding of one VM.
pub fn vm(env: &Env, node: &Node, vmid: u32) -> Vec<Finding> {
    let mut out = Out {
        vmid,
        list: Vec::new(),
    };
    let config = match VmConfig::read(env.root.base(), vmid) {
        Ok(config) => config,
        Err(e) => {
            out.push(
                Severity::Error,
                "vm-config",
                e.to_string(),
                "fix the VM config at the line named, or remove the profile of a VM that no \
                 longer exists"
                    .into(),
            );
            return out.list;
        }
    };
    config_checks(&mut out, &config);
    let has_profile = crate::profile::locate(&env.root, vmid, env.profile.as_deref()).is_some();
    hookscript_checks(&mut out, env, &config, has_profile);
    let state = crate::state::Store::new(&env.root)
        .load()
        .unwrap_or_default();
    // A placement request is placed as pre-start would place it now (or as the ledger
    // recorded it for a running VM).
    match crate::hook::load(env, vmid, false).and_then(|l| {
        l.map(|mut l| l.resolve(env, vmid, &state).map(|()| l))
            .transpose()
    }) {
        Ok(Some(loaded)) => profile_checks(&mut out, env, node, &loaded, &state),
        Ok(None) => {}
        Err(e) => out.push(
            Severity::Error,
            "profile-invalid",
            e.to_string(),
            "fix the profile at the place named (docs/profile.md); `pvetune check` then passes"
                .into(),
        ),
    }
    if config.hugepages.is_some()
        && let Some(pid) = node.ksmtuned
    {
        out.push(
            Severity::Warning,
            "ksmtuned-hugepages",
            format!(
                "ksmtuned runs (pid {pid}) while the VM's memory is hugepages, which KSM cannot \
                 merge: its scans cost CPU for nothing"
            ),
            "`systemctl disable --now ksmtuned` on a node for hugepage VMs (or `allow-ksm: 0` \
             where the release has it)"
                .into(),
        );
    }
    out.list
}

fn config_checks(out: &mut Out, config: &VmConfig) {
    let vmid = out.vmid;
    if !config.hostpci.is_empty() && config.balloon != Some(0) {
        out.push(
            Severity::Warning,
            "balloon-passthrough",
            "ballooning is on with PCI passthrough: the guest's memory is pinned for DMA, so the \
             balloon cannot give any back"
                .into(),
            format!("`qm set {vmid} --balloon 0`"),
        );
    }
    if config.hugepages.is_some() && !config.numa {
        out.push(
            Severity::Error,
            "hugepages-without-numa",
            "hugepages is set but numa is not: qemu-server refuses to start the VM".into(),
            format!("`qm set {vmid} --numa 1`"),
        );
    }
}

fn hookscript_checks(out: &mut Out, env: &Env, config: &VmConfig, has_profile: bool) {
    let vmid = out.vmid;
    let Some(hook) = config.hookscript.as_deref().filter(|h| is_pvetune_hook(h)) else {
        if has_profile {
            out.push(
                Severity::Warning,
                "not-enabled",
                format!(
                    "the VM has a profile but its hookscript is {}: pvetune never runs for it",
                    config.hookscript.as_deref().unwrap_or("not set")
                ),
                format!("`pvetune enable {vmid}` (with --chain to keep another hookscript)"),
            );
        }
        return;
    };
    let chained = crate::chain::read(env, vmid);
    let volumes = [Some(hook.to_string()), chained.ok().flatten()];
    for volid in volumes.iter().flatten() {
        // A link (pvetune's snippet) counts when what it points to exists, under the root.
        let present = storage::read(&env.root)
            .and_then(|list| storage::volume_path(&list, volid))
            .map(|p| match std::fs::read_link(env.root.path(&p)) {
                Ok(target) if target.is_absolute() => env.root.path(target).exists(),
                _ => env.root.path(&p).exists(),
            });
        match present {
            Ok(true) => {}
            Ok(false) => out.push(
                Severity::Error,
                "snippet-missing",
                format!("hookscript {volid} does not exist on this node: the VM cannot start here"),
                format!("install the pvetune package here and run `pvetune enable {vmid}`"),
            ),
            Err(e) => out.push(
                Severity::Error,
                "snippet-missing",
                format!("hookscript {volid}: {e}"),
                "fix /etc/pve/storage.cfg, or `pvetune enable` on a storage with snippets".into(),
            ),
        }
    }
}

fn profile_checks(out: &mut Out, env: &Env, node: &Node, loaded: &Loaded, state: &State) {
    let vmid = out.vmid;
    let (profile, config, topo) = (&loaded.profile, &loaded.config, &loaded.topology);
    let others = state.owned_by_others(vmid);
    let inputs = loaded.inputs(vmid, &others);
    // A profile of memory or device keys only owns no CPUs: no CPU finding applies.
    let no_cpus = CpuSet::new();
    let cpus = loaded.cpus.as_ref().map_or(&no_cpus, |c| &c.value);
    if let Err(e) = crate::plan::validate(&inputs) {
        let code = if e.key == "governor" {
            "governor-unavailable"
        } else {
            "profile-invalid"
        };
        out.push(
            Severity::Error,
            code,
            format!("{}:{}:{}: {e}", profile.path.display(), e.line, e.column),
            "change the profile at the place named; `pvetune check` then passes".into(),
        );
    }
    let cpu_type = config
        .cpu
        .as_deref()
        .map(|c| c.split(',').next().unwrap_or_default())
        .map(|c| c.strip_prefix("cputype=").unwrap_or(c));
    if cpu_type != Some("host") {
        out.push(
            Severity::Warning,
            "cpu-not-host",
            format!(
                "CPU type is {} for a latency VM: the guest gets a reduced instruction set and \
                 an emulated topology",
                cpu_type.unwrap_or("the default (x86-64-v2-AES)")
            ),
            format!(
                "`qm set {vmid} --cpu host` (live migration then needs the same CPU on the target)"
            ),
        );
    }
    if let Some(affinity) = &config.affinity
        && !cpus.is_subset(affinity)
    {
        out.push(
            Severity::Warning,
            "affinity-conflict",
            format!(
                "affinity: {affinity} leaves out CPU {} of the profile's cpus {cpus}: qemu-server \
                 sets it on every QEMU thread with taskset, against pvetune's pinning",
                cpus.difference(affinity)
            ),
            format!("`qm set {vmid} --delete affinity`: pvetune pins every thread itself"),
        );
    }
    let core0 = cpus.contains(0)
        || cpus
            .iter()
            .any(|c| topo.cpu(c).is_some_and(|cpu| cpu.siblings.contains(0)));
    if core0 {
        out.push(
            Severity::Warning,
            "cpu0-core",
            format!("cpus {cpus} include CPU 0's core, where the kernel keeps housekeeping work (timers, unmovable IRQs)"),
            "choose cpus without CPU 0 and its SMT sibling".into(),
        );
    }
    if let Ok(targets) = crate::tunables::pinning::vcpu_targets(&inputs) {
        super::placement::numa(out, config, topo, &targets);
        super::placement::guest_topology(out, config, topo, &targets);
    }
    let topoext = [config.cpu.as_deref(), config.args.as_deref()]
        .iter()
        .flatten()
        .any(|s| s.contains("topoext"));
    if node.amd && config.threads_per_core() > 1 && cpu_type != Some("host") && !topoext {
        out.push(
            Severity::Warning,
            "amd-smt-without-topoext",
            "the guest has SMT (threads > 1) on an AMD host without the topoext CPU flag: the \
             guest sees no sibling threads"
                .into(),
            format!("use `cpu: host`, or add topoext: `qm set {vmid} --args \"-cpu <model>,topoext=on ...\"`"),
        );
    }
    if let Some(pid) = node.irqbalance
        && profile.isolation.irqbalance != IrqbalancePolicy::Ban
    {
        out.push(
            Severity::Warning,
            "irqbalance-running",
            format!("irqbalance runs (pid {pid}) and moves IRQs onto the VM's CPUs at its next scan"),
            "set `irqbalance: ban` under isolation: in the profile, or `systemctl disable --now irqbalance`".into(),
        );
    }
    let cluster_wide = env.root.path(paths::PVE_PROFILE_DIR);
    if node.ha.contains(&vmid) && !profile.path.starts_with(&cluster_wide) {
        out.push(
            Severity::Warning,
            "ha-profile-node-local",
            format!(
                "the VM is an HA resource but its profile {} is on this node only: after a \
                 failover it starts untuned",
                env.root.host_path(&profile.path).display()
            ),
            format!(
                "move it to {}/{vmid}.yaml (pmxcfs, every node)",
                paths::PVE_PROFILE_DIR
            ),
        );
    }
}
