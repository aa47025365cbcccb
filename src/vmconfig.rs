//! `VmConfig`: the parts of a Proxmox VM config (`/etc/pve/qemu-server/<vmid>.conf`) that
//! pvetune needs to place a VM's threads and memory.
//!
//! The grammar follows qemu-server 9.2 (`parse_vm_config` and the option formats in
//! `$confdesc`), with two deliberate differences: only the main section is read (snapshots and
//! `[PENDING]` describe configs that are not running), and keys pvetune does not read are
//! accepted silently, because a hookscript that refuses a key added by a newer Proxmox release
//! would block every VM start on that node. A key pvetune does read must hold a valid value:
//! guessing a default for a mistyped `affinity` would pin the VM somewhere the user never asked.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::cpuset::CpuSet;
use crate::excerpt::excerpt;
pub use crate::pci::PciId;

mod values;
use values::{
    boolean, host_pci, indexed, memory, numa_spec, positive, pve_cpuset, smp_option,
    split_key_value, uint,
};

/// Where qemu-server keeps VM configs, relative to the host root.
pub const CONFIG_DIR: &str = "etc/pve/qemu-server";

/// qemu-server's `$MAX_NUMA`: keys `numa0`..`numa7`.
const MAX_NUMA: u8 = 8;
/// qemu-server's `$MAX_HOSTPCI_DEVICES`: keys `hostpci0`..`hostpci15`.
const MAX_HOSTPCI: u8 = 16;
/// The largest VM config pvetune reads. pmxcfs keeps files far smaller; a bigger file is
/// refused without being read whole, so memory stays bounded.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// qemu-server's minimum for `memory`.
const MIN_MEMORY_MIB: u64 = 16;

/// Why a VM config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum VmConfigError {
    #[error("VM config {path} does not exist: is the VM defined on this cluster?")]
    NotFound { path: PathBuf },
    #[error("cannot read VM config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM config {path} is larger than {} MiB: not a VM config", MAX_CONFIG_BYTES >> 20)]
    TooLarge { path: PathBuf },
    #[error("{}line {line}: invalid {key} '{value}': expected {expected}", at(.path))]
    Invalid {
        path: Option<PathBuf>,
        line: usize,
        key: String,
        value: String,
        expected: String,
    },
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

/// The main section of a VM config, reduced to what pvetune acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: Option<String>,
    /// Cores per socket.
    pub cores: u32,
    pub sockets: u32,
    /// vCPUs plugged at start; the maximum is `cores * sockets`.
    pub vcpus: Option<u32>,
    /// Threads per core from a `-smp ...,threads=T` in `args` (Proxmox has no key for SMT).
    pub smp_threads: Option<u32>,
    /// Boot vCPUs from a `-smp N,...` (or `cpus=N`) in `args`: QEMU uses the last `-smp`.
    pub smp_cpus: Option<u32>,
    pub memory_mib: u64,
    pub balloon: Option<u64>,
    pub numa: bool,
    pub numa_nodes: BTreeMap<u8, NumaSpec>,
    pub hugepages: Option<HugepageSize>,
    pub keephugepages: bool,
    /// `allow-ksm:` (Proxmox VE 9.1 and later; `0` starts QEMU with `mem-merge=off`).
    pub allow_ksm: Option<bool>,
    /// `memory` in `hotplug:` (qemu-server then backs memory with DIMMs, and allocates
    /// hugepages per DIMM).
    pub hotplug_memory: bool,
    pub affinity: Option<CpuSet>,
    pub hostpci: BTreeMap<u8, HostPci>,
    pub lock: Option<String>,
    pub cpu: Option<String>,
    pub args: Option<String>,
    pub hookscript: Option<String>,
}

impl Default for VmConfig {
    /// The values qemu-server assumes for an empty config.
    fn default() -> Self {
        VmConfig {
            name: None,
            cores: 1,
            sockets: 1,
            vcpus: None,
            smp_threads: None,
            smp_cpus: None,
            memory_mib: 512,
            balloon: None,
            numa: false,
            numa_nodes: BTreeMap::new(),
            hugepages: None,
            keephugepages: false,
            allow_ksm: None,
            hotplug_memory: false,
            affinity: None,
            hostpci: BTreeMap::new(),
            lock: None,
            cpu: None,
            args: None,
            hookscript: None,
        }
    }
}

/// One guest NUMA node (`numaN:`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NumaSpec {
    /// Guest vCPU ids, ascending, without duplicates.
    pub cpus: Vec<u32>,
    /// Host NUMA node ids, ascending, without duplicates.
    pub hostnodes: Option<Vec<u32>>,
    pub memory_mib: Option<u64>,
    pub policy: Option<NumaPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumaPolicy {
    Preferred,
    Bind,
    Interleave,
}

/// `hugepages:` (`any` lets qemu-server choose 1 GiB pages when the host has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugepageSize {
    Any,
    Mib2,
    Gib1,
}

/// One passed-through PCI device (`hostpciN:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPci {
    pub source: PciSource,
    pub pcie: bool,
    pub x_vga: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PciSource {
    /// `host=` ids (several for one multi-device passthrough).
    Host(Vec<PciId>),
    /// A cluster resource mapping in `/etc/pve/mapping/pci.cfg`, resolved per node.
    Mapping(String),
}

impl VmConfig {
    /// Reads `<root>/etc/pve/qemu-server/<vmid>.conf`.
    pub fn read(root: &Path, vmid: u32) -> Result<VmConfig, VmConfigError> {
        let path = root.join(CONFIG_DIR).join(format!("{vmid}.conf"));
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmConfigError::NotFound { path });
            }
            Err(source) => return Err(VmConfigError::Read { path, source }),
        };
        let mut bytes = Vec::new();
        if let Err(source) = file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes) {
            return Err(VmConfigError::Read { path, source });
        }
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(VmConfigError::TooLarge { path });
        }
        // pmxcfs stores bytes; a stray non-UTF-8 byte in a key we skip must not block a start.
        let text = String::from_utf8_lossy(&bytes);
        VmConfig::parse(&text).map_err(|e| match e {
            VmConfigError::Invalid {
                line,
                key,
                value,
                expected,
                ..
            } => VmConfigError::Invalid {
                path: Some(path),
                line,
                key,
                value,
                expected,
            },
            other => other,
        })
    }

    /// Parses the main section of a config: everything before the first `[section]` line.
    pub fn parse(text: &str) -> Result<VmConfig, VmConfigError> {
        let mut config = VmConfig::default();
        for (index, raw) in text.split('\n').enumerate() {
            let line = index + 1;
            // A description line: `#` only at column 0, as in qemu-server.
            if raw.starts_with('#') || raw.trim().is_empty() {
                continue;
            }
            if raw.starts_with('[') {
                break;
            }
            let Some((key, value)) = split_key_value(raw) else {
                // qemu-server drops such a line with a warning (outside strict mode) and starts
                // the VM without it; doing the same keeps pvetune's view equal to the VM's.
                log::warn!(
                    "VM config line {line}: not a 'key: value' line, ignored: {:?}",
                    excerpt(raw)
                );
                continue;
            };
            config
                .apply(key, value)
                .map_err(|expected| VmConfigError::Invalid {
                    path: None,
                    line,
                    key: excerpt(key),
                    // A bounded quote: a 10 MB value must not become a 10 MB message.
                    value: excerpt(value),
                    expected,
                })?;
        }
        Ok(config)
    }

    /// The number of vCPUs QEMU starts with: an `-smp` in `args` wins (qemu-server appends
    /// `args` after its own `-smp`), then `vcpus`, then cores x sockets.
    pub fn vcpu_count(&self) -> u32 {
        self.smp_cpus
            .or(self.vcpus)
            .unwrap_or_else(|| self.cores.saturating_mul(self.sockets))
    }

    /// Guest SMT width: 1 unless `args` carries `-smp ...,threads=T`.
    pub fn threads_per_core(&self) -> u32 {
        self.smp_threads.unwrap_or(1)
    }

    /// Stores one key; the error is the "expected ..." text for the user.
    fn apply(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "name" => self.name = Some(value.to_string()),
            "cores" => self.cores = positive(value)?,
            "sockets" => self.sockets = positive(value)?,
            "vcpus" => self.vcpus = Some(positive(value)?),
            "memory" => self.memory_mib = memory(value)?,
            "balloon" => self.balloon = Some(uint(value, "an integer number of MiB (0 disables)")?),
            "numa" => self.numa = boolean(value)?,
            "hugepages" => {
                self.hugepages = Some(match value {
                    "any" => HugepageSize::Any,
                    "2" => HugepageSize::Mib2,
                    "1024" => HugepageSize::Gib1,
                    _ => return Err("one of any, 2, 1024".into()),
                })
            }
            "keephugepages" => self.keephugepages = boolean(value)?,
            "allow-ksm" => self.allow_ksm = Some(boolean(value)?),
            // `1` is qemu-server's default set (network,disk,usb), `0` none.
            "hotplug" => self.hotplug_memory = value.split(',').any(|f| f == "memory"),
            "affinity" => self.affinity = Some(pve_cpuset(value)?),
            "lock" => self.lock = Some(value.to_string()),
            "cpu" => self.cpu = Some(value.to_string()),
            "hookscript" => self.hookscript = Some(value.to_string()),
            "args" => {
                (self.smp_cpus, self.smp_threads) = smp_option(value)?;
                self.args = Some(value.to_string());
            }
            _ => {
                if let Some(n) = indexed(key, "numa", MAX_NUMA) {
                    self.numa_nodes.insert(n, numa_spec(value)?);
                } else if let Some(n) = indexed(key, "hostpci", MAX_HOSTPCI) {
                    self.hostpci.insert(n, host_pci(value)?);
                }
                // Every other key is qemu-server's business, not pvetune's.
            }
        }
        Ok(())
    }
}
