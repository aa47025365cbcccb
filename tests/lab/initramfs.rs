//! Assembles each guest's initramfs: busybox as the shell and init, the lab's guest scripts
//! and scenarios, pvetune itself, and what the flavour needs on top (QEMU for the busybox
//! guest).
//!
//! pvetune goes in as the very binary cargo built for this test run (`CARGO_BIN_EXE_pvetune`),
//! with the shared libraries `ldd` lists copied at their host paths. That tests exactly what
//! `cargo test` built, with no second (static) build; it relies on the guest's glibc being at
//! least the build host's (Debian 12), which holds for the busybox guest (it gets the host's
//! libraries) and for the systemd guests (bookworm's glibc is the host's, trixie's is newer).

use std::path::{Path, PathBuf};

use crate::cpio::Archive;
use crate::util::{LabResult, shared_libraries};

/// What goes into the guest besides the lab's own files.
pub enum Payload {
    /// Just enough to print a marker: used to see whether KVM can boot a guest.
    Probe,
    /// QEMU and its firmware, for the busybox guest that runs the "VM" from the initramfs.
    Qemu,
    /// The systemd flavour: init mounts the root image and hands over to systemd.
    RootDisk,
}

const QEMU_TCG_MODULE: &str = "/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so";

/// Firmware QEMU loads for `-machine q35 -nodefaults`, each copied to the path it has on the
/// host: Debian's QEMU searches `/usr/share/qemu` and `/usr/share/seabios` (its firmware path).
const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/multiboot_dma.bin",
    "/usr/share/qemu/pvh.bin",
];

pub fn build(busybox_pkg: &Path, payload: Payload, out: &Path) -> LabResult<()> {
    let mut cpio = Archive::default();
    cpio.host_file("/bin/busybox", &busybox_pkg.join("bin/busybox"))?;
    let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab");
    cpio.host_file("/init", &lab.join("guest/init"))?;
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run"] {
        cpio.dir(dir);
    }
    if !matches!(payload, Payload::Probe) {
        cpio.host_tree("/lab/guest", &lab.join("guest"))?;
        cpio.host_tree("/lab/scenarios", &lab.join("scenarios"))?;
        let pvetune = Path::new(env!("CARGO_BIN_EXE_pvetune"));
        cpio.host_file("/usr/local/bin/pvetune", pvetune)?;
        with_libraries(&mut cpio, pvetune)?;
    }
    match payload {
        Payload::Probe => {}
        Payload::Qemu => {
            let qemu = which("qemu-system-x86_64")?;
            cpio.host_file("/usr/bin/qemu-system-x86_64", &qemu)?;
            with_libraries(&mut cpio, &qemu)?;
            // Debian builds TCG as a loadable module ("could not load module for type
            // 'tcg-accel-ops'" without it).
            let tcg = Path::new(QEMU_TCG_MODULE);
            cpio.host_file(QEMU_TCG_MODULE, tcg)?;
            with_libraries(&mut cpio, tcg)?;
            for path in QEMU_FIRMWARE {
                cpio.host_file(path, Path::new(path))
                    .map_err(|e| format!("QEMU firmware for the guest's VM: {e}"))?;
            }
        }
        // The root disk is NVMe, built into Debian's cloud kernels: nothing to add.
        Payload::RootDisk => {}
    }
    cpio.write(out)
}

fn with_libraries(cpio: &mut Archive, binary: &Path) -> LabResult<()> {
    for lib in shared_libraries(binary)? {
        cpio.host_file(&lib.display().to_string(), &lib)?;
    }
    Ok(())
}

fn which(program: &str) -> LabResult<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{program} is not on PATH"))
}
