//! Kernel files whose value is a CPU set: their two text forms, and taking a VM's CPUs out
//! of one (what a composed claim writes).

use super::{CpuSet, MAX_CPUS};

/// The text form of a kernel file that holds a CPU set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuFormat {
    /// `0-3,8` (`smp_affinity_list`, `cpuset.cpus*`).
    List,
    /// `ff` or `00000000,000000ff` (`default_smp_affinity`, workqueue `cpumask`).
    Mask,
}

impl CpuFormat {
    pub fn parse(self, text: &str) -> Option<CpuSet> {
        let text = text.trim();
        match self {
            CpuFormat::List => CpuSet::parse_list(text, MAX_CPUS).ok(),
            CpuFormat::Mask => {
                let nbits = text.split(',').map(|w| w.len() as u32 * 4).sum::<u32>();
                CpuSet::parse_mask(text, nbits.max(1)).ok()
            }
        }
    }

    /// `set` written as this format, in the layout of `like` for a mask.
    pub fn render(self, set: &CpuSet, like: &str) -> String {
        match self {
            CpuFormat::List => set.to_string(),
            CpuFormat::Mask => set.to_mask_like(like),
        }
    }
}

/// A host-wide CPU set file with some CPUs taken out: `current` minus `remove`, or `fallback`
/// minus `remove` when nothing would be left (a file such as an IRQ's affinity must never name
/// no CPU). `current` itself, byte for byte, when nothing changes or when it cannot be parsed
/// (a file pvetune does not understand is left alone).
pub fn exclude_text(
    current: &str,
    format: CpuFormat,
    remove: &CpuSet,
    fallback: &CpuSet,
) -> String {
    let Some(set) = format.parse(current) else {
        return current.to_string();
    };
    let mut left = set.difference(remove);
    if left.is_empty() {
        left = fallback.difference(remove);
    }
    if left.is_empty() || left == set {
        return current.to_string();
    }
    format.render(&left, current)
}

/// A host-wide CPU set file with some CPUs added: `current` plus `add` (an empty file is the
/// empty set). `current` itself, byte for byte, when nothing changes or when it cannot be
/// parsed.
pub fn include_text(current: &str, format: CpuFormat, add: &CpuSet) -> String {
    let set = if current.trim().is_empty() {
        Some(CpuSet::new())
    } else {
        format.parse(current)
    };
    let Some(set) = set else {
        return current.to_string();
    };
    let all = set.union(add);
    if all == set {
        return current.to_string();
    }
    format.render(&all, current)
}
