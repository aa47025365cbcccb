//! The real-kernel lab: boots throwaway Linux guests under QEMU and runs pvetune in them, as
//! root, against a real kernel (and, in the systemd flavour, real systemd), with a real QEMU
//! process as the VM. How to run it, add a scenario and read a failure: docs/testing.md.
//!
//! Two tests, one per flavour; cargo runs them in parallel. Each boots one guest that runs
//! every scenario in tests/lab/scenarios/ for its flavour and reports back over a serial port.
//!
//! Environment: `PVETUNE_LAB=skip` skips with a printed reason (local opt-out only; without
//! QEMU the lab fails), `PVETUNE_LAB_CACHE` moves the download cache,
//! `PVETUNE_LAB_SCENARIOS=<text>` runs only scenarios whose name contains it,
//! `PVETUNE_LAB_ACCEL=tcg|kvm|auto` picks the accelerator.

#[path = "lab/boot.rs"]
mod boot;
#[path = "lab/cache.rs"]
mod cache;
#[path = "lab/cpio.rs"]
mod cpio;
#[path = "lab/initramfs.rs"]
mod initramfs;
#[path = "lab/results.rs"]
mod results;
#[path = "lab/rootfs.rs"]
mod rootfs;
#[path = "lab/util.rs"]
mod util;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use boot::{Accel, Guest};
use cache::Cache;
use initramfs::Payload;
use util::{Ctx, LabResult};

#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    /// busybox is PID 1, the cgroup tree is built by hand: fast.
    Busybox,
    /// Debian with systemd as PID 1: slices and scopes are systemd's own.
    Systemd,
}

impl Flavour {
    fn name(self) -> &'static str {
        match self {
            Flavour::Busybox => "busybox",
            Flavour::Systemd => "systemd",
        }
    }

    /// From power-on to the first scenario, with room to spare on a busy 2-core machine.
    fn boot_allowance(self) -> Duration {
        match self {
            Flavour::Busybox => Duration::from_secs(90),
            Flavour::Systemd => Duration::from_secs(240),
        }
    }
}

#[test]
fn busybox_guest() {
    run(Flavour::Busybox);
}

#[test]
fn systemd_guest() {
    run(Flavour::Systemd);
}

fn run(flavour: Flavour) {
    let name = flavour.name();
    if std::env::var("PVETUNE_LAB").as_deref() == Ok("skip") {
        say(&format!("lab {name}: SKIPPED because PVETUNE_LAB=skip"));
        return;
    }
    let start = Instant::now();
    match lab(flavour) {
        Ok(summary) => say(&format!(
            "lab {name}: {summary} in {:.1} s",
            start.elapsed().as_secs_f64()
        )),
        Err(msg) => panic!(
            "{msg}\n(lab {name} ran for {:.1} s)",
            start.elapsed().as_secs_f64()
        ),
    }
}

/// Prints past libtest's output capture: the duration line is the one line the lab shows
/// on success.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn lab(flavour: Flavour) -> LabResult<String> {
    let name = flavour.name();
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(format!(
            "lab {name}: qemu-system-x86_64 is not installed, so the real-kernel lab cannot run. \
             Install what it needs with tests/lab/install-deps.sh (as root); to skip it \
             locally, set PVETUNE_LAB=skip."
        ));
    }
    let cache = Cache::open()?;
    let lock = cache.lock("packages")?;
    let kernel = cache.cloud_kernel(&lock)?;
    let busybox = cache.package(&lock, "busybox-static")?;
    drop(lock);
    let disk = match flavour {
        Flavour::Busybox => None,
        Flavour::Systemd => Some(rootfs::image(&cache, &cache.lock("rootfs")?)?),
    };

    let workdir = workdir(name)?;
    let memo = boot::probe_memo(cache.dir(), &kernel.version);
    if let Some(parent) = memo.parent() {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    let accel = boot::accel(&memo, |accel| {
        let dir = workdir.join("probe");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let initrd = dir.join("initrd.cpio");
        initramfs::build(&busybox, Payload::Probe, &initrd, &dir)?;
        Guest {
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            disk: None,
            append: "quiet lab.flavour=probe".into(),
            limit: Duration::from_secs(30),
            workdir: &dir,
            accel,
        }
        .boot()
    })?;

    let payload = match flavour {
        Flavour::Busybox => Payload::Qemu,
        Flavour::Systemd => Payload::RootDisk {
            modules: &kernel.modules,
        },
    };
    let initrd = workdir.join("initrd.cpio");
    initramfs::build(&busybox, payload, &initrd, &workdir)?;

    let only = std::env::var("PVETUNE_LAB_SCENARIOS").unwrap_or_default();
    let mut append = format!("quiet lab.flavour={name} systemd.show_status=false");
    if !only.is_empty() {
        append.push_str(&format!(" lab.only={only}"));
    }
    let guest = Guest {
        kernel: &kernel.vmlinuz,
        initrd: &initrd,
        disk: disk.as_deref(),
        append,
        limit: flavour.boot_allowance() + scenario_limits(flavour, &only)?,
        workdir: &workdir,
        accel,
    };
    let mut outcome = guest.boot()?;
    let mut report = results::parse(&outcome.results);
    // Multi-threaded TCG occasionally crashes the guest kernel while it patches its own text
    // at boot (seen: "Oops: int3" in run_timer_softirq, 1.5 s in, before any of our code
    // ran). That is the emulator, not pvetune: one more boot, said out loud. A crash after
    // the scenario runner started is never retried.
    if report.boot.is_none() && kernel_crashed(&outcome.console) {
        say(&format!(
            "lab {name}: the guest kernel crashed during boot under {accel:?} (emulator fault, before any scenario); booting once more"
        ));
        let first = workdir.join("console.first-boot.log");
        fs::write(&first, &outcome.console).ctx(|| format!("writing {}", first.display()))?;
        outcome = guest.boot()?;
        report = results::parse(&outcome.results);
    }
    if let Some(msg) = results::failure(name, &outcome, &report) {
        return Err(msg);
    }
    let accel = if accel == Accel::Kvm { "kvm" } else { "tcg" };
    Ok(format!(
        "{} scenarios passed (kernel {}, {accel}, guest {:.1} s)",
        report.scenarios.len(),
        kernel.version,
        outcome.elapsed.as_secs_f64()
    ))
}

fn kernel_crashed(console: &str) -> bool {
    console.contains("Kernel panic") || console.contains("Oops:")
}

/// A fresh directory for this flavour's run files, kept after the run for reading failures.
fn workdir(name: &str) -> LabResult<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lab-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The sum of the `# timeout:` limits (default 60 s) of the scenarios this run selects,
/// mirroring the runner's choice in guest/run-scenarios.sh.
fn scenario_limits(flavour: Flavour, only: &str) -> LabResult<Duration> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/scenarios");
    let mut total = 0;
    for entry in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
        let path = entry.ctx(|| format!("listing {}", dir.display()))?.path();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.extension().is_none_or(|e| e != "sh") || !stem.contains(only) {
            continue;
        }
        let text = fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .map(str::to_string)
        };
        let flavours = header("flavours").unwrap_or_else(|| "busybox systemd".into());
        if !flavours.split_whitespace().any(|f| f == flavour.name()) {
            continue;
        }
        total += header("timeout")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(60);
    }
    Ok(Duration::from_secs(total))
}
