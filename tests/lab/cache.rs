//! The lab's download cache: the Debian packages `tests/lab/versions` pins, fetched with
//! `apt-get download` through a private apt configuration, unpacked with `dpkg -x`, kept
//! outside the clone so that a fresh CI checkout does not download them again.
//!
//! Layout under the cache dir (`PVETUNE_LAB_CACHE`, default `/var/cache/pvetune-lab`):
//! `pkg/<name>_<version>/` holds one unpacked package and a `.complete` marker written last,
//! so an interrupted unpack is never mistaken for a good one. `apt/` is the private apt
//! configuration, `rootfs/` is managed by `rootfs.rs`. `flock`s serialise the runs of the
//! matrix, which boot in parallel.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::fcntl::{Flock, FlockArg};

use crate::matrix::Pin;
use crate::util::{Ctx, LabResult, run_cmd};

const DEFAULT_CACHE_DIR: &str = "/var/cache/pvetune-lab";
const COMPLETE_MARKER: &str = ".complete";
pub const MIRROR: &str = "http://deb.debian.org/debian";
const UBUNTU_MIRROR: &str = "http://archive.ubuntu.com/ubuntu";
/// In Debian's `ubuntu-keyring` package: the key Ubuntu's archive signs its Release files with.
pub const UBUNTU_KEYRING: &str = "usr/share/keyrings/ubuntu-archive-keyring.gpg";

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

    /// Debian package `pin`, unpacked: from the cache, or downloaded through the lab's private
    /// apt (which refreshes its lists first, once per run, only when something is missing).
    pub fn package(&self, _lock: &CacheLock, apt: &Apt, pin: &Pin) -> LabResult<PathBuf> {
        self.unpack(apt, pin)
    }

    /// The kernel package `pin`, unpacked.
    pub fn kernel(&self, lock: &CacheLock, apt: &Apt, pin: &Pin) -> LabResult<Kernel> {
        Kernel::find(&self.package(lock, apt, pin)?)
    }

    fn pkg_root(&self) -> PathBuf {
        self.dir.join("pkg")
    }

    fn unpack(&self, apt: &Apt, pin: &Pin) -> LabResult<PathBuf> {
        // Epochs (`1:`) are not welcome in file names.
        let dir = self
            .pkg_root()
            .join(format!("{}_{}", pin.name, pin.version.replace(':', "%3a")));
        if dir.join(COMPLETE_MARKER).exists() {
            return Ok(dir);
        }
        let work = self.pkg_root().join(format!(".{}.download", pin.name));
        let _ = fs::remove_dir_all(&work);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&work).ctx(|| format!("creating {}", work.display()))?;
        apt.download(pin, &work)?;
        let deb = fs::read_dir(&work)
            .ctx(|| format!("listing {}", work.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| format!("apt-get download {pin} left no .deb in {}", work.display()))?;
        run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
        File::create(dir.join(COMPLETE_MARKER)).ctx(|| format!("marking {}", dir.display()))?;
        let _ = fs::remove_dir_all(&work);
        Ok(dir)
    }
}

/// A private apt configuration under `<cache>/apt`: its own sources (the suites that
/// `tests/lab/versions` names), lists and archive cache. The machine's own sources and lists
/// are never read or changed.
pub struct Apt {
    dir: PathBuf,
    /// The `sources.list` lines.
    sources: String,
    updated: OnceLock<Result<(), String>>,
}

impl Apt {
    /// Debian's suites, checked against this machine's Debian archive keyring.
    pub fn new(cache: &Cache, suites: &[String]) -> Apt {
        let sources = suites
            .iter()
            .map(|s| {
                let base = if s.ends_with("-security") {
                    "http://deb.debian.org/debian-security"
                } else {
                    MIRROR
                };
                format!("deb {base} {s} main\n")
            })
            .collect();
        Apt {
            dir: cache.dir().join("apt"),
            sources,
            updated: OnceLock::new(),
        }
    }

    /// Ubuntu's suites, in a configuration of their own, checked against the keyring of
    /// Debian's `ubuntu-keyring` package unpacked at `keyring_pkg` (so the chain of trust
    /// starts at this machine's Debian keyring).
    pub fn ubuntu(cache: &Cache, suites: &[String], keyring_pkg: &Path) -> Apt {
        let keyring = keyring_pkg.join(UBUNTU_KEYRING);
        let sources = suites
            .iter()
            .map(|s| {
                format!(
                    "deb [signed-by={}] {UBUNTU_MIRROR} {s} main\n",
                    keyring.display()
                )
            })
            .collect();
        Apt {
            dir: cache.dir().join("apt-ubuntu"),
            sources,
            updated: OnceLock::new(),
        }
    }

    /// `-o` options that point apt at this configuration only.
    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("Dir::Etc::sourcelist={d}/sources.list"),
            format!("Dir::Etc::sourceparts={d}/sources.list.d"),
            format!("Dir::Etc::preferences={d}/preferences"),
            format!("Dir::Etc::preferencesparts={d}/preferences.d"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::State::status=/dev/null".into(),
            // As root, apt would drop to `_apt`, which cannot write the cache dir.
            "APT::Sandbox::User=root".into(),
            "Acquire::Languages=none".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    /// The sources and directories, then `apt-get update` into the private lists: once per
    /// test run, and only when a package has to be downloaded (a warm cache needs no network).
    fn update(&self) -> LabResult<()> {
        self.updated
            .get_or_init(|| {
                for sub in [
                    "sources.list.d",
                    "preferences.d",
                    "lists/partial",
                    "cache/archives/partial",
                ] {
                    let path = self.dir.join(sub);
                    fs::create_dir_all(&path).ctx(|| format!("creating {}", path.display()))?;
                }
                let path = self.dir.join("sources.list");
                fs::write(&path, &self.sources).ctx(|| format!("writing {}", path.display()))?;
                let path = self.dir.join("preferences");
                fs::write(&path, "").ctx(|| format!("writing {}", path.display()))?;
                run_cmd(
                    Command::new("apt-get")
                        .args(self.options())
                        .args(["-q", "update"]),
                )
                .map(|_| ())
                .map_err(|e| format!("refreshing the lab's private apt lists: {e}"))
            })
            .clone()
    }

    fn download(&self, pin: &Pin, into: &Path) -> LabResult<()> {
        self.update()?;
        run_cmd(
            Command::new("apt-get")
                .args(self.options())
                .args(["-q", "download"])
                .arg(pin.to_string())
                .current_dir(into),
        )
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{e}\n(the mirror no longer has {pin}? Pick the current version with `apt-cache \
                 policy` as docs/testing.md, \"Bumping versions\", says, and update tests/lab/versions)"
            )
        })
    }
}

/// An unpacked kernel package: the image the lab boots. No modules are needed: the systemd
/// flavour's root disk is attached to a driver the kernel has built in (NVMe for Debian's
/// cloud kernels, virtio-blk for Ubuntu's generic one; from 7.0 Debian's modules are a package
/// of their own, which the mirror does not always carry).
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
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
        Ok(Kernel { version, vmlinuz })
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
