//! Reading sysfs for [`Topology`](super::Topology): the per-file fallbacks that old kernels,
//! offline CPUs and broken firmware need (see the parent module's doc).

use super::{
    CPU_ATOM_PMU_CPUS, CPU_CORE_PMU_CPUS, Cpu, CpuKind, HugePool, Hybrid, NumaNode, TopologyError,
};
use crate::attr;
use crate::cpuset::{CpuSet, MAX_CPUS};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// More `cache/indexK` entries than any CPU has (the kernel makes one per cache leaf).
const MAX_CACHE_INDEXES: u32 = 64;

/// Bitmap width for parsing: masks are printed `nr_cpu_ids` wide, which never exceeds
/// `kernel_max + 1`; [`MAX_CPUS`] is the floor so captures without `kernel_max` still parse.
pub(super) fn bitmap_width(cpu_dir: &Path) -> u32 {
    read_u64(&cpu_dir.join("kernel_max"))
        .and_then(|max| u32::try_from(max.saturating_add(1)).ok())
        .map_or(MAX_CPUS, |n| n.max(MAX_CPUS))
}

/// `cpu/online`, or on kernels without it (before 2.6.30) each `cpuN/online` flag. `cpu0`
/// usually has no `online` file because the boot CPU cannot be hot-unplugged on x86.
pub(super) fn read_online(cpu_dir: &Path, nbits: u32) -> Result<CpuSet, TopologyError> {
    let path = cpu_dir.join("online");
    match attr::read(&path) {
        Ok(text) => {
            return CpuSet::parse_list(&text, nbits)
                .map_err(|source| TopologyError::OnlineList { path, source });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(TopologyError::Read { path, source }),
    }
    let entries = fs::read_dir(cpu_dir).map_err(|source| TopologyError::CpuDir {
        path: cpu_dir.to_path_buf(),
        source,
    })?;
    let mut online = CpuSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::CpuDir {
            path: cpu_dir.to_path_buf(),
            source,
        })?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("cpu"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let flag = entry.path().join("online");
        match attr::read(&flag) {
            Ok(text) => match text.trim() {
                "1" => online.insert(id),
                "0" => {}
                other => {
                    return Err(TopologyError::OnlineFlag {
                        path: flag,
                        value: other.to_string(),
                    });
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => online.insert(id),
            Err(source) => return Err(TopologyError::Read { path: flag, source }),
        }
    }
    Ok(online)
}

/// One online CPU. Missing files fall back rather than fail: the kernel removes `topology/`
/// when a CPU goes offline, so an online CPU without it (a capture racing a hotplug) is taken
/// as its own core in package 0.
pub(super) fn read_cpu(dir: &Path, id: u32, nbits: u32, online: &CpuSet) -> Cpu {
    let topo = dir.join("topology");
    // physical_package_id and core_id are -1 on some platforms without firmware tables.
    let number = |name: &str| read_u64(&topo.join(name)).and_then(|v| u32::try_from(v).ok());
    // thread_siblings is the old name of core_cpus; some kernels only have the latter.
    let mut siblings = read_set_pair(&topo, "thread_siblings", nbits)
        .or_else(|| read_set_pair(&topo, "core_cpus", nbits))
        .map(|s| s.intersection(online))
        .unwrap_or_default();
    siblings.insert(id);
    let (l3, l3_id) = read_l3(&dir.join("cache"), nbits, online);
    Cpu {
        id,
        package: number("physical_package_id").unwrap_or(0),
        die: number("die_id"),
        core_id: number("core_id").unwrap_or(id),
        siblings,
        l3,
        l3_id,
        node: None,
        kind: CpuKind::Unknown,
    }
}

/// The level-3 entry among `cache/index0`, `index1`, ...; its index varies: old Intel kernels
/// had no separate L1i entry, so L3 was `index2` there. The kernel numbers the entries from 0
/// without gaps, so the scan goes up from `index0` and stops at the first level-3 entry with
/// a CPU set, or at the first index that does not exist: neither the directory listing nor
/// the entries after L3 (or their other files) are read.
pub(super) fn read_l3(cache: &Path, nbits: u32, online: &CpuSet) -> (Option<CpuSet>, Option<u32>) {
    for k in 0..MAX_CACHE_INDEXES {
        let index = cache.join(format!("index{k}"));
        match read_u64(&index.join("level")) {
            Some(3) => {}
            Some(_) => continue,
            // An entry without a readable level is passed over; a missing entry is the end.
            None if index.is_dir() => continue,
            None => break,
        }
        let Some(shared) = read_set_pair(&index, "shared_cpu", nbits) else {
            continue;
        };
        let id = read_u64(&index.join("id")).and_then(|v| u32::try_from(v).ok());
        return (Some(shared.intersection(online)), id);
    }
    (None, None)
}

/// `nodeN` directories; without a node directory (kernel built without NUMA) one implicit
/// node 0 holds every online CPU.
pub(super) fn read_nodes(dir: &Path, nbits: u32, online: &CpuSet) -> BTreeMap<u32, NumaNode> {
    let mut nodes = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            // Node cpulists can name CPUs that are possible but not present (nvidiagpunumanodes:
            // node0 lists 0-87 with only 0-15 online), hence the intersection.
            let cpus = read_set(&path.join("cpulist"), &path.join("cpumap"), nbits)
                .map(|s| s.intersection(online))
                .unwrap_or_default();
            let node = NumaNode {
                id,
                cpus,
                mem_total_kib: read_mem_total(&path.join("meminfo")),
                hugepages: read_hugepages(&path.join("hugepages")),
            };
            nodes.insert(id, node);
        }
    }
    if nodes.is_empty() {
        let node = NumaNode {
            id: 0,
            cpus: online.clone(),
            mem_total_kib: None,
            hugepages: BTreeMap::new(),
        };
        nodes.insert(0, node);
    }
    // Each CPU stays only in the lowest node that lists it (see `Topology::read`).
    let mut claimed = CpuSet::new();
    for node in nodes.values_mut() {
        node.cpus = node.cpus.difference(&claimed);
        claimed = claimed.union(&node.cpus);
    }
    nodes
}

/// `Node N MemTotal:   X kB` in `nodeN/meminfo`.
pub(super) fn read_mem_total(path: &Path) -> Option<u64> {
    let text = attr::read(path).ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace().skip(2);
        (words.next() == Some("MemTotal:"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// `hugepages/hugepages-<size>kB/{nr,free}_hugepages`; pools that cannot be read are left out.
pub(super) fn read_hugepages(dir: &Path) -> BTreeMap<u64, HugePool> {
    let mut pools = BTreeMap::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return pools;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(size) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hugepages-"))
            .and_then(|n| n.strip_suffix("kB"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if let (Some(nr), Some(free)) = (
            read_u64(&path.join("nr_hugepages")),
            read_u64(&path.join("free_hugepages")),
        ) {
            pools.insert(size, HugePool { nr, free });
        }
    }
    pools
}

/// Intel hybrid PMUs; `None` on every other CPU, where the PMU is plain `cpu`.
pub(super) fn read_hybrid(root: &Path, nbits: u32, online: &CpuSet) -> Option<Hybrid> {
    let core = read_list(&root.join(CPU_CORE_PMU_CPUS), nbits);
    let atom = read_list(&root.join(CPU_ATOM_PMU_CPUS), nbits);
    if core.is_none() && atom.is_none() {
        return None;
    }
    Some(Hybrid {
        performance: core.unwrap_or_default().intersection(online),
        efficiency: atom.unwrap_or_default().intersection(online),
    })
}

/// `<stem>_list`, else the hex mask `<stem>` (or `<stem>_map` for caches) that old kernels
/// print instead.
pub(super) fn read_set_pair(dir: &Path, stem: &str, nbits: u32) -> Option<CpuSet> {
    let mask = if stem == "shared_cpu" {
        format!("{stem}_map")
    } else {
        stem.to_string()
    };
    read_set(&dir.join(format!("{stem}_list")), &dir.join(mask), nbits)
}

/// A cpulist file, else a cpumask file; `None` if neither reads and parses.
pub(super) fn read_set(list: &Path, mask: &Path, nbits: u32) -> Option<CpuSet> {
    read_list(list, nbits).or_else(|| {
        let text = attr::read(mask).ok()?;
        CpuSet::parse_mask(&text, nbits).ok()
    })
}

pub(super) fn read_list(path: &Path, nbits: u32) -> Option<CpuSet> {
    let text = attr::read(path).ok()?;
    CpuSet::parse_list(&text, nbits).ok()
}

pub(super) fn read_u64(path: &Path) -> Option<u64> {
    attr::read(path).ok()?.trim().parse().ok()
}
