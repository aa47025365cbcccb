//! The real-kernel lab: boots throwaway Linux guests under QEMU and runs pvetune in them, as
//! root, against a real kernel (and, in the systemd flavour, real systemd), with a real QEMU
//! process as the VM. How to run it, add a scenario and read a failure: docs/testing.md.
//!
//! The lab is a matrix: each cell of `tests/lab/versions` (one per Proxmox VE release: a kernel
//! and a userland at exact Debian versions) boots in both flavours, `PVETUNE_LAB_JOBS` guests
//! at a time (default 2). Each guest runs every scenario in tests/lab/scenarios/ that its
//! flavour and cell select and reports back over a serial port. The facts the guests record
//! become docs/kernel-facts.md.
//!
//! Environment: `PVETUNE_LAB=skip` skips with a printed reason (local opt-out only; without
//! QEMU the lab fails), `PVETUNE_LAB_MATRIX=<terms>` narrows the matrix (`pve9.1`, `systemd`,
//! `pve8/busybox`), `PVETUNE_LAB_CACHE` moves the download cache,
//! `PVETUNE_LAB_SCENARIOS=<text>` runs only scenarios whose name contains it,
//! `PVETUNE_LAB_ACCEL=tcg|kvm|auto` picks the accelerator, `PVETUNE_LAB_FACTS=write`
//! rewrites docs/kernel-facts.md from a full run instead of comparing it.

#[path = "lab/boot.rs"]
mod boot;
#[path = "lab/cache.rs"]
mod cache;
#[path = "lab/cpio.rs"]
mod cpio;
#[path = "lab/facts.rs"]
mod facts;
#[path = "lab/initramfs.rs"]
mod initramfs;
#[path = "lab/matrix.rs"]
mod matrix;
#[path = "lab/results.rs"]
mod results;
#[path = "lab/rootfs.rs"]
mod rootfs;
#[path = "lab/util.rs"]
mod util;

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use boot::{Accel, Guest};
use cache::{Apt, Cache};
use initramfs::Payload;
use matrix::{Flavour, Origin, Run, Versions};
use util::{Ctx, LabResult};

/// Boots a run may take when the guest kernel crashes before the first scenario.
const BOOTS: usize = 3;

/// From power-on to the first scenario, with room to spare on a busy 2-core machine.
fn boot_allowance(flavour: Flavour) -> Duration {
    match flavour {
        Flavour::Busybox => Duration::from_secs(90),
        Flavour::Systemd => Duration::from_secs(240),
    }
}

#[test]
fn matrix() {
    if std::env::var("PVETUNE_LAB").as_deref() == Ok("skip") {
        say("lab: SKIPPED because PVETUNE_LAB=skip");
        return;
    }
    let start = Instant::now();
    match lab() {
        Ok(summary) => say(&format!(
            "lab: {summary}; whole lab {:.1} s",
            start.elapsed().as_secs_f64()
        )),
        Err(msg) => panic!(
            "{msg}\n(the lab ran for {:.1} s)",
            start.elapsed().as_secs_f64()
        ),
    }
}

/// Prints past libtest's output capture: the per-run lines are what the lab shows on success.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// What every run shares.
struct Lab {
    cache: Cache,
    apt: Apt,
    /// For cells whose kernel is Ubuntu's; made when the first such run needs it.
    ubuntu_apt: std::sync::OnceLock<LabResult<Apt>>,
    ubuntu_suites: Vec<String>,
    ubuntu_keyring: Option<matrix::Pin>,
    busybox: PathBuf,
    /// `PVETUNE_LAB_SCENARIOS`.
    only: String,
}

/// A run that passed.
struct Passed {
    summary: String,
    facts: Vec<(String, String, String)>,
}

fn lab() -> LabResult<String> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(
            "lab: qemu-system-x86_64 is not installed, so the real-kernel lab cannot \
             run. Install what it needs with tests/lab/install-deps.sh (as root); to skip it \
             locally, set PVETUNE_LAB=skip."
                .into(),
        );
    }
    let versions = Versions::load()?;
    let filter = std::env::var("PVETUNE_LAB_MATRIX").unwrap_or_default();
    let runs = matrix::runs(&versions, &filter)?;
    // Longest first (the systemd guests), so that the last guest to finish is a short one.
    let mut start_order = runs.clone();
    start_order.sort_by_key(|r| r.flavour == Flavour::Busybox);
    let cache = Cache::open()?;
    let apt = Apt::new(&cache, &versions.suites);
    let busybox = {
        let lock = cache.lock("packages")?;
        cache.package(&lock, &apt, versions.tool("busybox-static")?)?
    };
    let lab = Lab {
        cache,
        apt,
        ubuntu_apt: std::sync::OnceLock::new(),
        ubuntu_suites: versions.ubuntu_suites.clone(),
        ubuntu_keyring: versions.tool("ubuntu-keyring").ok().cloned(),
        busybox,
        only: std::env::var("PVETUNE_LAB_SCENARIOS").unwrap_or_default(),
    };
    let jobs: usize = match std::env::var("PVETUNE_LAB_JOBS") {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("PVETUNE_LAB_JOBS={n}: expected a number above 0"))?,
        Err(_) => 2,
    };

    let queue = Mutex::new(start_order.into_iter().collect::<VecDeque<Run>>());
    let done: Mutex<Vec<(Run, Duration, LabResult<Passed>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(runs.len()) {
            s.spawn(|| {
                // The lock is taken and dropped inside `next_run`, never held over a boot.
                while let Some(run) = next_run(&queue) {
                    let start = Instant::now();
                    let outcome = run_one(&lab, &run);
                    let took = start.elapsed();
                    match &outcome {
                        Ok(p) => say(&format!(
                            "lab {}: {} in {:.1} s",
                            run.id(),
                            p.summary,
                            took.as_secs_f64()
                        )),
                        Err(_) => say(&format!(
                            "lab {}: FAILED after {:.1} s",
                            run.id(),
                            took.as_secs_f64()
                        )),
                    }
                    if let Ok(mut d) = done.lock() {
                        d.push((run, took, outcome));
                    }
                }
            });
        }
    });
    let mut done = done
        .into_inner()
        .map_err(|_| "a lab thread panicked".to_string())?;
    // Matrix order again (cell, then flavour) for the summary and the facts.
    let order = |r: &Run| runs.iter().position(|x| x.id() == r.id());
    done.sort_by_key(|(r, _, _)| order(r));

    let failures: Vec<&String> = done
        .iter()
        .filter_map(|(_, _, o)| o.as_ref().err())
        .collect();
    if !failures.is_empty() {
        let msgs: Vec<&str> = failures.iter().map(|s| s.as_str()).collect();
        return Err(format!(
            "{} of {} lab runs failed\n\n{}",
            failures.len(),
            done.len(),
            msgs.join("\n\n")
        ));
    }
    let whole = filter.trim().is_empty() && lab.only.is_empty();
    let table: Vec<facts::Column> = done
        .iter()
        .filter_map(|(r, _, o)| o.as_ref().ok().map(|p| (r.column(), p.facts.clone())))
        .collect();
    let facts_note = facts::publish(&table, whole)?;
    let total: Duration = done.iter().map(|(_, t, _)| *t).sum();
    Ok(format!(
        "{} runs passed ({:.1} s of guest time in all); {facts_note}",
        done.len(),
        total.as_secs_f64()
    ))
}

fn next_run(queue: &Mutex<VecDeque<Run>>) -> Option<Run> {
    queue.lock().ok()?.pop_front()
}

impl Run {
    /// The column header of docs/kernel-facts.md.
    fn column(&self) -> String {
        format!("{} {}", self.cell.name, self.flavour.name())
    }
}

fn run_one(lab: &Lab, run: &Run) -> LabResult<Passed> {
    let id = run.id();
    let kernel = {
        let lock = lab.cache.lock("packages")?;
        let apt = match run.cell.origin {
            Origin::Debian => &lab.apt,
            Origin::Ubuntu => lab
                .ubuntu_apt
                .get_or_init(|| {
                    let pin = lab.ubuntu_keyring.as_ref().ok_or(
                        "tests/lab/versions: a cell's kernel comes from Ubuntu, and there is \
                         no `tool ubuntu-keyring <version>` line",
                    )?;
                    let keyring = lab.cache.package(&lock, &lab.apt, pin)?;
                    Ok(Apt::ubuntu(&lab.cache, &lab.ubuntu_suites, &keyring))
                })
                .as_ref()
                .map_err(|e| e.clone())?,
        };
        lab.cache.kernel(&lock, apt, &run.cell.kernel)?
    };
    let image = match run.flavour {
        Flavour::Busybox => None,
        Flavour::Systemd => {
            let lock = lab.cache.lock(&format!("rootfs-{}", run.cell.suite))?;
            Some(rootfs::image(&lab.cache, &lock, &run.cell)?)
        }
    };

    let workdir = workdir(run)?;
    let memo = boot::probe_memo(lab.cache.dir(), &kernel.version);
    if let Some(parent) = memo.parent() {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    let accel = boot::accel(&memo, |accel| {
        let dir = workdir.join("probe");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let initrd = dir.join("initrd.cpio");
        initramfs::build(&lab.busybox, Payload::Probe, &initrd)?;
        Guest {
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            disk: None,
            append: "quiet lab.flavour=probe".into(),
            limit: Duration::from_secs(30),
            workdir: &dir,
            accel,
            single_threaded: false,
        }
        .boot()
    })?;

    let payload = match run.flavour {
        Flavour::Busybox => Payload::Qemu,
        Flavour::Systemd => Payload::RootDisk,
    };
    let initrd = workdir.join("initrd.cpio");
    initramfs::build(&lab.busybox, payload, &initrd)?;

    let name = run.flavour.name();
    let mut append = format!(
        "quiet lab.flavour={name} lab.cell={} systemd.show_status=false",
        run.cell.name
    );
    if !lab.only.is_empty() {
        append.push_str(&format!(" lab.only={}", lab.only));
    }
    let guest = Guest {
        kernel: &kernel.vmlinuz,
        initrd: &initrd,
        disk: image.as_ref().map(|i| (i.path.as_path(), run.cell.disk)),
        append,
        limit: boot_allowance(run.flavour) + scenario_limits(run, &lab.only)?,
        workdir: &workdir,
        accel,
        single_threaded: boot::tcg_threads(run.flavour == Flavour::Systemd),
    };
    let mut outcome = guest.boot()?;
    let mut report = results::parse(&outcome.results);
    // Multi-threaded TCG occasionally crashes the guest kernel while it patches its own text
    // (seen: "Oops: int3" in run_timer_softirq and sched_clock_cpu, 1.5-4 s in, before any of
    // our code ran; and once 55 s in, in alloc_pages_bulk, right after the first scenario of
    // pve9.2/systemd). That is the emulator, not pvetune: up to two more boots, said out loud.
    // Any other crash after the scenario runner started is never retried.
    for retry in 1..BOOTS {
        let at_boot = report.boot.is_none() && kernel_crashed(&outcome.console);
        if !at_boot && !emulator_fault(&outcome.console) {
            break;
        }
        let when = if at_boot {
            "during boot (before any scenario)"
        } else {
            "on an int3 of its own text patching (a multi-threaded TCG fault)"
        };
        say(&format!(
            "lab {id}: the guest kernel crashed {when} under {accel:?}; booting once more"
        ));
        let first = workdir.join(format!("console.crashed-boot-{retry}.log"));
        fs::write(&first, &outcome.console).ctx(|| format!("writing {}", first.display()))?;
        outcome = guest.boot()?;
        report = results::parse(&outcome.results);
    }
    if let Some(msg) = results::failure(&id, &outcome, &report) {
        return Err(msg);
    }
    let accel = if accel == Accel::Kvm { "kvm" } else { "tcg" };
    let userland = image
        .map(|i| format!(", {}", i.versions))
        .unwrap_or_default();
    Ok(Passed {
        summary: format!(
            "{} scenarios passed (kernel {}{userland}, {accel}, guest {:.1} s)",
            report.scenarios.len(),
            kernel.version,
            outcome.elapsed.as_secs_f64()
        ),
        facts: report.scenarios.into_iter().flat_map(|s| s.facts).collect(),
    })
}

fn kernel_crashed(console: &str) -> bool {
    console.contains("Kernel panic") || console.contains("Oops:")
}

/// The kernel hit an int3 while live-patching its own text (static keys, alternatives): the
/// breakpoint it plants for the patch, seen by another vCPU before multi-threaded TCG flushed
/// the old code. pvetune runs in user space and patches no kernel text, so this is never its
/// doing, at whatever point of a run it comes.
fn emulator_fault(console: &str) -> bool {
    // "Oops: int3: 0000 [#1]" from 6.12 on, "int3: 0000 [#1]" on 6.8.
    console.contains("Oops: int3") || console.contains("] int3: 0000 [#")
}

/// A fresh directory for this run's files (`target/tmp/lab-pve9.1-systemd`), kept after the
/// run for reading failures.
fn workdir(run: &Run) -> LabResult<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "lab-{}-{}",
        run.cell.name,
        run.flavour.name()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The sum of the `# timeout:` limits (default 60 s) of the scenarios this run selects,
/// mirroring the runner's choice in guest/run-scenarios.sh (`# flavours:`, `# cells:`).
fn scenario_limits(run: &Run, only: &str) -> LabResult<Duration> {
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
        if !flavours.split_whitespace().any(|f| f == run.flavour.name()) {
            continue;
        }
        if header("cells").is_some_and(|c| !c.split_whitespace().any(|c| c == run.cell.name)) {
            continue;
        }
        total += header("timeout")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(60);
    }
    Ok(Duration::from_secs(total))
}
