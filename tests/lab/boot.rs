//! Boots one throwaway guest with a host-like topology and waits for it, within a time limit.
//!
//! The guest has two serial ports, both files on the host: ttyS0 is the console (kernel,
//! systemd, init), ttyS1 carries only the `LAB ...` result lines. Keeping results off the
//! console means kernel messages can never interleave with them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::matrix::Disk;
use crate::util::{Ctx, LabResult};

/// How the guest's CPUs are emulated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// One guest to boot.
pub struct Guest<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// A raw ext4 image attached as an NVMe disk (/dev/nvme0n1) or a virtio one (/dev/vda),
    /// opened with snapshot=on (never written).
    pub disk: Option<(&'a Path, Disk)>,
    pub append: String,
    pub limit: Duration,
    /// Where console.log, results.log and qemu.log go.
    pub workdir: &'a Path,
    pub accel: Accel,
    /// TCG on one host thread for all vCPUs: slower for a nested QEMU, but free of
    /// multi-threaded TCG's race with the kernel's live text patching (see `tcg_threads`).
    pub single_threaded: bool,
}

/// Whether a guest of `systemd` flavour runs its vCPUs on one TCG thread. Every kernel crash
/// the lab saw under multi-threaded TCG (an int3 of the kernel's own static-key patching,
/// docs/testing.md) was in a systemd guest, whose systemd switches cgroup controllers on and
/// off and so flips static keys while other vCPUs run; one thread serialises them. The busybox
/// guests keep multi-threaded TCG: they run a nested QEMU, which one thread makes twice as slow.
/// `PVETUNE_LAB_TCG_THREAD=single|multi` forces one for every guest.
pub fn tcg_threads(systemd: bool) -> bool {
    match std::env::var("PVETUNE_LAB_TCG_THREAD").as_deref() {
        Ok("single") => true,
        Ok("multi") => false,
        _ => systemd,
    }
}

/// What a boot left behind.
pub struct Outcome {
    pub console: String,
    pub results: String,
    pub qemu_log: String,
    pub elapsed: Duration,
    pub timed_out: bool,
    pub console_path: PathBuf,
}

/// After the guest reported `done` (or KVM failed), how long QEMU may take to exit by itself.
const GRACE: Duration = Duration::from_secs(10);
const KVM_FAILURE: &str = "KVM internal error";

impl Guest<'_> {
    pub fn boot(&self) -> LabResult<Outcome> {
        let console_path = self.workdir.join("console.log");
        let results_path = self.workdir.join("results.log");
        let qemu_log_path = self.workdir.join("qemu.log");
        for p in [&console_path, &results_path] {
            // QEMU appends to an existing file: start empty.
            fs::write(p, "").ctx(|| format!("creating {}", p.display()))?;
        }
        let qemu_log = fs::File::create(&qemu_log_path)
            .ctx(|| format!("creating {}", qemu_log_path.display()))?;
        let qemu_log_err = qemu_log
            .try_clone()
            .ctx(|| "duplicating a file handle".into())?;
        let start = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(self.args(&console_path, &results_path))
            // snapshot=on puts its overlay in TMPDIR: keep it with the other run files.
            .env("TMPDIR", self.workdir)
            .stdin(Stdio::null())
            .stdout(qemu_log)
            .stderr(qemu_log_err)
            .spawn()
            .ctx(|| "starting qemu-system-x86_64".into())?;
        let timed_out = self.wait(&mut child, &results_path, &qemu_log_path, start)?;
        let read = |p: &Path| fs::read(p).map(|b| String::from_utf8_lossy(&b).replace('\r', ""));
        Ok(Outcome {
            console: read(&console_path).ctx(|| format!("reading {}", console_path.display()))?,
            results: read(&results_path).ctx(|| format!("reading {}", results_path.display()))?,
            qemu_log: read(&qemu_log_path).unwrap_or_default(),
            elapsed: start.elapsed(),
            timed_out,
            console_path,
        })
    }

    /// Waits for QEMU to exit; kills it at the time limit, or when the guest reported `done`
    /// (or KVM failed) and it does not exit by itself. Returns whether the limit was hit.
    fn wait(
        &self,
        child: &mut Child,
        results: &Path,
        qemu_log: &Path,
        start: Instant,
    ) -> LabResult<bool> {
        let mut grace_until: Option<Instant> = None;
        loop {
            if child
                .try_wait()
                .ctx(|| "waiting for QEMU".into())?
                .is_some()
            {
                return Ok(false);
            }
            let now = Instant::now();
            if now - start > self.limit {
                stop(child);
                return Ok(true);
            }
            if grace_until.is_some_and(|t| now > t) {
                stop(child);
                return Ok(false);
            }
            if grace_until.is_none() {
                let finished = fs::read_to_string(results).is_ok_and(|r| {
                    r.lines().any(|l| {
                        l == "LAB done" || l == "LAB probe-ok" || l.starts_with("LAB fatal")
                    })
                });
                let kvm_failed =
                    fs::read_to_string(qemu_log).is_ok_and(|l| l.contains(KVM_FAILURE));
                if kvm_failed {
                    stop(child);
                    return Ok(false);
                }
                if finished {
                    grace_until = Some(now + GRACE);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn args(&self, console: &Path, results: &Path) -> Vec<String> {
        let accel = match self.accel {
            Accel::Tcg if self.single_threaded => "tcg,thread=single",
            Accel::Tcg => "tcg,thread=multi",
            Accel::Kvm => "kvm",
        };
        let mut args: Vec<String> = [
            "-accel",
            accel,
            "-machine",
            "q35",
            // qemu64 gives each socket its own L3 (cache/index3), which a host has. As an AMD
            // CPU it warns that its family has no SMT and wants topoext, which TCG refuses:
            // the Intel vendor has SMT without either. pdpe1gb offers 1 GiB hugepages.
            "-cpu",
            "qemu64,vendor=GenuineIntel,+pdpe1gb",
            // A two-socket host: SMT pairs (0,1) (2,3) .., one NUMA node per socket.
            "-smp",
            "8,sockets=2,cores=2,threads=2",
            "-m",
            "4096",
            "-object",
            "memory-backend-ram,id=m0,size=2048M",
            "-object",
            "memory-backend-ram,id=m1,size=2048M",
            "-numa",
            "node,nodeid=0,cpus=0-3,memdev=m0",
            "-numa",
            "node,nodeid=1,cpus=4-7,memdev=m1",
            // PCI devices to remove, rescan and reset: a single-function edu at 00:10.0 and a
            // two-function device at 00:11.
            "-device",
            "edu,addr=10.0",
            "-device",
            "edu,addr=11.0,multifunction=on",
            "-device",
            "edu,addr=11.1",
            "-nographic",
            "-nodefaults",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["-serial".into(), format!("file:{}", console.display())]);
        args.extend(["-serial".into(), format!("file:{}", results.display())]);
        args.extend(["-kernel".into(), self.kernel.display().to_string()]);
        args.extend(["-initrd".into(), self.initrd.display().to_string()]);
        args.extend([
            "-append".into(),
            // tsc=unstable: the kernel decides early that sched_clock is unstable, so it never
            // flips that static key while other CPUs run (under multi-threaded TCG the int3
            // of that live text patch crashed 6.12 guests about 4 s into boot: "Oops: int3"
            // in sched_clock_cpu).
            format!("console=ttyS0 panic=-1 tsc=unstable {}", self.append),
        ]);
        if let Some((disk, kind)) = self.disk {
            // A driver the kernel has built in: Debian's cloud kernels have NVMe, virtio_blk
            // is a module (and 7.0's modules are not on every mirror); Ubuntu's generic kernel
            // is the other way round. The guest's init mounts whichever appears.
            args.extend([
                "-drive".into(),
                format!(
                    "file={},if=none,id=root,format=raw,snapshot=on",
                    disk.display()
                ),
                "-device".into(),
                match kind {
                    Disk::Nvme => "nvme,drive=root,serial=lab-root".into(),
                    Disk::Virtio => "virtio-blk-pci,drive=root,serial=lab-root".into(),
                },
            ]);
        }
        args
    }
}

fn stop(child: &mut Child) {
    // Our own child, by pid; it may have exited in the meantime, which is fine.
    let _ = child.kill();
    let _ = child.wait();
}

/// The accelerator every guest of this test process uses, decided once.
///
/// `PVETUNE_LAB_ACCEL=tcg|kvm` forces one. Otherwise KVM is used only when /dev/kvm opens
/// and a probe guest actually boots with it: on some machines KVM is there but a Linux guest
/// dies early with "KVM internal error ... emulation failure" (seen ~9 s after start, which
/// is why the answer is remembered in `probe_memo`, a file keyed by host and guest kernel
/// and QEMU version).
pub fn accel(
    probe_memo: &Path,
    probe: impl FnOnce(Accel) -> LabResult<Outcome>,
) -> LabResult<Accel> {
    static CHOICE: OnceLock<Result<Accel, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| match std::env::var("PVETUNE_LAB_ACCEL").as_deref() {
            Ok("tcg") => Ok(Accel::Tcg),
            Ok("kvm") => Ok(Accel::Kvm),
            Ok("auto") | Err(_) => {
                let kvm_opens = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if !kvm_opens {
                    return Ok(Accel::Tcg);
                }
                match fs::read_to_string(probe_memo).as_deref() {
                    Ok("kvm") => return Ok(Accel::Kvm),
                    Ok("tcg") => return Ok(Accel::Tcg),
                    _ => {}
                }
                let boots = probe(Accel::Kvm).is_ok_and(|o| o.results.contains("LAB probe-ok"));
                let choice = if boots { Accel::Kvm } else { Accel::Tcg };
                let _ = fs::write(probe_memo, if boots { "kvm" } else { "tcg" });
                Ok(choice)
            }
            Ok(other) => Err(format!(
                "PVETUNE_LAB_ACCEL={other}: expected tcg, kvm or auto"
            )),
        })
        .clone()
}

/// Where the KVM probe's answer is kept: one file per host kernel, guest kernel and QEMU.
pub fn probe_memo(cache_dir: &Path, guest_kernel: &str) -> PathBuf {
    let host_kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let key: String = format!("{}_{guest_kernel}_{qemu}", host_kernel.trim())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    cache_dir.join("kvm-probe").join(key)
}
