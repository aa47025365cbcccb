//! (stand-in until the vmcfg branch lands)
use crate::cpuset::CpuSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VmConfigError {
    #[error("{path}: not found")]
    NotFound { path: PathBuf },
}
#[derive(Debug, Clone, Default)]
pub struct VmConfig {
    pub name: Option<String>,
    pub cores: u32,
    pub sockets: u32,
    pub vcpus: Option<u32>,
    pub smp_threads: Option<u32>,
    pub affinity: Option<CpuSet>,
    pub lock: Option<String>,
}
impl VmConfig {
    pub fn read(_root: &Path, _vmid: u32) -> Result<VmConfig, VmConfigError> {
        todo!()
    }
    pub fn parse(_text: &str) -> Result<VmConfig, VmConfigError> {
        todo!()
    }
    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.unwrap_or(self.cores * self.sockets)
    }
    pub fn threads_per_core(&self) -> u32 {
        self.smt_threads()
    }
    fn smt_threads(&self) -> u32 {
        self.smp_threads.unwrap_or(1)
    }
}
