//! The plan: what a phase would change, as data.
//!
//! [`build`] is a pure function of the profile, the host's topology and facts, the VM's config
//! and its running threads. It returns primitive actions (write a kernel file, set a thread's
//! affinity); `pvetune plan` prints them and the hook executes them. Nothing below the command
//! line knows whether it is a dry run.

use crate::cpuset::{CpuFormat, CpuSet, exclude_text, include_text};
use crate::facts::HostFacts;
use crate::profile::{Located, Profile};
use crate::topology::Topology;
use crate::tunables;
use crate::vm::RunningVm;
use crate::vmconfig::VmConfig;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The hookscript phases, as qemu-server names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    PreStart,
    PostStart,
    PreStop,
    PostStop,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::PreStart,
        Phase::PostStart,
        Phase::PreStop,
        Phase::PostStop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreStart => "pre-start",
            Phase::PostStart => "post-start",
            Phase::PreStop => "pre-stop",
            Phase::PostStop => "post-stop",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown phase '{s}': expected pre-start, post-start, pre-stop or post-stop"
                )
            })
    }
}

/// A thread of the VM's QEMU process. `tid` is `None` when the VM is not running and the plan
/// only shows what would happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRef {
    pub pid: Option<i32>,
    pub tid: Option<i32>,
    pub label: String,
}

/// One primitive change. Apply and undo are written once per variant (see `exec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write a kernel file (host-absolute path). Host-wide, so it is a claim: see `state`.
    Write { path: String, value: String },
    /// Set a thread's CPU affinity.
    Pin { thread: ThreadRef, cpus: CpuSet },
    /// Take the VM's `cpus` out of a host-wide CPU set file (an IRQ's affinity, the default
    /// IRQ affinity). A claim *composed* from every holder: the file holds its original set
    /// minus the CPUs of every VM that holds it (`fallback`, the housekeeping CPUs, when that
    /// leaves none), so stopping one VM gives back exactly its CPUs. `refusable`: the kernel may
    /// refuse the write (a managed or per-CPU IRQ: EIO, EPERM; no vectors left: ENOSPC), which
    /// is then a skip, not a failure.
    Exclude {
        path: String,
        cpus: CpuSet,
        format: CpuFormat,
        fallback: CpuSet,
        refusable: bool,
    },
    /// Add the VM's `cpus` to a host-wide CPU set file: a claim composed as the original plus
    /// every holder's CPUs (the exclusive CPUs of `qemu.slice`, which must cover every
    /// isolated VM's partition), so one VM's stop leaves the others' CPUs in.
    Include { path: String, cpus: CpuSet },
    /// Switch `controller` on in a `cgroup.subtree_control` file; a claim shared by every VM
    /// that needs it, switched off after the last one only if it was off before.
    Enable {
        path: String,
        controller: &'static str,
    },
    /// Create the cgroup `path` as `cgroup.type` `kind`. Undone by moving whatever threads are
    /// left in it to its parent, then removing it; so the threads that [`Action::Move`] put
    /// there need no ledger entry of their own.
    Mkdir { path: String, kind: &'static str },
    /// Move a thread into the cgroup `cgroup` (a write of its tid to `cgroup.threads`).
    Move { thread: ThreadRef, cgroup: String },
    /// Ban the VM's `cpus` in irqbalance over its control socket (`socket`, host-absolute):
    /// a claim composed as irqbalance's ban before the first claim plus every holder's CPUs
    /// (`state::ComposeOp::Ban`), given back exactly by the last release. irqbalance is
    /// optional: a socket that refuses or does not answer in time is a warning and a skip.
    Ban { socket: String, cpus: CpuSet },
    /// Fail the batch, undoing it, unless `path` reads `value`: the kernel accepts a write to
    /// `cpuset.cpus.partition` and only says on reading it back that it made the partition
    /// invalid, and why.
    Expect { path: String, value: String },
    /// Take a CPU offline and online again (`path`: its `cpuN/online`): the kernel moves its
    /// timers, kernel threads and IRQs away. A claim on `online` with its original `1`, so a
    /// crash between the two writes leaves a ledger whose undo brings the CPU back.
    Cycle { path: String },
    /// Write a kernel *trigger*: a write-only file that holds no state to put back
    /// (`nodeN/compact`, `/proc/sys/vm/compact_memory`, `/proc/sys/vm/drop_caches`, a PCI
    /// function's `reset`). Nothing is recorded, because nothing can be restored.
    Trigger { path: String, value: String },
    /// `sync(2)`: dirty pages written back, so that `drop_caches` can drop them.
    Sync,
    /// Raise one node's pool of `size_kb` pages by `pages` for this VM (its
    /// `nr_hugepages`): a claim composed as the original count plus every holder's pages
    /// (`state::ComposeOp::Add`), made under qemu-server's `/var/lock/hugepages.lck`, and read
    /// back: fewer pages than asked fail the batch, which puts the pool back as it was.
    /// `keep`: a boot-time reservation (`pvetune reserve`), kept across the VM's stops.
    Reserve {
        node: u32,
        size_kb: u64,
        pages: u64,
        keep: bool,
    },
    /// Remove every function of `functions` (the sysfs name of each, with the driver it is
    /// bound to, None for none), wait until all are gone, rescan the bus, wait until each is
    /// back with the driver it had; each wait bounded by `timeout_ms`. Recorded beforehand as
    /// a claim on `/sys/bus/pci/rescan` (`state::ComposeOp::Rescan`), so that a crash between
    /// the removal and the rescan is mended by the next rollback, which rescans.
    RemoveRescan {
        functions: Vec<(crate::pci::PciId, Option<String>)>,
        timeout_ms: u64,
    },
    /// The kernel makes files in answer to the steps before this one (a controller switched
    /// on creates the children's `cpuset.*` files, a cgroup comes with its own): the steps
    /// after it are read, recorded and made only once those before are made. A phase with
    /// barriers is still one all-or-nothing apply.
    Barrier,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub tunable: &'static str,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub tunable: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub skipped: Vec<Skip>,
    pub notes: Vec<String>,
}

/// A profile that cannot work on this host or for this VM, with the place in the profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct PlanError {
    pub key: &'static str,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl PlanError {
    pub fn at<T>(key: &'static str, place: &Located<T>, message: impl Into<String>) -> Self {
        PlanError {
            key,
            line: place.line,
            column: place.column,
            message: message.into(),
        }
    }
}

/// Everything the planner may look at.
pub struct Inputs<'a> {
    pub vmid: u32,
    pub profile: &'a Profile,
    /// The CPUs the VM owns: the profile's list, or where placement put them (recorded in
    /// the ledger at pre-start). `None`: the profile gives the VM no CPUs. Every tunable reads
    /// them here, never from the profile.
    pub cpus: Option<&'a Located<CpuSet>>,
    pub topology: &'a Topology,
    pub facts: &'a HostFacts,
    pub config: &'a VmConfig,
    pub running: Option<&'a RunningVm>,
    /// CPUs owned by other VMs that pvetune holds as running.
    pub others: &'a BTreeMap<u32, CpuSet>,
    /// Hugepage pools, NUMA node memory, KSM (read only for a profile that needs them).
    pub memory: &'a crate::memory::MemoryFacts,
    /// The PCI functions the profile resets (read only with `pci-reset:`).
    pub devices: &'a crate::devices::Devices,
}

/// Checks the profile against the host and the VM; shared by `check` and every phase.
pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    tunables::sysctl::validate(inp)?;
    let Some(cpus) = inp.cpus else {
        return Ok(());
    };
    let missing = cpus.value.difference(&inp.topology.online);
    if !missing.is_empty() {
        return Err(PlanError::at(
            "cpus",
            cpus,
            format!(
                "CPU {missing} does not exist or is offline on this host (online: {})",
                inp.topology.online
            ),
        ));
    }
    for (other, owned) in inp.others {
        let shared = owned.intersection(&cpus.value);
        if *other != inp.vmid && !shared.is_empty() {
            return Err(PlanError::at(
                "cpus",
                cpus,
                format!("CPU {shared} is already owned by running VM {other}"),
            ));
        }
    }
    tunables::pinning::validate(inp)?;
    tunables::governor::validate(inp)?;
    tunables::partition::validate(inp)?;
    tunables::cycle::validate(inp)?;
    tunables::hugepages::validate(inp)?;
    tunables::pcireset::validate(inp)?;
    Ok(())
}

/// The plan of one phase. Post-stop is not built here: it is the undo of what the ledger holds.
pub fn build(inp: &Inputs, phase: Phase) -> Result<Plan, PlanError> {
    validate(inp)?;
    let mut plan = Plan::default();
    match phase {
        Phase::PreStart => {
            // Devices first (qemu-server binds them to vfio-pci right after pre-start), then
            // memory: compaction, and the reservations under qemu-server's lock.
            tunables::pcireset::plan(inp, &mut plan);
            tunables::hugepages::plan(inp, &mut plan)?;
            tunables::ksm::plan(inp, &mut plan);
            // Before QEMU starts: the passthrough devices' IRQs that appear while it starts
            // take the default affinity set here.
            if plan.steps.last().is_some_and(|s| s.action != Action::Barrier)
                && inp.profile.isolation.irqs
            {
                plan.steps.push(Step {
                    tunable: "irqs",
                    action: Action::Barrier,
                });
            }
            tunables::irqs::plan(inp, &mut plan);
            if plan.steps.is_empty() && plan.skipped.is_empty() {
                plan.notes.push(
                    "pre-start: profile validated; nothing to change before QEMU starts".into(),
                );
            }
        }
        Phase::PreStop => plan
            .notes
            .push("pre-stop: nothing to do (undo runs in post-stop, which also runs when the guest powers off)".into()),
        Phase::PostStop => {}
        Phase::PostStart => {
            if inp.config.lock.as_deref() == Some("backup") {
                plan.skipped.push(Skip {
                    tunable: "all",
                    reason: "VM started paused for a backup (lock: backup): no isolation".into(),
                });
                return Ok(plan);
            }
            // The cycle first, the partition next: the vCPUs are pinned inside it, the rest
            // outside it.
            tunables::cycle::plan(inp, &mut plan);
            tunables::partition::plan(inp, &mut plan);
            tunables::pinning::plan(inp, &mut plan)?;
            tunables::governor::plan(inp, &mut plan);
            tunables::sysctl::plan(inp, &mut plan);
        }
    }
    Ok(plan)
}

impl fmt::Display for ThreadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tid {
            Some(tid) => write!(f, "thread {tid} ({})", self.label),
            None => write!(f, "{} (not running)", self.label),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Write { path, .. }
            | Action::Exclude { path, .. }
            | Action::Include { path, .. }
            | Action::Enable { path, .. }
            | Action::Mkdir { path, .. }
            | Action::Cycle { path }
            | Action::Trigger { path, .. } => f.write_str(path),
            Action::Sync => f.write_str("sync (dirty pages written back)"),
            Action::Reserve {
                node,
                size_kb,
                pages,
                ..
            } => write!(
                f,
                "{} (+{pages} for this VM)",
                crate::memory::pool_file(*node, *size_kb, "nr_hugepages")
            ),
            Action::RemoveRescan { functions, .. } => {
                let names: Vec<String> = functions.iter().map(|(id, _)| id.to_string()).collect();
                write!(f, "PCI {} remove, rescan", names.join(" "))
            }
            Action::Expect { path, .. } => write!(f, "check {path}"),
            Action::Ban { socket, .. } => write!(f, "irqbalance ban ({socket})"),
            Action::Barrier => f.write_str("(barrier)"),
            Action::Pin { thread, .. } | Action::Move { thread, .. } => write!(f, "{thread}"),
        }
    }
}

impl Action {
    /// The new value as printed in `target: before -> after`, given what the target holds
    /// now (a composed file's new value depends on it).
    pub fn after(&self, before: &str) -> String {
        match self {
            Action::Write { value, .. } => value.clone(),
            Action::Pin { cpus, .. } => cpus.to_string(),
            Action::Exclude {
                cpus,
                format,
                fallback,
                ..
            } => exclude_text(before, *format, cpus, fallback),
            Action::Include { cpus, .. } => include_text(before, CpuFormat::List, cpus),
            // What irqbalance bans now (other VMs' CPUs in it already) and this VM's.
            Action::Ban { cpus, .. } => before
                .trim()
                .parse::<CpuSet>()
                .map_or_else(|_| cpus.clone(), |now| now.union(cpus))
                .to_string(),
            Action::Enable { controller, .. } => {
                let mut words: Vec<&str> = before.split_whitespace().collect();
                if !words.contains(controller) {
                    words.push(controller);
                }
                words.join(" ")
            }
            Action::Mkdir { kind, .. } => kind.to_string(),
            Action::Move { cgroup, .. } => cgroup.clone(),
            Action::Expect { value, .. } => value.clone(),
            Action::Cycle { .. } => "0 -> 1".to_string(),
            Action::Trigger { value, .. } => value.clone(),
            Action::Sync => "written back".to_string(),
            Action::Reserve { pages, .. } => before
                .trim()
                .parse::<u64>()
                .map_or_else(|_| format!("+{pages}"), |now| (now + pages).to_string()),
            Action::RemoveRescan { functions, .. } => functions
                .iter()
                .map(|(id, driver)| format!("{id} back ({})", crate::pci::driver_name(driver)))
                .collect::<Vec<_>>()
                .join(", "),
            Action::Barrier => String::new(),
        }
    }
}
