//! `pvetune doctor [<vmid>]`: what is wrong with a VM's setup before it hurts, checked against
//! the VM config, the profile and the host, each finding with what to do. Reads only.
//!
//! A finding is an `error` when a start would fail because of it (qemu-server or pvetune
//! refuses), a `warning` when the VM starts but does not get what the profile is for. The
//! command exits 2 when there is an error. Without a VMID it checks every VM that has a
//! profile or has pvetune as its hookscript.

mod checks;
mod placement;

use crate::error::Error;
use crate::hook::Env;
use crate::root::paths;
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// One VM (default: every VM with a profile or with pvetune as its hookscript)
    pub vmid: Option<String>,
    /// Machine-readable output (docs/json.md)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One thing found, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub vmid: u32,
    pub severity: Severity,
    /// A stable name (docs/json.md lists them).
    pub code: &'static str,
    pub message: String,
    pub fix: String,
}

/// Every finding of one VM, or of every VM the node knows, in VMID order.
pub fn diagnose(env: &Env, only: Option<u32>) -> Vec<Finding> {
    let vmids = match only {
        Some(vmid) => vec![vmid],
        None => known_vms(env),
    };
    let node = checks::Node::read(&env.root);
    vmids
        .into_iter()
        .flat_map(|vmid| checks::vm(env, &node, vmid))
        .collect()
}

/// `pvetune doctor`: the findings as text (two lines each) or JSON; with an error among them
/// the output is printed here and the command fails (exit 2).
pub fn command(
    env: &Env,
    args: &DoctorArgs,
    print: &dyn Fn(&[String]) -> Result<(), Error>,
) -> Result<Vec<String>, Error> {
    let only = args
        .vmid
        .as_deref()
        .map(crate::cli::parse_vmid)
        .transpose()?;
    let findings = diagnose(env, only);
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let lines = if args.json {
        vec![crate::json::doctor(&findings)]
    } else {
        render(&findings, only)
    };
    if errors > 0 {
        print(&lines)?;
        return Err(Error::Findings { count: errors });
    }
    Ok(lines)
}

fn render(findings: &[Finding], only: Option<u32>) -> Vec<String> {
    let mut out = Vec::new();
    for f in findings {
        let severity = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        out.push(format!(
            "VM {}: {severity}: {} [{}]",
            f.vmid, f.message, f.code
        ));
        out.push(format!("  fix: {}", f.fix));
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let scope = only.map_or_else(|| "this node".to_string(), |v| format!("VM {v}"));
    out.push(match findings.len() {
        0 => format!("doctor: nothing found for {scope}"),
        n => format!(
            "doctor: {errors} error(s), {} warning(s) for {scope}",
            n - errors
        ),
    });
    out
}

/// VMs with a profile (either directory) or with pvetune's snippet as their hookscript.
fn known_vms(env: &Env) -> Vec<u32> {
    let mut vmids = BTreeSet::new();
    for dir in [paths::PVE_PROFILE_DIR, paths::NODE_PROFILE_DIR] {
        for name in file_names(&env.root.path(dir)) {
            if let Some(id) = name.strip_suffix(".yaml") {
                vmids.extend(crate::cli::parse_vmid(id).ok());
            }
        }
    }
    let configs = env.root.path(format!("/{}", crate::vmconfig::CONFIG_DIR));
    for name in file_names(&configs) {
        let Some(vmid) = name
            .strip_suffix(".conf")
            .and_then(|id| crate::cli::parse_vmid(id).ok())
        else {
            continue;
        };
        if crate::vmconfig::VmConfig::read(env.root.base(), vmid)
            .is_ok_and(|c| c.hookscript.as_deref().is_some_and(checks::is_pvetune_hook))
        {
            vmids.insert(vmid);
        }
    }
    vmids.into_iter().collect()
}

fn file_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}
