//! `isolation:` of a profile: IRQs, the cpuset partition, kernel threads, the CPU cycle and
//! irqbalance, parsed from YAML and checked for what they need of each other.

use super::memory::Bad;
use super::{Located, at, located, one_of};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// `isolation:`: what besides pinning keeps the host off the VM's CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Isolation {
    /// Every movable IRQ, and the default affinity of IRQs yet to come, off `cpus`.
    pub irqs: bool,
    /// `partition: isolated`: the vCPU threads in an isolated cpuset partition of `cpus`
    /// (where in the profile, for errors).
    pub partition: Option<Located<()>>,
    /// `kthreads: true`: verify after post-start that no movable kernel thread is left on
    /// `cpus` (the kernel moves them off an isolated partition; pvetune never pins them).
    pub kthreads: Option<Located<bool>>,
    /// `cpu-cycle: true`: each of `cpus` offline and online again before the partition and
    /// the pins (post-start).
    pub cpu_cycle: Option<Located<bool>>,
    /// `irqbalance:`: what to do about a running irqbalance, which moves IRQs back.
    pub irqbalance: IrqbalancePolicy,
}

impl Isolation {
    /// `kthreads: true`.
    pub fn verify_kthreads(&self) -> bool {
        self.kthreads.as_ref().is_some_and(|k| k.value)
    }
}

/// `isolation.irqbalance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IrqbalancePolicy {
    /// A warning in `plan`, `check` and the hook log (irqbalance left alone).
    #[default]
    Warn,
    /// Ban the VM's CPUs in irqbalance over its socket while the VM runs.
    Ban,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawIsolation {
    irqs: Option<bool>,
    partition: Option<Spanned<String>>,
    kthreads: Option<Spanned<bool>>,
    cpu_cycle: Option<Spanned<bool>>,
    irqbalance: Option<Spanned<String>>,
}

/// The validated `isolation:` (all off when absent).
pub(super) fn parse(raw: Option<RawIsolation>) -> Result<Isolation, Bad> {
    let raw_isolation = raw.unwrap_or_default();
    // A word that is none of a key's words.
    let unknown = |key, p: &Spanned<String>, what: &str| {
        let value = crate::excerpt::excerpt(&p.value);
        (key, at(p), format!("'{value}' is not {what}"))
    };
    let partition = match one_of(&raw_isolation.partition, &["isolated", "none"]) {
        Ok(Some((p, "isolated"))) => Some(located((), at(p))),
        Ok(_) => None,
        Err(p) => {
            let what = "a partition type: expected isolated (or none)";
            return Err(unknown("isolation.partition", p, what));
        }
    };
    let irqs = raw_isolation.irqs.unwrap_or(false);
    let irqbalance = match one_of(&raw_isolation.irqbalance, &["warn", "ban"]) {
        Ok(None | Some((_, "warn"))) => IrqbalancePolicy::Warn,
        Ok(Some(_)) if irqs => IrqbalancePolicy::Ban,
        Ok(Some((p, _))) => {
            return Err((
                "isolation.irqbalance",
                at(p),
                "ban needs 'irqs: true' in isolation: irqbalance is only asked to stay off \
                 the CPUs that pvetune moves the IRQs off"
                    .into(),
            ));
        }
        Err(p) => {
            let what = "an irqbalance policy: expected ban or warn";
            return Err(unknown("isolation.irqbalance", p, what));
        }
    };
    Ok(Isolation {
        irqs,
        partition,
        kthreads: raw_isolation
            .kthreads
            .as_ref()
            .map(|k| located(k.value, at(k))),
        cpu_cycle: raw_isolation
            .cpu_cycle
            .as_ref()
            .map(|c| located(c.value, at(c))),
        irqbalance,
    })
}
