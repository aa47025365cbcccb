//! The PCI functions a VM passes through, as sysfs has them: resolved from its `hostpciN`
//! (an address without a function means every function of the device; `mapping=<id>` through
//! `/etc/pve/mapping/pci.cfg` for this node) or from the profile's list, each with its driver
//! and reset attributes. Read before planning, only for a profile with `pci-reset:`.
//!
//! Kernel files (read only): `/sys/bus/pci/devices/<dddd:bb:dd.f>/` (present or not),
//! `driver` (a link to the driver's directory: its name), `reset`, `reset_method`.

use crate::pci::PciId;
use crate::root::Root;
use crate::vmconfig::{PciSource, VmConfig};

pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// Proxmox's cluster-wide PCI resource mappings.
pub const PCI_MAPPING: &str = "/etc/pve/mapping/pci.cfg";
/// The node's name, as Proxmox names nodes (`PVE::INotify::nodename`: the host name up to
/// its first dot).
const HOSTNAME: &str = "/proc/sys/kernel/hostname";
/// A mapping file larger than this is not read (pmxcfs keeps files far smaller).
const MAX_MAPPING_BYTES: u64 = 1 << 20;

/// One PCI function to reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub id: PciId,
    /// Where it came from (`hostpci0`, `mapping gpu`, `profile`), for messages.
    pub from: String,
    pub present: bool,
    pub driver: Option<String>,
    /// Whether the kernel offers `reset` (some reset method works) and which methods
    /// (`reset_method`, kernels from 5.15; None where the file is absent).
    pub reset: bool,
    pub reset_method: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    pub functions: Vec<Function>,
    /// What could not be resolved (a mapping without an entry for this node, a device
    /// address with no function in sysfs), each a message naming it.
    pub unresolved: Vec<String>,
}

impl Devices {
    /// `listed`: the profile's devices; None: the VM's hostpciN.
    pub fn read(root: &Root, config: &VmConfig, listed: Option<&[PciId]>) -> Devices {
        let mut out = Devices::default();
        let add = |id: PciId, from: String, out: &mut Devices| {
            if !out.functions.iter().any(|f| f.id == id) {
                out.functions.push(function(root, id, from));
            }
        };
        match listed {
            Some(ids) => {
                for id in ids {
                    add(*id, "profile".into(), &mut out);
                }
            }
            None => {
                for (n, pci) in &config.hostpci {
                    let (from, ids) = match &pci.source {
                        PciSource::Host(ids) => (format!("hostpci{n}"), ids.clone()),
                        PciSource::Mapping(name) => match mapping(root, name) {
                            Ok(ids) => (format!("hostpci{n} (mapping {name})"), ids),
                            Err(why) => {
                                out.unresolved.push(format!("hostpci{n}: {why}"));
                                continue;
                            }
                        },
                    };
                    for id in ids {
                        if id.function.is_some() {
                            add(id, from.clone(), &mut out);
                            continue;
                        }
                        let all = functions_of(root, &id);
                        if all.is_empty() {
                            out.unresolved
                                .push(format!("{from}: no function of {id} in {PCI_DEVICES}"));
                        }
                        for f in all {
                            add(f, from.clone(), &mut out);
                        }
                    }
                }
            }
        }
        out
    }
}

fn function(root: &Root, id: PciId, from: String) -> Function {
    let dir = root.path(format!("{PCI_DEVICES}/{id}"));
    let reset_method = crate::attr::read(&dir.join("reset_method"))
        .ok()
        .map(|t| t.trim().to_string());
    Function {
        id,
        from,
        present: dir.exists(),
        driver: std::fs::read_link(dir.join("driver"))
            .ok()
            .and_then(|l| Some(l.file_name()?.to_string_lossy().into_owned())),
        reset: dir.join("reset").exists(),
        reset_method,
    }
}

/// Every function of the device `id` (its function None) that sysfs lists, in order.
fn functions_of(root: &Root, id: &PciId) -> Vec<PciId> {
    let mut found: Vec<PciId> = std::fs::read_dir(root.path(PCI_DEVICES))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| PciId::parse_sysfs(&e.file_name().to_string_lossy()).ok())
        .filter(|f| (f.domain, f.bus, f.device) == (id.domain, id.bus, id.device))
        .collect();
    found.sort_unstable();
    found
}

/// The devices a mapping names for this node: its `map` lines with `node=<this node>`,
/// each `path=` a `;`-separated list of addresses (without a function: every function).
fn mapping(root: &Root, name: &str) -> Result<Vec<PciId>, String> {
    use std::io::Read;
    let node = crate::attr::read(&root.path(HOSTNAME))
        .map_err(|e| format!("cannot read {HOSTNAME} (this node's name): {e}"))?;
    let node = node.trim().split('.').next().unwrap_or("").to_string();
    let mut text = String::new();
    std::fs::File::open(root.path(PCI_MAPPING))
        .and_then(|f| f.take(MAX_MAPPING_BYTES).read_to_string(&mut text))
        .map_err(|e| format!("mapping '{name}': cannot read {PCI_MAPPING}: {e}"))?;
    let mut section: Option<&str> = None;
    let mut ids = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            // `<id>` (or `pci: <id>`) opens a mapping's section.
            let header = line.trim();
            section = Some(header.strip_prefix("pci:").map_or(header, str::trim));
            continue;
        }
        let Some(("map", props)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        if section != Some(name) {
            continue;
        }
        let kv: Vec<(&str, &str)> = props
            .trim()
            .split(',')
            .filter_map(|p| p.split_once('='))
            .collect();
        if !kv.iter().any(|(k, v)| *k == "node" && *v == node) {
            continue;
        }
        let Some((_, path)) = kv.iter().find(|(k, _)| *k == "path") else {
            return Err(format!(
                "mapping '{name}': a map line for node {node} has no path="
            ));
        };
        for addr in path.split(';') {
            let id: PciId = addr
                .parse()
                .map_err(|e| format!("mapping '{name}' in {PCI_MAPPING}: {e}"))?;
            match id.function {
                Some(_) => ids.push(id),
                None => ids.extend(functions_of(root, &id)),
            }
        }
    }
    if ids.is_empty() {
        return Err(format!(
            "mapping '{name}' has no device for node '{node}' in {PCI_MAPPING}"
        ));
    }
    Ok(ids)
}
