//! What pvetune shows: the dry run (`plan`) and what it holds (`status`). Reads only.

use crate::error::Error;
use crate::exec::{managed_words, read_claimed, same_value};
use crate::hook::{Env, process_alive};
use crate::host::{Host, RealHost};
use crate::plan::{Action, Phase, Plan, Step, ThreadRef};
use crate::state::{Claim, ComposeOp, State, Store};

mod rows;
pub use rows::{PhaseRows, PlanRows, Row, plan_rows};

/// The dry run of `phases`, as `target: before -> after` lines under a heading per phase.
pub fn render_plan<H: Host>(
    env: &Env,
    host: &H,
    vmid: u32,
    phases: &[Phase],
) -> Result<Vec<String>, Error> {
    let Some(PlanRows { phases, .. }) = plan_rows(env, host, vmid, phases)? else {
        return Ok(vec![format!(
            "VM {vmid} has no profile: pvetune does nothing for it"
        )]);
    };
    let mut out = Vec::new();
    for p in phases {
        out.push(format!("{}:", p.phase));
        render_steps(&p, &mut out);
    }
    Ok(out)
}

fn render_steps(p: &PhaseRows, out: &mut Vec<String>) {
    let shown = |text: &str| match text {
        "" => "(empty)".to_string(),
        text => text.to_string(),
    };
    for row in &p.rows {
        out.push(match row {
            Row::Check { path, value, now } => {
                let now = now
                    .as_ref()
                    .map_or_else(|| "not there yet".to_string(), |n| format!("now {n}"));
                format!("  check {path} reads '{value}' ({now})")
            }
            Row::Change {
                target,
                before,
                after,
                unchanged,
                ..
            } => {
                let mark = if *unchanged { " (unchanged)" } else { "" };
                format!("  {target}: {} -> {}{mark}", shown(before), shown(after))
            }
        });
    }
    let plan = &p.plan;
    for skip in &plan.skipped {
        out.push(format!("  skip {}: {}", skip.tunable, skip.reason));
    }
    for note in &plan.notes {
        out.push(format!("  note: {note}"));
    }
    if plan.steps.is_empty() && plan.skipped.is_empty() && plan.notes.is_empty() {
        out.push("  nothing to do".into());
    }
}

/// What post-stop would do: the undo of the ledger's entries for the VM.
fn undo_plan(state: &State, vmid: u32) -> Plan {
    let mut plan = Plan::default();
    // In the order rollback releases them: last taken first.
    let mut held: Vec<(u64, &String, &Claim)> = state
        .claims
        .iter()
        .filter_map(|(p, c)| {
            c.holder(vmid)
                .filter(|h| !h.kept())
                .map(|h| (h.seq, p, &**c))
        })
        .collect();
    held.sort_unstable_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
    for (_, path, claim) in held {
        {
            let mut rest = claim.clone();
            rest.holders.retain(|h| h.vmid != vmid);
            let action = match claim.op() {
                Some(ComposeOp::Ban) => {
                    plan.notes.push(format!(
                        "{path}: settings cpus {} (irqbalance's ban{})",
                        rest.effective(),
                        if rest.holders.is_empty() {
                            " as it was"
                        } else {
                            " without this VM's CPUs"
                        }
                    ));
                    None
                }
                Some(ComposeOp::Rescan) => {
                    plan.notes.push(format!(
                        "{path}: PCI {} rescanned (a removal that did not finish)",
                        claim.holder(vmid).map_or("", |h| h.value.as_str())
                    ));
                    None
                }
                Some(ComposeOp::Dir) if rest.holders.is_empty() => {
                    plan.notes.push(format!(
                        "{path}: removed (threads left in it go back to its parent first)"
                    ));
                    None
                }
                Some(ComposeOp::Words) => {
                    let off: Vec<&str> = claim
                        .holders
                        .iter()
                        .map(|h| h.value.as_str())
                        .filter(|w| !rest.effective().split_whitespace().any(|r| r == *w))
                        .collect();
                    if !off.is_empty() {
                        plan.notes
                            .push(format!("{path}: -{} (it was off before)", off.join(" -")));
                    }
                    None
                }
                _ => Some(Action::Write {
                    path: path.clone(),
                    value: rest.effective().to_string(),
                }),
            };
            if let Some(action) = action {
                plan.steps.push(Step {
                    tunable: "restore",
                    action,
                });
            }
            if !rest.holders.is_empty() {
                let who: Vec<String> = rest.holders.iter().map(|h| h.vmid.to_string()).collect();
                plan.notes
                    .push(format!("{path} stays claimed by VM {}", who.join(", ")));
            }
        }
    }
    if let Some(rec) = state.vms.get(&vmid) {
        for pin in &rec.pins {
            plan.steps.push(Step {
                tunable: "restore",
                action: Action::Pin {
                    thread: ThreadRef {
                        pid: rec.pid,
                        tid: Some(pin.tid),
                        label: pin.label.clone(),
                    },
                    cpus: pin.old.clone(),
                },
            });
        }
    }
    plan
}

/// ` [changed outside pvetune: now X]` when the file no longer holds what the claim set (an
/// admin's echo, irqbalance, systemd): rollback still restores the original, and says so.
fn drift(env: &Env, path: &str, claim: &Claim) -> String {
    match claim_drift(env, path, claim) {
        Ok(None) => String::new(),
        Ok(Some(now)) => format!(" [changed outside pvetune: now {now}]"),
        Err(e) => format!(" [unreadable: {e}]"),
    }
}

/// What a claimed file holds now when that is not what pvetune set (`None`: it still holds).
pub fn claim_drift(env: &Env, path: &str, claim: &Claim) -> Result<Option<String>, String> {
    let words = managed_words(claim);
    match read_claimed(&RealHost, &env.root, path, claim.op(), &words) {
        Ok(now) if same_value(&now, &claim.effective()) => Ok(None),
        Ok(now) => Ok(Some(now.trim().to_string())),
        Err(e) => Err(e.to_string()),
    }
}

/// A pinned thread's affinity now when it is not what pvetune set; only for threads of the
/// very QEMU that was pinned (`alive`): a gone VM's tids may be reused.
pub fn pin_drift(alive: bool, pin: &crate::state::PinRecord) -> Option<crate::cpuset::CpuSet> {
    alive
        .then(|| RealHost.get_affinity(pin.tid).ok())
        .flatten()
        .filter(|now| *now != pin.new)
}

/// The isolation of one VM at a glance: its partition as the kernel reports it now, and its
/// IRQs (moved, and refused by the kernel).
fn isolation_summary(
    env: &Env,
    state: &State,
    vmid: u32,
    rec: &crate::state::VmRecord,
) -> Vec<String> {
    let mut out = Vec::new();
    let partition = format!(
        "{}/{}/{}",
        crate::cgroup::scope_of(vmid),
        crate::cgroup::VCPUS,
        crate::cgroup::PARTITION
    );
    if state
        .claims
        .get(&partition)
        .is_some_and(|c| c.holder(vmid).is_some())
    {
        let now = RealHost
            .read(&env.root.path(&partition))
            .map(|s| s.trim().to_string());
        out.push(match now {
            Ok(v) if v == "isolated" => "  partition: isolated (valid)".to_string(),
            Ok(v) => format!(
                "  partition: NOT VALID: the kernel reports '{v}' (pvetune rollback {vmid}, then post-start, builds it again)"
            ),
            Err(e) => format!("  partition: gone ({e})"),
        });
    }
    let held: Vec<&String> = state
        .claims
        .iter()
        .filter(|(p, c)| p.starts_with("/proc/irq/") && c.holder(vmid).is_some())
        .map(|(p, _)| p)
        .collect();
    let moved = held.len();
    // Where each IRQ really fires now (the kernel's choice inside the affinity, one CPU on x86).
    let firing: Vec<String> = held
        .iter()
        .filter_map(|p| p.strip_suffix("/smp_affinity_list"))
        .filter(|dir| {
            RealHost
                .read(&env.root.path(format!("{dir}/effective_affinity_list")))
                .ok()
                .and_then(|t| t.trim().parse::<crate::cpuset::CpuSet>().ok())
                .is_some_and(|eff| !eff.intersection(&rec.cpus).is_empty())
        })
        .map(|dir| dir.to_string())
        .collect();
    if moved > 0 || !rec.refused.is_empty() {
        let mut line = format!("  IRQs: {moved} held off the VM's CPUs");
        if !firing.is_empty() {
            line.push_str(&format!(
                "; still firing on them (effective_affinity_list): {}",
                firing.join(", ")
            ));
        }
        if !rec.refused.is_empty() {
            let names: Vec<String> = rec
                .refused
                .iter()
                .map(|(path, errno)| {
                    format!("{} ({errno})", path.trim_end_matches("/smp_affinity_list"))
                })
                .collect();
            line.push_str(&format!(
                "; refused by the kernel, left as they are: {}",
                names.join(", ")
            ));
        }
        out.push(line);
    }
    out
}

/// `pvetune status`: what the ledger holds, and what changed behind pvetune's back since.
pub fn status(env: &Env, only: Option<u32>) -> Result<Vec<String>, Error> {
    let state = Store::new(&env.root).load()?;
    let mut out = Vec::new();
    if state.is_empty() {
        out.push("pvetune holds nothing on this node".into());
        return Ok(out);
    }
    for vmid in state
        .held_vms()
        .into_iter()
        .filter(|v| only.is_none_or(|o| o == *v))
    {
        let rec = state.vms.get(&vmid);
        let proc_state = match rec.and_then(|r| r.pid) {
            Some(pid) if process_alive(env, rec) => format!("running (pid {pid})"),
            Some(pid) => {
                format!("gone (pid {pid}): the next hook or 'pvetune rollback {vmid}' undoes it")
            }
            None => "starting".to_string(),
        };
        out.push(format!("VM {vmid}: {proc_state}"));
        let (mut held, mut drifted) = (0, 0);
        if let Some(rec) = rec {
            out.push(format!("  cpus {} (last phase {})", rec.cpus, rec.phase));
            out.extend(isolation_summary(env, &state, vmid, rec));
            let alive = process_alive(env, Some(rec));
            for pin in &rec.pins {
                let now = pin_drift(alive, pin)
                    .map(|now| format!(" [changed outside pvetune: now {now}]"))
                    .unwrap_or_default();
                held += 1;
                drifted += usize::from(!now.is_empty());
                out.push(format!(
                    "  thread {} ({}): {} (was {}){now}",
                    pin.tid, pin.label, pin.new, pin.old
                ));
            }
        }
        for (path, claim) in &state.claims {
            if let Some(h) = claim.holders.iter().find(|h| h.vmid == vmid) {
                // A composed claim's holder value is the CPUs it takes out, not the file's.
                let line = match claim.op() {
                    Some(ComposeOp::Exclude) => format!(
                        "  {path}: {} (original {}; CPUs {} taken out)",
                        claim.effective().trim(),
                        claim.original.trim(),
                        h.value.trim()
                    ),
                    Some(ComposeOp::Include) => format!(
                        "  {path}: {} (original {}; CPUs {} added)",
                        claim.effective().trim(),
                        claim.original.trim(),
                        h.value.trim()
                    ),
                    Some(ComposeOp::Words) => format!(
                        "  {path}: {} on (was {})",
                        h.value,
                        if claim.original.split_whitespace().any(|w| w == h.value) {
                            "on"
                        } else {
                            "off"
                        }
                    ),
                    Some(ComposeOp::Dir) => format!("  {path}: cgroup created ({})", h.value),
                    Some(ComposeOp::Ban) => format!(
                        "  {path}: irqbalance bans {} (original {}; CPUs {} banned)",
                        claim.effective(),
                        claim.original,
                        h.value
                    ),
                    Some(ComposeOp::Add) => format!(
                        "  {path}: {} (original {}; {} pages reserved for this VM{})",
                        claim.effective(),
                        claim.original.trim(),
                        h.value,
                        if h.kept() { " at boot, kept" } else { "" }
                    ),
                    Some(ComposeOp::Rescan) => format!(
                        "  {path}: PCI {} removed, not rescanned yet (rollback rescans)",
                        h.value
                    ),
                    None => format!(
                        "  {path}: {} (original {})",
                        h.value.trim(),
                        claim.original.trim()
                    ),
                };
                let drift = drift(env, path, claim);
                held += 1;
                drifted += usize::from(!drift.is_empty());
                out.push(line + &drift);
            }
        }
        out.push(match drifted {
            0 => format!("  holds {held}: every one as pvetune set it"),
            n => format!(
                "  holds {held}: {n} changed outside pvetune (rollback still restores the originals)"
            ),
        });
    }
    if only.is_none() {
        out.push("node-wide claims:".into());
        for (path, claim) in &state.claims {
            let holders: Vec<String> = claim
                .holders
                .iter()
                .map(|h| match claim.op() {
                    Some(ComposeOp::Exclude) => {
                        format!("VM {} takes out {}", h.vmid, h.value.trim())
                    }
                    Some(ComposeOp::Include) => format!("VM {} adds {}", h.vmid, h.value.trim()),
                    Some(ComposeOp::Ban) => format!("VM {} bans {}", h.vmid, h.value),
                    Some(ComposeOp::Add) => format!("VM {} reserves {}", h.vmid, h.value),
                    Some(ComposeOp::Words | ComposeOp::Dir | ComposeOp::Rescan) | None => {
                        format!("VM {}={}", h.vmid, h.value.trim())
                    }
                })
                .collect();
            out.push(format!(
                "  {path}: {} -> {} ({}){}",
                claim.original.trim(),
                claim.effective().trim(),
                holders.join(", "),
                drift(env, path, claim)
            ));
        }
    }
    Ok(out)
}
