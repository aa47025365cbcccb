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
    /// The slot keys from this level up: an L3 domain is also told apart by its node and
    /// package, so cores with no known L3 form one domain per node, never one for the host.
    pub key: Vec<Option<u32>>,
    pub slots: Vec<usize>,
    pub usable: usize,
    pub first: u32,
}

/// The domains of `level` (0..=3) over `members`, sorted by lowest CPU.
pub fn domains(slots: &[Slot], members: &[usize], level: usize, rules: Rules) -> Vec<Domain> {
    let mut out: Vec<Domain> = Vec::new();
    for &i in members {
        let key = slots[i].keys[level.min(3)..].to_vec();
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
        let fits = subs
            .iter()
            .enumerate()
            .filter(|(_, d)| d.usable >= need)
            .min_by_key(|(_, d)| (d.usable, d.first));
        // None holds the rest alone: the largest first (fewest domains in all).
        let largest = || {
            subs.iter()
                .enumerate()
                .max_by_key(|(_, d)| (d.usable, std::cmp::Reverse(d.first)))
        };
        let at = fits.or_else(largest).map_or(0, |(i, _)| i);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(cpus: &str, l3: Option<u32>, node: u32) -> Slot {
        let cpus: CpuSet = cpus.parse().unwrap();
        Slot {
            free: cpus.clone(),
            cpus,
            keys: [l3, Some(node), Some(0)],
            kind: CpuKind::Unknown,
        }
    }

    const PREFER: Rules = Rules {
        smt: SmtPolicy::Prefer,
        whole_cores: false,
    };

    #[test]
    fn cores_without_a_known_l3_form_one_domain_per_node() {
        let slots = [slot("0", None, 0), slot("1", None, 0), slot("2", None, 1)];
        let all = [0, 1, 2];
        let l3 = domains(&slots, &all, 0, PREFER);
        assert_eq!(l3.len(), 2, "{l3:?}");
        assert_eq!(l3[0].slots, [0, 1]);
        assert_eq!(best_fit(&l3, 2).map(|d| d.first), Some(0));
        assert!(best_fit(&l3, 3).is_none());
    }

    #[test]
    fn fill_takes_the_subdomain_that_holds_the_rest_else_the_largest() {
        // Node 0: L3 A with 3 free CPUs, L3 B with 2.
        let slots = [
            slot("0-2", Some(0), 0),
            slot("3", Some(3), 0),
            slot("4", Some(3), 0),
        ];
        let take = |need| {
            let got = fill(&slots, &[0, 1, 2], 1, need, PREFER);
            got.iter().fold(CpuSet::new(), |a, &(i, n)| {
                a.union(&PREFER.held(&slots[i], n))
            })
        };
        assert_eq!(
            take(2).to_string(),
            "3-4",
            "B holds 2 alone and is the tighter fit"
        );
        assert_eq!(take(3).to_string(), "0-2");
        assert_eq!(take(4).to_string(), "0-3", "A whole, then the rest from B");
    }
}
