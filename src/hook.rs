//! The hookscript phases and the other commands, on top of plan, exec and the ledger.
//!
//! Proxmox facts that shape this file (see docs/design.md): post-stop does not run after a
//! failed start nor on a migration source, and pre-stop does not run when the guest powers
//! itself off. So undo happens in post-stop, and every hook first *reconciles*: it rolls back
//! what the ledger holds for VMs of this node that no longer run.

use crate::cpuset::CpuSet;
use crate::error::Error;
use crate::exec::{Applied, Executor};
use crate::facts::HostFacts;
use crate::host::Host;
use crate::plan::{self, Inputs, Phase, Plan};
use crate::profile::{self, CpuRequest, Located, Profile};
use crate::root::Root;
use crate::state::{self, Change, State, Store, VmRecord};
use crate::topology::Topology;
use crate::vm::{self, RunningVm};
use crate::vmconfig::VmConfig;
use std::path::PathBuf;

mod resolve;
use resolve::read_facts;

/// Resolved command-line context.
pub struct Env {
    pub root: Root,
    pub profile: Option<PathBuf>,
}

/// Everything read about the host and the VM before planning.
pub struct Loaded {
    pub profile: Profile,
    pub topology: Topology,
    pub facts: HostFacts,
    pub config: VmConfig,
    pub running: Option<RunningVm>,
    /// The VM's CPUs: the profile's list at once; a placement request's once
    /// [`Loaded::resolve`] ran. `None`: the VM owns no CPUs (or they are not placed yet).
    pub cpus: Option<Located<CpuSet>>,
    /// Why placement chose `cpus` (empty for an explicit list).
    pub placed: Vec<String>,
    pub memory: crate::memory::MemoryFacts,
    pub devices: crate::devices::Devices,
    /// Whether `facts` has the IRQs (`/proc/irq` listed, irqbalance looked for): a profile
    /// with `isolation.irqs`, except in a post-start that does not cycle CPUs, which writes
    /// no IRQ (a listing of thousands, and a read of every process's `comm`, saved).
    irq_facts: bool,
}

impl Loaded {
    pub fn inputs<'a>(
        &'a self,
        vmid: u32,
        others: &'a std::collections::BTreeMap<u32, crate::cpuset::CpuSet>,
    ) -> Inputs<'a> {
        Inputs {
            vmid,
            profile: &self.profile,
            cpus: self.cpus.as_ref(),
            topology: &self.topology,
            facts: &self.facts,
            config: &self.config,
            running: self.running.as_ref(),
            others,
            memory: &self.memory,
            devices: &self.devices,
        }
    }
}

/// Reads the profile (None: the VM has none), the topology, host facts, the VM config and,
/// if asked, the running VM's threads.
pub fn load(env: &Env, vmid: u32, with_threads: bool) -> Result<Option<Loaded>, Error> {
    load_for(env, vmid, with_threads, None)
}

/// [`load`] for one hook phase (None: every phase, as `plan` and `doctor` show them).
fn load_for(
    env: &Env,
    vmid: u32,
    with_threads: bool,
    phase: Option<Phase>,
) -> Result<Option<Loaded>, Error> {
    let Some(path) = profile::locate(&env.root, vmid, env.profile.as_deref()) else {
        return Ok(None);
    };
    let profile = profile::load(&path)?;
    let cycles = profile
        .isolation
        .cpu_cycle
        .as_ref()
        .is_some_and(|c| c.value);
    let irq_facts = profile.isolation.irqs && (phase != Some(Phase::PostStart) || cycles);
    let listed = match profile.cpus.as_ref() {
        Some(
            c @ Located {
                value: CpuRequest::List(set),
                ..
            },
        ) => Some(Located {
            value: set.clone(),
            line: c.line,
            column: c.column,
        }),
        _ => None,
    };
    let topology = match (&profile.cpus, &listed) {
        // Placement looks at every CPU of the host.
        (Some(_), None) => Topology::read(env.root.base())?,
        // Only the VM's CPUs: what a plan places threads on (see `Topology::read_for`).
        _ => Topology::read_for(
            env.root.base(),
            &listed.as_ref().map(|c| c.value.clone()).unwrap_or_default(),
        )?,
    };
    // A placement request's facts depend on the CPUs it gets: read by `Loaded::resolve`.
    let facts = match (&profile.cpus, &listed) {
        (Some(_), None) => HostFacts::default(),
        _ => read_facts(env, &profile, listed.as_ref(), irq_facts),
    };
    let config = VmConfig::read(env.root.base(), vmid)?;
    let running = if with_threads {
        vm::discover(env.root.base(), vmid).map_err(|source| Error::Vm { vmid, source })?
    } else {
        None
    };
    let mut memory = crate::memory::MemoryFacts::read(
        &env.root,
        profile.hugepages.is_some(),
        profile.ksm.is_some(),
    );
    memory.vm_running = running.is_some()
        || (profile.hugepages.is_some()
            && vm::read_pid(env.root.base(), vmid).is_ok_and(|p| p.is_some()));
    let devices = match &profile.pci_reset {
        Some(reset) => crate::devices::Devices::read(&env.root, &config, reset.devices.as_deref()),
        None => crate::devices::Devices::default(),
    };
    Ok(Some(Loaded {
        profile,
        topology,
        facts,
        config,
        running,
        cpus: listed,
        placed: Vec::new(),
        memory,
        devices,
        irq_facts,
    }))
}

/// Runs one hook phase exactly as qemu-server calls it.
pub fn run_hook<H: Host>(env: &Env, host: &H, vmid: u32, phase: Phase) -> Result<String, Error> {
    run_hook_with(env, host, &Store::new(&env.root), vmid, phase)
}

/// [`run_hook`] on a given ledger store (tests count its writes through it).
///
/// Ledger cost: everything the run changes is journaled in batches (reconcile's rollbacks, the
/// VM's record, the phase's plan as one batch), and the compaction at the end folds the
/// journal into the snapshot once it is a quarter of the snapshot's size: at most one full
/// rewrite per run, amortised linear in the changes (`Store::compact`).
pub fn run_hook_with<H: Host>(
    env: &Env,
    host: &H,
    store: &Store,
    vmid: u32,
    phase: Phase,
) -> Result<String, Error> {
    if phase == Phase::PreStop {
        return Ok(String::new());
    }
    // post-stop needs neither the profile nor the VM config (both may be gone by then).
    let loaded = match phase {
        Phase::PostStop => None,
        _ => load_for(env, vmid, phase == Phase::PostStart, Some(phase))?,
    };
    // A damaged ledger stops only the VMs pvetune tunes: for one without a profile it is a
    // warning (post-stop has not loaded the profile: it only needs to know there is one).
    let unrelated = loaded.is_none()
        && (phase != Phase::PostStop
            || profile::locate(&env.root, vmid, env.profile.as_deref()).is_none());
    let load = || {
        store
            .load()
            .map_err(|source| Error::Ledger {
                vmid,
                phase,
                dir: store.dir().to_path_buf(),
                source,
            })
            .map(Some)
            .or_else(|e| match e {
                Error::Ledger { source, .. } if unrelated => {
                    log::warn!(
                        "VM {vmid} {phase}: VM has no pvetune profile, going on; the ledger cannot be read: {source}"
                    );
                    Ok(None)
                }
                e => Err(e),
            })
    };
    // The fast path of a VM without a profile: a look at the ledger without the node lock, and
    // nothing more when nothing is held. A VM with a profile goes straight to the lock and
    // reads the ledger once (it may be megabytes: one claim per IRQ).
    if unrelated {
        let Some(held) = load()? else {
            return Ok(String::new());
        };
        if held.is_empty() {
            log::debug!("VM {vmid}: no profile, nothing held: nothing to do");
            return Ok(String::new());
        }
    }
    let result = store.lock().map_err(Error::from).and_then(|_lock| {
        let Some(mut state) = load()? else {
            return Ok(String::new());
        };
        if loaded.is_none() && state.is_empty() {
            log::debug!("VM {vmid}: nothing held: nothing to do");
            return Ok(String::new());
        }
        let result = run_phase(env, host, store, &mut state, vmid, phase, loaded);
        // After a failure too: what the journal holds is valid either way, this only keeps it
        // short.
        if let Err(e) = store.compact(&mut state) {
            log::warn!(
                "ledger journal not compacted ({e}); it stays valid and the next run folds it"
            );
        }
        log::debug!("VM {vmid} {phase}: ledger writes: {:?}", store.stats());
        result
    });
    match result {
        // What the ledger holds for other VMs (reconcile) or left over for this one cannot stop
        // the start of a VM pvetune does not tune: the rest stays held for the next run.
        Err(e) if unrelated && phase == Phase::PreStart => {
            log::warn!("VM {vmid} {phase}: VM has no pvetune profile, going on; {e}");
            Ok(String::new())
        }
        result => result,
    }
}

/// The phase itself, under the node lock, on the ledger as loaded.
fn run_phase<H: Host>(
    env: &Env,
    host: &H,
    store: &Store,
    state: &mut State,
    vmid: u32,
    phase: Phase,
    loaded: Option<Loaded>,
) -> Result<String, Error> {
    reconcile(env, host, store, state, vmid)?;
    match phase {
        Phase::PreStop => Ok(String::new()),
        Phase::PostStop => {
            let applied = rollback_vm(env, host, store, state, vmid)?;
            Ok(summary(vmid, phase, &applied, 0))
        }
        Phase::PreStart => {
            // qemu-server only starts a VM that is not running: anything still held for it is
            // left over from a start that failed or a crash.
            if state.held_vms().contains(&vmid) {
                log::warn!("VM {vmid}: undoing what a previous run left behind");
                rollback_vm(env, host, store, state, vmid)?;
            }
            let Some(loaded) = loaded else {
                return Ok(String::new());
            };
            if let Ok(from) = std::env::var("PVE_MIGRATED_FROM") {
                log::info!("VM {vmid}: incoming migration from {from}");
            }
            let mut loaded = loaded;
            loaded.resolve(env, vmid, state)?;
            let others = state.owned_by_others(vmid);
            let plan = plan_for(&loaded, vmid, &others, phase)?;
            let record = VmRecord {
                cpus: loaded
                    .cpus
                    .as_ref()
                    .map(|c| c.value.clone())
                    .unwrap_or_default(),
                phase: phase.to_string(),
                ..Default::default()
            };
            execute(env, host, store, state, (vmid, record), phase, plan)
        }
        Phase::PostStart => {
            let Some(mut loaded) = loaded else {
                return Ok(String::new());
            };
            loaded.resolve(env, vmid, state)?;
            let running = loaded.running.as_ref().ok_or(Error::NotRunning { vmid })?;
            if let Ok(from) = std::env::var("PVE_MIGRATED_FROM") {
                log::info!("VM {vmid}: incoming migration from {from}: pinning as usual");
            }
            let others = state.owned_by_others(vmid);
            let plan = plan_for(&loaded, vmid, &others, phase)?;
            let mut record = state.vms.get(&vmid).cloned().unwrap_or_default();
            record.cpus = loaded
                .cpus
                .as_ref()
                .map(|c| c.value.clone())
                .unwrap_or_default();
            record.pid = Some(running.pid);
            record.start_time = Some(running.start_time);
            record.phase = phase.to_string();
            let mut done = execute(env, host, store, state, (vmid, record), phase, plan)?;
            // What the kernel did by itself, in the hook's output (qemu-server's task log).
            if loaded.profile.isolation.verify_kthreads()
                && let Some(cpus) = loaded.cpus.as_ref().map(|c| &c.value)
            {
                for (holds, line) in crate::tunables::partition::verify(&env.root, cpus) {
                    let mark = if holds { "" } else { "warning: " };
                    done.push_str(&format!("\npvetune: VM {vmid} {phase}: {mark}{line}"));
                }
            }
            Ok(done)
        }
    }
}

pub(crate) fn plan_for(
    loaded: &Loaded,
    vmid: u32,
    others: &std::collections::BTreeMap<u32, crate::cpuset::CpuSet>,
    phase: Phase,
) -> Result<Plan, Error> {
    let mut plan =
        plan::build(&loaded.inputs(vmid, others), phase).map_err(|source| Error::Plan {
            path: loaded.profile.path.clone(),
            source,
        })?;
    if phase == Phase::PreStart {
        let why = loaded
            .placed
            .iter()
            .map(|line| format!("placement: {line}"));
        plan.notes.splice(0..0, why);
    }
    Ok(plan)
}

/// Records the VM's record (durably, before any change), then applies the plan as one batch.
fn execute<H: Host>(
    env: &Env,
    host: &H,
    store: &Store,
    state: &mut State,
    (vmid, record): (u32, VmRecord),
    phase: Phase,
    plan: Plan,
) -> Result<String, Error> {
    let record = Change::Vm {
        vmid,
        record: Some(Box::new(record)),
    };
    store.append(state, vec![record])?;
    for skip in &plan.skipped {
        log::warn!(
            "VM {vmid} {phase}: {} skipped: {}",
            skip.tunable,
            skip.reason
        );
    }
    for note in &plan.notes {
        match note.strip_prefix("warning: ") {
            Some(warning) => log::warn!("VM {vmid} {phase}: {warning}"),
            None => log::info!("VM {vmid} {phase}: {note}"),
        }
    }
    let mut exec = Executor::new(&env.root, host, store, std::mem::take(state), vmid);
    let skipped = plan.skipped.len();
    // Handed over, not lent: the executor frees each stretch of steps once it is made (a
    // step per IRQ).
    let applied = exec.apply(plan.steps);
    *state = exec.state;
    let applied = applied.map_err(|source| Error::Apply { phase, source })?;
    if !applied.refused.is_empty()
        && let Some(mut record) = state.vms.get(&vmid).cloned()
    {
        // For `status`: which IRQs stayed where they were, and why.
        record.refused = applied.refused.clone();
        let change = Change::Vm {
            vmid,
            record: Some(Box::new(record)),
        };
        if let Err(e) = store.append(state, vec![change]) {
            log::warn!("ledger: the refused IRQs are not recorded for status: {e}");
        }
    }
    Ok(summary(vmid, phase, &applied, skipped))
}

fn summary(vmid: u32, phase: Phase, a: &Applied, skipped: usize) -> String {
    let mut s = format!(
        "pvetune: VM {vmid} {phase}: {} changed, {} already set",
        a.changed, a.unchanged
    );
    if a.vanished > 0 {
        s.push_str(&format!(", {} threads or IRQs gone", a.vanished));
    }
    if !a.refused.is_empty() {
        // IRQs mostly: name them, a managed IRQ is something an admin may want to know about.
        let names: Vec<String> = a
            .refused
            .iter()
            .map(|(path, errno)| {
                let short = path
                    .strip_prefix("/proc/irq/")
                    .and_then(|p| p.split('/').next())
                    .map_or_else(|| path.clone(), |n| format!("IRQ {n}"));
                format!("{short} ({errno})")
            })
            .collect();
        s.push_str(&format!(
            ", {} refused by the kernel (managed or per-CPU IRQs, left as they are): {}",
            a.refused.len(),
            names.join(", ")
        ));
    }
    if skipped > 0 {
        s.push_str(&format!(", {skipped} skipped (see warnings)"));
    }
    s
}

/// Whether the QEMU process pvetune recorded for the VM is still the one running.
pub(crate) fn process_alive(env: &Env, rec: Option<&VmRecord>) -> bool {
    match rec.and_then(|r| r.pid.zip(r.start_time)) {
        Some((pid, start)) => vm::process_start_time(env.root.base(), pid) == Some(start),
        None => false,
    }
}

/// Rolls back every VM the ledger holds that is not running any more (and is not starting:
/// qemu-server holds its config lock then). `current` is the VM whose hook runs now; it is
/// handled by the phase itself.
pub fn reconcile<H: Host>(
    env: &Env,
    host: &H,
    store: &Store,
    state: &mut State,
    current: u32,
) -> Result<(), Error> {
    for vmid in state.held_vms() {
        if vmid == current {
            continue;
        }
        let alive =
            process_alive(env, state.vms.get(&vmid)) || state::config_lock_held(&env.root, vmid);
        if !alive {
            log::warn!(
                "VM {vmid} no longer runs but pvetune still held changes for it: rolling them back"
            );
            rollback_vm(env, host, store, state, vmid)?;
        }
    }
    Ok(())
}

/// Undoes everything held for one VM.
pub fn rollback_vm<H: Host>(
    env: &Env,
    host: &H,
    store: &Store,
    state: &mut State,
    vmid: u32,
) -> Result<Applied, Error> {
    rollback_vm_with(env, host, store, state, vmid, false)
}

/// [`rollback_vm`]; `release_kept`: boot-time reservations too (`pvetune rollback`).
fn rollback_vm_with<H: Host>(
    env: &Env,
    host: &H,
    store: &Store,
    state: &mut State,
    vmid: u32,
    release_kept: bool,
) -> Result<Applied, Error> {
    let alive = process_alive(env, state.vms.get(&vmid));
    let pins = state.vms.get(&vmid).map_or(0, |r| r.pins.len());
    let claims = state
        .claims
        .values()
        .filter(|c| c.holders.iter().any(|h| h.vmid == vmid))
        .count();
    let mut exec = Executor::new(&env.root, host, store, std::mem::take(state), vmid);
    exec.release_kept = release_kept;
    let errors = exec.rollback(alive);
    *state = exec.state;
    if !errors.is_empty() {
        return Err(Error::Rollback {
            vmid,
            errors: errors.iter().map(ToString::to_string).collect(),
        });
    }
    let applied = Applied {
        changed: claims + if alive { pins } else { 0 },
        ..Applied::default()
    };
    Ok(applied)
}

/// `pvetune rollback <vmid>`: undo now, under the node lock, boot-time hugepage reservations
/// included (`pvetune reserve`).
pub fn rollback_command<H: Host>(env: &Env, host: &H, vmid: u32) -> Result<String, Error> {
    rollback_now(env, host, vmid, true)
}

/// Undoes a start that was aborted after pvetune's pre-start (a chained hookscript refused
/// it): what post-stop would undo, so a boot-time reservation stays kept for the VM.
pub fn undo_start<H: Host>(env: &Env, host: &H, vmid: u32) -> Result<String, Error> {
    rollback_now(env, host, vmid, false)
}

fn rollback_now<H: Host>(
    env: &Env,
    host: &H,
    vmid: u32,
    release_kept: bool,
) -> Result<String, Error> {
    let store = Store::new(&env.root);
    let _lock = store.lock()?;
    let mut state = store.load()?;
    let kept = release_kept
        && state
            .claims
            .values()
            .any(|c| c.holder(vmid).is_some_and(|h| h.kept()));
    if !kept && !state.held_vms().contains(&vmid) {
        return Ok(format!("pvetune: VM {vmid}: nothing held"));
    }
    let applied = rollback_vm_with(env, host, &store, &mut state, vmid, release_kept);
    if let Err(e) = store.compact(&mut state) {
        log::warn!("ledger journal not compacted ({e}); it stays valid and the next run folds it");
    }
    let applied = applied?;
    Ok(summary(vmid, Phase::PostStop, &applied, 0).replace("post-stop", "rollback"))
}

/// `pvetune check <vmid>`: everything pre-start and post-start would refuse, without changes.
pub fn check(env: &Env, vmid: u32) -> Result<String, Error> {
    let state = Store::new(&env.root).load()?;
    let Some(mut loaded) = load(env, vmid, false)? else {
        return Ok(format!(
            "VM {vmid}: no profile, pvetune does nothing for it"
        ));
    };
    loaded.resolve(env, vmid, &state)?;
    let others = state.owned_by_others(vmid);
    let inputs = loaded.inputs(vmid, &others);
    plan::validate(&inputs).map_err(|source| Error::Plan {
        path: loaded.profile.path.clone(),
        source,
    })?;
    let mut out = format!(
        "VM {vmid}: {} is valid on this host",
        loaded.profile.path.display()
    );
    if let Some(cpus) = &loaded.cpus
        && !loaded.placed.is_empty()
    {
        out.push_str(&format!(" (CPUs placed: {})", cpus.value));
    }
    if let Some(warning) = crate::tunables::pinning::guest_smt_missing(&inputs) {
        out.push_str(&format!("\n{warning}"));
    }
    for line in crate::tunables::ksm::advice(&inputs) {
        out.push_str(&format!("\n{line}"));
    }
    Ok(out)
}
