//! (stand-in until the topo branch lands)
use crate::cpuset::CpuSet;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("topology: {path}")]
pub struct TopologyError {
    pub path: String,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuKind {
    Performance,
    Efficiency,
    Unknown,
}
#[derive(Debug, Clone)]
pub struct Cpu {
    pub id: u32,
    pub package: u32,
    pub die: Option<u32>,
    pub core_id: u32,
    pub siblings: CpuSet,
    pub l3: Option<CpuSet>,
    pub l3_id: Option<u32>,
    pub node: Option<u32>,
    pub kind: CpuKind,
}
#[derive(Debug, Clone)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: CpuSet,
    pub mem_total_kib: Option<u64>,
}
#[derive(Debug, Clone)]
pub struct Topology {
    pub online: CpuSet,
    pub isolated: CpuSet,
    pub cpus: BTreeMap<u32, Cpu>,
    pub nodes: BTreeMap<u32, NumaNode>,
}
impl Topology {
    pub fn read(_root: &Path) -> Result<Topology, TopologyError> {
        todo!()
    }
    pub fn cores_in(&self, _set: &CpuSet) -> Vec<CpuSet> {
        todo!()
    }
    pub fn smt_width(&self) -> usize {
        todo!()
    }
    pub fn cpu(&self, id: u32) -> Option<&Cpu> {
        self.cpus.get(&id)
    }
    pub fn node_of(&self, cpu: u32) -> Option<u32> {
        self.cpus.get(&cpu).and_then(|c| c.node)
    }
}
