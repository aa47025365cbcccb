//! `Root`: the prefix under which pvetune reads and writes every host file.
//!
//! Production uses `/`; tests and the README demo point it at a fixture tree. Paths inside
//! pvetune are always written host-absolute (`/proc/sys/vm/stat_interval`) and mapped here, so
//! the journal stays meaningful whatever the prefix. Syscalls on threads are not affected.

use std::path::{Path, PathBuf};

/// Host paths pvetune knows, as named constants (host-absolute, before the root prefix).
pub mod paths {
    pub const CPU_DIR: &str = "/sys/devices/system/cpu";
    pub const PROC: &str = "/proc";
    pub const PROC_SYS: &str = "/proc/sys";
    pub const STATE_DIR: &str = "/run/pvetune";
    pub const PVE_PROFILE_DIR: &str = "/etc/pve/pvetune";
    pub const NODE_PROFILE_DIR: &str = "/etc/pvetune/profiles";
    /// qemu-server's per-VM config lock (`PVE::QemuConfig::lock_config`), an flock held during
    /// the whole start, both start hooks included.
    pub const QEMU_LOCK_DIR: &str = "/var/lock/qemu-server";
}

#[derive(Debug, Clone)]
pub struct Root {
    base: PathBuf,
}

impl Root {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Root { base: base.into() }
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Maps a host-absolute path under the prefix.
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let p = host_path.as_ref();
        self.base.join(p.strip_prefix("/").unwrap_or(p))
    }

    /// Maps a path back to its host-absolute form (for messages and the journal).
    pub fn host_path(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.base) {
            Ok(rel) => Path::new("/").join(rel),
            Err(_) => path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways() {
        let root = Root::new("/tmp/fix");
        let p = root.path("/proc/sys/vm/stat_interval");
        assert_eq!(p, Path::new("/tmp/fix/proc/sys/vm/stat_interval"));
        assert_eq!(root.host_path(&p), Path::new("/proc/sys/vm/stat_interval"));
        assert_eq!(Root::new("/").path("/sys"), Path::new("/sys"));
    }
}
