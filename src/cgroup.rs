//! cgroup v2 paths and what the host's cgroup tree offers for cpuset partitions.
//!
//! The layout pvetune builds (docs/design.md, "Isolation: the cgroup layout"): the vCPU
//! threads in a threaded child `vcpus` of QEMU's own `qemu.slice/<vmid>.scope`, made a
//! *remote* isolated partition by the exclusive-CPU chain `qemu.slice` -> scope -> `vcpus`.
//! Every fact this relies on is proven by the lab on every kernel and systemd of the matrix
//! (tests/lab/scenarios/80-kernel-facts.sh, docs/kernel-facts.md).

use crate::root::Root;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Where qemu-server's `systemd-run --scope --slice qemu.slice` puts every VM.
pub const QEMU_SLICE: &str = "/sys/fs/cgroup/qemu.slice";
/// The name of the threaded child that holds a VM's vCPU threads.
pub const VCPUS: &str = "vcpus";

pub const CONTROLLERS: &str = "cgroup.controllers";
pub const SUBTREE_CONTROL: &str = "cgroup.subtree_control";
pub const EXCLUSIVE: &str = "cpuset.cpus.exclusive";
/// Written only on kernels before 6.12 (`CgroupFacts::exclusive_needs_cpus`).
pub const CPUS: &str = "cpuset.cpus";
pub const PARTITION: &str = "cpuset.cpus.partition";
/// Root only, read only, from 6.8 on: the CPUs of every isolated partition.
pub const ROOT_ISOLATED: &str = "/sys/fs/cgroup/cpuset.cpus.isolated";
pub const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

/// `/sys/fs/cgroup/qemu.slice/<vmid>.scope`, where qemu-server starts the VM.
pub fn scope_of(vmid: u32) -> String {
    format!("{QEMU_SLICE}/{vmid}.scope")
}

/// The directory that holds `path` (`/a/b` -> `/a`).
pub fn parent_of(path: &str) -> Option<&str> {
    path.rsplit_once('/')
        .map(|(parent, _)| parent)
        .filter(|p| !p.is_empty())
}

pub fn thread_cgroup_path(pid: i32, tid: i32) -> String {
    format!("/proc/{pid}/task/{tid}/cgroup")
}

/// The cgroup v2 line of a `/proc/<pid>/cgroup` file (`0::/qemu.slice/100.scope`) as a
/// host-absolute directory; None without one, or for a path that is not normalized.
pub fn unified_path(text: &str) -> Option<String> {
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim_end();
    if rel == "/" {
        return Some(CGROUP_ROOT.to_string());
    }
    let rest = rel.strip_prefix('/')?;
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    Some(format!("{CGROUP_ROOT}{rel}"))
}

/// What the host's cgroup tree offers, read once before planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// cgroup v2 is mounted at /sys/fs/cgroup (its root has `cgroup.controllers`).
    pub unified: bool,
    /// `cpuset` is among the root's `cgroup.controllers` (not bound to a v1 hierarchy).
    pub cpuset: bool,
    /// The root has `cpuset.cpus.isolated`: a kernel with exclusive CPUs and remote
    /// partitions (6.8 on; both arrived in 6.7).
    pub remote_partitions: bool,
    /// `/proc/sys/kernel/osrelease`, e.g. `6.8.12-4-pve`.
    pub kernel: String,
}

impl CgroupFacts {
    pub fn read(root: &Root) -> Self {
        let controllers = crate::attr::read(&root.path(format!("{CGROUP_ROOT}/{CONTROLLERS}")));
        CgroupFacts {
            unified: controllers.is_ok(),
            cpuset: controllers.is_ok_and(|c| c.split_whitespace().any(|w| w == "cpuset")),
            remote_partitions: root.path(ROOT_ISOLATED).exists(),
            kernel: crate::attr::read(&root.path(OSRELEASE))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }

    /// Whether the kernel derives a partition's exclusive CPUs from `cpuset.cpus` too, so
    /// that every cgroup of the chain needs `cpuset.cpus` covering them (6.8, proven by the
    /// lab: docs/kernel-facts.md, "partition.needs-cpus"; from 6.12 the exclusive chain alone
    /// is enough). No file tells the two apart without writing, so this is the one decision
    /// taken from the version: a release that cannot be read counts as old, which is the safe
    /// side (the 6.8 layout also works on later kernels; it only writes more).
    pub fn exclusive_needs_cpus(&self) -> bool {
        let mut parts = self
            .kernel
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) => (major, minor) < (6, 12),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_line_becomes_a_host_path() {
        assert_eq!(
            unified_path("0::/qemu.slice/100.scope\n").as_deref(),
            Some("/sys/fs/cgroup/qemu.slice/100.scope")
        );
        assert_eq!(
            unified_path("12:cpuset:/x\n0::/\n").as_deref(),
            Some("/sys/fs/cgroup")
        );
        assert_eq!(unified_path("0::/qemu.slice/../etc\n"), None);
        assert_eq!(unified_path("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn kernels_before_6_12_need_cpuset_cpus_on_the_chain() {
        let facts = |k: &str| CgroupFacts {
            kernel: k.into(),
            ..Default::default()
        };
        assert!(facts("6.8.12-4-pve").exclusive_needs_cpus());
        assert!(facts("6.11.0-2-pve").exclusive_needs_cpus());
        assert!(facts("").exclusive_needs_cpus());
        assert!(!facts("6.12.117+deb12-cloud-amd64").exclusive_needs_cpus());
        assert!(!facts("6.14.8-2-pve").exclusive_needs_cpus());
        assert!(!facts("7.0.13+deb13-cloud-amd64").exclusive_needs_cpus());
    }
}
