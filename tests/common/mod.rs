//! Helpers shared by integration tests: temp dirs, the peer-data folder, archive extraction.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod hostgen;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pvetune-{tag}-{}-{n}", std::process::id()));
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
