//! Host facts the planner needs beyond the topology: cpufreq policies, which sysctls exist,
//! and the host's IRQs.
//!
//! Read once per run, before planning, so that planning itself stays pure.

use crate::cpuset::CpuSet;
use crate::root::{Root, paths};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// CPUs that have cpufreq, with their policy. A CPU missing here has no cpufreq.
    pub cpufreq: BTreeMap<u32, CpuFreq>,
    /// Sysctl names asked about, and whether their file exists.
    pub sysctls: BTreeMap<String, bool>,
    /// The IRQs under `/proc/irq` (read only when the profile moves IRQs).
    pub irqs: Option<Irqs>,
    /// The cgroup tree (read only when the profile asks for a partition).
    pub cgroup: Option<crate::cgroup::CgroupFacts>,
    /// Which of the VM's CPUs have a `cpuN/online` file, i.e. can be taken offline (read only
    /// when the profile cycles them).
    pub hotplug: Option<std::collections::BTreeSet<u32>>,
}

/// `/proc/irq`: every IRQ that has an affinity file, and the default affinity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Irqs {
    /// IRQ numbers in ascending order (a directory name that is not a canonical number is
    /// never turned into a path).
    pub numbers: Vec<u32>,
    /// Whether `/proc/irq/default_smp_affinity` exists.
    pub default_affinity: bool,
    /// The pid of a running irqbalance, which moves IRQs back by itself (it only ever bans
    /// boot-time isolated CPUs, never a VM's: isolation-facts.md section 5).
    pub irqbalance: Option<u32>,
    /// Whether that irqbalance's control socket exists (`/run/irqbalance/irqbalance<pid>.sock`;
    /// irqbalance built without its UI has none, and then cannot be told to ban CPUs).
    pub irqbalance_socket: bool,
}

pub const IRQ_DIR: &str = "/proc/irq";
pub const DEFAULT_IRQ_AFFINITY: &str = "/proc/irq/default_smp_affinity";

/// `/proc/irq/<n>/smp_affinity_list`.
pub fn irq_affinity_path(irq: u32) -> String {
    format!("{IRQ_DIR}/{irq}/smp_affinity_list")
}

impl Irqs {
    /// One listing of `/proc/irq`, nothing more: every IRQ directory has `smp_affinity_list`,
    /// and one torn down before its turn is counted as gone when it is applied, so no check
    /// per IRQ here (thousands of them, inside `qm start`).
    pub fn read(root: &Root) -> Irqs {
        let mut numbers: Vec<u32> = numbered_entries(&root.path(IRQ_DIR)).collect();
        numbers.sort_unstable();
        let irqbalance = find_process(root, "irqbalance");
        Irqs {
            numbers,
            default_affinity: root.path(DEFAULT_IRQ_AFFINITY).exists(),
            irqbalance,
            irqbalance_socket: irqbalance
                .is_some_and(|pid| root.path(crate::irqbalance::socket_path(pid)).exists()),
        }
    }
}

/// The first process whose `comm` is `name` (one listing of /proc, one small read per process).
pub(crate) fn find_process(root: &Root, name: &str) -> Option<u32> {
    numbered_entries(&root.path(paths::PROC)).find(|pid| {
        crate::attr::read(&root.path(format!("{}/{pid}/comm", paths::PROC)))
            .is_ok_and(|comm| comm.trim_end() == name)
    })
}

/// The entries of `dir` named by a [`canonical_number`] (`/proc/<pid>`, `/proc/irq/<n>`), in
/// directory order: none if `dir` cannot be listed, and an entry that cannot be read is left
/// out (one listing, no other system call).
pub(crate) fn numbered_entries(dir: &Path) -> impl Iterator<Item = u32> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| canonical_number(&e.file_name().to_string_lossy()))
}

/// `42`, not `042`, `+42` or `4 2`: a name that is a number exactly as the kernel prints it.
fn canonical_number(name: &str) -> Option<u32> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_digit())
        && (name == "0" || !name.starts_with('0'));
    if ok { name.parse().ok() } else { None }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuFreq {
    /// Host path of the policy's `scaling_governor`. CPUs of one policy share it, so a
    /// governor is written once per policy.
    pub governor_path: String,
    pub available: Vec<String>,
}

impl HostFacts {
    pub fn read<'a>(
        root: &Root,
        cpus: &CpuSet,
        sysctls: impl Iterator<Item = &'a str>,
        with_irqs: bool,
        with_cgroup: bool,
        with_hotplug: bool,
    ) -> Self {
        let cpufreq = cpus
            .iter()
            .filter_map(|cpu| cpufreq_of(root, cpu).map(|f| (cpu, f)))
            .collect();
        let sysctls = sysctls
            .map(|name| {
                let path = root.path(crate::profile::sysctl_path(name));
                (name.to_string(), path.exists())
            })
            .collect();
        let irqs = with_irqs.then(|| Irqs::read(root));
        HostFacts {
            cpufreq,
            sysctls,
            irqs,
            cgroup: with_cgroup.then(|| crate::cgroup::CgroupFacts::read(root)),
            hotplug: with_hotplug.then(|| {
                cpus.iter()
                    .filter(|&cpu| root.path(crate::tunables::cycle::online_path(cpu)).exists())
                    .collect()
            }),
        }
    }
}

/// `cpuN/cpufreq` is a symlink to `../cpufreq/policyM` (or, on old kernels, a directory).
fn cpufreq_of(root: &Root, cpu: u32) -> Option<CpuFreq> {
    let link = format!("{}/cpu{cpu}/cpufreq", paths::CPU_DIR);
    let dir = match std::fs::read_link(root.path(&link)) {
        Ok(target) => lexical_join(Path::new(&format!("{}/cpu{cpu}", paths::CPU_DIR)), &target)?,
        Err(_) => PathBuf::from(&link),
    };
    if !dir.starts_with(paths::CPU_DIR) {
        return None;
    }
    let governor_path = dir.join("scaling_governor");
    if !root.path(&governor_path).exists() {
        return None;
    }
    let available = crate::attr::read(&root.path(dir.join("scaling_available_governors")))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    Some(CpuFreq {
        governor_path: governor_path.to_string_lossy().into_owned(),
        available,
    })
}

/// Resolves a relative symlink target against its directory without touching the filesystem.
fn lexical_join(base: &Path, target: &Path) -> Option<PathBuf> {
    let mut out = if target.is_absolute() {
        PathBuf::from("/")
    } else {
        base.to_path_buf()
    };
    for c in target.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_irq_numbers_become_paths() {
        assert_eq!(canonical_number("0"), Some(0));
        assert_eq!(canonical_number("127"), Some(127));
        for bad in [
            "",
            "042",
            "+4",
            "4 2",
            "default_smp_affinity",
            "99999999999",
        ] {
            assert_eq!(canonical_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolves_policy_links() {
        let p = lexical_join(
            Path::new("/sys/devices/system/cpu/cpu3"),
            Path::new("../cpufreq/policy3"),
        );
        assert_eq!(
            p.unwrap(),
            Path::new("/sys/devices/system/cpu/cpufreq/policy3")
        );
    }
}
