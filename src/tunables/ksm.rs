//! `ksm: { pause: true }`: KSM kept from scanning while the VM runs.
//!
//! Kernel file: `/sys/kernel/mm/ksm/run` (`1` scan, `0` stop scanning and keep what is
//! merged, `2` stop and unmerge). A host-wide claim: every VM that asks holds `0`, and the
//! last one to stop writes back what the file held before the first. ksmd adds latency to a
//! latency-sensitive guest and cannot merge hugepage-backed memory anyway.
//!
//! Proxmox's own switch is per VM: `allow-ksm: 0` (qemu-server since November 2025, Proxmox VE 9.1) starts QEMU with
//! `mem-merge=off`, which keeps that VM's memory out of KSM and leaves KSM for the others:
//! `check` and `plan` suggest it where this qemu-server has it (its
//! schema in `/usr/share/perl5/PVE/QemuServer.pm` names it). `ksmtuned` (Proxmox's default KSM tuner) writes `run`
//! itself and would start KSM again: it is detected and warned about.

use crate::memory::facts::KSM_RUN;
use crate::plan::{Action, Inputs, Plan, Skip, Step};

const TUNABLE: &str = "ksm";

/// What `check` and `plan` say beside the steps.
pub fn advice(inp: &Inputs) -> Vec<String> {
    if !inp.profile.ksm.as_ref().is_some_and(|k| k.pause) {
        return Vec::new();
    }
    let mut out = Vec::new();
    match (inp.config.allow_ksm, inp.memory.allow_ksm_supported) {
        (Some(false), _) => out.push(
            "ksm: the VM config has 'allow-ksm: 0' already: its memory is never merged; \
             pausing KSM host-wide only keeps ksmd's scanning off the host"
                .to_string(),
        ),
        (_, Some(false)) => out.push(
            "ksm: this qemu-server has no 'allow-ksm' (Proxmox VE 9.1 and later): pausing KSM \
             host-wide is the way to keep it off this VM"
                .to_string(),
        ),
        _ => out.push(
            "ksm: prefer 'allow-ksm: 0' in the VM config (Proxmox VE 9.1 and later) to \
             ksm.pause: it keeps this VM's memory out of KSM without stopping KSM for every \
             other VM"
                .to_string(),
        ),
    }
    if let Some(pid) = inp.memory.ksmtuned {
        out.push(format!(
            "warning: ksm: ksmtuned runs (pid {pid}) and writes {KSM_RUN} by itself: it may start \
             KSM again while the VM runs (systemctl disable --now ksmtuned, or use allow-ksm: 0)"
        ));
    }
    out
}

pub fn plan(inp: &Inputs, plan: &mut Plan) {
    if !inp.profile.ksm.as_ref().is_some_and(|k| k.pause) {
        return;
    }
    if inp.memory.ksm_run.is_none() {
        plan.skipped.push(Skip {
            tunable: TUNABLE,
            reason: format!("no {KSM_RUN}: this kernel has no KSM, nothing to pause"),
        });
        return;
    }
    plan.notes.extend(advice(inp));
    plan.steps.push(Step {
        tunable: TUNABLE,
        action: Action::Write {
            path: KSM_RUN.into(),
            value: "0".into(),
        },
    });
}
