//! Per-VM profiles: finding the file, refusing unsafe ones, parsing YAML, validating meaning.
//!
//! Three steps, two error kinds (as cloud-hypervisor does): YAML syntax and unknown keys are
//! [`ProfileError::Syntax`]; a well-formed value that means nothing on this host (a CPU that is
//! not online, an unknown sysctl) is [`ProfileError::Invalid`]. Both carry file, line and
//! column. All YAML parsing of pvetune lives in this module.

use crate::cpuset::CpuSet;
use crate::root::{Root, paths};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

mod cpus;
mod isolation;
mod memory;
mod trust;
pub use cpus::{CpuRequest, PlaceRequest, SmtPolicy, Within};
pub use isolation::{IrqbalancePolicy, Isolation};
pub use memory::{Compact, Hugepages, Ksm, PciReset, Preflight, ResetMethod};
use trust::check_owner;

/// A validated profile, still independent of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub path: PathBuf,
    /// Host CPUs this VM owns exclusively while it runs: named, or placed by topology at
    /// pre-start. `None`: the VM owns no CPUs (and the CPU tunables do nothing).
    pub cpus: Option<Located<CpuRequest>>,
    pub vcpus: Located<VcpuLayout>,
    pub emulator: Located<Placement>,
    pub iothreads: Located<Placement>,
    pub governor: Option<Located<String>>,
    /// `key` (dotted sysctl name) -> value, in file order of keys (sorted).
    pub sysctl: Vec<(String, Located<String>)>,
    pub isolation: Isolation,
    /// `hugepages:`: compaction, preflight and reservation before qemu-server allocates.
    pub hugepages: Option<Hugepages>,
    /// `ksm:`: KSM kept from scanning while the VM runs.
    pub ksm: Option<Ksm>,
    /// `pci-reset:`: the VM's passthrough devices reset before QEMU starts.
    pub pci_reset: Option<PciReset>,
}

/// A value with the place in the profile it came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub line: u32,
    pub column: u32,
}

/// How vCPU i is mapped to a host CPU of `cpus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuLayout {
    /// Sibling pairs when the guest has SMT, else one vCPU per physical core first.
    Auto,
    /// vCPU i -> the i-th CPU of `cpus` in ascending order.
    Sequential,
    /// Guest sibling threads on host sibling threads (guest core k -> host core k).
    SmtPairs,
    /// One vCPU per host core (first thread) before any sibling thread is used.
    CoresFirst,
    /// vCPU i -> `list[i]`.
    Explicit(Vec<u32>),
}

/// Where emulator threads or iothreads go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Online CPUs that are not isolated and that no VM owns.
    Housekeeping,
    /// The VM's own `cpus` (shares them with the vCPUs).
    VmCpus,
    Cpus(CpuSet),
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: cannot read profile: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: refused: {reason} (a profile, and every directory and symlink on its path, \
         must be owned by root and writable by root only)"
    )]
    Unsafe { path: PathBuf, reason: String },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: u32,
        column: u32,
        message: String,
    },
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: u32,
        column: u32,
        key: &'static str,
        message: String,
    },
}

/// Keys of the profile schema (docs/profile.md) that this version does not implement yet: a
/// profile using them is refused with a clear message instead of being half-applied. The
/// keys of `isolation:` are all implemented.
const PLANNED_KEYS: &[&str] = &["irq"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawProfile {
    cpus: Option<Spanned<cpus::RawCpus>>,
    vcpus: Option<Spanned<RawLayout>>,
    emulator: Option<Spanned<String>>,
    iothreads: Option<Spanned<String>>,
    governor: Option<Spanned<String>>,
    sysctl: Option<BTreeMap<String, Spanned<String>>>,
    isolation: Option<Spanned<isolation::RawIsolation>>,
    hugepages: Option<Spanned<memory::RawHugepages>>,
    ksm: Option<Spanned<memory::RawKsm>>,
    pci_reset: Option<Spanned<memory::RawPciReset>>,
}

/// `vcpus:` is a mode word or a list of CPU numbers.
enum RawLayout {
    Mode(String),
    List(Vec<u32>),
}

impl<'de> Deserialize<'de> for RawLayout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawLayout;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("auto, sequential, smt-pairs, cores-first or a list of host CPUs")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawLayout, E> {
                Ok(RawLayout::Mode(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawLayout, A::Error> {
                let mut list = Vec::new();
                while let Some(cpu) = seq.next_element::<u32>()? {
                    list.push(cpu);
                }
                Ok(RawLayout::List(list))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a VM's profile lives: `--profile`, else the cluster-wide pmxcfs copy, else the
/// node-local one. `None`: this VM has no profile.
pub fn locate(root: &Root, vmid: u32, explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    [paths::PVE_PROFILE_DIR, paths::NODE_PROFILE_DIR]
        .iter()
        .map(|dir| root.path(format!("{dir}/{vmid}.yaml")))
        .find(|p| p.exists())
}

/// The owner and mode chain a profile must have, for another file pvetune acts on as root
/// (the chain record of `pvetune enable --chain`); returns the file's real path.
pub fn trusted(path: &Path) -> Result<PathBuf, ProfileError> {
    check_owner(path)
}

/// Reads, checks ownership of, parses and validates a profile file.
pub fn load(path: &Path) -> Result<Profile, ProfileError> {
    let real = check_owner(path)?;
    let read_error = |source| ProfileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(&real)
        .and_then(|file| file.take(MAX_PROFILE_BYTES + 1).read_to_string(&mut text))
        .map_err(read_error)?;
    if text.len() as u64 > MAX_PROFILE_BYTES {
        return Err(read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than 1 MiB, not a profile",
        )));
    }
    parse(path, &text)
}

/// The largest profile pvetune reads (a real one is a few hundred bytes): memory and parse
/// time stay bounded whatever file the path names.
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// Parses and validates profile text (no host knowledge needed).
pub fn parse(path: &Path, text: &str) -> Result<Profile, ProfileError> {
    // Every key is optional, so an empty file (or one of comments only) would parse as a
    // profile that does nothing: almost always a mistake.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(ProfileError::Syntax {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            message: "empty profile: expected keys such as cpus or sysctl (docs/profile.md)".into(),
        });
    }
    let options = serde_saphyr::options! { strict_booleans: true };
    let raw: RawProfile =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| syntax(path, &e))?;
    let invalid = |key, at: (u32, u32), message: String| ProfileError::Invalid {
        path: path.to_path_buf(),
        line: at.0,
        column: at.1,
        key,
        message,
    };
    if raw.cpus.is_none() {
        cpus::require_cpus(
            [
                ("vcpus", raw.vcpus.as_ref().map(at)),
                ("emulator", raw.emulator.as_ref().map(at)),
                ("iothreads", raw.iothreads.as_ref().map(at)),
                ("governor", raw.governor.as_ref().map(at)),
                ("isolation", raw.isolation.as_ref().map(at)),
            ],
            &invalid,
        )?;
    }
    let cpus_request = raw.cpus.map(|c| cpus::parse(c, &invalid)).transpose()?;
    let listed = match cpus_request.as_ref().map(|c| &c.value) {
        Some(CpuRequest::List(set)) => Some(set.clone()),
        _ => None,
    };
    let vcpus = match raw.vcpus {
        None => located(VcpuLayout::Auto, (0, 0)),
        Some(s) => {
            let pos = at(&s);
            let layout = match s.value {
                RawLayout::List(list) => VcpuLayout::Explicit(list),
                RawLayout::Mode(m) => match m.as_str() {
                    "auto" => VcpuLayout::Auto,
                    "sequential" => VcpuLayout::Sequential,
                    "smt-pairs" => VcpuLayout::SmtPairs,
                    "cores-first" => VcpuLayout::CoresFirst,
                    other => {
                        return Err(invalid(
                            "vcpus",
                            pos,
                            format!(
                                "'{other}': expected auto, sequential, smt-pairs, cores-first or a list of host CPUs"
                            ),
                        ));
                    }
                },
            };
            if let VcpuLayout::Explicit(list) = &layout {
                let Some(cpus) = &listed else {
                    return Err(invalid(
                        "vcpus",
                        pos,
                        "a list of host CPUs needs 'cpus' as a cpulist, not a placement \
                         request (use auto, smt-pairs, cores-first or sequential)"
                            .into(),
                    ));
                };
                let mut seen = CpuSet::new();
                for &cpu in list {
                    if !cpus.contains(cpu) {
                        return Err(invalid(
                            "vcpus",
                            pos,
                            format!("CPU {cpu} is not in cpus ({cpus})"),
                        ));
                    }
                    if seen.contains(cpu) {
                        return Err(invalid("vcpus", pos, format!("CPU {cpu} is listed twice")));
                    }
                    seen.insert(cpu);
                }
            }
            located(layout, pos)
        }
    };
    let placement = |key: &'static str, field: Option<Spanned<String>>| match field {
        None => Ok(located(Placement::Housekeeping, (0, 0))),
        Some(s) => {
            let pos = at(&s);
            let value = match s.value.as_str() {
                "housekeeping" => Placement::Housekeeping,
                "vm" => Placement::VmCpus,
                list => {
                    Placement::Cpus(list.parse().map_err(|e: crate::cpuset::CpuListError| {
                        invalid(
                            key,
                            pos,
                            format!("{e}; expected housekeeping, vm or a cpulist"),
                        )
                    })?)
                }
            };
            Ok(located(value, pos))
        }
    };
    let emulator = placement("emulator", raw.emulator)?;
    let iothreads = placement("iothreads", raw.iothreads)?;
    cpus::check_reserved(
        cpus_request.as_ref(),
        [&emulator.value, &iothreads.value],
        &invalid,
    )?;
    let governor = match raw.governor {
        None => None,
        Some(g) => {
            let ok = !g.value.is_empty()
                && g.value.len() <= 15
                && g.value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit());
            if !ok {
                return Err(invalid(
                    "governor",
                    at(&g),
                    format!("'{}' is not a cpufreq governor name", g.value),
                ));
            }
            Some(located(g.value.clone(), at(&g)))
        }
    };
    let mut sysctl = Vec::new();
    for (name, value) in raw.sysctl.unwrap_or_default() {
        let pos = at(&value);
        if !valid_sysctl_name(&name) {
            return Err(invalid(
                "sysctl",
                pos,
                format!("'{name}' is not a sysctl name (dotted words such as vm.stat_interval)"),
            ));
        }
        if value.value.is_empty() || value.value.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "sysctl",
                pos,
                format!("value of {name} must be one line of text"),
            ));
        }
        sysctl.push((name, located(value.value.clone(), pos)));
    }
    let bad = |(key, place, message): memory::Bad| invalid(key, place, message);
    let isolation = isolation::parse(raw.isolation.map(|i| i.value)).map_err(bad)?;
    let hugepages = raw
        .hugepages
        .map(memory::hugepages)
        .transpose()
        .map_err(bad)?;
    let pci_reset = raw
        .pci_reset
        .map(memory::pci_reset)
        .transpose()
        .map_err(bad)?;
    Ok(Profile {
        path: path.to_path_buf(),
        hugepages,
        ksm: raw.ksm.map(memory::ksm),
        pci_reset,
        cpus: cpus_request,
        vcpus,
        emulator,
        iothreads,
        governor,
        sysctl,
        isolation,
    })
}

/// A key whose value is one of `words`: None when it is absent, the value (and where it is)
/// when it is one of them, `Err` with the value otherwise.
fn one_of<'a>(
    value: &'a Option<Spanned<String>>,
    words: &[&'static str],
) -> Result<Option<(&'a Spanned<String>, &'static str)>, &'a Spanned<String>> {
    let Some(v) = value else {
        return Ok(None);
    };
    match words.iter().find(|w| **w == v.value) {
        Some(word) => Ok(Some((v, word))),
        None => Err(v),
    }
}

/// A sysctl name becomes a path under /proc/sys: dotted words of `[A-Za-z0-9_-]`, nothing
/// that could climb out (`..`, `/`).
pub fn valid_sysctl_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// The host file of a sysctl name (`vm.stat_interval` -> `/proc/sys/vm/stat_interval`).
pub fn sysctl_path(name: &str) -> String {
    format!("{}/{}", paths::PROC_SYS, name.replace('.', "/"))
}

fn at<T>(s: &Spanned<T>) -> (u32, u32) {
    (s.referenced.line() as u32, s.referenced.column() as u32)
}

fn located<T>(value: T, (line, column): (u32, u32)) -> Located<T> {
    Located {
        value,
        line,
        column,
    }
}

fn syntax(path: &Path, e: &serde_saphyr::Error) -> ProfileError {
    let (line, column) = e
        .location()
        .map(|l| (l.line() as u32, l.column() as u32))
        .unwrap_or((1, 1));
    let mut message = e.without_snippet().to_string();
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    if let Some(key) = PLANNED_KEYS
        .iter()
        .find(|k| message.contains(&format!("`{k}`")))
    {
        message = format!(
            "'{key}' is part of the profile schema but not supported by this pvetune version yet"
        );
    }
    ProfileError::Syntax {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Profile, ProfileError> {
        parse(Path::new("100.yaml"), text)
    }

    #[test]
    fn full_profile() {
        let prof = p("cpus: 6-11,18-23\nvcpus: smt-pairs\nemulator: 0-1\niothreads: vm\ngovernor: performance\nsysctl: { vm.stat_interval: 120 }\n").unwrap();
        assert_eq!(
            prof.cpus.unwrap().value,
            CpuRequest::List("6-11,18-23".parse().unwrap())
        );
        assert_eq!(prof.vcpus.value, VcpuLayout::SmtPairs);
        assert_eq!(prof.emulator.value, Placement::Cpus(CpuSet::range(0, 1)));
        assert_eq!(prof.iothreads.value, Placement::VmCpus);
        assert_eq!(prof.governor.unwrap().value, "performance");
        assert_eq!(prof.sysctl[0].0, "vm.stat_interval");
        assert_eq!(prof.sysctl[0].1.value, "120");
        assert_eq!(prof.sysctl[0].1.line, 6);
    }

    #[test]
    fn defaults() {
        let prof = p("cpus: 4\n").unwrap();
        assert_eq!(prof.vcpus.value, VcpuLayout::Auto);
        assert_eq!(prof.emulator.value, Placement::Housekeeping);
        assert_eq!(
            prof.cpus.unwrap().value,
            CpuRequest::List(CpuSet::range(4, 4))
        );
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = p("cpus: 4-7\ngovernr: performance\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("100.yaml:2:1: unknown field `governr`"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_their_place() {
        let err = p("cpus: 4-7\nvcpus: [4, 9]\n").unwrap_err().to_string();
        assert_eq!(err, "100.yaml:2:8: vcpus: CPU 9 is not in cpus (4-7)");
        let err = p("cpus: 7-4\n").unwrap_err().to_string();
        assert!(
            err.starts_with("100.yaml:1:7: cpus: invalid cpulist '7-4'"),
            "{err}"
        );
        let err = p("cpus: 1\nsysctl:\n  ../../etc/x: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("100.yaml:3:"), "{err}");
        let err = p("cpus: 1\nirq: {}\n").unwrap_err().to_string();
        assert!(err.contains("'irq' is part of the profile schema"), "{err}");
        let err = p("").unwrap_err().to_string();
        assert!(err.contains("empty profile"), "{err}");
    }

    #[test]
    fn irqbalance_policy() {
        let policy = |text: &str| p(text).map(|prof| prof.isolation.irqbalance);
        let policy_error = |text: &str| policy(text).unwrap_err().to_string();
        let irqs = "cpus: 4\nisolation:\n  irqs: true\n";
        assert_eq!(policy(irqs).unwrap(), IrqbalancePolicy::Warn);
        let ban = policy(&format!("{irqs}  irqbalance: ban\n"));
        assert_eq!(ban.unwrap(), IrqbalancePolicy::Ban);
        let warn = policy("cpus: 4\nisolation:\n  irqbalance: warn\n");
        assert_eq!(warn.unwrap(), IrqbalancePolicy::Warn);
        assert_eq!(
            policy_error(&format!("{irqs}  irqbalance: stop\n")),
            "100.yaml:4:15: isolation.irqbalance: 'stop' is not an irqbalance policy: \
             expected ban or warn"
        );
        let err = policy_error("cpus: 4\nisolation:\n  irqbalance: ban\n");
        assert!(
            err.starts_with("100.yaml:3:15: isolation.irqbalance: ban needs 'irqs: true'"),
            "{err}"
        );
    }

    #[test]
    fn memory_and_device_keys() {
        let prof = p(
            "cpus: 4\nhugepages:\n  sync: true\n  drop-caches: 3\n  compact: global\n  \
                      preflight: warn\n  reserve: true\n  boot: true\nksm: {pause: true}\n\
                      pci-reset:\n  method: reset\n  devices: [0000:0b:00.0, 0000:0b:00.1]\n  \
                      allow-host-driver: true\n  timeout: 5\n",
        )
        .unwrap();
        let hp = prof.hugepages.unwrap();
        assert_eq!(
            (
                hp.sync,
                hp.drop_caches,
                hp.compact,
                hp.preflight,
                hp.reserve,
                hp.boot
            ),
            (true, Some(3), Compact::Global, Preflight::Warn, true, true)
        );
        assert!(prof.ksm.unwrap().pause);
        let reset = prof.pci_reset.unwrap();
        assert_eq!(reset.method, ResetMethod::Reset);
        assert_eq!(reset.devices.unwrap().len(), 2);
        assert!(reset.allow_host_driver);
        assert_eq!(reset.timeout_ms, 5000);
        let defaults = p("cpus: 4\nhugepages: {}\npci-reset: {}\n").unwrap();
        let hp = defaults.hugepages.unwrap();
        assert_eq!(
            (hp.compact, hp.preflight, hp.reserve),
            (Compact::Nodes, Preflight::Fail, false)
        );
        assert_eq!(
            defaults.pci_reset.unwrap().method,
            ResetMethod::RemoveRescan
        );
        for (text, want) in [
            (
                "hugepages:\n  drop-caches: 4\n",
                "100.yaml:3:16: hugepages.drop-caches: 4 is not",
            ),
            (
                "hugepages:\n  compact: all\n",
                "100.yaml:3:12: hugepages.compact: 'all' is not one of nodes, global, none",
            ),
            (
                "pci-reset:\n  method: flr\n",
                "100.yaml:3:11: pci-reset.method: 'flr' is not one of",
            ),
            (
                "pci-reset:\n  devices: [0b:00.0]\n",
                "100.yaml:3:13: pci-reset.devices: invalid PCI address '0b:00.0'",
            ),
            (
                "pci-reset:\n  devices: [0000:0b:00.0, 0000:0b:00.0]\n",
                "is listed twice",
            ),
            ("pci-reset:\n  timeout: 0\n", "pci-reset.timeout: 0 s"),
            ("hugepages:\n  reserv: true\n", "unknown field `reserv`"),
        ] {
            let err = p(&format!("cpus: 4\n{text}")).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn sysctl_names() {
        assert!(valid_sysctl_name("vm.stat_interval"));
        assert!(valid_sysctl_name("net.ipv4.conf.all.rp_filter"));
        assert!(!valid_sysctl_name("vm"));
        assert!(!valid_sysctl_name("vm..x"));
        assert!(!valid_sysctl_name("vm/../x.y"));
        assert_eq!(
            sysctl_path("vm.stat_interval"),
            "/proc/sys/vm/stat_interval"
        );
    }
}
