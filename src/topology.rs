//! The host's CPU topology (SMT siblings, L3 domains, packages, NUMA nodes, hybrid P/E cores),
//! read from sysfs under a root prefix so tests can point it at a fixture tree.
//!
//! Real sysfs is less regular than its documentation: ~2009 kernels print only hex masks (no
//! `*_list` files, no `cpu/online`), offline CPUs lose their `topology/` and `cache/` directories,
//! node cpulists may name CPUs that are not even present, node ids can be sparse, and some
//! firmware makes every node claim every CPU. Each of these is handled below with a documented
//! fallback; only an unreadable CPU directory or a malformed `online` file is an error, because
//! without those pvetune cannot know which CPUs exist.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::cpuset::{CpuListError, CpuSet, MAX_CPUS};

/// `sys/devices/system/cpu`, relative to the root.
pub const CPU_DIR: &str = "sys/devices/system/cpu";
/// `sys/devices/system/node`, relative to the root.
pub const NODE_DIR: &str = "sys/devices/system/node";
/// The P-core PMU of an Intel hybrid CPU lists the P-cores' CPUs.
pub const CPU_CORE_PMU_CPUS: &str = "sys/devices/cpu_core/cpus";
/// The E-core PMU of an Intel hybrid CPU lists the E-cores' CPUs.
pub const CPU_ATOM_PMU_CPUS: &str = "sys/devices/cpu_atom/cpus";

/// What pvetune knows about the host's CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Online CPUs (`cpu/online`, or every `cpuN` whose `cpuN/online` is not `0`).
    pub online: CpuSet,
    /// CPUs removed from the scheduler's domains at boot (`isolcpus=`); empty if unknown.
    pub isolated: CpuSet,
    /// Online CPUs only: offline CPUs have no topology to read.
    pub cpus: BTreeMap<u32, Cpu>,
    /// NUMA nodes, including CPU-less and memoryless ones; ids may be sparse.
    pub nodes: BTreeMap<u32, NumaNode>,
    /// Set when the kernel exposes Intel hybrid PMUs (`cpu_core` / `cpu_atom`).
    pub hybrid: Option<Hybrid>,
}

/// One online logical CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    pub id: u32,
    pub package: u32,
    pub die: Option<u32>,
    pub core_id: u32,
    /// SMT siblings including this CPU, restricted to online CPUs.
    pub siblings: CpuSet,
    /// CPUs sharing this CPU's level-3 cache, restricted to online CPUs.
    pub l3: Option<CpuSet>,
    /// The L3's `id` attribute (kernels since 4.x on x86).
    pub l3_id: Option<u32>,
    pub node: Option<u32>,
    pub kind: CpuKind,
}

/// Core type on hybrid CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKind {
    Performance,
    Efficiency,
    /// Not a hybrid CPU, or a CPU listed by neither PMU.
    Unknown,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    pub id: u32,
    /// Online CPUs assigned to this node (see [`Topology::read`] for broken firmware).
    pub cpus: CpuSet,
    /// `MemTotal` from `nodeN/meminfo`; `None` when the file is absent or unreadable.
    pub mem_total_kib: Option<u64>,
    /// Per-node hugepage pools, keyed by page size in kB.
    pub hugepages: BTreeMap<u64, HugePool>,
}

/// One node's pool of hugepages of one size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HugePool {
    pub nr: u64,
    pub free: u64,
}

/// Intel hybrid core types, as the two PMUs list them (restricted to online CPUs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hybrid {
    pub performance: CpuSet,
    pub efficiency: CpuSet,
}

/// Why the topology could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot list CPUs in {path}")]
    CpuDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed CPU list in {path}")]
    OnlineList {
        path: PathBuf,
        #[source]
        source: CpuListError,
    },
    #[error("{path} holds {value:?}, expected 0 or 1")]
    OnlineFlag { path: PathBuf, value: String },
}

impl Topology {
    /// Reads the topology under `root` (`/` in production).
    ///
    /// Broken firmware can make several nodes list the same CPU (`8em64t-2s2ca2c-buggynuma`: 8
    /// nodes each claiming all 8 CPUs). The kernel itself then places a CPU on one node only, so
    /// here each CPU goes to the lowest node that lists it and the other nodes' `cpus` drop it:
    /// node CPU sets are always disjoint.
    pub fn read(root: &Path) -> Result<Topology, TopologyError> {
        let cpu_dir = root.join(CPU_DIR);
        let nbits = bitmap_width(&cpu_dir);
        let online = read_online(&cpu_dir, nbits)?;
        // A malformed `isolated` is treated as "nothing isolated": it only refines placement.
        let isolated = read_list(&cpu_dir.join("isolated"), nbits).unwrap_or_default();
        let hybrid = read_hybrid(root, nbits, &online);
        let nodes = read_nodes(&root.join(NODE_DIR), nbits, &online);
        let mut cpus = BTreeMap::new();
        for id in online.iter() {
            let mut cpu = read_cpu(&cpu_dir.join(format!("cpu{id}")), id, nbits, &online);
            cpu.node = nodes.values().find(|n| n.cpus.contains(id)).map(|n| n.id);
            cpu.kind = match &hybrid {
                Some(h) if h.performance.contains(id) => CpuKind::Performance,
                Some(h) if h.efficiency.contains(id) => CpuKind::Efficiency,
                _ => CpuKind::Unknown,
            };
            cpus.insert(id, cpu);
        }
        Ok(Topology {
            online,
            isolated,
            cpus,
            nodes,
            hybrid,
        })
    }

    /// SMT sibling groups of the online CPUs, sorted by lowest CPU. Always a partition: if
    /// firmware reports overlapping sibling sets, a CPU stays in the first group that claims it.
    pub fn cores(&self) -> Vec<CpuSet> {
        partition(self.cpus.values().map(|c| (c.id, &c.siblings)))
    }

    /// Sibling groups restricted to `set`: each group ∩ `set`, empty ones dropped, sorted by
    /// lowest CPU.
    pub fn cores_in(&self, set: &CpuSet) -> Vec<CpuSet> {
        let mut groups: Vec<CpuSet> = self
            .cores()
            .iter()
            .map(|g| g.intersection(set))
            .filter(|g| !g.is_empty())
            .collect();
        groups.sort_by_key(|g| g.first());
        groups
    }

    /// Distinct L3 domains, sorted by lowest CPU; CPUs with no known L3 are in none.
    pub fn l3_domains(&self) -> Vec<CpuSet> {
        partition(
            self.cpus
                .values()
                .filter_map(|c| c.l3.as_ref().map(|l3| (c.id, l3))),
        )
    }

    /// Online CPUs by `physical_package_id`.
    pub fn packages(&self) -> BTreeMap<u32, CpuSet> {
        let mut packages: BTreeMap<u32, CpuSet> = BTreeMap::new();
        for cpu in self.cpus.values() {
            packages.entry(cpu.package).or_default().insert(cpu.id);
        }
        packages
    }

    /// The most SMT siblings any core has (1 without SMT, 0 with no CPUs).
    pub fn smt_width(&self) -> usize {
        self.cores().iter().map(CpuSet::len).max().unwrap_or(0)
    }

    pub fn node_of(&self, cpu: u32) -> Option<u32> {
        self.cpus.get(&cpu).and_then(|c| c.node)
    }

    pub fn cpu(&self, id: u32) -> Option<&Cpu> {
        self.cpus.get(&id)
    }
}

/// Groups CPUs by the set each one reports, taking every CPU at most once.
fn partition<'a>(sets: impl Iterator<Item = (u32, &'a CpuSet)>) -> Vec<CpuSet> {
    let mut covered = CpuSet::new();
    let mut groups = Vec::new();
    for (id, set) in sets {
        if covered.contains(id) {
            continue;
        }
        let mut group = set.difference(&covered);
        group.insert(id);
        covered = covered.union(&group);
        groups.push(group);
    }
    groups
}

/// Bitmap width for parsing: masks are printed `nr_cpu_ids` wide, which never exceeds
/// `kernel_max + 1`; [`MAX_CPUS`] is the floor so captures without `kernel_max` still parse.
fn bitmap_width(cpu_dir: &Path) -> u32 {
    read_u64(&cpu_dir.join("kernel_max"))
        .and_then(|max| u32::try_from(max.saturating_add(1)).ok())
        .map_or(MAX_CPUS, |n| n.max(MAX_CPUS))
}

/// `cpu/online`, or on kernels without it (before 2.6.30) each `cpuN/online` flag. `cpu0`
/// usually has no `online` file because the boot CPU cannot be hot-unplugged on x86.
fn read_online(cpu_dir: &Path, nbits: u32) -> Result<CpuSet, TopologyError> {
    let path = cpu_dir.join("online");
    match fs::read_to_string(&path) {
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
        match fs::read_to_string(&flag) {
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
fn read_cpu(dir: &Path, id: u32, nbits: u32, online: &CpuSet) -> Cpu {
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

/// The level-3 entry among `cache/indexK`. Its index varies: old Intel kernels had no
/// separate L1i entry, so L3 was `index2` there.
fn read_l3(cache: &Path, nbits: u32, online: &CpuSet) -> (Option<CpuSet>, Option<u32>) {
    let Ok(entries) = fs::read_dir(cache) else {
        return (None, None);
    };
    let mut indexes: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("index"))
        .map(|e| e.path())
        .collect();
    indexes.sort();
    for index in indexes {
        if read_u64(&index.join("level")) != Some(3) {
            continue;
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
fn read_nodes(dir: &Path, nbits: u32, online: &CpuSet) -> BTreeMap<u32, NumaNode> {
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
fn read_mem_total(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace().skip(2);
        (words.next() == Some("MemTotal:"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// `hugepages/hugepages-<size>kB/{nr,free}_hugepages`; pools that cannot be read are left out.
fn read_hugepages(dir: &Path) -> BTreeMap<u64, HugePool> {
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
fn read_hybrid(root: &Path, nbits: u32, online: &CpuSet) -> Option<Hybrid> {
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
fn read_set_pair(dir: &Path, stem: &str, nbits: u32) -> Option<CpuSet> {
    let mask = if stem == "shared_cpu" {
        format!("{stem}_map")
    } else {
        stem.to_string()
    };
    read_set(&dir.join(format!("{stem}_list")), &dir.join(mask), nbits)
}

/// A cpulist file, else a cpumask file; `None` if neither reads and parses.
fn read_set(list: &Path, mask: &Path, nbits: u32) -> Option<CpuSet> {
    read_list(list, nbits).or_else(|| {
        let text = fs::read_to_string(mask).ok()?;
        CpuSet::parse_mask(&text, nbits).ok()
    })
}

fn read_list(path: &Path, nbits: u32) -> Option<CpuSet> {
    let text = fs::read_to_string(path).ok()?;
    CpuSet::parse_list(&text, nbits).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}
