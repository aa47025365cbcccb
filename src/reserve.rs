//! `pvetune reserve`: hugepages reserved at boot, per node, for the VMs whose profile asks
//! (`hugepages: { boot: true }`), before memory fragments and before Proxmox starts guests
//! (`examples/pvetune-reserve.service` orders it before `pve-guests.service`).
//!
//! The kernel command line (`hugepages=N`) spreads pages evenly over every node, which wastes
//! them on nodes no VM is bound to. Here each VM's pages go to the nodes its `numaN:
//! hostnodes=` name, as qemu-server will look for them (`memory::need`), through the same
//! composed claim a pre-start reservation makes (`Action::Reserve`), held by that VM and
//! marked kept: the VM's starts find the pages free and add nothing, its stops and reconciles
//! leave them, `pvetune rollback <vmid>` gives them back. Running it again is a no-op for the
//! VMs already reserved. A VM whose profile or config cannot be read is reported and skipped;
//! the others are still reserved.

use crate::error::Error;
use crate::exec::Executor;
use crate::hook::Env;
use crate::host::Host;
use crate::memory::{self, MemoryFacts, size_name};
use crate::plan::{Action, Step};
use crate::profile;
use crate::state::Store;
use crate::vmconfig::{CONFIG_DIR, VmConfig};

/// The VMIDs with a config on this node, ascending (`/etc/pve/qemu-server` is this node's).
fn local_vms(env: &Env) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(env.root.base().join(CONFIG_DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".conf")?;
            let canonical = id.bytes().all(|b| b.is_ascii_digit()) && !id.starts_with('0');
            canonical.then(|| id.parse().ok())?
        })
        .filter(|id| (100..=999_999_999).contains(id))
        .collect();
    ids.sort_unstable();
    ids
}

pub fn reserve<H: Host>(env: &Env, host: &H) -> Result<Vec<String>, Error> {
    let store = Store::new(&env.root);
    let _lock = store.lock()?;
    let mut state = store.load()?;
    let facts = MemoryFacts::read(&env.root, true, false);
    let mut out = Vec::new();
    let mut failed = 0;
    for vmid in local_vms(env) {
        let Some(path) = profile::locate(&env.root, vmid, None) else {
            continue;
        };
        let prepared = profile::load(&path).map_err(Error::from).and_then(|p| {
            let config = VmConfig::read(env.root.base(), vmid)?;
            Ok((p, config))
        });
        let (profile, config) = match prepared {
            Ok(found) => found,
            Err(e) => {
                out.push(format!("VM {vmid}: skipped: {e}"));
                failed += 1;
                continue;
            }
        };
        if !profile.hugepages.as_ref().is_some_and(|h| h.boot) {
            continue;
        }
        let needs = match memory::need(&config, &facts.sizes) {
            Ok(needs) => needs,
            Err(why) => {
                out.push(format!("VM {vmid}: skipped: {why}"));
                failed += 1;
                continue;
            }
        };
        if !config.keephugepages {
            out.push(format!(
                "warning: VM {vmid}: no 'keephugepages: 1' in its config: after its start \
                 qemu-server shrinks the pools to the boot default, freeing every unused page, \
                 other VMs' reservations included"
            ));
        }
        let steps: Vec<Step> = needs
            .iter()
            .map(|n| Step {
                tunable: "reserve",
                action: Action::Reserve {
                    node: n.node,
                    size_kb: n.size_kb,
                    pages: n.pages,
                    keep: true,
                },
            })
            .collect();
        let mut exec = Executor::new(&env.root, host, &store, std::mem::take(&mut state), vmid);
        let applied = exec.apply(steps);
        state = exec.state;
        match applied {
            Ok(_) => {
                for n in &needs {
                    out.push(format!(
                        "VM {vmid}: node {}: {} x {} reserved at boot (pool now {})",
                        n.node,
                        n.pages,
                        size_name(n.size_kb),
                        std::fs::read_to_string(env.root.path(n.file("nr_hugepages")))
                            .unwrap_or_default()
                            .trim()
                    ));
                }
            }
            Err(e) => {
                out.push(format!("VM {vmid}: not reserved: {e}"));
                failed += 1;
            }
        }
    }
    if let Err(e) = store.compact(&mut state) {
        log::warn!("ledger journal not compacted ({e}); it stays valid and the next run folds it");
    }
    if out.is_empty() {
        out.push("pvetune reserve: no profile on this node asks for hugepages at boot".into());
    }
    if failed > 0 {
        return Err(Error::Usage(format!(
            "{}\npvetune reserve: {failed} VM(s) not reserved",
            out.join("\n")
        )));
    }
    Ok(out)
}
