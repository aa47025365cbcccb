//! (stand-in until the vmcfg branch lands)
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("vm")]
pub struct VmError;
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadSource {
    Qmp,
    Proc,
}
#[derive(Debug, Clone)]
pub struct VcpuThread {
    pub index: u32,
    pub tid: i32,
    pub socket: Option<u32>,
    pub core: Option<u32>,
    pub thread: Option<u32>,
}
#[derive(Debug, Clone)]
pub struct IoThread {
    pub id: String,
    pub tid: i32,
}
#[derive(Debug, Clone)]
pub struct Thread {
    pub tid: i32,
    pub comm: String,
}
#[derive(Debug, Clone)]
pub struct RunningVm {
    pub vmid: u32,
    pub pid: i32,
    pub start_time: u64,
    pub vcpus: Vec<VcpuThread>,
    pub iothreads: Vec<IoThread>,
    pub emulator: Vec<Thread>,
    pub source: ThreadSource,
}
pub fn read_pid(_root: &Path, _vmid: u32) -> Result<Option<i32>, VmError> {
    todo!()
}
pub fn process_start_time(_root: &Path, _pid: i32) -> Option<u64> {
    todo!()
}
pub fn discover(_root: &Path, _vmid: u32) -> Result<Option<RunningVm>, VmError> {
    todo!()
}
