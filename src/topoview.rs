//! `pvetune topology`: the host as placement sees it, NUMA node -> package -> L3 domain ->
//! core -> SMT threads, with P/E cores, offline and isolated CPUs, free memory and hugepages
//! per node, and who holds each CPU now (a VM, from the ledger, or the host). One model
//! ([`View`]), printed as a terminal picture or as JSON (`--json`; docs/json.md). Reads only.

use crate::cpuset::CpuSet;
use crate::error::Error;
use crate::root::Root;
use crate::state::Store;
use crate::topology::{CPU_DIR, CpuKind, NODE_DIR, Topology};
use serde::Serialize;
use std::collections::BTreeMap;

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct View {
    pub online: String,
    pub offline: String,
    pub isolated: String,
    /// Threads per core, the widest (1: no SMT).
    pub smt: usize,
    pub hybrid: bool,
    pub nodes: Vec<Node>,
    /// CPUs each VM holds, from the ledger.
    pub vms: BTreeMap<u32, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// `None`: CPUs of no known node.
    pub id: Option<u32>,
    pub mem_total_kib: Option<u64>,
    pub mem_free_kib: Option<u64>,
    pub hugepages: Vec<Pool>,
    pub packages: Vec<Package>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pool {
    pub size_kib: u64,
    pub total: u64,
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    pub id: u32,
    pub l3: Vec<L3>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct L3 {
    /// The domain's CPUs; `None`: cores with no known L3.
    pub cpus: Option<String>,
    pub cores: Vec<Core>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Core {
    pub cpus: String,
    /// `performance`, `efficiency`, or `None` when the CPU is not hybrid.
    pub kind: Option<&'static str>,
    pub threads: Vec<Thread>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Thread {
    pub cpu: u32,
    /// The VM holding it; `None`: the host's.
    pub vm: Option<u32>,
    pub isolated: bool,
}

/// Reads the host and the ledger under `root`.
pub fn read(root: &Root) -> Result<View, Error> {
    let topo = Topology::read(root.base())?;
    let state = Store::new(root).load()?;
    let vms: BTreeMap<u32, CpuSet> = state
        .vms
        .iter()
        .map(|(id, rec)| (*id, rec.cpus.clone()))
        .collect();
    let present = present(root).union(&topo.online);
    let free = |id: u32| mem_free(&root.path(format!("/{NODE_DIR}/node{id}/meminfo")));
    Ok(build(&topo, &present, &vms, free))
}

/// The model, from what was read (pure: tests build it from fixture trees).
pub fn build(
    topo: &Topology,
    present: &CpuSet,
    vms: &BTreeMap<u32, CpuSet>,
    mem_free: impl Fn(u32) -> Option<u64>,
) -> View {
    let holder = |cpu: u32| vms.iter().find(|(_, c)| c.contains(cpu)).map(|(id, _)| *id);
    // Node -> package -> L3 (lowest CPU) -> cores, in CPU order at each level.
    type Tree = BTreeMap<Option<u32>, BTreeMap<u32, BTreeMap<Option<u32>, Vec<CpuSet>>>>;
    let mut tree: Tree = BTreeMap::new();
    for core in topo.cores() {
        let Some(cpu) = core.first().and_then(|c| topo.cpu(c)) else {
            continue;
        };
        tree.entry(cpu.node)
            .or_default()
            .entry(cpu.package)
            .or_default()
            .entry(cpu.l3.as_ref().and_then(CpuSet::first))
            .or_default()
            .push(core);
    }
    let nodes = tree
        .into_iter()
        .map(|(id, packages)| {
            let node = id.and_then(|id| topo.nodes.get(&id));
            Node {
                id,
                mem_total_kib: node.and_then(|n| n.mem_total_kib),
                mem_free_kib: id.and_then(&mem_free),
                hugepages: node
                    .map(|n| {
                        n.hugepages
                            .iter()
                            .map(|(size, p)| Pool {
                                size_kib: *size,
                                total: p.nr,
                                free: p.free,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                packages: packages
                    .into_iter()
                    .map(|(id, l3s)| Package {
                        id,
                        l3: l3s
                            .into_values()
                            .map(|cores| L3 {
                                cpus: cores
                                    .first()
                                    .and_then(|c| c.first())
                                    .and_then(|c| topo.cpu(c))
                                    .and_then(|c| c.l3.as_ref())
                                    .map(CpuSet::to_string),
                                cores: cores
                                    .iter()
                                    .map(|core| Core {
                                        cpus: core.to_string(),
                                        kind: core.first().and_then(|c| topo.cpu(c)).and_then(
                                            |c| match c.kind {
                                                CpuKind::Performance => Some("performance"),
                                                CpuKind::Efficiency => Some("efficiency"),
                                                CpuKind::Unknown => None,
                                            },
                                        ),
                                        threads: core
                                            .iter()
                                            .map(|cpu| Thread {
                                                cpu,
                                                vm: holder(cpu),
                                                isolated: topo.isolated.contains(cpu),
                                            })
                                            .collect(),
                                    })
                                    .collect(),
                            })
                            .collect(),
                    })
                    .collect(),
            }
        })
        .collect();
    View {
        online: topo.online.to_string(),
        offline: present.difference(&topo.online).to_string(),
        isolated: topo.isolated.to_string(),
        smt: topo.smt_width(),
        hybrid: topo.hybrid.is_some(),
        nodes,
        vms: vms.iter().map(|(id, c)| (*id, c.to_string())).collect(),
    }
}

/// `cpu/present`, or on kernels without it every `cpuN` directory (an offline CPU keeps its
/// directory and its `online` file).
fn present(root: &Root) -> CpuSet {
    let dir = root.path(format!("/{CPU_DIR}"));
    if let Some(set) = crate::attr::read(&dir.join("present"))
        .ok()
        .and_then(|t| t.trim().parse::<CpuSet>().ok())
    {
        return set;
    }
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name();
                    let n = name.to_str()?.strip_prefix("cpu")?;
                    // Canonical numbers only (`cpu01` is not a CPU directory).
                    n.parse::<u32>().ok().filter(|v| v.to_string() == n)
                })
                .filter(|&n| n < crate::cpuset::MAX_CPUS)
                .collect()
        })
        .unwrap_or_default()
}

/// `Node N MemFree: K kB` of a node's meminfo.
fn mem_free(path: &std::path::Path) -> Option<u64> {
    let text = crate::attr::read(path).ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace().skip(2);
        (words.next() == Some("MemFree:"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// Whether to colour: only on a terminal, and never with `NO_COLOR` set to anything but
/// the empty string (no-color.org).
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `pvetune topology [--json]`: the lines to print.
pub fn command(root: &Root, json: bool) -> Result<Vec<String>, Error> {
    use std::io::IsTerminal;
    let view = read(root)?;
    if json {
        // Versioned as every --json document is (docs/json.md).
        #[derive(Serialize)]
        struct Versioned<'a> {
            version: u32,
            #[serde(flatten)]
            view: &'a View,
        }
        let doc = Versioned {
            version: 1,
            view: &view,
        };
        let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::Output(e.into()))?;
        return Ok(vec![text]);
    }
    let colour = use_colour(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    Ok(render(&view, colour))
}

mod render;
pub use render::render;
