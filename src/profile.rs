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

/// A validated profile, still independent of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub path: PathBuf,
    /// Host CPUs this VM owns exclusively while it runs.
    pub cpus: Located<CpuSet>,
    pub vcpus: Located<VcpuLayout>,
    pub emulator: Located<Placement>,
    pub iothreads: Located<Placement>,
    pub governor: Option<Located<String>>,
    /// `key` (dotted sysctl name) -> value, in file order of keys (sorted).
    pub sysctl: Vec<(String, Located<String>)>,
    pub isolation: Isolation,
}

/// `isolation:`: what besides pinning keeps the host off the VM's CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Isolation {
    /// Every movable IRQ, and the default affinity of IRQs yet to come, off `cpus`.
    pub irqs: bool,
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
/// first four are keys of `isolation:`.
const PLANNED_KEYS: &[&str] = &[
    "partition",
    "kthreads",
    "cpu-cycle",
    "irqbalance",
    "irq",
    "hugepages",
    "pci-reset",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawProfile {
    cpus: Spanned<String>,
    vcpus: Option<Spanned<RawLayout>>,
    emulator: Option<Spanned<String>>,
    iothreads: Option<Spanned<String>>,
    governor: Option<Spanned<String>>,
    sysctl: Option<BTreeMap<String, Spanned<String>>>,
    isolation: Option<RawIsolation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawIsolation {
    irqs: Option<bool>,
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

/// The most symlinks [`check_owner`] follows (the kernel's limit, `MAXSYMLINKS`).
const MAX_SYMLINKS: u32 = 40;

/// pmxcfs, the cluster file system Proxmox mounts on `/etc/pve`, shows every entry as owned by
/// root with group `www-data` (files 0640, directories 0755; it refuses chmod and chown).
const PMXCFS_MOUNT: &str = "/etc/pve";
const PMXCFS_GROUP: &str = "www-data";

/// Refuses a profile that anyone but root (or the invoking user, for fixture trees) could have
/// written or swapped: pvetune runs it as root. Returns the profile's real path.
///
/// The path is resolved one component at a time, as the kernel does, and every entry it passes
/// through is checked: each directory (from `/`), each symlink followed (the directory that
/// holds a symlink can redirect it, so a safe directory linking to an unsafe target, or an
/// unsafe directory linking to a safe one, is refused), and the file itself. Each must be
///
/// - owned by root or the invoking euid;
/// - not writable by group or others;
/// - of group root or the invoking egid, with one exception: entries under pmxcfs's mount
///   `/etc/pve` (the real path) may have group `www-data`, which is how pmxcfs shows every
///   entry; the write bits are checked there as everywhere, and nowhere else is `www-data`
///   (or any other group) accepted.
///
/// **Sticky world-writable directories (`/tmp`).** The sticky bit stops others from deleting or
/// renaming what they do not own, not from creating new names: anyone can pre-create
/// `/tmp/100.yaml`, or a symlink there, before root writes it. So such a directory is accepted
/// on the path only when the entry of the path inside it is a directory owned by root (which
/// nobody else can rename or replace there): `/tmp/<root-owned dir>/.../100.yaml` passes,
/// `/tmp/100.yaml` and `/tmp/link -> ...` are refused, as is a group-writable or
/// world-writable directory without the sticky bit anywhere on the path. For fixture trees a
/// directory of the invoking euid counts as root's (the sticky bit protects it from others just
/// the same; when pvetune runs as root, as a hook does, that is root alone).
fn check_owner(path: &Path) -> Result<PathBuf, ProfileError> {
    let refuse = |reason: String| ProfileError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    let read_error = |source| ProfileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let me = nix::unistd::geteuid().as_raw();
    let my_gid = nix::unistd::getegid().as_raw();
    let pmxcfs_gid = nix::unistd::Group::from_name(PMXCFS_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    // Owner and group of one entry (its real path `at`).
    let owned = |at: &Path, meta: &std::fs::Metadata, what: &str| -> Result<(), ProfileError> {
        if meta.uid() != 0 && meta.uid() != me {
            return Err(refuse(format!(
                "{what} {} is owned by uid {}",
                at.display(),
                meta.uid()
            )));
        }
        let pmxcfs = at.starts_with(PMXCFS_MOUNT) && Some(meta.gid()) == pmxcfs_gid;
        if meta.gid() != 0 && meta.gid() != my_gid && !pmxcfs {
            return Err(refuse(format!(
                "{what} {} has group gid {} (only root's group, or www-data under /etc/pve)",
                at.display(),
                meta.gid()
            )));
        }
        Ok(())
    };
    // A directory that holds `below` on the path: nobody else may add, remove or swap it.
    let holder = |dir: &Path, below: &std::fs::Metadata| -> Result<(), ProfileError> {
        let meta = std::fs::symlink_metadata(dir).map_err(read_error)?;
        owned(dir, &meta, "directory")?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            let sticky_over_root_dir =
                mode & 0o1000 != 0 && below.is_dir() && (below.uid() == 0 || below.uid() == me);
            if !sticky_over_root_dir {
                return Err(refuse(format!(
                    "directory {} is writable by group or others (mode {mode:o}){}",
                    dir.display(),
                    if mode & 0o1000 != 0 {
                        ": its sticky bit protects entries from deletion, not from being \
                         created by others"
                    } else {
                        ""
                    }
                )));
            }
        }
        Ok(())
    };

    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(read_error)?.join(path)
    };
    // Components still to resolve, the next one last.
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    let push = |pending: &mut Vec<std::ffi::OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                std::path::Component::Normal(name) => pending.push(name.to_os_string()),
                std::path::Component::ParentDir => pending.push("..".into()),
                _ => {}
            }
        }
    };
    push(&mut pending, &absolute);
    let mut current = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            // `current` is a real path (no symlinks): its parent is the lexical one.
            current.pop();
            continue;
        }
        let next = current.join(&name);
        let meta = std::fs::symlink_metadata(&next).map_err(read_error)?;
        holder(&current, &meta)?;
        if meta.file_type().is_symlink() {
            owned(&next, &meta, "symlink")?;
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(refuse(format!("more than {MAX_SYMLINKS} symlinks")));
            }
            let target = std::fs::read_link(&next).map_err(read_error)?;
            if target.is_absolute() {
                current = PathBuf::from("/");
            }
            push(&mut pending, &target);
            continue;
        }
        if pending.is_empty() {
            owned(&next, &meta, "profile")?;
            if !meta.is_file() {
                return Err(refuse(format!("{} is not a regular file", next.display())));
            }
            let mode = meta.mode() & 0o7777;
            if mode & 0o022 != 0 {
                return Err(refuse(format!(
                    "profile {} has mode {mode:o}: writable by group or others",
                    next.display()
                )));
            }
            return Ok(next);
        }
        if !meta.is_dir() {
            return Err(refuse(format!("{} is not a directory", next.display())));
        }
        current = next;
    }
    // The path named a directory (`/`, or ending in `..`).
    Err(refuse(format!(
        "{} is not a regular file",
        current.display()
    )))
}

/// Parses and validates profile text (no host knowledge needed).
pub fn parse(path: &Path, text: &str) -> Result<Profile, ProfileError> {
    let options = serde_saphyr::options! { strict_booleans: true };
    let raw: RawProfile =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| syntax(path, text, &e))?;
    let invalid = |key, at: (u32, u32), message: String| ProfileError::Invalid {
        path: path.to_path_buf(),
        line: at.0,
        column: at.1,
        key,
        message,
    };
    let cpus: CpuSet = raw
        .cpus
        .value
        .parse()
        .map_err(|e: crate::cpuset::CpuListError| invalid("cpus", at(&raw.cpus), e.to_string()))?;
    if cpus.is_empty() {
        return Err(invalid("cpus", at(&raw.cpus), "no CPUs given".into()));
    }
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
    let isolation = Isolation {
        irqs: raw.isolation.and_then(|i| i.irqs).unwrap_or(false),
    };
    Ok(Profile {
        path: path.to_path_buf(),
        cpus: located(cpus, at(&raw.cpus)),
        vcpus,
        emulator,
        iothreads,
        governor,
        sysctl,
        isolation,
    })
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

fn syntax(path: &Path, text: &str, e: &serde_saphyr::Error) -> ProfileError {
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
    if text.trim().is_empty() {
        message = "empty profile: at least 'cpus' is required".into();
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
        assert_eq!(prof.cpus.value.to_string(), "6-11,18-23");
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
        assert_eq!(prof.cpus.value, CpuSet::range(4, 4));
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
        let err = p("cpus: 1\nhugepages: 1G\n").unwrap_err().to_string();
        assert!(
            err.contains("'hugepages' is part of the profile schema"),
            "{err}"
        );
        let err = p("").unwrap_err().to_string();
        assert!(err.contains("empty profile"), "{err}");
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
