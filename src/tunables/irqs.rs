//! IRQs off the VM's CPUs (`isolation: {irqs: true}`): `/proc/irq/<n>/smp_affinity_list` of
//! every IRQ, and `/proc/irq/default_smp_affinity` (a hex mask), which IRQs that start later
//! take: the passthrough device's MSI-X vectors the guest enables once it runs.
//!
//! Planned for pre-start, before QEMU (and qemu-server's vfio setup) creates any of the VM's
//! IRQs. Each file is a composed claim (`Action::Exclude`): with several isolated VMs it holds
//! its original CPUs minus all of theirs. The kernel refuses some IRQs (managed queues, per-CPU
//! IRQs, IRQ 0 on x86: EPERM from 6.14 and on the 6.12 lab kernel, EIO on 6.8; ENOSPC when the
//! target CPUs have no vectors left): those are skipped when applied, never a failure. An
//! isolated cpuset partition never moves IRQs by itself (docs/kernel-facts.md). A running
//! irqbalance would move them back: see `tunables/irqbalance.rs`.

use crate::cpuset::CpuFormat;
use crate::facts::{DEFAULT_IRQ_AFFINITY, irq_affinity_path};
use crate::plan::{Action, Inputs, Plan, Skip, Step};
use crate::tunables::pinning::housekeeping;

const TUNABLE: &str = "irqs";

pub fn plan(inp: &Inputs, plan: &mut Plan) {
    if !inp.profile.isolation.irqs {
        return;
    }
    let (Some(irqs), Some(cpus)) = (&inp.facts.irqs, inp.cpus) else {
        return;
    };
    let cpus = &cpus.value;
    let housekeeping = housekeeping(inp);
    if housekeeping.is_empty() {
        plan.skipped.push(Skip {
            tunable: TUNABLE,
            reason: "no housekeeping CPU would be left for the host's IRQs".into(),
        });
        return;
    }
    // The recorded fallback keeps this VM's own usable CPUs: the claim takes them out of the
    // value anyway (`Claim::effective` subtracts every holder's CPUs from the fallback too),
    // so nothing changes while the VM runs, but once it stops they come back to an IRQ that
    // only had VM CPUs. With the plain housekeeping set, a VM that joined a claim another VM
    // held left its CPUs out of such an IRQ after its stop (IRQ 35 of the Ryzen fixture,
    // found by tests/crash_syscalls.rs). `prepare` keeps the other holders' CPUs the same way.
    let usable = inp.topology.online.difference(&inp.topology.isolated);
    let fallback = housekeeping.union(&cpus.intersection(&usable));
    let exclude = |path: String, format, refusable| Step {
        tunable: TUNABLE,
        action: Action::Exclude {
            path,
            cpus: cpus.clone(),
            format,
            fallback: fallback.clone(),
            refusable,
        },
    };
    if irqs.default_affinity {
        plan.steps.push(exclude(
            DEFAULT_IRQ_AFFINITY.to_string(),
            CpuFormat::Mask,
            false,
        ));
    } else {
        plan.skipped.push(Skip {
            tunable: TUNABLE,
            reason: format!("{DEFAULT_IRQ_AFFINITY} does not exist on this host"),
        });
    }
    for &irq in &irqs.numbers {
        plan.steps
            .push(exclude(irq_affinity_path(irq), CpuFormat::List, true));
    }
    crate::tunables::irqbalance::plan(inp, irqs, plan);
    if irqs.numbers.is_empty() {
        plan.skipped.push(Skip {
            tunable: TUNABLE,
            reason: "no IRQ under /proc/irq".into(),
        });
    } else {
        plan.notes.push(format!(
            "irqs: {} IRQs off CPUs {cpus}; those the kernel refuses (managed, per-CPU) are skipped when applied",
            irqs.numbers.len()
        ));
    }
}
