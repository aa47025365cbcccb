//! The lab's download cache: Debian packages fetched with `apt-get download`, unpacked with
//! `dpkg -x`, kept outside the clone so that a fresh CI checkout does not download them again.
//!
//! Layout under the cache dir (`PVETUNE_LAB_CACHE`, default `/var/cache/pvetune-lab`):
//! `pkg/<name>_<version>/` holds one unpacked package and a `.complete` marker written last,
//! so an interrupted unpack is never mistaken for a good one. `rootfs/` is managed by
//! `rootfs.rs`. A `flock` serialises the two flavours, which run as parallel tests.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};

use crate::util::{Ctx, LabResult, run_cmd};

const DEFAULT_CACHE_DIR: &str = "/var/cache/pvetune-lab";
const COMPLETE_MARKER: &str = ".complete";

/// The cache directory, created if needed.
pub struct Cache {
    dir: PathBuf,
}

/// Held while the cache is being read or filled; dropping it releases the lock.
pub struct CacheLock {
    _lock: Flock<File>,
}

impl Cache {
    pub fn open() -> LabResult<Cache> {
        let dir = std::env::var_os("PVETUNE_LAB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
        fs::create_dir_all(&dir).ctx(|| format!("creating the lab cache {}", dir.display()))?;
        Ok(Cache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the cache lock `name`; blocks while the other flavour fills that part of the
    /// cache (packages and the root image have separate locks, so that the fast flavour does
    /// not wait for the slow one's debootstrap).
    pub fn lock(&self, name: &str) -> LabResult<CacheLock> {
        let path = self.dir.join(format!(".{name}.lock"));
        let file = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("locking {}: {e}", path.display()))?;
        Ok(CacheLock { _lock: lock })
    }

    /// The unpacked contents of the candidate version of Debian package `name`.
    ///
    /// apt's candidate comes from the local package lists (no network). When the lists do not
    /// know the package (no `apt-get update` yet), the newest cached copy is used instead.
    pub fn package(&self, _lock: &CacheLock, name: &str) -> LabResult<PathBuf> {
        let fetched = match candidate_version(name) {
            Some(version) => self.unpack(name, &version),
            None => Err(format!("apt knows no package {name}")),
        };
        // Stale apt lists name versions the mirror no longer has: a cached copy still serves.
        fetched.or_else(|e| {
            self.newest_cached(name).ok_or_else(|| {
                format!(
                    "{e}, and the lab cache {} has no {name}: \
                     run tests/lab/install-deps.sh (it runs apt-get update)",
                    self.dir.display()
                )
            })
        })
    }

    /// The newest `linux-image-6.12.<n>+deb<m>-cloud-amd64` apt knows, unpacked.
    pub fn cloud_kernel(&self, lock: &CacheLock) -> LabResult<Kernel> {
        let out = Command::new("apt-cache")
            .args([
                "search",
                "--names-only",
                r"^linux-image-6\.12\..*-cloud-amd64$",
            ])
            .output()
            .ctx(|| "running apt-cache search".to_string())?;
        let listing = String::from_utf8_lossy(&out.stdout);
        let mut names: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| is_cloud_kernel_package(n))
            .collect();
        names.sort_by(|a, b| compare_debian_versions(a, b));
        let dir = match names.last() {
            Some(name) => self.package(lock, name)?,
            None => self.newest_cached_kernel().ok_or_else(|| {
                "apt-cache finds no linux-image-6.12.*-cloud-amd64 and the lab cache has none: \
                 run tests/lab/install-deps.sh (it runs apt-get update)"
                    .to_string()
            })?,
        };
        Kernel::find(&dir)
    }

    fn pkg_root(&self) -> PathBuf {
        self.dir.join("pkg")
    }

    fn unpack(&self, name: &str, version: &str) -> LabResult<PathBuf> {
        // Epochs (`1:`) are not welcome in file names.
        let dir = self
            .pkg_root()
            .join(format!("{name}_{}", version.replace(':', "%3a")));
        if dir.join(COMPLETE_MARKER).exists() {
            return Ok(dir);
        }
        let work = self.pkg_root().join(format!(".{name}.download"));
        let _ = fs::remove_dir_all(&work);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&work).ctx(|| format!("creating {}", work.display()))?;
        run_cmd(
            Command::new("apt-get")
                // As root, apt would try to drop to `_apt`, which cannot write our cache dir.
                .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
                .arg(format!("{name}={version}"))
                .current_dir(&work),
        )?;
        let deb = fs::read_dir(&work)
            .ctx(|| format!("listing {}", work.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| format!("apt-get download {name} left no .deb in {}", work.display()))?;
        run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
        File::create(dir.join(COMPLETE_MARKER)).ctx(|| format!("marking {}", dir.display()))?;
        let _ = fs::remove_dir_all(&work);
        Ok(dir)
    }

    fn cached(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.pkg_root()) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(COMPLETE_MARKER).exists())
            .collect();
        dirs.sort_by(|a, b| compare_debian_versions(&file_name(a), &file_name(b)));
        dirs
    }

    fn newest_cached(&self, name: &str) -> Option<PathBuf> {
        let prefix = format!("{name}_");
        self.cached()
            .into_iter()
            .rfind(|p| file_name(p).starts_with(&prefix))
    }

    fn newest_cached_kernel(&self) -> Option<PathBuf> {
        self.cached().into_iter().rfind(|p| {
            file_name(p)
                .split('_')
                .next()
                .is_some_and(is_cloud_kernel_package)
        })
    }
}

/// An unpacked kernel package: the image and the modules the lab loads.
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

impl Kernel {
    fn find(dir: &Path) -> LabResult<Kernel> {
        let boot = dir.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .ctx(|| format!("listing {}", boot.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| file_name(p).starts_with("vmlinuz-"))
            .ok_or_else(|| format!("no vmlinuz-* in {}", boot.display()))?;
        let version = file_name(&vmlinuz)["vmlinuz-".len()..].to_string();
        let modules = dir.join("lib/modules").join(&version);
        Ok(Kernel {
            version,
            vmlinuz,
            modules,
        })
    }
}

/// `linux-image-6.12.117+deb12-cloud-amd64`, not the `-dbg`, `-unsigned` or meta packages.
fn is_cloud_kernel_package(name: &str) -> bool {
    name.strip_prefix("linux-image-6.12.")
        .and_then(|rest| rest.strip_suffix("-cloud-amd64"))
        .is_some_and(|abi| {
            abi.split('+')
                .next()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
}

fn candidate_version(name: &str) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", name])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_string)
}

/// Orders names by the numbers in them (`6.12.99` < `6.12.117`), which is what version
/// order means for the names the lab compares.
fn compare_debian_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn numbers(s: &str) -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    }
    numbers(a).cmp(&numbers(b))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
