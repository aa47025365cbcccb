//! The systemd flavour's root filesystem: a Debian suite (bookworm for pve8, trixie for
//! pve9.x) made by `debootstrap` with systemd as init and Debian's own QEMU inside, packed into
//! an ext4 image with `mkfs.ext4 -d` (no loop mount needed). Built once per suite and cached;
//! the guest opens it with `snapshot=on`, so runs never change it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{Cache, CacheLock, MIRROR};
use crate::matrix::Cell;
use crate::util::{Ctx, LabResult, run_cmd};

/// Bump the version when the recipe below changes: the cache keeps one image per suite and
/// recipe.
const RECIPE: &str = "minbase-systemd-qemu-irqbalance-v3";
/// systemd as PID 1, QEMU as the "VM", irqbalance (masked: only the scenario that needs it
/// starts it), nothing else that would slow the boot.
const PACKAGES: &str = "systemd-sysv,qemu-system-x86,irqbalance";
/// Units that only cost boot time in a guest without network or logins.
const MASKED_UNITS: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    // Started by hand by 45-irqbalance-ban.sh only: it would move the other scenarios' IRQs.
    "irqbalance.service",
];

/// A built root image and what is in it.
pub struct Image {
    pub path: PathBuf,
    /// `systemd 257.13-1~deb13u1, qemu-system-x86 1:10.0.13+ds-0+deb13u1`
    pub versions: String,
}

/// The cached root image of the cell's suite, built first if missing.
pub fn image(cache: &Cache, _lock: &CacheLock, cell: &Cell) -> LabResult<Image> {
    let dir = cache
        .dir()
        .join("rootfs")
        .join(format!("{}-{RECIPE}", cell.suite));
    let path = dir.join("rootfs.ext4");
    let versions_file = dir.join("versions");
    if path.exists() {
        let versions = fs::read_to_string(&versions_file)
            .ctx(|| format!("reading {}", versions_file.display()))?;
        return Ok(Image { path, versions });
    }
    let work = dir.join("tree");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    run_cmd(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={PACKAGES}"),
                &cell.suite,
            ])
            .arg(&work)
            .arg(MIRROR),
    )
    .map_err(|e| format!("building the systemd guest's root: {e}"))?;
    let versions = installed_versions(&work, cell)?;
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
    fs::write(&versions_file, &versions).ctx(|| format!("writing {}", versions_file.display()))?;
    // Renamed last: an image that exists is a complete image.
    fs::rename(&tmp, &path).ctx(|| format!("renaming {}", tmp.display()))?;
    let _ = fs::remove_dir_all(&work);
    Ok(Image { path, versions })
}

/// The versions of systemd and QEMU debootstrap installed; an error when systemd is not the
/// major version the cell stands for (the suite moved on: tests/lab/versions needs a look).
fn installed_versions(root: &Path, cell: &Cell) -> LabResult<String> {
    let admindir = root.join("var/lib/dpkg");
    let out = run_cmd(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", admindir.display()))
            .args([
                "-W",
                "-f",
                "${Package} ${Version}\\n",
                "systemd",
                "qemu-system-x86",
                "irqbalance",
            ]),
    )?;
    let versions: Vec<&str> = out.lines().collect();
    let systemd = versions
        .iter()
        .find_map(|l| l.strip_prefix("systemd "))
        .unwrap_or("none");
    if !systemd.starts_with(&format!("{}.", cell.systemd)) {
        return Err(format!(
            "cell {}: {} brought systemd {systemd}, but tests/lab/versions says {}",
            cell.name, cell.suite, cell.systemd
        ));
    }
    Ok(versions.join(", "))
}

fn customise(root: &Path) -> LabResult<()> {
    let write = |rel: &str, text: &str| {
        let path = root.join(rel);
        fs::write(&path, text).ctx(|| format!("writing {}", path.display()))
    };
    write("etc/hostname", "lab\n")?;
    // The guest's init rewrites it for the disk it finds (a virtio cell has /dev/vda).
    write("etc/fstab", "/dev/nvme0n1 / ext4 defaults 0 1\n")?;
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
