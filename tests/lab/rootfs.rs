//! The systemd flavour's root filesystem: Debian bookworm made by `debootstrap` with systemd
//! as init and Debian's own QEMU inside, packed into an ext4 image with `mkfs.ext4 -d` (no
//! loop mount needed). Built once and cached; the guest opens it with `snapshot=on`, so runs
//! never change it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{Cache, CacheLock};
use crate::util::{Ctx, LabResult, run_cmd};

/// Bump the version when the recipe below changes: the cache keeps one image per recipe.
const RECIPE: &str = "bookworm-minbase-systemd-qemu-v1";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// systemd as PID 1, QEMU as the "VM", nothing else that would slow the boot.
const PACKAGES: &str = "systemd-sysv,qemu-system-x86";
/// Units that only cost boot time in a guest without network or logins.
const MASKED_UNITS: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
];

/// The cached root image, built first if missing.
pub fn image(cache: &Cache, _lock: &CacheLock) -> LabResult<PathBuf> {
    let dir = cache.dir().join("rootfs").join(RECIPE);
    let image = dir.join("rootfs.ext4");
    if image.exists() {
        return Ok(image);
    }
    let work = dir.join("tree");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    run_cmd(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
            .arg(&work)
            .arg(MIRROR),
    )
    .map_err(|e| format!("building the systemd guest's root: {e}"))?;
    customise(&work)?;
    let tmp = dir.join("rootfs.ext4.tmp");
    let size_mib = tree_size_mib(&work)? * 3 / 2 + 256;
    run_cmd(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "lab-root", "-d"])
            .arg(&work)
            .arg(&tmp)
            .arg(format!("{size_mib}M")),
    )?;
    // Renamed last: an image that exists is a complete image.
    fs::rename(&tmp, &image).ctx(|| format!("renaming {}", tmp.display()))?;
    let _ = fs::remove_dir_all(&work);
    Ok(image)
}

fn customise(root: &Path) -> LabResult<()> {
    let write = |rel: &str, text: &str| {
        let path = root.join(rel);
        fs::write(&path, text).ctx(|| format!("writing {}", path.display()))
    };
    write("etc/hostname", "lab\n")?;
    write("etc/fstab", "/dev/vda / ext4 defaults 0 1\n")?;
    let system = root.join("etc/systemd/system");
    for unit in MASKED_UNITS {
        let link = system.join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link)
            .ctx(|| format!("masking {}", link.display()))?;
    }
    // Downloaded packages are not needed in the image.
    let archives = root.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives).ctx(|| format!("listing {}", archives.display()))? {
        let path = entry
            .ctx(|| format!("listing {}", archives.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "deb") {
            let _ = fs::remove_file(path);
        }
    }
    Ok(())
}

fn tree_size_mib(root: &Path) -> LabResult<u64> {
    let out = run_cmd(Command::new("du").args(["-sm"]).arg(root))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("cannot read du's answer for {}: {out}", root.display()))
}
