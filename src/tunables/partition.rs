//! The isolated cpuset partition (`isolation: {partition: isolated}`): the VM's vCPU threads
//! alone on its CPUs, every other task of the host (its slices, other VMs, containers, the
//! VM's own emulator threads and iothreads) off them, by the kernel.
//!
//! The layout, proven by the lab on 6.8, 6.12, 6.17 and 7.0 with systemd 252 and 257
//! (docs/kernel-facts.md; docs/design.md has the picture): a threaded child `vcpus` of
//! QEMU's own `qemu.slice/<vmid>.scope` (QEMU never leaves its scope: Proxmox's stats and stop
//! use it) is a *remote* isolated partition. That needs the cpuset controller on the way down,
//! and the VM's CPUs in `cpuset.cpus.exclusive` of `qemu.slice`, the scope and `vcpus`.
//! `qemu.slice`'s exclusive CPUs are a composed claim (the union of every isolated VM's), so
//! VMs start and stop in any order without invalidating one another. `+cpuset` in
//! `vcpus/cgroup.subtree_control` keeps systemd 252 from removing the partition on
//! `daemon-reload`.
//!
//! From 6.12 `cpuset.cpus` is never written. Kernel 6.8 (Proxmox VE 8's default) takes a
//! cgroup's exclusive CPUs as `exclusive ∩ cpuset.cpus ∩ parent's`, so there every cgroup of
//! the chain also needs `cpuset.cpus` covering the CPUs, or the partition reads back
//! `isolated invalid (cpuset.cpus is empty)`. `qemu.slice` and the scope get every online CPU
//! (which changes no task's CPUs: an empty `cpuset.cpus` means the parent's), `vcpus` the VM's.
//! 6.8 checks a cgroup against its siblings by its exclusive CPUs once it has some, else by
//! its `cpuset.cpus`, so each `cpuset.cpus` is written right after its exclusive CPUs and two
//! isolated VMs' scopes never conflict.
//! It refuses an empty `cpuset.cpus` on a cgroup that has tasks (ENOSPC), so those two are
//! given back once the cgroup is empty: the scope's goes with the scope, `qemu.slice`'s is
//! released when its last VM has stopped (exec/undo.rs, "deferred").
//!
//! Planned for post-start: the scope exists only once QEMU runs. The partition file is read
//! back twice (the kernel accepts the write and says only on reading whether it made the
//! partition valid): after the write, and with the vCPU threads in it; an invalid partition
//! fails the phase, which undoes it. The steps run before pinning, so the vCPUs are pinned
//! inside their partition and the emulator threads on the housekeeping CPUs the scope keeps.

use crate::cgroup::{
    CGROUP_ROOT, CPUS, EXCLUSIVE, PARTITION, QEMU_SLICE, SUBTREE_CONTROL, VCPUS, scope_of,
};
use crate::cpuset::CpuSet;
use crate::plan::{Action, Inputs, Plan, PlanError, Skip, Step, ThreadRef};
use crate::profile::Placement;
use crate::root::Root;
use crate::tunables::pinning::housekeeping;

const TUNABLE: &str = "partition";
const KEY: &str = "isolation.partition";

/// Refuses what cannot work on this host: no cgroup v2 cpuset, a kernel without remote
/// partitions, a partition that would leave no CPU outside every partition, emulator threads
/// or iothreads placed on the partition's CPUs (they stay in the scope, outside it).
pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    let Some(place) = &inp.profile.isolation.partition else {
        if let Some(k) = &inp.profile.isolation.kthreads
            && k.value
        {
            return Err(PlanError::at(
                "isolation.kthreads",
                k,
                "needs isolation.partition: isolated. The kernel moves unbound kernel threads off \
                 an isolated partition by itself, and resets any pinning of them at every \
                 partition change, so pvetune verifies instead of pinning them",
            ));
        }
        return Ok(());
    };
    let cgroup = inp.facts.cgroup.clone().unwrap_or_default();
    let kernel = if cgroup.kernel.is_empty() {
        "this kernel".to_string()
    } else {
        format!("kernel {}", cgroup.kernel)
    };
    if !cgroup.unified || !cgroup.cpuset {
        return Err(PlanError::at(
            KEY,
            place,
            format!(
                "{kernel} offers no cgroup v2 cpuset controller at {CGROUP_ROOT} \
                 (cgroup.controllers has no cpuset): a partition needs the unified hierarchy"
            ),
        ));
    }
    if !cgroup.remote_partitions {
        return Err(PlanError::at(
            KEY,
            place,
            format!(
                "{kernel} has no cpuset.cpus.exclusive or remote partitions \
                 ({CGROUP_ROOT}/cpuset.cpus.isolated is missing; they came with Linux 6.7)"
            ),
        ));
    }
    if housekeeping(inp).is_empty() {
        return Err(PlanError::at(
            KEY,
            place,
            format!(
                "no CPU would be left outside every partition (online: {}); the host needs at \
                 least one",
                inp.topology.online
            ),
        ));
    }
    let Some(cpus) = inp.cpus else {
        return Ok(());
    };
    let cpus = &cpus.value;
    for (key, placement) in [
        ("emulator", &inp.profile.emulator),
        ("iothreads", &inp.profile.iothreads),
    ] {
        let on_partition = match &placement.value {
            Placement::VmCpus => true,
            Placement::Cpus(set) => !set.intersection(cpus).is_empty(),
            Placement::Housekeeping => false,
        };
        if on_partition {
            return Err(PlanError::at(
                key,
                placement,
                format!(
                    "{key} threads stay in the VM's scope, outside its partition: with \
                     isolation.partition they cannot run on the VM's CPUs {cpus} (use housekeeping, \
                     or CPUs outside them, instead of vm)"
                ),
            ));
        }
    }
    Ok(())
}

pub fn plan(inp: &Inputs, plan: &mut Plan) {
    let (Some(_), Some(cpus)) = (&inp.profile.isolation.partition, inp.cpus) else {
        return;
    };
    let scope = scope_of(inp.vmid);
    if let Some(vm) = inp.running
        && let Some(actual) = vm.cgroup.as_deref()
        && actual != scope
    {
        plan.skipped.push(Skip {
            tunable: TUNABLE,
            reason: format!(
                "QEMU (pid {}) runs in {actual}, not in {scope}: pvetune never moves QEMU out of \
                 the cgroup qemu-server started it in",
                vm.pid
            ),
        });
        return;
    }
    let cpus = &cpus.value;
    let vcpus = format!("{scope}/{VCPUS}");
    let step = |action| Step {
        tunable: TUNABLE,
        action,
    };
    let enable = |dir: &str| {
        step(Action::Enable {
            path: format!("{dir}/{SUBTREE_CONTROL}"),
            controller: "cpuset",
        })
    };
    let write = |path: String, value: String| step(Action::Write { path, value });
    let expect = || {
        step(Action::Expect {
            path: format!("{vcpus}/{PARTITION}"),
            value: "isolated".into(),
        })
    };
    // 6.8: `cpuset.cpus` on the chain too, each right after its exclusive CPUs: a cgroup with
    // exclusive CPUs is checked against its siblings by those, one without by its `cpuset.cpus`
    // (every online CPU, which would clash with another isolated VM's scope).
    let needs_cpus = inp
        .facts
        .cgroup
        .as_ref()
        .is_some_and(|c| c.exclusive_needs_cpus());
    let online = &inp.topology.online;
    let cpus_of = |dir: &str, value: &CpuSet| {
        needs_cpus.then(|| write(format!("{dir}/{CPUS}"), value.to_string()))
    };
    plan.steps.extend([
        enable(CGROUP_ROOT),
        enable(QEMU_SLICE),
        enable(&scope),
        // The cpuset files of qemu.slice and the scope exist only from here.
        step(Action::Barrier),
    ]);
    plan.steps.push(step(Action::Include {
        path: format!("{QEMU_SLICE}/{EXCLUSIVE}"),
        cpus: cpus.clone(),
    }));
    if needs_cpus {
        // A union like the exclusive CPUs: every isolated VM holds it, the last one gives it back.
        plan.steps.push(step(Action::Include {
            path: format!("{QEMU_SLICE}/{CPUS}"),
            cpus: online.clone(),
        }));
    }
    plan.steps
        .push(write(format!("{scope}/{EXCLUSIVE}"), cpus.to_string()));
    plan.steps.extend(cpus_of(&scope, online));
    plan.steps.extend([
        step(Action::Mkdir {
            path: vcpus.clone(),
            kind: "threaded",
        }),
        step(Action::Barrier),
        write(format!("{vcpus}/{EXCLUSIVE}"), cpus.to_string()),
    ]);
    plan.steps.extend(cpus_of(&vcpus, cpus));
    plan.steps.extend([
        // The pin: systemd 252 removes a child partition without it on daemon-reload.
        enable(&vcpus),
        write(format!("{vcpus}/{PARTITION}"), "isolated".into()),
        expect(),
    ]);
    match inp.running {
        Some(vm) => plan.steps.extend(vm.vcpus.iter().map(|v| {
            step(Action::Move {
                thread: ThreadRef {
                    pid: Some(vm.pid),
                    tid: Some(v.tid),
                    label: format!("vCPU {}", v.index),
                },
                cgroup: vcpus.clone(),
            })
        })),
        None => plan.steps.push(step(Action::Move {
            thread: ThreadRef {
                pid: None,
                tid: None,
                label: "vCPU threads".into(),
            },
            cgroup: vcpus.clone(),
        })),
    }
    plan.steps.push(expect());
    plan.notes.push(format!(
        "partition: CPUs {cpus} become an isolated partition holding only the vCPU threads; \
         the host's slices, other VMs, containers and this VM's emulator threads leave them by \
         themselves (the kernel), so no AllowedCPUs is written anywhere"
    ));
    if needs_cpus {
        let kernel = &inp.facts.cgroup.as_ref().map_or("", |c| c.kernel.as_str());
        plan.notes.push(format!(
            "partition: kernel {kernel} also needs cpuset.cpus on qemu.slice, the scope and vcpus \
             (the 6.8 behaviour); it refuses to empty cpuset.cpus again while the cgroup has \
             tasks, so qemu.slice's is given back once its last VM has stopped"
        ));
    }
    plan.notes.push(format!(
        "workqueues: the kernel takes CPUs {cpus} out of the unbound workqueue mask when the \
         partition is made; nothing is written (a restore would give another VM's CPUs back)"
    ));
    if inp
        .profile
        .isolation
        .kthreads
        .as_ref()
        .is_some_and(|k| k.value)
    {
        plan.notes.push(format!(
            "kthreads: unbound kernel threads leave CPUs {cpus} by themselves; verified after \
             post-start (per-CPU threads and workqueue workers cannot move and are counted)"
        ));
    }
}

/// After post-start made the partition: what the kernel did by itself, read back and never
/// written. Each line with whether it holds (a kernel thread still on the VM's CPUs, or a
/// workqueue mask that still has them, is a warning, not a failure: the VM runs either way).
pub fn verify(root: &Root, cpus: &CpuSet) -> Vec<(bool, String)> {
    let kthreads = crate::kthreads::scan(root, cpus);
    let workqueues = crate::kthreads::workqueues(root, cpus);
    vec![
        (kthreads.verified(), kthreads.summary(cpus)),
        (workqueues.verified(cpus), workqueues.summary(cpus)),
    ]
}
