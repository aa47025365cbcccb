//! PCI addresses as Proxmox writes them (`hostpci0: 0b:00`) and as sysfs names them
//! (`0000:0b:00.0`). A PCI id becomes a path under `/sys/bus/pci/devices`, so parsing is strict.

use std::fmt;
use std::str::FromStr;

/// A PCI address that is not of the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address '{value}': expected {expected}")]
pub struct PciIdError {
    pub value: String,
    pub expected: &'static str,
}

/// A PCI address; `function: None` means every function of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciId {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: Option<u8>,
}

pub(crate) const PCI_CONFIG_FORM: &str =
    "a PCI address [dddd:]bb:dd[.f] in lowercase hex, e.g. 0b:00.0 or 0000:0b:00";
const PCI_SYSFS_FORM: &str = "a sysfs PCI name dddd:bb:dd.f in lowercase hex, e.g. 0000:0b:00.0";

impl PciId {
    /// Parses the strict `dddd:bb:dd.f` form the kernel uses for `/sys/bus/pci/devices/*`.
    pub fn parse_sysfs(s: &str) -> Result<PciId, PciIdError> {
        let bad = || PciIdError {
            value: s.to_string(),
            expected: PCI_SYSFS_FORM,
        };
        let parts: Vec<&str> = s.split([':', '.']).collect();
        let [domain, bus, device, function] = parts[..] else {
            return Err(bad());
        };
        if s.as_bytes().get(4) != Some(&b':') || s.as_bytes().get(10) != Some(&b'.') {
            return Err(bad());
        }
        let domain = hex(domain, 4).ok_or_else(bad)?;
        let bus = hex(bus, 2).ok_or_else(bad)?;
        let device = hex(device, 2).ok_or_else(bad)?;
        let function = hex(function, 1).ok_or_else(bad)?;
        // Real PCI has 32 devices of 8 functions per bus; the kernel never names others.
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(PciId {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: Some(function as u8),
        })
    }
}

/// A driver as messages and plans name it: `vfio-pci`, or `no driver`.
pub fn driver_name(driver: &Option<String>) -> String {
    driver.clone().unwrap_or_else(|| "no driver".to_string())
}

/// Lowercase hex of exactly `len` digits (Proxmox's patterns are case-sensitive).
fn hex(s: &str, len: usize) -> Option<u32> {
    let ok = s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

impl FromStr for PciId {
    type Err = PciIdError;

    /// The `hostpci` grammar: `[dddd:]bb:dd[.f]`, the domain four or more lowercase hex digits.
    fn from_str(s: &str) -> Result<PciId, PciIdError> {
        let bad = || PciIdError {
            value: s.to_string(),
            expected: PCI_CONFIG_FORM,
        };
        let (address, function) = match s.split_once('.') {
            Some((a, f)) => (a, Some(hex(f, 1).ok_or_else(bad)? as u8)),
            None => (s, None),
        };
        let parts: Vec<&str> = address.split(':').collect();
        let (domain, bus, device) = match parts[..] {
            [bus, device] => (0, bus, device),
            [domain, bus, device] if domain.len() >= 4 => {
                let domain = domain.trim_start_matches('0');
                let domain = if domain.is_empty() {
                    0
                } else {
                    hex(domain, domain.len())
                        .filter(|d| *d <= 0xffff)
                        .ok_or_else(bad)?
                };
                (domain as u16, bus, device)
            }
            _ => return Err(bad()),
        };
        Ok(PciId {
            domain,
            bus: hex(bus, 2).ok_or_else(bad)? as u8,
            device: hex(device, 2).ok_or_else(bad)? as u8,
            function,
        })
    }
}

impl fmt::Display for PciId {
    /// The sysfs name (`0000:0b:00.0`), or its device prefix (`0000:0b:00`) for all functions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}",
            self.domain, self.bus, self.device
        )?;
        match self.function {
            Some(function) => write!(f, ".{function:x}"),
            None => Ok(()),
        }
    }
}
