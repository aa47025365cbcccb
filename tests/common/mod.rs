//! Helpers shared by integration tests: temp dirs, the peer-data folder, archive extraction.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod hostgen;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// What every temp dir and every QEMU `-name` of the tests starts with, so that what a run
/// leaves behind can be found (`.ci/leftovers`).
pub const TEST_PREFIX: &str = "pvetune-test-";

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("{TEST_PREFIX}{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The pids of every `qemu-system-*` process whose command line contains `marker`.
pub fn qemu_pids(marker: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|b| *b == 0);
            let program = args.next().unwrap_or_default();
            String::from_utf8_lossy(program).contains("qemu-system")
                && String::from_utf8_lossy(&cmdline).contains(marker)
        })
        .collect()
}

/// Kills (SIGKILL) every QEMU whose command line contains `marker` and waits until they are
/// gone (at most 5 s). A `-daemonize`d QEMU is no child of the test: only this finds it.
pub fn kill_qemus(marker: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = qemu_pids(marker);
        if pids.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Made before a test starts a QEMU whose command line names `root` (its `-pidfile` and
/// `-qmp` live there): dropping it, also when the test panics at any point after (even before
/// the pid is known), kills every such QEMU and then removes `root`.
pub struct QemuGuard {
    pub root: PathBuf,
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        kill_qemus(&self.root.to_string_lossy());
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `../shared/peer-data` beside the crate, if CI put it there.
pub fn peer_data() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peer-data");
    path.is_dir().then_some(path)
}

/// Extracts a `.tar.bz2` / `.tar.gz` capture and returns the temp dir and the directory that
/// holds its `sys/` (captures nest it under their own name, some under `fsroot/`).
pub fn extract_capture(archive: &Path) -> (TempDir, PathBuf) {
    let dir = TempDir::new("capture");
    let status = Command::new("tar")
        .arg("xf")
        .arg(archive)
        .arg("-C")
        .arg(dir.path())
        // Only the topology part: some captures also carry large PCI and device trees.
        .args(["--wildcards", "*sys/devices/system/*"])
        .status()
        .expect("run tar");
    assert!(status.success(), "tar failed on {}", archive.display());
    let root = find_sys_root(dir.path())
        .unwrap_or_else(|| panic!("no sys/devices/system/cpu in {}", archive.display()));
    (dir, root)
}

/// One capture of peer-data (`rel` below it) extracted and read as a `Topology`: the temp dir,
/// the root its `sys/` is under, and the topology. `None` (after saying why) when peer-data
/// is absent.
pub fn read_capture(rel: &str) -> Option<(TempDir, PathBuf, pvetune::topology::Topology)> {
    let Some(peer) = peer_data() else {
        println!("skipped: ../shared/peer-data not present");
        return None;
    };
    let (dir, root) = extract_capture(&peer.join(rel));
    let topo = pvetune::topology::Topology::read(&root).unwrap_or_else(|e| panic!("{rel}: {e}"));
    Some((dir, root, topo))
}

fn find_sys_root(dir: &Path) -> Option<PathBuf> {
    if dir.join("sys/devices/system/cpu").is_dir() {
        return Some(dir.to_path_buf());
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| !p.ends_with("sys") && !p.ends_with("proc"))
        .collect();
    children.sort();
    children.iter().find_map(|c| find_sys_root(c))
}
