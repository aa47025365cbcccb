//! A claim on a host file, as the ledger keeps it: the file's original content, every VM
//! that holds it with the value it wants, and for a composed claim (a CPU set made from every
//! holder's CPUs, a hugepage count, a controller list) how the value is made
//! ([`Claim::effective`]). Kept small: the ledger holds one per IRQ.

use super::Extra;
use crate::cpuset::{CpuFormat, CpuSet, exclude_text, include_text};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cell::RefCell;

/// The text of a ledger entry (a file's original content, a holder's value): kept in place up
/// to 24 bytes (`0-255\n`, `0-1`), without an allocation of its own; the ledger holds a claim
/// per IRQ, each with two of them.
pub type Text = compact_str::CompactString;

/// A claim's holders: one kept in the claim itself, more on the heap (a claim per IRQ has one).
pub type Holders = smallvec::SmallVec<[Holder; 1]>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Exact file content before the first claim.
    pub original: Text,
    /// Most claims have one holder (a claim per IRQ): it is kept in the claim itself.
    pub holders: Holders,
    /// Set for a file whose value is a CPU set composed from every holder (an IRQ's
    /// affinity): each holder's `value` is then the CPUs it takes out, not a value to write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compose: Option<Compose>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// How a composed claim's value is made from its original and every holder's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compose {
    /// Absent in ledgers written before there was more than one way (`exclude`).
    #[serde(default, skip_serializing_if = "ComposeOp::is_exclude")]
    pub op: ComposeOp,
    pub format: CpuFormat,
    /// The housekeeping CPUs as the latest claimer saw them.
    #[serde(deserialize_with = "shared_set")]
    pub fallback: CpuSet,
    /// `Ban` only: the CPUs irqbalance banned by itself when the first VM claimed (see
    /// [`ComposeOp::Ban`]). Empty, and not written, for every other op.
    #[serde(default, skip_serializing_if = "CpuSet::is_empty")]
    pub base: CpuSet,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The ways a claim is composed. Each is commutative, so the order in which VMs start and
/// stop never matters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComposeOp {
    /// A CPU set file: the original minus every holder's CPUs, or `fallback` minus them when
    /// that would leave none (an IRQ's affinity; `cpuset::exclude_text`).
    #[default]
    Exclude,
    /// A CPU set file: the original plus every holder's CPUs (the exclusive CPUs of
    /// `qemu.slice`, which must cover every isolated VM's partition).
    Include,
    /// `cgroup.subtree_control`: each holder's value is a controller it needs switched on.
    /// Only those words are ever written (`+cpuset`, and `-cpuset` after the last holder if it
    /// was off before); what others switch on or off meanwhile is left alone. `original`
    /// holds only the held words that were on before the first claim.
    Words,
    /// A cgroup directory pvetune creates: `original` is `absent`, a holder's value the
    /// `cgroup.type` to give it. Releasing the last holder moves any thread left in it to
    /// its parent and removes it.
    Dir,
    /// irqbalance's banned CPUs, set over its socket (`settings cpus`), keyed by the socket's
    /// path: the CPUs it banned before the first claim (`base`) plus every holder's CPUs.
    /// `original` is [`crate::irqbalance::Setting::original_text`]: `NULL` when that ban was
    /// irqbalance's own detection, else the explicit cpulist someone had set. `base` records
    /// the detected CPUs as well, because a `settings cpus` list *replaces* the detection: the
    /// list sent while VMs hold the claim must name them too, and they are never read again
    /// (irqbalance's `BANNED` lags a scan behind and already holds VM CPUs). The last release
    /// sends `original` (`NULL`: irqbalance detects again).
    Ban,
    /// A hugepage pool's `nr_hugepages`: the original count plus every holder's pages (each
    /// VM's reservation). A release never raises the pool (qemu-server may have shrunk it
    /// after the start, `keephugepages: 0`): it writes the smaller of what the file holds and
    /// what the others still need.
    Add,
    /// `/sys/bus/pci/rescan`, held while a VM's devices are removed and not yet rescanned:
    /// a holder's value lists the functions. Its release rescans (a crash in between is
    /// mended by the next rollback); a successful reset releases it at once.
    Rescan,
}

impl Compose {
    /// A composition that needs no CPU format or fallback (`Include` of a CPU list,
    /// `Words`, `Dir`).
    pub fn of(op: ComposeOp) -> Self {
        Compose {
            op,
            format: CpuFormat::List,
            fallback: CpuSet::new(),
            base: CpuSet::new(),
            extra: Extra::new(),
        }
    }
}

impl ComposeOp {
    fn is_exclude(&self) -> bool {
        *self == ComposeOp::Exclude
    }
}

/// A holder's field for a boot-time reservation (`pvetune reserve`): kept across the VM's
/// stops and reconciles, released only by `pvetune rollback <vmid>` or a later `reserve`.
pub const KEPT: &str = "boot";

impl Holder {
    /// A boot-time reservation, which the VM's post-stop and reconcile leave alone.
    pub fn kept(&self) -> bool {
        self.extra.get(KEPT) == Some(&serde_json::Value::Bool(true))
    }
}

/// What a `Dir` claim's directory reads when it does not exist.
pub const DIR_ABSENT: &str = "absent";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub vmid: u32,
    pub value: Text,
    /// Order in which this VM took its claims (1, 2, ...): rollback releases them last first,
    /// so a cgroup's files go before the cgroup and a child before its parent. 0 in ledgers
    /// written before it was recorded (released in reverse path order, as then).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Claim {
    /// The value the file should hold: the original when no holder is left; for a composed
    /// claim, the original minus the CPUs of every holder; else the last claimer's value.
    /// Composing is commutative, so with composed claims the stop order of VMs never matters.
    pub fn effective(&self) -> Cow<'_, str> {
        let Some(last) = self.holders.last() else {
            return Cow::Borrowed(&self.original);
        };
        let Some(compose) = &self.compose else {
            return Cow::Borrowed(&last.value);
        };
        let taken = || {
            self.holders
                .iter()
                .filter_map(|h| h.value.parse::<CpuSet>().ok())
                .fold(CpuSet::new(), |acc, c| acc.union(&c))
        };
        match compose.op {
            ComposeOp::Exclude => Cow::Owned(exclude_text(
                &self.original,
                compose.format,
                &taken(),
                &compose.fallback,
            )),
            ComposeOp::Include => {
                Cow::Owned(include_text(&self.original, compose.format, &taken()))
            }
            ComposeOp::Words => {
                let mut words: Vec<&str> = self.original.split_whitespace().collect();
                words.extend(self.holders.iter().map(|h| h.value.as_str()));
                words.sort_unstable();
                words.dedup();
                Cow::Owned(words.join(" "))
            }
            ComposeOp::Dir => Cow::Borrowed(&last.value),
            ComposeOp::Ban => Cow::Owned(compose.base.union(&taken()).to_string()),
            ComposeOp::Add => {
                let pages: u64 = self
                    .holders
                    .iter()
                    .filter_map(|h| h.value.trim().parse::<u64>().ok())
                    .sum();
                let base = self.original.trim().parse::<u64>().unwrap_or(0);
                Cow::Owned((base + pages).to_string())
            }
            ComposeOp::Rescan => Cow::Borrowed(&last.value),
        }
    }

    /// This VM's holding, if it holds the claim.
    pub fn holder(&self, vmid: u32) -> Option<&Holder> {
        self.holders.iter().find(|h| h.vmid == vmid)
    }

    pub fn op(&self) -> Option<ComposeOp> {
        self.compose.as_ref().map(|c| c.op)
    }
}

/// A CPU set read as the one before it when its text is the same, sharing its words: a ledger
/// lists a claim per IRQ, all with the same fallback.
fn shared_set<'de, D: serde::Deserializer<'de>>(d: D) -> Result<CpuSet, D::Error> {
    thread_local! {
        static LAST: RefCell<(String, CpuSet)> = RefCell::default();
    }
    let text = String::deserialize(d)?;
    LAST.with_borrow_mut(|(last_text, last)| {
        if *last_text != text {
            *last = text.parse().map_err(serde::de::Error::custom)?;
            *last_text = text;
        }
        Ok(last.clone())
    })
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
