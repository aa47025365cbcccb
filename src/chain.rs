//! Hookscript chaining: a VM that had a hookscript of its own (for a GPU, a USB device)
//! before `pvetune enable --chain` keeps it. pvetune records it in
//! `/etc/pve/pvetune/<vmid>.chain` (one line, its volume `<storage>:snippets/<file>`; on pmxcfs,
//! so every node knows it) and runs it after its own work in every phase, with the same
//! arguments, as an argv (never a shell).
//!
//! Exit codes: in pre-start, a chained script's non-zero exit is passed on (qemu-server then
//! aborts the start), after pvetune has undone its own pre-start, since no post-stop follows a
//! start that failed there. When pvetune's own pre-start fails the start is aborted anyway and
//! the chained script is not run (it would prepare a start that never comes). In the other
//! phases the chained script always runs (a post-stop must release its devices even when
//! pvetune's rollback was incomplete); pvetune's own failure decides the exit code, else the
//! chained script's.

use crate::enable::storage;
use crate::error::Error;
use crate::hook::{self, Env};
use crate::host::Host;
use crate::plan::Phase;
use std::path::PathBuf;
use std::process::Command;

/// Host path of the chain record of a VM.
pub fn chain_file(vmid: u32) -> String {
    format!("{}/{vmid}.chain", crate::root::paths::PVE_PROFILE_DIR)
}

/// The chained hookscript's volume, or `None` when the VM has none. The record names a
/// program that runs as root, so it is trusted as a profile is (owner and mode chain).
pub fn read(env: &Env, vmid: u32) -> Result<Option<String>, Error> {
    let path = env.root.path(chain_file(vmid));
    if !storage::exists(&path) {
        return Ok(None);
    }
    let real = crate::profile::trusted(&path)?;
    let text = std::fs::read_to_string(&real)
        .map_err(|e| Error::Usage(format!("{}: cannot read: {e}", path.display())))?;
    let volid = text.trim();
    if storage::split_volume(volid).is_none() {
        return Err(Error::Usage(format!(
            "{}:1:1: expected one '<storage>:snippets/<file>' volume, found {:?}",
            path.display(),
            crate::excerpt::excerpt(volid)
        )));
    }
    Ok(Some(volid.to_string()))
}

/// The hook as qemu-server calls it, with the chained hookscript if there is one. `print`
/// writes pvetune's own line before the chained script writes its own.
pub fn hook<H: Host>(
    env: &Env,
    host: &H,
    vmid: u32,
    phase: Phase,
    print: &dyn Fn(&[String]) -> Result<(), Error>,
) -> Result<Vec<String>, Error> {
    // A damaged record stops a start before any change (bad input changes nothing); in the
    // other phases pvetune's own work (post-stop's rollback) is done first.
    let chained = read(env, vmid);
    if phase == Phase::PreStart
        && let Err(e) = chained
    {
        return Err(e);
    }
    let own = hook::run_hook(env, host, vmid, phase);
    let volid = match chained {
        Ok(Some(volid)) => volid,
        Ok(None) => return own.map(|line| vec![line]),
        Err(e) => {
            if let Ok(line) = &own {
                print(std::slice::from_ref(line))?;
            }
            own?;
            return Err(e);
        }
    };
    if phase == Phase::PreStart && own.is_err() {
        return own.map(|line| vec![line]);
    }
    if let Ok(line) = &own {
        print(std::slice::from_ref(line))?;
    }
    let ran = run(env, vmid, phase, &volid);
    own?;
    if matches!(ran, Ok(0)) {
        return Ok(Vec::new());
    }
    if phase == Phase::PreStart {
        // The start is aborted: nothing of pvetune's may stay held for it.
        match hook::undo_start(env, host, vmid) {
            Ok(line) => print(&[line])?,
            Err(e) => log::warn!("VM {vmid}: undoing pre-start after the chained script: {e}"),
        }
    }
    Err(Error::Chained {
        volid,
        phase,
        code: ran?,
    })
}

/// Runs the chained script with `<vmid> <phase>`; its exit code (1 when a signal ended it).
fn run(env: &Env, vmid: u32, phase: Phase, volid: &str) -> Result<i32, Error> {
    let fail = |e: String| Error::Admin(format!("chained hookscript {volid}: {e}"));
    let storages = storage::read(&env.root).map_err(fail)?;
    let path: PathBuf = env
        .root
        .path(storage::volume_path(&storages, volid).map_err(fail)?);
    let status = Command::new(&path)
        .arg(vmid.to_string())
        .arg(phase.as_str())
        .status()
        .map_err(|e| fail(format!("{}: cannot run: {e}", path.display())))?;
    Ok(status.code().unwrap_or(1))
}
