//! `VmConfig`: the parts of a Proxmox VM config (`/etc/pve/qemu-server/<vmid>.conf`) that
//! pvetune needs to place a VM's threads and memory.
//!
//! The grammar follows qemu-server 9.2 (`parse_vm_config` and the option formats in
//! `$confdesc`), with two deliberate differences: only the main section is read (snapshots and
//! `[PENDING]` describe configs that are not running), and keys pvetune does not read are
//! accepted silently, because a hookscript that refuses a key added by a newer Proxmox release
//! would block every VM start on that node. A key pvetune does read must hold a valid value:
//! guessing a default for a mistyped `affinity` would pin the VM somewhere the user never asked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::cpuset::{CpuSet, MAX_CPUS};

/// Where qemu-server keeps VM configs, relative to the host root.
pub const CONFIG_DIR: &str = "etc/pve/qemu-server";

/// qemu-server's `$MAX_NUMA`: keys `numa0`..`numa7`.
const MAX_NUMA: u8 = 8;
/// qemu-server's `$MAX_HOSTPCI_DEVICES`: keys `hostpci0`..`hostpci15`.
const MAX_HOSTPCI: u8 = 16;
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
    #[error("{}line {line}: invalid {key} '{value}': expected {expected}", at(.path))]
    Invalid {
        path: Option<PathBuf>,
        line: usize,
        key: String,
        value: String,
        expected: String,
    },
    /// A PCI address outside a config (a sysfs name, a profile entry).
    #[error("invalid PCI address '{value}': expected {expected}")]
    PciId {
        value: String,
        expected: &'static str,
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

/// A PCI address; `function: None` means every function of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciId {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: Option<u8>,
}

const PCI_CONFIG_FORM: &str =
    "a PCI address [dddd:]bb:dd[.f] in lowercase hex, e.g. 0b:00.0 or 0000:0b:00";
const PCI_SYSFS_FORM: &str = "a sysfs PCI name dddd:bb:dd.f in lowercase hex, e.g. 0000:0b:00.0";

impl PciId {
    /// Parses the strict `dddd:bb:dd.f` form the kernel uses for `/sys/bus/pci/devices/*`.
    pub fn parse_sysfs(s: &str) -> Result<PciId, VmConfigError> {
        let bad = || VmConfigError::PciId {
            value: s.to_string(),
            expected: PCI_SYSFS_FORM,
        };
        let parts: Vec<&str> = s.split([':', '.']).collect();
        let [domain, bus, device, function] = parts[..] else {
            return Err(bad());
        };
        if s.as_bytes().get(4) != Some(&b':') || s.as_bytes().get(10) != Some(&b'.') {
            return Err(bad());
        }
        let domain = hex(domain, 4).ok_or_else(bad)?;
        let bus = hex(bus, 2).ok_or_else(bad)?;
        let device = hex(device, 2).ok_or_else(bad)?;
        let function = hex(function, 1).ok_or_else(bad)?;
        // Real PCI has 32 devices of 8 functions per bus; the kernel never names others.
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(PciId {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: Some(function as u8),
        })
    }
}

/// Lowercase hex of exactly `len` digits (Proxmox's patterns are case-sensitive).
fn hex(s: &str, len: usize) -> Option<u32> {
    let ok = s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

impl FromStr for PciId {
    type Err = VmConfigError;

    /// The `hostpci` grammar: `[dddd:]bb:dd[.f]`, the domain four or more lowercase hex digits.
    fn from_str(s: &str) -> Result<PciId, VmConfigError> {
        let bad = || VmConfigError::PciId {
            value: s.to_string(),
            expected: PCI_CONFIG_FORM,
        };
        let (address, function) = match s.split_once('.') {
            Some((a, f)) => (a, Some(hex(f, 1).ok_or_else(bad)? as u8)),
            None => (s, None),
        };
        let parts: Vec<&str> = address.split(':').collect();
        let (domain, bus, device) = match parts[..] {
            [bus, device] => (0, bus, device),
            [domain, bus, device] if domain.len() >= 4 => {
                let domain = domain.trim_start_matches('0');
                let domain = if domain.is_empty() {
                    0
                } else {
                    hex(domain, domain.len())
                        .filter(|d| *d <= 0xffff)
                        .ok_or_else(bad)?
                };
                (domain as u16, bus, device)
            }
            _ => return Err(bad()),
        };
        Ok(PciId {
            domain,
            bus: hex(bus, 2).ok_or_else(bad)? as u8,
            device: hex(device, 2).ok_or_else(bad)? as u8,
            function,
        })
    }
}

impl fmt::Display for PciId {
    /// The sysfs name (`0000:0b:00.0`), or its device prefix (`0000:0b:00`) for all functions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}",
            self.domain, self.bus, self.device
        )?;
        match self.function {
            Some(function) => write!(f, ".{function:x}"),
            None => Ok(()),
        }
    }
}

impl VmConfig {
    /// Reads `<root>/etc/pve/qemu-server/<vmid>.conf`.
    pub fn read(root: &Path, vmid: u32) -> Result<VmConfig, VmConfigError> {
        let path = root.join(CONFIG_DIR).join(format!("{vmid}.conf"));
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmConfigError::NotFound { path });
            }
            Err(source) => return Err(VmConfigError::Read { path, source }),
        };
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
                log::warn!("VM config line {line}: not a 'key: value' line, ignored: {raw:?}");
                continue;
            };
            config
                .apply(key, value)
                .map_err(|expected| VmConfigError::Invalid {
                    path: None,
                    line,
                    key: key.to_string(),
                    value: value.to_string(),
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

/// `key: value` with qemu-server's key pattern `[a-z][a-z_-]*\d*`; the value runs to the last
/// non-blank character and must not be empty.
fn split_key_value(raw: &str) -> Option<(&str, &str)> {
    let (key, rest) = raw.split_once(':')?;
    let name = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-');
    let value = rest.trim();
    (valid && !value.is_empty()).then_some((key, value))
}

/// `numa3` -> 3 when below `max`; leading zeros are not part of Proxmox's key names.
fn indexed(key: &str, prefix: &str, max: u8) -> Option<u8> {
    let digits = key.strip_prefix(prefix)?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse::<u8>().ok().filter(|n| *n < max)
}

/// A plain `\d+` (no sign, no spaces), as in qemu-server's integer type.
fn uint<T: FromStr>(value: &str, expected: &str) -> Result<T, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected.to_string());
    }
    value
        .parse()
        .map_err(|_| format!("{expected} (this one is too large)"))
}

fn positive(value: &str) -> Result<u32, String> {
    match uint::<u32>(value, "an integer of at least 1")? {
        0 => Err("an integer of at least 1".into()),
        n => Ok(n),
    }
}

fn boolean(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Ok(true),
        "0" | "off" | "no" | "false" => Ok(false),
        _ => Err("a boolean: 1|0, on|off, yes|no or true|false".into()),
    }
}

/// A Proxmox property string `a=b,c=d`: empty parts skipped, a bare part is the default key.
/// Keys pvetune does not know are kept out of the way rather than refused (see module doc).
fn property_string<'a>(
    value: &'a str,
    default_key: Option<&'a str>,
) -> Result<BTreeMap<&'a str, &'a str>, String> {
    let mut props = BTreeMap::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = match (part.split_once('='), default_key) {
            (Some((k, v)), _) => (k, v),
            (None, Some(default)) => (default, part),
            (None, None) => return Err(format!("key=value pairs, but '{part}' has no '='")),
        };
        if props.insert(k, v).is_some() {
            return Err(format!("each property once, but '{k}' appears twice"));
        }
    }
    Ok(props)
}

/// `memory: [current=]<MiB>`.
fn memory(value: &str) -> Result<u64, String> {
    const EXPECTED: &str = "[current=]<MiB>, an integer of at least 16";
    let props = property_string(value, Some("current"))?;
    let current = props.get("current").ok_or(EXPECTED)?;
    match uint::<u64>(current, EXPECTED)? {
        mib if mib >= MIN_MEMORY_MIB => Ok(mib),
        _ => Err(EXPECTED.into()),
    }
}

/// `affinity:` in PVE's cpuset grammar (`PVE::CpuSet::parse_cpuset`): comma-separated `N` or
/// `A-B` with blanks allowed around each part; Perl's `split` drops trailing empty parts, so a
/// trailing comma passes, while an empty leading or inner part is refused. No kernel extras
/// (`N`, `all`, strides): qemu-server would refuse them, so the VM never ran with them.
fn pve_cpuset(value: &str) -> Result<CpuSet, String> {
    let expected = || {
        format!(
            "a CPU list such as 0-3,8-11 (numbers or ascending ranges below {MAX_CPUS}, comma-separated)"
        )
    };
    let mut set = CpuSet::new();
    let parts: Vec<&str> = value.trim_end_matches(',').split(',').collect();
    for part in parts {
        let (first, last) = id_range(part.trim(), MAX_CPUS).ok_or_else(expected)?;
        for cpu in first..=last {
            set.insert(cpu);
        }
    }
    Ok(set)
}

/// `N` or `A-B` with `A <= B < limit`, plain decimal digits.
fn id_range(part: &str, limit: u32) -> Option<(u32, u32)> {
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().filter(|n| *n < limit)
    };
    let (first, last) = match part.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => (number(part)?, number(part)?),
    };
    (first <= last).then_some((first, last))
}

/// `numaN:` `cpus=<ranges>[,hostnodes=<ranges>][,memory=<MiB>][,policy=...]`.
fn numa_spec(value: &str) -> Result<NumaSpec, String> {
    let props = property_string(value, None)?;
    let cpus = props
        .get("cpus")
        .ok_or("cpus=<id[-id][;...]> (the guest vCPUs of this node)")?;
    let hostnodes = props.get("hostnodes");
    Ok(NumaSpec {
        cpus: id_ranges(
            cpus,
            "cpus=<id[-id][;...]>, ascending ranges of guest vCPU ids",
        )?,
        hostnodes: hostnodes
            .map(|h| {
                id_ranges(
                    h,
                    "hostnodes=<id[-id][;...]>, ascending ranges of host nodes",
                )
            })
            .transpose()?,
        memory_mib: props
            .get("memory")
            .map(|m| uint(m, "memory=<MiB>, an integer"))
            .transpose()?,
        policy: match props.get("policy").copied() {
            None => None,
            Some("preferred") => Some(NumaPolicy::Preferred),
            Some("bind") => Some(NumaPolicy::Bind),
            Some("interleave") => Some(NumaPolicy::Interleave),
            Some(_) => return Err("policy=preferred|bind|interleave".into()),
        },
    })
}

/// qemu-server's number sets: `0-3;8;10-11`, no blanks, each range ascending.
fn id_ranges(value: &str, expected: &str) -> Result<Vec<u32>, String> {
    let mut ids = BTreeSet::new();
    for part in value.split(';') {
        let (first, last) = id_range(part, MAX_CPUS).ok_or(expected)?;
        ids.extend(first..=last);
    }
    Ok(ids.into_iter().collect())
}

/// `hostpciN:` `[host=]<id>[;<id>...]` or `mapping=<id>`, plus options.
fn host_pci(value: &str) -> Result<HostPci, String> {
    let props = property_string(value, Some("host"))?;
    let source = match (props.get("host"), props.get("mapping")) {
        (Some(host), None) => PciSource::Host(
            host.split(';')
                .map(|id| id.parse::<PciId>().map_err(|_| PCI_CONFIG_FORM.to_string()))
                .collect::<Result<_, _>>()?,
        ),
        (None, Some(mapping)) => PciSource::Mapping(mapping.to_string()),
        _ => return Err("either host=<[dddd:]bb:dd[.f];...> or mapping=<id>, not both".into()),
    };
    let flag = |key| props.get(key).map(|v| boolean(v)).transpose();
    Ok(HostPci {
        source,
        pcie: flag("pcie")?.unwrap_or(false),
        x_vga: flag("x-vga")?.unwrap_or(false),
    })
}

/// `(cpus, threads)` of the last `-smp` in `args`. QEMU merges repeated `-smp` options, later
/// ones winning, and qemu-server appends `args` after its own `-smp`, so this is what QEMU uses.
fn smp_option(args: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let words = shell_words(args);
    let (mut cpus, mut threads) = (None, None);
    let bad = |what: &str| {
        format!("in -smp, {what}=<integer of at least 1> (QEMU would refuse this too)")
    };
    for pair in words.windows(2) {
        if pair[0] != "-smp" && pair[0] != "--smp" {
            continue;
        }
        for (i, opt) in pair[1].split(',').enumerate() {
            if let Some(t) = opt.strip_prefix("threads=") {
                threads = Some(positive(t).map_err(|_| bad("threads"))?);
            } else if let Some(c) = opt.strip_prefix("cpus=") {
                cpus = Some(positive(c).map_err(|_| bad("cpus"))?);
            } else if i == 0 && !opt.contains('=') {
                cpus = Some(positive(opt).map_err(|_| bad("cpus"))?);
            }
        }
    }
    Ok((cpus, threads))
}

/// Splits like a POSIX shell, which is how qemu-server splits `args` (`split_args`): blanks
/// separate words, quotes group, a backslash escapes outside single quotes.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                w.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => w.extend(chars.next()),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_group_quotes() {
        assert_eq!(
            shell_words(r#"-smp '4,threads=2' -x "a b\"c" d\ e"#),
            ["-smp", "4,threads=2", "-x", "a b\"c", "d e"]
        );
    }

    #[test]
    fn pve_cpuset_follows_perl_split() {
        assert_eq!(pve_cpuset("0-3,").unwrap(), CpuSet::range(0, 3));
        assert_eq!(pve_cpuset(" 1 , 3-4 ").unwrap().to_string(), "1,3-4");
        for bad in [
            ",0-3", "1,,2", "1 3", "1- 3", "3-1", "0--3", "+1", "0x1", "all", "N",
        ] {
            assert!(pve_cpuset(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(pve_cpuset("01-03").unwrap(), CpuSet::range(1, 3));
    }

    #[test]
    fn key_pattern_matches_qemu_server() {
        assert_eq!(split_key_value("allow-ksm: 1"), Some(("allow-ksm", "1")));
        assert_eq!(
            split_key_value("hostpci12:0b:00"),
            Some(("hostpci12", "0b:00"))
        );
        assert_eq!(split_key_value("name:   "), None);
        assert_eq!(split_key_value("Name: x"), None);
        assert_eq!(split_key_value(" cores: 2"), None);
    }
}
