//! The rules of kernel 6.8 (Proxmox VE 8's default) that later kernels dropped, as the lab saw
//! them (docs/kernel-facts.md, column pve8.k68) and `cpuset.c` of 6.8 has them:
//! - a cgroup's exclusive CPUs are `cpuset.cpus.exclusive ∩ cpuset.cpus ∩ parent's`
//!   (`compute_effective_exclusive_cpumask`), so a partition with an empty `cpuset.cpus` reads
//!   back `isolated invalid (cpuset.cpus is empty)` and one whose ancestors lack the CPUs in
//!   their `cpuset.cpus` `isolated invalid (Invalid cpu list in cpuset.cpus.exclusive)`;
//! - siblings are checked against each other when either has exclusive CPUs, each by
//!   `fetch_xcpus`: its exclusive CPUs when set, else its `cpuset.cpus` (`validate_change`).
//!   That is upstream 6.8.0; Ubuntu's 6.8.0-151 in the lab accepts a sibling's `cpuset.cpus`
//!   over exclusive CPUs (docs/kernel-facts.md, `sibling.superset`): the model keeps the
//!   stricter rule, so an order of steps that passes here passes on both.
//!
//! One rule holds up to 6.17 and is modelled for every kernel: `cpuset.cpus` cannot go from
//! non-empty to empty while the cgroup (or a descendant) has tasks (ENOSPC).

use super::{CgroupKernel, err, put};
use pvetune::cpuset::CpuSet;
use std::io;

impl CgroupKernel {
    /// The CPUs 6.8 checks siblings with.
    fn fetch_xcpus(&self, cg: &str) -> CpuSet {
        let exclusive = self.list(cg, "cpuset.cpus.exclusive");
        if exclusive.is_empty() {
            self.list(cg, "cpuset.cpus")
        } else {
            exclusive
        }
    }

    /// Whether any thread is in `cg` or below it (`cgroup_is_populated`).
    pub(super) fn populated(&self, cg: &str) -> bool {
        let below = format!("{cg}/");
        self.threads
            .borrow()
            .values()
            .any(|(_, c)| c == cg || c.starts_with(&below))
    }

    /// 6.8: the siblings of `cg` that conflict with `mine` (its CPUs as 6.8 checks them),
    /// when `cg` or the sibling has exclusive CPUs.
    pub(super) fn sibling_conflict_6_8(&self, cg: &str, mine: &CpuSet, exclusive: bool) -> bool {
        let Some(parent) = Self::parent(cg) else {
            return false;
        };
        self.children(&parent)
            .into_iter()
            .filter(|s| s != cg)
            .any(|s| {
                let theirs_exclusive = !self.list(&s, "cpuset.cpus.exclusive").is_empty();
                (exclusive || theirs_exclusive)
                    && !self.fetch_xcpus(&s).intersection(mine).is_empty()
            })
    }

    /// 6.8's extra verdict on a partition: `cpuset.cpus` on it and on every ancestor below
    /// the root must cover its exclusive CPUs.
    pub(super) fn verdict_6_8(&self, cg: &str, mine: &CpuSet) -> Result<(), String> {
        if self.list(cg, "cpuset.cpus").is_empty() {
            return Err("cpuset.cpus is empty".into());
        }
        let mut at = Some(cg.to_string());
        while let Some(c) = at.filter(|c| !c.is_empty()) {
            if !mine.difference(&self.list(&c, "cpuset.cpus")).is_empty() {
                return Err("Invalid cpu list in cpuset.cpus.exclusive".into());
            }
            at = Self::parent(&c);
        }
        Ok(())
    }

    pub(super) fn write_cpus(&self, cg: &str, value: &str) -> io::Result<()> {
        let set: CpuSet = if value.trim().is_empty() {
            CpuSet::new()
        } else {
            value.trim().parse().map_err(|_| err(nix::libc::EINVAL))?
        };
        if !set.difference(&self.all).is_empty() {
            return Err(err(nix::libc::EINVAL));
        }
        let now = self.list(cg, "cpuset.cpus");
        if set.is_empty() && !now.is_empty() && self.populated(cg) {
            return Err(err(nix::libc::ENOSPC));
        }
        if self.v6_8 {
            let exclusive = self.list(cg, "cpuset.cpus.exclusive");
            let mine = if exclusive.is_empty() {
                set.clone()
            } else {
                exclusive.clone()
            };
            if self.sibling_conflict_6_8(cg, &mine, !exclusive.is_empty()) {
                return Err(err(nix::libc::EINVAL));
            }
        }
        put(&self.dir(cg), "cpuset.cpus", &format!("{set}\n"));
        self.settle();
        Ok(())
    }
}
