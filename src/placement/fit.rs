//! The fitting itself: the smallest topology domain (L3, then NUMA node, then package, then
//! the host) that can hold the request alone, best fit among those (the one with the fewest
//! usable CPUs, so larger domains stay whole for larger VMs), then inside it as few L3
//! domains as possible. As the Kubernetes CPU manager's static policy does, but with the
//! order of levels explicit and every choice deterministic (ties go to the lowest CPU).

use crate::cpuset::CpuSet;
use crate::profile::SmtPolicy;
use crate::topology::CpuKind;

/// One physical core as placement sees it.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Its online CPUs.
    pub cpus: CpuSet,
    /// Those no other VM holds.
    pub free: CpuSet,
    /// Keys of its domains: [L3, NUMA node, package] (`None`: unknown), lowest CPU of the
    /// L3 domain as its key.
    pub keys: [Option<u32>; 3],
    pub kind: CpuKind,
}

/// How a core counts for a policy.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub smt: SmtPolicy,
    pub whole_cores: bool,
}

impl Rules {
    /// vCPU-usable CPUs this core gives.
    pub fn usable(&self, slot: &Slot) -> usize {
        let whole = slot.free == slot.cpus;
        match self.smt {
            SmtPolicy::Isolate => usize::from(whole),
            SmtPolicy::Require => {
                if whole {
                    slot.cpus.len()
                } else {
                    0
                }
            }
            SmtPolicy::Prefer if self.whole_cores => {
                if whole {
                    slot.cpus.len()
                } else {
                    0
                }
            }
            SmtPolicy::Prefer => slot.free.len(),
        }
    }

    /// What the VM holds when it takes `take` usable CPUs of this core.
    pub fn held(&self, slot: &Slot, take: usize) -> CpuSet {
        match self.smt {
            SmtPolicy::Isolate => slot.cpus.clone(),
            _ if self.whole_cores => slot.cpus.clone(),
            _ => slot.free.iter().take(take).collect(),
        }
    }
}

/// Level names, index = position in [`Slot::keys`], then the host.
pub const LEVELS: [&str; 4] = ["L3 domain", "NUMA node", "package", "host"];

/// A domain at one level: its key and the slots in it (indexes into the slot list).
#[derive(Debug, Clone)]
pub struct Domain {
    pub key: Option<u32>,
    pub slots: Vec<usize>,
    pub usable: usize,
    pub first: u32,
}

/// The domains of `level` (0..=3) over `members`, sorted by lowest CPU.
pub fn domains(slots: &[Slot], members: &[usize], level: usize, rules: Rules) -> Vec<Domain> {
    let mut out: Vec<Domain> = Vec::new();
    for &i in members {
        let key = if level < 3 {
            slots[i].keys[level]
        } else {
            None
        };
        let first = slots[i].cpus.first().unwrap_or(u32::MAX);
        let usable = rules.usable(&slots[i]);
        match out.iter_mut().find(|d| d.key == key) {
            Some(d) => {
                d.slots.push(i);
                d.usable += usable;
                d.first = d.first.min(first);
            }
            None => out.push(Domain {
                key,
                slots: vec![i],
                usable,
                first,
            }),
        }
    }
    out.sort_by_key(|d| d.first);
    out
}

/// Best fit: the domain with the fewest usable CPUs that still holds `need`; ties to the
/// lowest CPU.
pub fn best_fit(domains: &[Domain], need: usize) -> Option<&Domain> {
    domains
        .iter()
        .filter(|d| d.usable >= need)
        .min_by_key(|d| (d.usable, d.first))
}

/// Takes `need` usable CPUs from the slots of a domain of `level`, filling as few domains of
/// the levels below as it can. Returns the (slot, count) pairs taken.
pub fn fill(
    slots: &[Slot],
    members: &[usize],
    level: usize,
    need: usize,
    rules: Rules,
) -> Vec<(usize, usize)> {
    if level == 0 {
        return take_cores(slots, members, need, rules);
    }
    let mut subs = domains(slots, members, level - 1, rules);
    let mut taken = Vec::new();
    let mut need = need;
    while need > 0 && !subs.is_empty() {
        let pick = match best_fit(&subs, need) {
            Some(d) => d.key,
            // None holds the rest alone: the largest first (fewest domains in all).
            None => subs
                .iter()
                .max_by_key(|d| (d.usable, std::cmp::Reverse(d.first)))
                .map(|d| d.key)
                .unwrap_or_default(),
        };
        let at = subs.iter().position(|d| d.key == pick).unwrap_or(0);
        let sub = subs.remove(at);
        if sub.usable == 0 {
            break;
        }
        let want = need.min(sub.usable);
        let got = fill(slots, &sub.slots, level - 1, want, rules);
        need -= got.iter().map(|(_, n)| n).sum::<usize>();
        taken.extend(got);
    }
    taken
}

/// Inside one L3 domain: performance cores first, whole free cores before partly held
/// ones, cores with more threads first (a core with an offline sibling is a single), then
/// by number.
fn take_cores(slots: &[Slot], members: &[usize], need: usize, rules: Rules) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = members.to_vec();
    order.sort_by_key(|&i| {
        let s = &slots[i];
        (
            s.kind == CpuKind::Efficiency,
            s.free != s.cpus,
            std::cmp::Reverse(s.free.len()),
            s.cpus.first(),
        )
    });
    let mut need = need;
    let mut out = Vec::new();
    for i in order {
        if need == 0 {
            break;
        }
        let n = rules.usable(&slots[i]).min(need);
        if n > 0 {
            out.push((i, n));
            need -= n;
        }
    }
    out
}
