//! `--json` output of `plan`, `status`, `check` and `doctor`: one JSON document on stdout,
//! pretty-printed, with `"version": 1`. The shapes are documented in docs/json.md and held by
//! snapshot tests (tests/json_output.rs): a field is only ever added, never renamed or
//! removed, within a version. Paths are host-absolute (as without `--root`).

use crate::doctor::Finding;
use crate::error::Error;
use crate::hook::{self, Env, process_alive};
use crate::host::Host;
use crate::plan::Phase;
use crate::report::{Row, claim_drift, pin_drift};
use crate::state::{ComposeOp, Store};
use serde_json::{Value, json};

/// The version of every shape in this file.
pub const VERSION: u32 = 1;

fn document(mut body: Value) -> String {
    body.as_object_mut()
        .expect("a JSON object")
        .insert("version".into(), json!(VERSION));
    serde_json::to_string_pretty(&body).expect("JSON values serialize")
}

/// `plan --json`.
pub fn plan<H: Host>(
    env: &Env,
    host: &H,
    vmid: u32,
    phases: &[Phase],
) -> Result<Vec<String>, Error> {
    let Some(crate::report::PlanRows { profile, phases }) =
        crate::report::plan_rows(env, host, vmid, phases)?
    else {
        return Ok(vec![document(
            json!({ "vmid": vmid, "profile": null, "phases": [] }),
        )]);
    };
    let phases: Vec<Value> = phases
        .iter()
        .map(|p| {
            let (mut steps, mut checks) = (Vec::new(), Vec::new());
            for row in &p.rows {
                match row {
                    Row::Change {
                        tunable,
                        kind,
                        target,
                        before,
                        after,
                        unchanged,
                    } => steps.push(json!({
                        "tunable": tunable, "kind": kind, "target": target,
                        "before": before, "after": after, "unchanged": unchanged,
                    })),
                    Row::Check { path, value, now } => {
                        checks.push(json!({ "path": path, "expect": value, "now": now }))
                    }
                }
            }
            let skipped: Vec<Value> = p
                .plan
                .skipped
                .iter()
                .map(|s| json!({ "tunable": s.tunable, "reason": s.reason }))
                .collect();
            json!({
                "phase": p.phase.as_str(), "steps": steps, "checks": checks,
                "skipped": skipped, "notes": p.plan.notes,
            })
        })
        .collect();
    let profile = profile.map(|p| env.root.host_path(&p).display().to_string());
    Ok(vec![document(
        json!({ "vmid": vmid, "profile": profile, "phases": phases }),
    )])
}

/// `check --json`: `valid` true, or false with the error (then exit 2, after printing).
pub fn check(
    env: &Env,
    vmid: u32,
    print: &dyn Fn(&[String]) -> Result<(), Error>,
) -> Result<Vec<String>, Error> {
    let profile = crate::profile::locate(&env.root, vmid, env.profile.as_deref())
        .map(|p| env.root.host_path(&p).display().to_string());
    match hook::check(env, vmid) {
        Ok(_) => Ok(vec![document(json!({
            "vmid": vmid, "profile": profile, "valid": profile.is_some(), "error": null,
        }))]),
        Err(e) => {
            let (line, column) = match &e {
                Error::Plan { source, .. } if source.line > 0 => (source.line, source.column),
                Error::Profile(
                    crate::profile::ProfileError::Syntax { line, column, .. }
                    | crate::profile::ProfileError::Invalid { line, column, .. },
                ) => (*line, *column),
                _ => (0, 0),
            };
            let error = json!({
                "message": e.to_string(), "exit": e.exit_code(),
                "line": (line > 0).then_some(line), "column": (line > 0).then_some(column),
            });
            print(&[document(json!({
                "vmid": vmid, "profile": profile, "valid": false, "error": error,
            }))])?;
            Err(e)
        }
    }
}

fn kind(op: Option<ComposeOp>) -> &'static str {
    match op {
        None => "value",
        Some(ComposeOp::Exclude) => "exclude",
        Some(ComposeOp::Include) => "include",
        Some(ComposeOp::Words) => "words",
        Some(ComposeOp::Dir) => "dir",
        Some(ComposeOp::Ban) => "ban",
        Some(ComposeOp::Add) => "add",
        Some(ComposeOp::Rescan) => "rescan",
    }
}

/// `status --json`: per VM what pvetune holds and whether it still holds (`drift`: the value
/// now when something changed it behind pvetune's back, else null); node-wide claims.
pub fn status(env: &Env, only: Option<u32>) -> Result<Vec<String>, Error> {
    let state = Store::new(&env.root).load()?;
    let drift = |path: &str, claim| match claim_drift(env, path, claim) {
        Ok(now) => json!({ "drift": now, "unreadable": null }),
        Err(e) => json!({ "drift": null, "unreadable": e }),
    };
    let mut vms = Vec::new();
    for vmid in state
        .held_vms()
        .into_iter()
        .filter(|v| only.is_none_or(|o| o == *v))
    {
        let rec = state.vms.get(&vmid);
        let alive = process_alive(env, rec);
        let status = match rec.and_then(|r| r.pid) {
            Some(_) if alive => "running",
            Some(_) => "gone",
            None => "starting",
        };
        let threads: Vec<Value> = rec
            .map(|r| r.pins.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|pin| {
                json!({
                    "tid": pin.tid, "label": pin.label, "cpus": pin.new.to_string(),
                    "was": pin.old.to_string(),
                    "drift": pin_drift(alive, pin).map(|c| c.to_string()),
                })
            })
            .collect();
        let mut claims = Vec::new();
        for (path, claim) in &state.claims {
            if let Some(h) = claim.holder(vmid) {
                let mut entry = json!({
                    "path": path, "kind": kind(claim.op()), "value": h.value.trim(),
                    "effective": claim.effective().trim(), "original": claim.original.trim(),
                });
                merge(&mut entry, drift(path, claim));
                claims.push(entry);
            }
        }
        let drifted = threads
            .iter()
            .chain(&claims)
            .filter(|e| !e["drift"].is_null())
            .count();
        vms.push(json!({
            "vmid": vmid, "status": status, "pid": rec.and_then(|r| r.pid),
            "cpus": rec.map(|r| r.cpus.to_string()), "phase": rec.map(|r| r.phase.clone()),
            "threads": threads, "claims": claims, "drifted": drifted,
        }));
    }
    let mut body = json!({ "vms": vms });
    if only.is_none() {
        let claims: Vec<Value> = state
            .claims
            .iter()
            .map(|(path, claim)| {
                let holders: Vec<Value> = claim
                    .holders
                    .iter()
                    .map(|h| json!({ "vmid": h.vmid, "value": h.value.trim() }))
                    .collect();
                let mut entry = json!({
                    "path": path, "kind": kind(claim.op()), "original": claim.original.trim(),
                    "effective": claim.effective().trim(), "holders": holders,
                });
                merge(&mut entry, drift(path, claim));
                entry
            })
            .collect();
        body["claims"] = json!(claims);
    }
    Ok(vec![document(body)])
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// `doctor --json`.
pub fn doctor(findings: &[Finding]) -> String {
    let errors = findings
        .iter()
        .filter(|f| f.severity == crate::doctor::Severity::Error)
        .count();
    document(json!({
        "findings": findings, "errors": errors, "warnings": findings.len() - errors,
    }))
}
