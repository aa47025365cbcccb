//! Kernel threads and unbound workqueues against a VM's isolated CPUs: verified and reported,
//! never written.
//!
//! Once a VM's CPUs are an isolated cpuset partition, the kernel moves what may move off them
//! by itself: the root cgroup's tasks, kthreadd and node-bound kthreads such as kswapd (reset
//! to the CPUs outside every partition), and the unbound workqueue mask (`requested` minus
//! `cpumask_isolated`). The lab saw it on 6.12, 6.17 and 7.0 (docs/kernel-facts.md: kthreadd
//! and kswapd1 on `0-3`, `workqueue/cpumask` `0f` with `cpumask_isolated` `f0`). pvetune
//! relies on that instead of writing it: a workqueue mask or a kthread affinity "restored"
//! when one VM stops would put another running VM's CPUs back, and the kernel rewrites a
//! pinned kthread at the next partition change anyway. What is left is to check and say so:
//! a kthread created later on 6.8 gets every CPU, a CPU coming online on 6.14/6.17 can put
//! kswapd back on an isolated CPU, and a write to `workqueue/cpumask` applies isolated CPUs as
//! written (/work/shared/isolation-facts.md sections 6 and 7).
//!
//! Kernel threads are told by `PF_KTHREAD` in their `stat` flags, never by name or parent
//! (a user process can call itself `kworker/0:1`). Those with `PF_NO_SETAFFINITY` (per-CPU
//! threads, every workqueue worker) cannot be moved by anyone and are only counted; unbound
//! workers follow the workqueue mask, which is checked on its own. The cost is one listing of
//! `/proc` and one read of `stat` per process, plus one of `status` per movable kthread.

use std::fmt::Write as _;

use crate::cpuset::{CpuFormat, CpuSet, MAX_LIST_BYTES};
use crate::excerpt::excerpt;
use crate::facts::numbered_entries;
use crate::procstat::{PF_KTHREAD, PF_NO_SETAFFINITY, Stat};
use crate::root::{Root, paths};

/// The effective global mask of unbound workqueues (a hex mask, writable).
pub const WQ_CPUMASK: &str = "/sys/devices/virtual/workqueue/cpumask";
/// The CPUs isolated partitions take out of it (read-only, 6.8 on).
pub const WQ_CPUMASK_ISOLATED: &str = "/sys/devices/virtual/workqueue/cpumask_isolated";
/// The mask last written to [`WQ_CPUMASK`], or all CPUs (read-only, 6.8 on).
pub const WQ_CPUMASK_REQUESTED: &str = "/sys/devices/virtual/workqueue/cpumask_requested";

/// The longest `/proc/<pid>/status` read: its two CPU lines take at most about 43 KB (a
/// cpulist of 8192 CPUs, their mask) and the rest a few KB.
const MAX_STATUS_BYTES: usize = 128 * 1024;

/// How many kthreads still on the CPUs a summary names.
const NAMED: usize = 5;

/// The kernel threads of the host, seen from the VM's CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KthreadScan {
    /// Kernel threads seen (`PF_KTHREAD`), all of whose files could be read.
    pub total: usize,
    /// Of those, the ones with `PF_NO_SETAFFINITY` (per-CPU threads, workqueue workers): they
    /// cannot move, so they are counted and left alone.
    pub fixed: usize,
    /// Movable kernel threads whose allowed CPUs still meet the VM's, in pid order.
    pub on_cpus: Vec<KthreadOnCpus>,
}

/// A movable kernel thread allowed on some of the VM's CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KthreadOnCpus {
    pub pid: i32,
    /// `stat` field 22: with `pid`, names this thread even after the pid is reused.
    pub start_time: u64,
    pub comm: String,
    /// `Cpus_allowed_list` of its `status`.
    pub allowed: CpuSet,
}

/// The unbound workqueue masks; `None` where the file is absent or unreadable
/// (`cpumask_isolated` and `cpumask_requested` do not exist before 6.8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkqueueCheck {
    pub mask: Option<CpuSet>,
    pub isolated: Option<CpuSet>,
    pub requested: Option<CpuSet>,
}

/// Every kernel thread under `/proc`, and the movable ones allowed on `cpus`. A process that
/// vanishes during the scan, or whose files are not shaped like the kernel's, is left out of
/// every count; so is an entry of `/proc` that is not a pid.
pub fn scan(root: &Root, cpus: &CpuSet) -> KthreadScan {
    let mut pids: Vec<i32> = numbered_entries(&root.path(paths::PROC))
        .filter_map(|n| i32::try_from(n).ok())
        .collect();
    pids.sort_unstable();
    let mut scan = KthreadScan::default();
    for pid in pids {
        match look(root, pid) {
            Some(Kind::User) | None => {}
            Some(Kind::Fixed) => {
                scan.total += 1;
                scan.fixed += 1;
            }
            Some(Kind::Movable(kthread)) => {
                scan.total += 1;
                if !kthread.allowed.is_disjoint(cpus) {
                    scan.on_cpus.push(kthread);
                }
            }
        }
    }
    scan
}

enum Kind {
    User,
    Fixed,
    Movable(KthreadOnCpus),
}

/// What process `pid` is; `None` if it is gone or its files are odd.
fn look(root: &Root, pid: i32) -> Option<Kind> {
    let dir = format!("{}/{pid}", paths::PROC);
    let stat = Stat::read(&root.path(format!("{dir}/stat")))?;
    // A line about another pid is no line about this one.
    if stat.pid() != Some(pid) {
        return None;
    }
    let flags = stat.flags()?;
    if flags & PF_KTHREAD == 0 {
        return Some(Kind::User);
    }
    if flags & PF_NO_SETAFFINITY != 0 {
        return Some(Kind::Fixed);
    }
    let start_time = stat.start_time()?;
    let status =
        crate::attr::read_at_most(&root.path(format!("{dir}/status")), MAX_STATUS_BYTES).ok()?;
    let allowed = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .and_then(|list| CpuFormat::List.parse(list))?;
    Some(Kind::Movable(KthreadOnCpus {
        pid,
        start_time,
        comm: stat.comm().to_string(),
        allowed,
    }))
}

/// The three workqueue masks, as they are now.
///
/// Reading does not depend on `cpus`; they are what [`WorkqueueCheck::verified`] and
/// [`WorkqueueCheck::summary`] compare against, and the debug log names them.
pub fn workqueues(root: &Root, cpus: &CpuSet) -> WorkqueueCheck {
    let mask = |path: &str| {
        crate::attr::read_at_most(&root.path(path), MAX_LIST_BYTES)
            .ok()
            .and_then(|text| CpuFormat::Mask.parse(&text))
    };
    let check = WorkqueueCheck {
        mask: mask(WQ_CPUMASK),
        isolated: mask(WQ_CPUMASK_ISOLATED),
        requested: mask(WQ_CPUMASK_REQUESTED),
    };
    log::debug!("workqueues against CPUs {cpus}: {check:?}");
    check
}

impl KthreadScan {
    /// Kernel threads were seen and none of the movable ones may run on `cpus`.
    pub fn verified(&self) -> bool {
        self.total > 0 && self.on_cpus.is_empty()
    }

    /// One line for the hook's log: the counts, and up to five kthreads still on `cpus`.
    pub fn summary(&self, cpus: &CpuSet) -> String {
        if self.total == 0 {
            return "kthreads: no kernel thread found in /proc: not verified".into();
        }
        let mut line = format!(
            "kthreads: {}, {} left alone ({} cannot move), ",
            count(self.total, "kernel thread", "kernel threads"),
            count(
                self.fixed,
                "per-CPU or workqueue worker",
                "per-CPU or workqueue workers"
            ),
            if self.fixed == 1 { "it" } else { "they" },
        );
        if self.on_cpus.is_empty() {
            let _ = write!(line, "none of the movable ones on CPUs {cpus}");
            return line;
        }
        let _ = write!(
            line,
            "{} still allowed on CPUs {cpus}: ",
            count(self.on_cpus.len(), "movable one", "movable ones"),
        );
        let named: Vec<String> = self
            .on_cpus
            .iter()
            .take(NAMED)
            .map(|k| {
                format!(
                    "{} (pid {}, allowed {})",
                    excerpt(&k.comm),
                    k.pid,
                    k.allowed
                )
            })
            .collect();
        line.push_str(&named.join(", "));
        if self.on_cpus.len() > NAMED {
            let _ = write!(line, " and {} more", self.on_cpus.len() - NAMED);
        }
        line
    }
}

impl WorkqueueCheck {
    /// The unbound mask could be read and holds none of `cpus`.
    pub fn verified(&self, cpus: &CpuSet) -> bool {
        self.mask
            .as_ref()
            .is_some_and(|mask| mask.is_disjoint(cpus))
    }

    /// One line for the hook's log: the mask, and why it does or does not hold `cpus`.
    pub fn summary(&self, cpus: &CpuSet) -> String {
        let Some(mask) = &self.mask else {
            return format!(
                "workqueues: {WQ_CPUMASK} cannot be read: unbound workqueues not verified; \
                 nothing written"
            );
        };
        let on = mask.intersection(cpus);
        let why = match (&self.isolated, on.is_empty()) {
            (Some(iso), true) if cpus.is_subset(iso) => format!(
                " (the kernel took CPUs {cpus} out: cpumask_isolated {})",
                shown(iso)
            ),
            (Some(iso), true) => format!(
                ", none of CPUs {cpus} (left out by the mask itself, not by isolation: \
                 cpumask_isolated {})",
                shown(iso)
            ),
            (None, true) => {
                format!(", none of CPUs {cpus} (this kernel has no cpumask_isolated to say why)")
            }
            (Some(iso), false) if on.is_subset(iso) => format!(
                " still holds CPUs {on}, which cpumask_isolated {} takes out: cpumask was \
                 written after the partition was made (cpumask_requested {}); the next \
                 partition change takes them out",
                shown(iso),
                self.requested.as_ref().map_or("unknown".into(), shown),
            ),
            (Some(iso), false) => format!(
                " still holds CPUs {on}: the kernel does not count them as isolated \
                 (cpumask_isolated {}): their partition is not a valid isolated one",
                shown(iso)
            ),
            (None, false) => format!(
                " still holds CPUs {on}: this kernel has no cpumask_isolated (before 6.8, \
                 isolated partitions leave the workqueue mask alone)"
            ),
        };
        format!(
            "workqueues: unbound mask {}{why}; nothing written",
            shown(mask)
        )
    }
}

/// A set for a message: its cpulist, or `none`.
fn shown(set: &CpuSet) -> String {
    if set.is_empty() {
        "none".into()
    } else {
        set.to_string()
    }
}

/// `1 kernel thread`, `143 kernel threads`.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
