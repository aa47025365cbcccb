//! What the host's hugepage pools, NUMA nodes and KSM hold, read before planning (only for a
//! profile that asks for memory work).
//!
//! Kernel files (all read-only here): `/sys/kernel/mm/hugepages/hugepages-<kB>kB/` (one
//! directory per size the kernel supports), per node
//! `/sys/devices/system/node/nodeN/hugepages/hugepages-<kB>kB/{nr,free,surplus}_hugepages`,
//! `nodeN/meminfo` (`Node N MemFree:`, `Node N FilePages:`), `nodeN/compact` (write-only:
//! its existence is read), the `pdpe1gb` flag of `/proc/cpuinfo` (1 GiB pages),
//! `/sys/kernel/mm/ksm/run`, and whether `ksmtuned` runs.

use super::{GLOBAL_POOLS, NODE_DIR, pool_file};
use crate::attr;
use crate::root::Root;
use std::collections::{BTreeMap, BTreeSet};

/// `/proc/cpuinfo` can be megabytes on a big host; the first CPU's flags are in its first
/// few kB.
const CPUINFO_READ: usize = 64 << 10;
pub const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";
pub const COMPACT_MEMORY: &str = "/proc/sys/vm/compact_memory";
pub const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";
/// qemu-server's config schema: whether it knows `allow-ksm` tells whether this release has
/// the per-VM switch (added in November 2025, Proxmox VE 9.1).
pub const QEMU_SERVER_PM: &str = "/usr/share/perl5/PVE/QemuServer.pm";
/// The schema entry is in the first part of that file; more is never read.
const QEMU_SERVER_READ: u64 = 4 << 20;

/// One node's pool of one page size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePool {
    pub nr: u64,
    pub free: u64,
    pub surplus: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMemory {
    /// (size kB) -> pool; a size missing here has no pool on this node.
    pub pools: BTreeMap<u64, NodePool>,
    pub mem_free_kb: u64,
    /// Page cache, which `drop_caches` can give back.
    pub file_pages_kb: u64,
    /// Whether `nodeN/compact` exists (CONFIG_COMPACTION with NUMA).
    pub compact: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryFacts {
    /// Pool sizes (kB) the kernel has: the names under `/sys/kernel/mm/hugepages`.
    pub sizes: BTreeSet<u64>,
    /// Every NUMA node with a directory, by number.
    pub nodes: BTreeMap<u32, NodeMemory>,
    /// The `pdpe1gb` CPU flag (1 GiB pages); None when `/proc/cpuinfo` has no flags line.
    pub pdpe1gb: Option<bool>,
    pub compact_memory: bool,
    /// `/sys/kernel/mm/ksm/run` as read (None: no KSM in this kernel).
    pub ksm_run: Option<String>,
    /// The pid of a running `ksmtuned`, which writes `ksm/run` by itself.
    pub ksmtuned: Option<u32>,
    /// Whether this qemu-server knows `allow-ksm` (None: no qemu-server found).
    pub allow_ksm_supported: Option<bool>,
    /// Whether the VM's QEMU runs now: its hugepages are then in use, and a preflight of
    /// free pages means nothing.
    pub vm_running: bool,
}

impl MemoryFacts {
    /// Reads the pools and nodes (`hugepages`), KSM (`ksm`); cheap: a few files per node.
    pub fn read(root: &Root, hugepages: bool, ksm: bool) -> MemoryFacts {
        let mut facts = MemoryFacts::default();
        if hugepages {
            facts.sizes = sizes_in(root, GLOBAL_POOLS);
            facts.compact_memory = root.path(COMPACT_MEMORY).exists();
            for node in node_numbers(root) {
                facts
                    .nodes
                    .insert(node, read_node(root, node, &facts.sizes));
            }
            facts.pdpe1gb = cpu_flag(root, "pdpe1gb");
        }
        if ksm {
            facts.ksm_run = attr::read(&root.path(KSM_RUN))
                .ok()
                .map(|t| t.trim().to_string());
            facts.ksmtuned = crate::facts::find_process(root, "ksmtuned");
            facts.allow_ksm_supported = knows_allow_ksm(root);
        }
        facts
    }
}

/// `node0`, `node1`, ... under the node directory (a name that is not `node` and a canonical
/// number never becomes a path).
fn node_numbers(root: &Root) -> Vec<u32> {
    let mut nodes: Vec<u32> = std::fs::read_dir(root.path(NODE_DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("node")?;
            let canonical = !n.is_empty()
                && n.len() <= 4
                && n.bytes().all(|b| b.is_ascii_digit())
                && (n == "0" || !n.starts_with('0'));
            canonical.then(|| n.parse().ok())?
        })
        .collect();
    nodes.sort_unstable();
    nodes
}

fn sizes_in(root: &Root, dir: &str) -> BTreeSet<u64> {
    std::fs::read_dir(root.path(dir))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()
        })
        .collect()
}

fn read_node(root: &Root, node: u32, sizes: &BTreeSet<u64>) -> NodeMemory {
    let number = |size: u64, file: &str| {
        attr::read(&root.path(pool_file(node, size, file)))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let pools = sizes
        .iter()
        .filter_map(|&size| {
            Some((
                size,
                NodePool {
                    nr: number(size, "nr_hugepages")?,
                    free: number(size, "free_hugepages")?,
                    surplus: number(size, "surplus_hugepages").unwrap_or(0),
                },
            ))
        })
        .collect();
    let meminfo =
        attr::read(&root.path(format!("{NODE_DIR}/node{node}/meminfo"))).unwrap_or_default();
    NodeMemory {
        pools,
        mem_free_kb: meminfo_kb(&meminfo, "MemFree:"),
        file_pages_kb: meminfo_kb(&meminfo, "FilePages:"),
        compact: root.path(format!("{NODE_DIR}/node{node}/compact")).exists(),
    }
}

/// `Node 1 MemFree:   123456 kB` -> 123456.
fn meminfo_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let mut words = line.split_whitespace().skip(2);
            (words.next() == Some(key)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

fn knows_allow_ksm(root: &Root) -> Option<bool> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(root.path(QEMU_SERVER_PM))
        .ok()?
        .take(QEMU_SERVER_READ)
        .read_to_end(&mut text)
        .ok()?;
    Some(text.windows(11).any(|w| w == b"'allow-ksm'"))
}

fn cpu_flag(root: &Root, flag: &str) -> Option<bool> {
    let text = attr::read_at_most(&root.path("/proc/cpuinfo"), CPUINFO_READ)
        .or_else(|_| {
            // Longer than the bound: its beginning is all that is needed.
            use std::io::Read;
            let mut head = vec![0; CPUINFO_READ];
            let n = std::fs::File::open(root.path("/proc/cpuinfo"))?.read(&mut head)?;
            head.truncate(n);
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&head).into_owned())
        })
        .ok()?;
    let flags = text.lines().find(|l| l.starts_with("flags"))?;
    Some(
        flags
            .split_once(':')?
            .1
            .split_whitespace()
            .any(|f| f == flag),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo_lines_as_the_kernel_prints_them() {
        let text = "Node 1 MemTotal:        2097152 kB\nNode 1 MemFree:         1900000 kB\n\
                    Node 1 FilePages:         12000 kB\n";
        assert_eq!(super::meminfo_kb(text, "MemFree:"), 1_900_000);
        assert_eq!(super::meminfo_kb(text, "FilePages:"), 12_000);
        assert_eq!(super::meminfo_kb(text, "Shmem:"), 0);
    }
}
