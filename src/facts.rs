//! Host facts the planner needs beyond the topology: cpufreq policies and which sysctls exist.
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuFreq {
    /// Host path of the policy's `scaling_governor`. CPUs of one policy share it, so a
    /// governor is written once per policy.
    pub governor_path: String,
    pub available: Vec<String>,
}

impl HostFacts {
    pub fn read<'a>(root: &Root, cpus: &CpuSet, sysctls: impl Iterator<Item = &'a str>) -> Self {
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
        HostFacts { cpufreq, sysctls }
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
