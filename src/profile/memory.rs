//! The memory and device keys of a profile: `hugepages:`, `ksm:`, `pci-reset:` (their YAML
//! shapes and validation; what they do is in `tunables/hugepages.rs`, `ksm.rs`, `pcireset.rs`).

use super::{Located, at, located};
use crate::pci::PciId;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// `hugepages:`: making qemu-server's hugepage allocation succeed (pre-start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hugepages {
    /// Where the key is, for errors about the whole key.
    pub at: Located<()>,
    /// `sync: true`: flush dirty pages first, so that `drop-caches` can drop them.
    pub sync: bool,
    /// `drop-caches: 1|2|3`: the value written to `/proc/sys/vm/drop_caches`.
    pub drop_caches: Option<u8>,
    pub compact: Compact,
    pub preflight: Preflight,
    /// `reserve: true`: raise each node's pool by the VM's pages before qemu-server allocates,
    /// read back what the kernel gave, and fail cleanly on a shortfall.
    pub reserve: bool,
    /// `boot: true`: `pvetune reserve` (run at boot) reserves the VM's pages and keeps them
    /// for it across its stops.
    pub boot: bool,
}

/// `hugepages.compact`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compact {
    /// `nodes` (default): `/sys/devices/system/node/nodeN/compact` of every node the VM's
    /// hugepages come from.
    Nodes,
    /// `global`: `/proc/sys/vm/compact_memory`, every node.
    Global,
    /// `none`.
    Off,
}

/// `hugepages.preflight`: what a start that cannot get its pages does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflight {
    /// `fail` (default): pre-start fails, naming node, size, pages wanted and free.
    Fail,
    /// `warn`: a warning, and qemu-server tries anyway.
    Warn,
}

/// `ksm:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ksm {
    pub at: Located<()>,
    /// `pause: true`: KSM stops scanning (`ksm/run` = 0) while this VM runs.
    pub pause: bool,
}

/// `pci-reset:`: resetting the VM's passthrough devices before QEMU starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciReset {
    pub at: Located<()>,
    pub method: ResetMethod,
    /// `devices:` (strict `dddd:bb:dd.f`); None: every function of every `hostpciN`.
    pub devices: Option<Vec<PciId>>,
    /// `allow-host-driver: true`: reset a device bound to a driver other than vfio-pci.
    pub allow_host_driver: bool,
    /// `timeout:` seconds for each wait (devices gone, devices back).
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetMethod {
    /// Remove every function, wait until all are gone, rescan, wait until all are back.
    RemoveRescan,
    /// The kernel's `reset` attribute (the method `reset_method` names).
    Reset,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawHugepages {
    sync: Option<bool>,
    drop_caches: Option<Spanned<u8>>,
    compact: Option<Spanned<String>>,
    preflight: Option<Spanned<String>>,
    reserve: Option<bool>,
    boot: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawKsm {
    pause: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawPciReset {
    method: Option<Spanned<String>>,
    devices: Option<Vec<Spanned<String>>>,
    allow_host_driver: Option<bool>,
    timeout: Option<Spanned<u64>>,
}

/// (key, where, message) of a value that means nothing.
pub(super) type Bad = (&'static str, (u32, u32), String);

fn word<T: Copy>(
    key: &'static str,
    value: &Option<Spanned<String>>,
    words: &[(&str, T)],
    default: T,
) -> Result<T, Bad> {
    let Some(v) = value else {
        return Ok(default);
    };
    match words.iter().find(|(w, _)| *w == v.value) {
        Some((_, t)) => Ok(*t),
        None => {
            let expected: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
            Err((
                key,
                at(v),
                format!(
                    "'{}' is not one of {}",
                    crate::excerpt::excerpt(&v.value),
                    expected.join(", ")
                ),
            ))
        }
    }
}

pub(super) fn hugepages(raw: Spanned<RawHugepages>) -> Result<Hugepages, Bad> {
    let place = at(&raw);
    let raw = raw.value;
    let drop_caches = match raw.drop_caches {
        None => None,
        Some(d) if (1..=3).contains(&d.value) => Some(d.value),
        Some(d) => {
            return Err((
                "hugepages.drop-caches",
                at(&d),
                format!(
                    "{} is not a drop_caches level: expected 1 (page cache), 2 (slab) or 3 (both)",
                    d.value
                ),
            ));
        }
    };
    let compact = word(
        "hugepages.compact",
        &raw.compact,
        &[
            ("nodes", Compact::Nodes),
            ("global", Compact::Global),
            ("none", Compact::Off),
        ],
        Compact::Nodes,
    )?;
    let preflight = word(
        "hugepages.preflight",
        &raw.preflight,
        &[("fail", Preflight::Fail), ("warn", Preflight::Warn)],
        Preflight::Fail,
    )?;
    Ok(Hugepages {
        at: located((), place),
        sync: raw.sync.unwrap_or(false),
        drop_caches,
        compact,
        preflight,
        reserve: raw.reserve.unwrap_or(false),
        boot: raw.boot.unwrap_or(false),
    })
}

pub(super) fn ksm(raw: Spanned<RawKsm>) -> Ksm {
    Ksm {
        at: located((), at(&raw)),
        pause: raw.value.pause.unwrap_or(false),
    }
}

/// The longest wait a profile may ask for: a hook holds the VM's start.
const MAX_TIMEOUT_S: u64 = 120;

pub(super) fn pci_reset(raw: Spanned<RawPciReset>) -> Result<PciReset, Bad> {
    let place = at(&raw);
    let raw = raw.value;
    let method = word(
        "pci-reset.method",
        &raw.method,
        &[
            ("remove-rescan", ResetMethod::RemoveRescan),
            ("reset", ResetMethod::Reset),
        ],
        ResetMethod::RemoveRescan,
    )?;
    let devices = match raw.devices {
        None => None,
        Some(list) => {
            let mut ids = Vec::with_capacity(list.len());
            for d in &list {
                let id = PciId::parse_sysfs(&d.value)
                    .map_err(|e| ("pci-reset.devices", at(d), e.to_string()))?;
                if ids.contains(&id) {
                    return Err(("pci-reset.devices", at(d), format!("{id} is listed twice")));
                }
                ids.push(id);
            }
            if ids.is_empty() {
                return Err((
                    "pci-reset.devices",
                    place,
                    "an empty list: leave it out to reset the VM's hostpciN devices".into(),
                ));
            }
            Some(ids)
        }
    };
    let timeout_ms = match raw.timeout {
        None => 10_000,
        Some(t) if (1..=MAX_TIMEOUT_S).contains(&t.value) => t.value * 1000,
        Some(t) => {
            return Err((
                "pci-reset.timeout",
                at(&t),
                format!("{} s: expected 1 to {MAX_TIMEOUT_S} seconds", t.value),
            ));
        }
    };
    Ok(PciReset {
        at: located((), place),
        method,
        devices,
        allow_host_driver: raw.allow_host_driver.unwrap_or(false),
        timeout_ms,
    })
}
