//! `RunningVm`: a running VM's QEMU process and its threads, sorted into vCPUs, iothreads and
//! the emulator's own threads, which is what pinning acts on.
//!
//! QMP is the only exact source: it names each vCPU's host thread with its socket/core/thread
//! position and each iothread by its config id. When QMP cannot be had (the socket serves one
//! client and qemu-server may hold it during a start), vCPUs are still found by their thread
//! names (`CPU <n>/KVM`, from `-name ...,debug-threads=on`), but iothreads are not: QEMU names
//! them `IO <id>` only when that fits the kernel's 15-character `comm`, and Proxmox ids such as
//! `iothread-virtioscsi0` do not, so those threads look exactly like the main thread.
//!
//! Every path is read under a root prefix (`/` in production, a temp dir in tests).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::procstat::Stat;
use crate::qmp::{Qmp, QmpError};

/// Where qemu-server keeps a running VM's pidfile and sockets, relative to the host root.
pub const RUN_DIR: &str = "var/run/qemu-server";

/// Why a running VM could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot read pidfile {path}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pidfile {path} holds {content:?}, not a process id: remove it if the VM is stopped")]
    BadPid { path: PathBuf, content: String },
    #[error("cannot list the threads of VM {vmid} in {path}")]
    Tasks {
        vmid: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the thread roles came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadSource {
    /// QMP: exact vCPU topology and iothreads.
    Qmp,
    /// Thread names in `/proc`: vCPU indexes only, no topology, no iothreads.
    Proc,
}

/// A running VM and its threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningVm {
    pub vmid: u32,
    pub pid: i32,
    /// `/proc/<pid>/stat` field 22 (clock ticks after boot): with `pid`, identifies this QEMU
    /// process even after the pid is reused.
    pub start_time: u64,
    /// Sorted by `index`.
    pub vcpus: Vec<VcpuThread>,
    pub iothreads: Vec<IoThread>,
    /// Every other thread of the process (main loop, `call_rcu`, workers, ...), by tid.
    pub emulator: Vec<Thread>,
    pub source: ThreadSource,
    /// QEMU's cgroup, host-absolute (`/sys/fs/cgroup/qemu.slice/100.scope`), if readable.
    pub cgroup: Option<String>,
}

/// A vCPU thread; the guest topology position is known only from QMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuThread {
    pub index: u32,
    pub tid: i32,
    pub socket: Option<u32>,
    pub core: Option<u32>,
    /// SMT sibling index inside the core.
    pub thread: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoThread {
    pub id: String,
    pub tid: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    pub tid: i32,
    pub comm: String,
}

/// `<root>/var/run/qemu-server/<vmid>.pid`.
pub fn pidfile_path(root: &Path, vmid: u32) -> PathBuf {
    root.join(RUN_DIR).join(format!("{vmid}.pid"))
}

/// `<root>/var/run/qemu-server/<vmid>.qmp`.
pub fn qmp_path(root: &Path, vmid: u32) -> PathBuf {
    root.join(RUN_DIR).join(format!("{vmid}.qmp"))
}

/// The QEMU pid of a running VM, or `None` when it does not run.
///
/// A pidfile survives a crashed QEMU, and its pid may since belong to another process. As
/// qemu-server does (`vm_running_locally`), the pid counts only while that process's command
/// line still carries `-pidfile .../qemu-server/<vmid>.pid`: pinning a stranger's threads
/// would be worse than doing nothing.
pub fn read_pid(root: &Path, vmid: u32) -> Result<Option<i32>, VmError> {
    let path = pidfile_path(root, vmid);
    let content = match std::fs::read_to_string(&path) {
        Ok(content) => content,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(VmError::PidFile { path, source }),
    };
    let pid = match content.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => pid,
        _ => return Err(VmError::BadPid { path, content }),
    };
    let Ok(cmdline) = std::fs::read(proc_dir(root, pid).join("cmdline")) else {
        return Ok(None);
    };
    let suffix = format!("qemu-server/{vmid}.pid");
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.windows(2).any(|pair| {
        matches!(pair[0], b"-pidfile" | b"--pidfile") && pair[1].ends_with(suffix.as_bytes())
    });
    if !ours {
        log::debug!(
            "{}: pid {pid} is not VM {vmid}'s QEMU (stale pidfile)",
            path.display()
        );
        return Ok(None);
    }
    Ok(Some(pid))
}

/// Field 22 of `/proc/<pid>/stat`, or `None` if the process is gone or the file is odd.
pub fn process_start_time(root: &Path, pid: i32) -> Option<u64> {
    Stat::read(&proc_dir(root, pid).join("stat"))?.start_time()
}

/// Finds VM `vmid`'s QEMU process and its threads; `None` when the VM does not run.
pub fn discover(root: &Path, vmid: u32) -> Result<Option<RunningVm>, VmError> {
    let Some(pid) = read_pid(root, vmid)? else {
        return Ok(None);
    };
    // Read after the pid check: if QEMU exits in between, the VM simply is not running.
    let Some(start_time) = process_start_time(root, pid) else {
        return Ok(None);
    };
    let Some(tasks) = list_tasks(root, vmid, pid)? else {
        return Ok(None);
    };

    let qmp = qmp_path(root, vmid);
    let (vcpus, iothreads, source) = match from_qmp(&qmp, vmid, pid, &tasks) {
        Ok((vcpus, iothreads)) => (vcpus, iothreads, ThreadSource::Qmp),
        Err(reason) => {
            log::warn!(
                "VM {vmid}: no thread list from QMP ({reason}); taking vCPUs from the thread \
                 names in /proc/{pid}/task instead, without their socket/core/thread position; \
                 iothreads cannot be recognised by name, so they are treated as emulator threads"
            );
            let vcpus = vcpus_from_names(root, pid, &tasks);
            if vcpus.is_empty() {
                // Before QEMU 11, threads are named only with `-name ...,debug-threads=on`,
                // which newer qemu-server releases no longer pass.
                log::warn!(
                    "VM {vmid}: no thread of pid {pid} is named 'CPU <n>/KVM': QEMU runs without \
                     thread names, so its vCPUs cannot be found without QMP"
                );
            }
            (vcpus, Vec::new(), ThreadSource::Proc)
        }
    };

    let taken: BTreeSet<i32> = vcpus
        .iter()
        .map(|v| v.tid)
        .chain(iothreads.iter().map(|io| io.tid))
        .collect();
    let emulator = tasks
        .difference(&taken)
        // A thread that exits meanwhile has no comm and needs no pinning.
        .filter_map(|&tid| comm(root, pid, tid).map(|comm| Thread { tid, comm }))
        .collect();

    Ok(Some(RunningVm {
        vmid,
        pid,
        start_time,
        vcpus,
        iothreads,
        emulator,
        source,
        cgroup: crate::attr::read(&proc_dir(root, pid).join("cgroup"))
            .ok()
            .and_then(|text| crate::cgroup::unified_path(&text)),
    }))
}

fn proc_dir(root: &Path, pid: i32) -> PathBuf {
    root.join("proc").join(pid.to_string())
}

/// The tids of `pid`, or `None` if the process is gone.
fn list_tasks(root: &Path, vmid: u32, pid: i32) -> Result<Option<BTreeSet<i32>>, VmError> {
    let path = proc_dir(root, pid).join("task");
    let entries = match std::fs::read_dir(&path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(VmError::Tasks { vmid, path, source }),
    };
    let mut tids = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| VmError::Tasks {
            vmid,
            path: path.clone(),
            source,
        })?;
        if let Some(tid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            tids.insert(tid);
        }
    }
    Ok(Some(tids))
}

fn comm(root: &Path, pid: i32, tid: i32) -> Option<String> {
    let path = proc_dir(root, pid)
        .join("task")
        .join(tid.to_string())
        .join("comm");
    let comm = std::fs::read_to_string(path).ok()?;
    Some(comm.trim_end_matches('\n').to_string())
}

/// vCPUs and iothreads from QMP, keeping only threads that really belong to `pid`: a QMP
/// socket left from an older QEMU instance, or a thread that has exited, must not be pinned.
fn from_qmp(
    path: &Path,
    vmid: u32,
    pid: i32,
    tasks: &BTreeSet<i32>,
) -> Result<(Vec<VcpuThread>, Vec<IoThread>), QmpError> {
    let mut qmp = Qmp::connect(path)?;
    let cpus = qmp.query_cpus_fast()?;
    let mut vcpus: Vec<VcpuThread> = cpus
        .iter()
        .filter(|cpu| belongs(vmid, pid, tasks, cpu.thread_id, "vCPU"))
        .map(|cpu| VcpuThread {
            index: cpu.cpu_index,
            tid: cpu.thread_id,
            socket: cpu.socket_id,
            core: cpu.core_id,
            thread: cpu.thread_id_in_core,
        })
        .collect();
    vcpus.sort_by_key(|v| v.index);
    if vcpus.is_empty() && !cpus.is_empty() {
        return Err(QmpError::Protocol {
            path: path.to_path_buf(),
            command: "query-cpus-fast".into(),
            detail: format!("none of its vCPU threads belongs to pid {pid}"),
        });
    }
    // Without iothreads the vCPUs are still exact; the iothreads then count as emulator threads.
    let iothreads = match qmp.query_iothreads() {
        Ok(list) => list
            .into_iter()
            .filter(|io| belongs(vmid, pid, tasks, io.thread_id, "iothread"))
            .map(|io| IoThread {
                id: io.id,
                tid: io.thread_id,
            })
            .collect(),
        Err(e) => {
            log::warn!(
                "VM {vmid}: {}; iothreads are treated as emulator threads",
                chain(&e)
            );
            Vec::new()
        }
    };
    Ok((vcpus, iothreads))
}

fn belongs(vmid: u32, pid: i32, tasks: &BTreeSet<i32>, tid: i32, role: &str) -> bool {
    let ok = tasks.contains(&tid);
    if !ok {
        log::warn!(
            "VM {vmid}: QMP names thread {tid} as a {role}, but it is not a thread of pid {pid}; ignored"
        );
    }
    ok
}

/// vCPUs by thread name: `CPU <n>/KVM` (or `/TCG` without KVM).
fn vcpus_from_names(root: &Path, pid: i32, tasks: &BTreeSet<i32>) -> Vec<VcpuThread> {
    let mut vcpus: Vec<VcpuThread> = tasks
        .iter()
        .filter_map(|&tid| {
            let comm = comm(root, pid, tid)?;
            let index = comm
                .strip_prefix("CPU ")?
                .strip_suffix("/KVM")
                .or_else(|| comm.strip_prefix("CPU ")?.strip_suffix("/TCG"))?
                .parse()
                .ok()?;
            Some(VcpuThread {
                index,
                tid,
                socket: None,
                core: None,
                thread: None,
            })
        })
        .collect();
    vcpus.sort_by_key(|v| v.index);
    vcpus
}

/// An error and its causes on one line, for a log message.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp root, removed when the test ends.
    struct FakeRoot(PathBuf);

    impl std::ops::Deref for FakeRoot {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake_root(name: &str) -> FakeRoot {
        let root =
            std::env::temp_dir().join(format!("pvetune-test-vm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(RUN_DIR)).unwrap();
        FakeRoot(root)
    }

    fn fake_task(root: &Path, pid: i32, tid: i32, comm: &str) {
        let dir = proc_dir(root, pid).join("task").join(tid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
    }

    fn fake_process(root: &Path, vmid: u32, pid: i32, comm: &str) {
        let dir = proc_dir(root, pid);
        std::fs::create_dir_all(&dir).unwrap();
        let stat = format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 2 3 0 0 20 0 9 0 123456 \
             1000 100 18446744073709551615 0 0 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n"
        );
        std::fs::write(dir.join("stat"), stat).unwrap();
        let cmdline =
            format!("/usr/bin/kvm\0-id\0{vmid}\0-pidfile\0/var/run/qemu-server/{vmid}.pid\0");
        std::fs::write(dir.join("cmdline"), cmdline).unwrap();
        std::fs::write(pidfile_path(root, vmid), format!("{pid}\n")).unwrap();
    }

    #[test]
    fn start_time_survives_odd_comm() {
        let root = fake_root("stat");
        fake_process(&root, 100, 4242, "a) b (c");
        assert_eq!(process_start_time(&root, 4242), Some(123456));
        assert_eq!(process_start_time(&root, 4243), None);
    }

    #[test]
    fn pidfile_states() {
        let root = fake_root("pid");
        assert_eq!(read_pid(&root, 100).unwrap(), None);
        fake_process(&root, 100, 4242, "kvm");
        assert_eq!(read_pid(&root, 100).unwrap(), Some(4242));
        // Another VM's pidfile pointing at this process: a reused pid.
        std::fs::write(pidfile_path(&root, 101), "4242").unwrap();
        assert_eq!(read_pid(&root, 101).unwrap(), None);
        std::fs::write(pidfile_path(&root, 102), "1234").unwrap();
        assert_eq!(read_pid(&root, 102).unwrap(), None);
        std::fs::write(pidfile_path(&root, 103), "-5\n").unwrap();
        assert!(matches!(read_pid(&root, 103), Err(VmError::BadPid { .. })));
    }

    #[test]
    fn proc_fallback_finds_vcpus_by_name_and_no_iothreads() {
        let root = fake_root("fallback");
        fake_process(&root, 100, 500, "kvm");
        for (tid, comm) in [
            (500, "kvm"),
            (501, "call_rcu"),
            (502, "kvm"),
            (503, "CPU 1/KVM"),
            (504, "CPU 0/KVM"),
            (505, "CPU 10/TCG"),
            (506, "CPU x/KVM"),
        ] {
            fake_task(&root, 500, tid, comm);
        }
        let vm = discover(&root, 100).unwrap().unwrap();
        assert_eq!(vm.source, ThreadSource::Proc);
        assert_eq!(vm.start_time, 123456);
        let vcpus: Vec<(u32, i32)> = vm.vcpus.iter().map(|v| (v.index, v.tid)).collect();
        assert_eq!(vcpus, [(0, 504), (1, 503), (10, 505)]);
        assert!(vm.iothreads.is_empty());
        let emulator: Vec<i32> = vm.emulator.iter().map(|t| t.tid).collect();
        assert_eq!(emulator, [500, 501, 502, 506]);
        assert_eq!(vm.emulator[1].comm, "call_rcu");
    }

    #[test]
    fn not_running_vm_is_none() {
        let root = fake_root("none");
        assert_eq!(discover(&root, 100).unwrap(), None);
    }
}
