//! The NUMA node of each passthrough device of a VM (`hostpciN:`), from
//! `/sys/bus/pci/devices/<dddd:bb:dd.f>/numa_node` (`-1`: the firmware gives none).

use crate::root::Root;
use crate::vmconfig::{PciSource, VmConfig};

/// `sys/bus/pci/devices`, host-absolute.
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// One passthrough device and where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// `hostpciN` and the device (`0000:0b:00.0`), or the mapping name.
    pub device: String,
    /// `None`: no node known (`-1`, the file missing, or a mapping not resolved here).
    pub node: Option<u32>,
}

/// Every `hostpciN` of the config, in order. A device given without its function is read as
/// function 0 (every function of a device sits on the same bus, hence the same node). A
/// resource mapping (`mapping=`) is resolved per node by qemu-server from
/// `/etc/pve/mapping/pci.cfg`, which pvetune does not read: its node stays unknown.
pub fn read(root: &Root, config: &VmConfig) -> Vec<DeviceNode> {
    let mut out = Vec::new();
    for (index, pci) in &config.hostpci {
        match &pci.source {
            PciSource::Host(ids) => {
                for id in ids {
                    let mut id = *id;
                    id.function.get_or_insert(0);
                    // The id is parsed strictly (pci.rs), so it is a safe path component.
                    let path = root.path(format!("{PCI_DEVICES}/{id}/numa_node"));
                    let node = crate::attr::read(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<i64>().ok())
                        .and_then(|n| u32::try_from(n).ok());
                    out.push(DeviceNode {
                        device: format!("hostpci{index} {id}"),
                        node,
                    });
                }
            }
            PciSource::Mapping(name) => out.push(DeviceNode {
                device: format!("hostpci{index} mapping={name}"),
                node: None,
            }),
        }
    }
    out
}
