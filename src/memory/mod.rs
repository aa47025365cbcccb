//! Hugepages as qemu-server allocates them: what a VM needs per host NUMA node and page size
//! (`hugepages_topology` in qemu-server's `Memory.pm`, without memory hotplug), and what the
//! host's pools hold (`facts`).
//!
//! qemu-server's rule, which pvetune must match page for page so that a reservation made
//! before it allocates is exactly what it then finds free: with `numaN:` lines, each guest node
//! needs `memory` MiB on its single `hostnodes` node (more than one host node is refused with
//! hugepages); without them, `memory / sockets` MiB on host node `i` for each socket `i`. The
//! size is the config's (`2` or `1024` MiB), or for `any` 1 GiB pages when the host has them
//! and the node's memory is a multiple of 1024 MiB, else 2 MiB pages.

use crate::vmconfig::{HugepageSize, VmConfig};
use std::collections::BTreeSet;

pub mod facts;
pub use facts::{MemoryFacts, NodePool};

/// The pages a VM needs of one size on one host node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeNeed {
    pub node: u32,
    /// Page size in kB, as the kernel names its pools (`hugepages-2048kB`).
    pub size_kb: u64,
    pub pages: u64,
}

impl NodeNeed {
    /// `/sys/devices/system/node/nodeN/hugepages/hugepages-<kB>kB/<file>`.
    pub fn file(&self, file: &str) -> String {
        pool_file(self.node, self.size_kb, file)
    }
}

pub const NODE_DIR: &str = "/sys/devices/system/node";
/// The global pools, one directory per size the kernel supports.
pub const GLOBAL_POOLS: &str = "/sys/kernel/mm/hugepages";
/// qemu-server's lock around its allocation (`hugepages_update_locked`): an flock on this
/// file, held while it raises the pools, starts QEMU and shrinks them again.
pub const HUGEPAGES_LOCK: &str = "/var/lock/hugepages.lck";

pub fn pool_file(node: u32, size_kb: u64, file: &str) -> String {
    format!("{NODE_DIR}/node{node}/hugepages/hugepages-{size_kb}kB/{file}")
}

/// `2048 kB` as `2 MiB`, `1048576 kB` as `1 GiB`.
pub fn size_name(size_kb: u64) -> String {
    if size_kb >= 1 << 20 && size_kb.is_multiple_of(1 << 20) {
        format!("{} GiB", size_kb >> 20)
    } else if size_kb >= 1024 && size_kb.is_multiple_of(1024) {
        format!("{} MiB", size_kb >> 10)
    } else {
        format!("{size_kb} kB")
    }
}

/// `node 1, 2 MiB pages` for a node pool's file (the path as a fallback).
pub fn describe_pool(path: &str) -> String {
    let node = path
        .split('/')
        .find_map(|c| c.strip_prefix("node")?.parse::<u32>().ok());
    let size = path.split('/').find_map(|c| {
        c.strip_prefix("hugepages-")?
            .strip_suffix("kB")?
            .parse::<u64>()
            .ok()
    });
    match (node, size) {
        (Some(node), Some(size)) => format!("node {node}, {} pages", size_name(size)),
        _ => path.to_string(),
    }
}

/// What the VM's memory needs, per host node and size, in node order; `sizes` are the pool
/// sizes (kB) this host has. The error says what qemu-server would refuse, and why.
pub fn need(config: &VmConfig, sizes: &BTreeSet<u64>) -> Result<Vec<NodeNeed>, String> {
    let Some(wanted) = config.hugepages else {
        return Ok(Vec::new());
    };
    if config.hotplug_memory {
        return Err(
            "memory hotplug is on (hotplug: memory): qemu-server then allocates \
                    hugepages per DIMM, which pvetune does not model; leave hugepages: out of \
                    the profile or memory out of hotplug:"
                .into(),
        );
    }
    if !config.numa {
        return Err(
            "the VM config sets hugepages but not 'numa: 1': qemu-server allocates \
                    hugepages only for a VM with NUMA on"
                .into(),
        );
    }
    if !sizes.contains(&2048) && !sizes.contains(&(1 << 20)) {
        return Err("this host has no 2 MiB or 1 GiB hugepage pools \
                    (/sys/kernel/mm/hugepages is empty)"
            .into());
    }
    let size_for = |mib: u64| -> Result<u64, String> {
        if mib == 0 || mib % 2 == 1 {
            return Err(format!(
                "memory size {mib} MiB is not a positive even number: no hugepages of it"
            ));
        }
        let kb = match wanted {
            HugepageSize::Any if sizes.contains(&(1 << 20)) && mib.is_multiple_of(1024) => 1 << 20,
            HugepageSize::Any if sizes.contains(&2048) => 2048,
            HugepageSize::Any => {
                return Err(format!(
                    "this host has only 1 GiB pages and {mib} MiB is not a multiple of 1024"
                ));
            }
            HugepageSize::Mib2 => 2048,
            HugepageSize::Gib1 => 1 << 20,
        };
        if !sizes.contains(&kb) {
            return Err(format!(
                "this host has no {} hugepages (no {GLOBAL_POOLS}/hugepages-{kb}kB)",
                size_name(kb)
            ));
        }
        if !(mib * 1024).is_multiple_of(kb) {
            return Err(format!(
                "memory size {mib} MiB is not a multiple of the {} page size",
                size_name(kb)
            ));
        }
        Ok(kb)
    };
    let mut needs: Vec<NodeNeed> = Vec::new();
    let mut add = |node: u32, mib: u64| -> Result<(), String> {
        let size_kb = size_for(mib)?;
        let pages = mib * 1024 / size_kb;
        match needs
            .iter_mut()
            .find(|n| n.node == node && n.size_kb == size_kb)
        {
            Some(n) => n.pages += pages,
            None => needs.push(NodeNeed {
                node,
                size_kb,
                pages,
            }),
        }
        Ok(())
    };
    if config.numa_nodes.is_empty() {
        let sockets = u64::from(config.sockets.max(1));
        for socket in 0..config.sockets.max(1) {
            add(socket, config.memory_mib / sockets)?;
        }
    } else {
        for (guest, spec) in &config.numa_nodes {
            let node = match spec.hostnodes.as_deref() {
                Some([node]) => *node,
                Some(_) => {
                    return Err(format!(
                        "numa{guest}: more than one host node in hostnodes: qemu-server refuses \
                         that with hugepages"
                    ));
                }
                None => {
                    return Err(format!(
                        "numa{guest} has no hostnodes=: pvetune cannot tell which host node \
                         qemu-server allocates its hugepages on"
                    ));
                }
            };
            let Some(mib) = spec.memory_mib else {
                return Err(format!(
                    "numa{guest} has no memory=: qemu-server needs it with hugepages"
                ));
            };
            add(node, mib)?;
        }
    }
    needs.sort_unstable();
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> VmConfig {
        VmConfig::parse(text).unwrap()
    }

    fn both() -> BTreeSet<u64> {
        [2048, 1 << 20].into()
    }

    #[test]
    fn custom_numa_nodes_need_pages_on_their_host_node() {
        let c = conf(
            "memory: 3072\nnuma: 1\nhugepages: any\n\
             numa0: cpus=0-1,hostnodes=1,memory=2048\nnuma1: cpus=2-3,hostnodes=1,memory=1024\n",
        );
        assert_eq!(
            need(&c, &both()).unwrap(),
            [NodeNeed {
                node: 1,
                size_kb: 1 << 20,
                pages: 3
            }]
        );
        let c = conf("memory: 300\nnuma: 1\nhugepages: 2\nnuma0: cpus=0,hostnodes=1,memory=300\n");
        assert_eq!(
            need(&c, &both()).unwrap(),
            [NodeNeed {
                node: 1,
                size_kb: 2048,
                pages: 150
            }]
        );
    }

    #[test]
    fn without_numa_lines_memory_is_split_over_sockets() {
        let c = conf("memory: 4096\nsockets: 2\nnuma: 1\nhugepages: 2\n");
        let pages: Vec<_> = need(&c, &both())
            .unwrap()
            .iter()
            .map(|n| (n.node, n.pages))
            .collect();
        assert_eq!(pages, [(0, 1024), (1, 1024)]);
    }

    #[test]
    fn what_qemu_server_refuses_is_refused() {
        let two: BTreeSet<u64> = [2048].into();
        let err = |text: &str, sizes: &BTreeSet<u64>| need(&conf(text), sizes).unwrap_err();
        assert!(err("memory: 2048\nhugepages: 2\n", &two).contains("numa: 1"));
        assert!(err("memory: 2048\nnuma: 1\nhugepages: 1024\n", &two).contains("no 1 GiB"));
        assert!(err("memory: 1000\nnuma: 1\nhugepages: 1024\n", &both()).contains("multiple"));
        assert!(
            err(
                "numa: 1\nhugepages: 2\nnuma0: cpus=0,hostnodes=0-1,memory=512\n",
                &two
            )
            .contains("more than one host node")
        );
        let any = conf("memory: 1000\nnuma: 1\nhugepages: any\n");
        assert_eq!(need(&any, &both()).unwrap()[0].size_kb, 2048);
        assert!(need(&conf("memory: 1000\n"), &two).unwrap().is_empty());
        assert!(
            err(
                "memory: 2048\nnuma: 1\nhugepages: 2\nhotplug: disk,memory\n",
                &two
            )
            .contains("memory hotplug")
        );
        let plugged = conf("memory: 2048\nnuma: 1\nhugepages: 2\nhotplug: 1\n");
        assert_eq!(need(&plugged, &two).unwrap()[0].pages, 1024);
    }
}
