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
use std::io;
use std::path::{Path, PathBuf};

use crate::cpuset::{CpuListError, CpuSet};

mod sysfs;
use sysfs::{bitmap_width, read_cpu, read_hybrid, read_list, read_nodes, read_online};

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
    /// Online CPUs only: offline CPUs have no topology to read. All of them from
    /// [`Topology::read`], the VM's from [`Topology::read_for`].
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
    /// Reads the topology under `root` (`/` in production), every online CPU.
    ///
    /// Broken firmware can make several nodes list the same CPU (`8em64t-2s2ca2c-buggynuma`: 8
    /// nodes each claiming all 8 CPUs). The kernel itself then places a CPU on one node only, so
    /// here each CPU goes to the lowest node that lists it and the other nodes' `cpus` drop it:
    /// node CPU sets are always disjoint.
    pub fn read(root: &Path) -> Result<Topology, TopologyError> {
        Self::read_cpus(root, None)
    }

    /// What a plan for a VM owning `cpus` needs: [`Topology::read`], but [`Cpu`] entries
    /// (siblings, L3, package, ...) only for the online CPUs of `cpus`, so that the cost
    /// grows with the VM and not with the host. `online`, `isolated`, `nodes` and `hybrid`
    /// are read whole; the sibling sets and L3 sets of the CPUs read still name CPUs outside
    /// `cpus`, so [`Topology::smt_width`] is the widest core among the VM's CPUs.
    pub fn read_for(root: &Path, cpus: &CpuSet) -> Result<Topology, TopologyError> {
        Self::read_cpus(root, Some(cpus))
    }

    fn read_cpus(root: &Path, only: Option<&CpuSet>) -> Result<Topology, TopologyError> {
        let cpu_dir = root.join(CPU_DIR);
        let nbits = bitmap_width(&cpu_dir);
        let online = read_online(&cpu_dir, nbits)?;
        // A malformed `isolated` is treated as "nothing isolated": it only refines placement.
        let isolated = read_list(&cpu_dir.join("isolated"), nbits).unwrap_or_default();
        let hybrid = read_hybrid(root, nbits, &online);
        let nodes = read_nodes(&root.join(NODE_DIR), nbits, &online);
        let wanted = only.map_or_else(|| online.clone(), |set| set.intersection(&online));
        let mut cpus = BTreeMap::new();
        for id in wanted.iter() {
            let mut cpu = read_cpu(&cpu_dir.join(format!("cpu{id}")), id, nbits, &online);
            cpu.node = node_of(&nodes, id);
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

    /// SMT sibling groups of the CPUs read (whole: a group can name CPUs that were not read),
    /// sorted by lowest CPU. Always a partition: if firmware reports overlapping sibling sets,
    /// a CPU stays in the first group that claims it.
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

    /// The CPUs read, by `physical_package_id`.
    pub fn packages(&self) -> BTreeMap<u32, CpuSet> {
        let mut packages: BTreeMap<u32, CpuSet> = BTreeMap::new();
        for cpu in self.cpus.values() {
            packages.entry(cpu.package).or_default().insert(cpu.id);
        }
        packages
    }

    /// The most SMT siblings any core of the CPUs read has (1 without SMT, 0 with no CPUs).
    pub fn smt_width(&self) -> usize {
        self.cores().iter().map(CpuSet::len).max().unwrap_or(0)
    }

    /// The node of any online CPU, read or not (see [`Topology::read_for`]).
    pub fn node_of(&self, cpu: u32) -> Option<u32> {
        node_of(&self.nodes, cpu)
    }

    pub fn cpu(&self, id: u32) -> Option<&Cpu> {
        self.cpus.get(&id)
    }
}

fn node_of(nodes: &BTreeMap<u32, NumaNode>, cpu: u32) -> Option<u32> {
    nodes.values().find(|n| n.cpus.contains(cpu)).map(|n| n.id)
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
