//! `cpus:` either names host CPUs (a cpulist) or says what the VM needs (a placement request
//! that pvetune fits on the node the VM starts on: see `placement`).

use super::{Located, Placement, ProfileError, at, located};
use crate::cpuset::CpuSet;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;
use std::fmt;

/// What `cpus:` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuRequest {
    /// Exactly these host CPUs.
    List(CpuSet),
    /// CPUs chosen by topology at pre-start.
    Place(PlaceRequest),
}

/// A placement request (`cpus:` as a mapping). Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceRequest {
    /// `count`: CPUs the vCPUs run on; `None`: one per vCPU of the VM config.
    pub count: Option<u32>,
    /// `emulator-cpus`: CPUs added to the count for the VM's own emulator threads (with
    /// `emulator: vm`).
    pub emulator_cpus: u32,
    /// `within`: the topology level all the CPUs must share.
    pub within: Within,
    /// `smt`: how SMT siblings are used (Nova's `hw:cpu_thread_policy`).
    pub smt: SmtPolicy,
    /// `whole-cores`: never share a core with anyone (an odd count rounds up to the core).
    pub whole_cores: bool,
    /// `core-type: performance`: P-cores only on a hybrid CPU.
    pub performance_only: bool,
    /// `near-devices`: on the NUMA node of the VM's passthrough devices.
    pub near_devices: bool,
    /// `near-memory`: on the host nodes the VM config binds its memory to (`numaN: hostnodes=`).
    pub near_memory: bool,
    /// `cpu0-core`: may CPU 0's core be given to the VM (the host's boot CPU, where much of
    /// the kernel's own work lands).
    pub allow_cpu0_core: bool,
    /// `host-cores`: whole cores that must stay free of every VM after this placement.
    pub host_cores: u32,
}

impl Default for PlaceRequest {
    fn default() -> Self {
        PlaceRequest {
            count: None,
            emulator_cpus: 0,
            within: Within::Any,
            smt: SmtPolicy::Prefer,
            whole_cores: false,
            performance_only: false,
            near_devices: false,
            near_memory: true,
            allow_cpu0_core: false,
            host_cores: 1,
        }
    }
}

/// `within:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Within {
    L3,
    NumaNode,
    Package,
    /// As few L3 domains and NUMA nodes as possible, but no limit.
    Any,
}

impl Within {
    pub fn as_str(self) -> &'static str {
        match self {
            Within::L3 => "l3",
            Within::NumaNode => "numa-node",
            Within::Package => "package",
            Within::Any => "any",
        }
    }
}

/// `smt:`, as OpenStack Nova names its thread policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtPolicy {
    /// Sibling threads of one core together (guest sibling pairs on host sibling pairs).
    Prefer,
    /// One thread per core; the siblings are held by the VM too and stay idle.
    Isolate,
    /// Sibling pairs, whole cores only; fails on a host without SMT.
    Require,
}

impl SmtPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SmtPolicy::Prefer => "prefer",
            SmtPolicy::Isolate => "isolate",
            SmtPolicy::Require => "require",
        }
    }
}

/// `cpus:` before its meaning is checked: a cpulist (a string, or a bare number) or a mapping.
pub(super) enum RawCpus {
    List(String),
    Place(Box<RawPlace>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawPlace {
    count: Option<Spanned<u32>>,
    emulator_cpus: Option<Spanned<u32>>,
    within: Option<Spanned<String>>,
    smt: Option<Spanned<String>>,
    whole_cores: Option<bool>,
    core_type: Option<Spanned<String>>,
    near_devices: Option<bool>,
    near_memory: Option<bool>,
    cpu0_core: Option<Spanned<String>>,
    host_cores: Option<Spanned<u32>>,
}

impl<'de> Deserialize<'de> for RawCpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawCpus;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a cpulist (6-11,18-23) or a placement mapping (count:, within:, smt:, ...)",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawCpus, E> {
                Ok(RawCpus::List(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawCpus, E> {
                Ok(RawCpus::List(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawCpus, E> {
                Ok(RawCpus::List(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawCpus, A::Error> {
                RawPlace::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|p| RawCpus::Place(Box::new(p)))
            }
        }
        d.deserialize_any(V)
    }
}

type Invalid<'a> = &'a dyn Fn(&'static str, (u32, u32), String) -> ProfileError;

/// Gives `cpus:` its meaning.
pub(super) fn parse(
    raw: Spanned<RawCpus>,
    invalid: Invalid,
) -> Result<Located<CpuRequest>, ProfileError> {
    let pos = at(&raw);
    let request = match raw.value {
        RawCpus::List(text) => {
            let cpus: CpuSet = text
                .parse()
                .map_err(|e: crate::cpuset::CpuListError| invalid("cpus", pos, e.to_string()))?;
            if cpus.is_empty() {
                return Err(invalid("cpus", pos, "no CPUs given".into()));
            }
            CpuRequest::List(cpus)
        }
        RawCpus::Place(p) => CpuRequest::Place(place(*p, invalid)?),
    };
    Ok(located(request, pos))
}

/// Keys that act on the VM's CPUs mean nothing without `cpus`: the first one given (with
/// where it is) is refused.
pub(super) fn require_cpus<const N: usize>(
    keys: [(&'static str, Option<(u32, u32)>); N],
    invalid: Invalid,
) -> Result<(), ProfileError> {
    match keys
        .into_iter()
        .find_map(|(key, pos)| pos.map(|p| (key, p)))
    {
        Some((key, pos)) => Err(invalid(
            key,
            pos,
            format!(
                "{key} acts on the VM's CPUs: it needs 'cpus' (a cpulist or a placement request)"
            ),
        )),
        None => Ok(()),
    }
}

/// `emulator-cpus` reserves CPUs for `emulator: vm` or `iothreads: vm`; without either they
/// would stay idle.
pub(super) fn check_reserved(
    cpus: Option<&Located<CpuRequest>>,
    placements: [&Placement; 2],
    invalid: Invalid,
) -> Result<(), ProfileError> {
    if let Some(Located {
        value: CpuRequest::Place(request),
        line,
        column,
    }) = cpus
        && request.emulator_cpus > 0
        && !placements.contains(&&Placement::VmCpus)
    {
        return Err(invalid(
            "cpus.emulator-cpus",
            (*line, *column),
            "the reserved CPUs are for 'emulator: vm' or 'iothreads: vm'; with housekeeping \
             they would stay idle"
                .into(),
        ));
    }
    Ok(())
}

fn place(p: RawPlace, invalid: Invalid) -> Result<PlaceRequest, ProfileError> {
    let mut req = PlaceRequest::default();
    let word = |key: &'static str, v: &Spanned<String>, words: &[&'static str]| {
        words
            .iter()
            .copied()
            .find(|w| *w == v.value)
            .ok_or_else(|| {
                let value = crate::excerpt::excerpt(&v.value);
                invalid(
                    key,
                    at(v),
                    format!("'{value}': expected {}", words.join(", ")),
                )
            })
    };
    if let Some(count) = &p.count {
        if count.value == 0 {
            return Err(invalid(
                "cpus.count",
                at(count),
                "must be at least 1".into(),
            ));
        }
        req.count = Some(count.value);
    }
    if let Some(n) = &p.emulator_cpus {
        req.emulator_cpus = n.value;
    }
    if let Some(w) = &p.within {
        req.within = match word("cpus.within", w, &["l3", "numa-node", "package", "any"])? {
            "l3" => Within::L3,
            "numa-node" => Within::NumaNode,
            "package" => Within::Package,
            _ => Within::Any,
        };
    }
    if let Some(s) = &p.smt {
        req.smt = match word("cpus.smt", s, &["prefer", "isolate", "require"])? {
            "isolate" => SmtPolicy::Isolate,
            "require" => SmtPolicy::Require,
            _ => SmtPolicy::Prefer,
        };
    }
    req.whole_cores = p.whole_cores.unwrap_or(false);
    if let Some(k) = &p.core_type {
        req.performance_only = word("cpus.core-type", k, &["performance", "any"])? == "performance";
    }
    req.near_devices = p.near_devices.unwrap_or(false);
    req.near_memory = p.near_memory.unwrap_or(true);
    if let Some(c) = &p.cpu0_core {
        req.allow_cpu0_core = word("cpus.cpu0-core", c, &["avoid", "allow"])? == "allow";
    }
    if let Some(h) = &p.host_cores {
        req.host_cores = h.value;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::super::{Profile, ProfileError, parse};
    use super::*;
    use std::path::Path;

    fn p(text: &str) -> Result<Profile, ProfileError> {
        parse(Path::new("100.yaml"), text)
    }

    fn request(text: &str) -> PlaceRequest {
        match p(text).unwrap().cpus.unwrap().value {
            CpuRequest::Place(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn placement_mapping_with_defaults() {
        assert_eq!(request("cpus: {}\n"), PlaceRequest::default());
        assert_eq!(
            request(
                "cpus:\n  count: 8\n  within: l3\n  smt: isolate\n  whole-cores: true\n  core-type: performance\n  near-devices: true\n  near-memory: false\n  cpu0-core: allow\n  host-cores: 2\n  emulator-cpus: 1\nemulator: vm\n"
            ),
            PlaceRequest {
                count: Some(8),
                emulator_cpus: 1,
                within: Within::L3,
                smt: SmtPolicy::Isolate,
                whole_cores: true,
                performance_only: true,
                near_devices: true,
                near_memory: false,
                allow_cpu0_core: true,
                host_cores: 2,
            }
        );
    }

    #[test]
    fn cpus_are_optional_but_cpu_keys_need_them() {
        let prof = p("sysctl: { vm.stat_interval: 120 }\n").unwrap();
        assert_eq!(prof.cpus, None);
        for (text, want) in [
            (
                "governor: performance\n",
                "100.yaml:1:11: governor: governor acts on",
            ),
            (
                "sysctl: {}\nvcpus: auto\n",
                "100.yaml:2:8: vcpus: vcpus acts on",
            ),
            (
                "emulator: vm\n",
                "100.yaml:1:11: emulator: emulator acts on",
            ),
            (
                "iothreads: 0-1\n",
                "100.yaml:1:12: iothreads: iothreads acts on",
            ),
            (
                "isolation:\n  irqs: true\n",
                "100.yaml:2:3: isolation: isolation acts on",
            ),
        ] {
            let err = p(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
            assert!(err.contains("it needs 'cpus'"), "{err}");
        }
        let err = p("cpus: {count: 4}\nvcpus: [1, 2]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("100.yaml:2:8: vcpus: a list of host CPUs needs"),
            "{err}"
        );
    }

    #[test]
    fn cpulist_forms_still_work() {
        let prof = p("cpus: 4\n").unwrap();
        assert_eq!(
            prof.cpus.unwrap().value,
            CpuRequest::List(CpuSet::range(4, 4))
        );
    }

    #[test]
    fn bad_placement_values_name_key_and_place() {
        let err = |t: &str| p(t).unwrap_err().to_string();
        assert_eq!(
            err("cpus:\n  within: ccx\n"),
            "100.yaml:2:11: cpus.within: 'ccx': expected l3, numa-node, package, any"
        );
        assert_eq!(
            err("cpus:\n  smt: off\n"),
            "100.yaml:2:8: cpus.smt: 'off': expected prefer, isolate, require"
        );
        assert_eq!(
            err("cpus:\n  count: 0\n"),
            "100.yaml:2:10: cpus.count: must be at least 1"
        );
        assert!(err("cpus:\n  cuont: 4\n").contains("unknown field `cuont`"));
        assert_eq!(
            err("cpus:\n  emulator-cpus: 1\n"),
            "100.yaml:2:3: cpus.emulator-cpus: the reserved CPUs are for 'emulator: vm' or \
             'iothreads: vm'; with housekeeping they would stay idle"
        );
        assert!(p("cpus:\n  emulator-cpus: 1\nemulator: vm\n").is_ok());
        assert!(err("cpus:\n  count: -1\n").starts_with("100.yaml:2:"));
    }
}
