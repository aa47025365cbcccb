//! `pvetune enable <vmid>` and `pvetune disable <vmid>`: pvetune as a VM's hookscript.
//!
//! `enable` validates the profile (as `check`), links `<storage>/snippets/pvetune` to the
//! installed binary on a storage with the `snippets` content type, and runs
//! `qm set <vmid> --hookscript <storage>:snippets/pvetune`. A hookscript the VM already has is
//! refused, or kept with `--chain` (see `chain.rs`). `disable` rolls back what pvetune holds
//! for a stopped VM, then gives the VM its chained hookscript back, or none. `qm` runs as an
//! argv (`/usr/sbin/qm`; `PVETUNE_QM` names a stand-in for tests), never through a shell, and
//! never from inside a hook (qemu-server holds the VM's config lock there).

pub mod storage;

use crate::chain;
use crate::error::Error;
use crate::hook::{self, Env};
use crate::host::Host;
use crate::vmconfig::VmConfig;
use std::path::Path;
use storage::Storage;

/// Where the Debian package installs pvetune; the snippet links here.
pub const BINARY: &str = "/usr/bin/pvetune";
/// The snippet's file name: the hookscript volume is `<storage>:snippets/pvetune`.
pub const SNIPPET: &str = "pvetune";
const QM: &str = "/usr/sbin/qm";

#[derive(clap::Args, Debug)]
pub struct EnableArgs {
    pub vmid: String,
    /// Storage with the `snippets` content type for the hookscript (default: local, else the
    /// first storage with snippets)
    #[arg(long)]
    pub storage: Option<String>,
    /// Keep the VM's current hookscript: pvetune runs it after its own work in every phase
    #[arg(long)]
    pub chain: bool,
    /// Print the commands and changes without making them
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug)]
pub struct DisableArgs {
    pub vmid: String,
    /// Print the commands and changes without making them
    #[arg(long)]
    pub dry_run: bool,
}

/// Whether a hookscript volume is pvetune's snippet (on any storage).
fn is_ours(volid: &str) -> bool {
    storage::split_volume(volid).is_some_and(|(_, file)| file == SNIPPET)
}

/// `pvetune enable`.
pub fn enable(env: &Env, args: &EnableArgs) -> Result<Vec<String>, Error> {
    let vmid = crate::cli::parse_vmid(&args.vmid)?;
    let config = VmConfig::read(env.root.base(), vmid)?;
    let Some(profile) = crate::profile::locate(&env.root, vmid, env.profile.as_deref()) else {
        return Err(Error::Admin(format!(
            "VM {vmid} has no profile: write {}/{vmid}.yaml first (see docs/profile.md)",
            crate::root::paths::PVE_PROFILE_DIR
        )));
    };
    let mut out = vec![hook::check(env, vmid)?];
    let storages = storage::read(&env.root).map_err(Error::Admin)?;
    let store = pick_storage(&storages, args.storage.as_deref())?;
    let volid = format!("{}:snippets/{SNIPPET}", store.id);
    let would = if args.dry_run { "would " } else { "" };

    if let Some(current) = config.hookscript.as_deref()
        && current != volid
        && !is_ours(current)
        && !args.chain
    {
        return Err(Error::Admin(format!(
            "VM {vmid} has a hookscript already ({current}): pass --chain to keep it \
             (pvetune runs it after its own work in every phase, with the same arguments), \
             or remove it with `qm set {vmid} --delete hookscript`"
        )));
    }

    // The snippet: a link to the installed binary.
    let host_snippet = store
        .snippet_path(SNIPPET)
        .expect("has_snippets implies a path");
    let snippet = env.root.path(&host_snippet);
    match std::fs::read_link(&snippet) {
        Ok(target) if target == Path::new(BINARY) => {
            out.push(format!("{host_snippet} -> {BINARY}: in place"))
        }
        _ if storage::exists(&snippet) => {
            return Err(Error::Admin(format!(
                "{host_snippet} exists and is not a link to {BINARY} (a copy of an older \
                 pvetune?): remove it, then run `pvetune enable {vmid}` again"
            )));
        }
        _ => {
            if !storage::exists(&env.root.path(BINARY)) {
                return Err(Error::Admin(format!(
                    "{BINARY} does not exist: install the pvetune package on this node first"
                )));
            }
            if !args.dry_run {
                let made = snippet
                    .parent()
                    .map(std::fs::create_dir_all)
                    .transpose()
                    .and_then(|_| std::os::unix::fs::symlink(BINARY, &snippet));
                made.map_err(|e| Error::Admin(format!("{host_snippet}: cannot link: {e}")))?;
            }
            out.push(format!("{would}link {host_snippet} -> {BINARY}"));
        }
    }

    // The hookscript itself.
    let mut chained_now = None;
    match config.hookscript.as_deref() {
        Some(current) if current == volid => {
            out.push(format!("VM {vmid}: hookscript is {volid} already"));
        }
        current => {
            if let Some(other) = current.filter(|c| !is_ours(c)) {
                let record = chain::chain_file(vmid);
                if !args.dry_run {
                    write_chain(env, &record, other)?;
                    chained_now = Some(record.clone());
                }
                out.push(format!(
                    "{would}record {other} in {record}: run after pvetune"
                ));
            }
            let argv = ["set", &vmid.to_string(), "--hookscript", &volid].map(String::from);
            if let Err(e) = qm(args.dry_run, &argv, &mut out) {
                if let Some(record) = chained_now {
                    let _ = std::fs::remove_file(env.root.path(record));
                }
                return Err(e);
            }
        }
    }
    out.extend(other_nodes(env, vmid, store, &profile));
    Ok(out)
}

/// `pvetune disable`.
pub fn disable<H: Host>(env: &Env, host: &H, args: &DisableArgs) -> Result<Vec<String>, Error> {
    let vmid = crate::cli::parse_vmid(&args.vmid)?;
    let config = VmConfig::read(env.root.base(), vmid)?;
    let mut out = Vec::new();
    let current = config.hookscript.as_deref();
    if !current.is_some_and(is_ours) {
        out.push(format!(
            "VM {vmid}: pvetune is not its hookscript ({}): nothing to do",
            current.unwrap_or("none")
        ));
        return Ok(out);
    }
    let would = if args.dry_run { "would " } else { "" };
    let running = crate::vm::read_pid(env.root.base(), vmid)
        .map_err(|source| Error::Vm { vmid, source })?
        .is_some();
    let held = crate::state::Store::new(&env.root)
        .load()?
        .held_vms()
        .contains(&vmid);
    if running {
        out.push(format!(
            "VM {vmid} runs: what pvetune holds for it stays until it stops, then the next \
             hook of any VM on this node (or `pvetune rollback {vmid}`) undoes it"
        ));
    } else if held && args.dry_run {
        out.push(format!("would roll back what pvetune holds for VM {vmid}"));
    } else if held {
        out.push(hook::rollback_command(env, host, vmid)?);
    }
    let record = chain::chain_file(vmid);
    let chained = chain::read(env, vmid)?;
    let id = vmid.to_string();
    match &chained {
        Some(volid) => {
            qm(
                args.dry_run,
                &["set", &id, "--hookscript", volid].map(String::from),
                &mut out,
            )?;
            if !args.dry_run {
                std::fs::remove_file(env.root.path(&record))
                    .map_err(|e| Error::Admin(format!("{record}: cannot remove: {e}")))?;
            }
            out.push(format!(
                "{would}remove {record} ({volid} is the hookscript again)"
            ));
        }
        None => qm(
            args.dry_run,
            &["set", &id, "--delete", "hookscript"].map(String::from),
            &mut out,
        )?,
    }
    Ok(out)
}

fn pick_storage<'a>(storages: &'a [Storage], wanted: Option<&str>) -> Result<&'a Storage, Error> {
    let fix = |id: &str| {
        format!(
            "give it the content type with `pvesm set {id} --content <its content>,snippets` \
             (Datacenter > Storage > {id} > Content)"
        )
    };
    if let Some(id) = wanted {
        let store = storages.iter().find(|s| s.id == id).ok_or_else(|| {
            Error::Admin(format!(
                "storage '{id}' is not a file storage in {}",
                storage::STORAGE_CFG
            ))
        })?;
        if !store.has_snippets() {
            return Err(Error::Admin(format!(
                "storage '{id}' has no 'snippets' content type (or is disabled): {}",
                fix(id)
            )));
        }
        return Ok(store);
    }
    storages
        .iter()
        .filter(|s| s.has_snippets())
        .min_by_key(|s| (s.id != storage::DEFAULT_STORAGE, s.line))
        .ok_or_else(|| {
            Error::Admin(format!(
                "no storage in {} has the 'snippets' content type: {}, or name another one \
                 with --storage",
                storage::STORAGE_CFG,
                fix(storage::DEFAULT_STORAGE)
            ))
        })
}

/// What the other nodes of the cluster need for the VM to start there.
fn other_nodes(env: &Env, vmid: u32, store: &Storage, profile: &Path) -> Vec<String> {
    let nodes = storage::cluster_nodes(&env.root);
    let list = if nodes.is_empty() {
        "every node".to_string()
    } else {
        format!("every node ({})", nodes.join(", "))
    };
    let mut out = vec![if store.is_shared() {
        format!(
            "other nodes: storage '{}' is shared, so they see the snippet; install the pvetune \
             package on {list} the VM may run on (the link points at {BINARY})",
            store.id
        )
    } else {
        format!(
            "other nodes: storage '{}' is local to each node: the snippet must exist on {list} \
             the VM may run on, or starts and migrations fail there; install the pvetune \
             package on each and run `pvetune enable {vmid}` there (qm set is then a no-op)",
            store.id
        )
    }];
    if !store.nodes.is_empty() {
        out.push(format!(
            "storage '{}' is restricted to nodes {}: the VM cannot start elsewhere",
            store.id,
            store.nodes.join(", ")
        ));
    }
    let node_local = env.root.path(crate::root::paths::NODE_PROFILE_DIR);
    if profile.starts_with(&node_local) {
        out.push(format!(
            "the profile {} is node-local: copy it to {}/{vmid}.yaml so every node has it",
            env.root.host_path(profile).display(),
            crate::root::paths::PVE_PROFILE_DIR
        ));
    }
    out
}

fn write_chain(env: &Env, record: &str, volid: &str) -> Result<(), Error> {
    let path = env.root.path(record);
    let fail = |e: std::io::Error| Error::Admin(format!("{record}: cannot write: {e}"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(fail)?;
    writeln!(file, "{volid}")
        .and_then(|_| file.sync_all())
        .map_err(fail)
}

/// Runs `qm <argv>` (or says it would); its stderr is in the error when it fails.
fn qm(dry_run: bool, argv: &[String], out: &mut Vec<String>) -> Result<(), Error> {
    let program = std::env::var_os("PVETUNE_QM").unwrap_or_else(|| QM.into());
    let shown = format!("qm {}", argv.join(" "));
    if dry_run {
        out.push(format!("would run: {shown}"));
        return Ok(());
    }
    let output = std::process::Command::new(&program)
        .args(argv)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            Error::Admin(format!(
                "{shown}: cannot run {}: {e}",
                Path::new(&program).display()
            ))
        })?;
    if !output.status.success() {
        return Err(Error::Admin(format!(
            "{shown} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    out.push(format!("ran: {shown}"));
    Ok(())
}
