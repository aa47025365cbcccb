//! A phase whose Nth change fails leaves nothing behind, for every N: files byte-identical,
//! thread affinities as before, the ledger empty. Uses the `Host` seam with a host that fails
//! on the Nth mutation, and one that "crashes" there (stops without undo, as a kill -9
//! would): a later run from the ledger alone then restores everything, whether the crash hit
//! between the journal append and the first change, in the middle of a batch, in the undo of
//! a failed batch, or in the middle of a rollback.

mod fixture;

use pvetune::cpuset::{CpuFormat, CpuSet};
use pvetune::exec::Executor;
use pvetune::host::{FailAt, Host, RealHost};
use pvetune::plan::{Action, Step, ThreadRef};
use pvetune::root::Root;
use pvetune::state::Store;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;

fn steps(pid: i32) -> Vec<Step> {
    let mut steps = vec![Step {
        tunable: "pinning",
        action: Action::Pin {
            thread: ThreadRef {
                pid: Some(pid),
                tid: Some(pid),
                label: "emulator".into(),
            },
            cpus: CpuSet::range(0, 0),
        },
    }];
    for cpu in [6, 7, 8] {
        steps.push(Step {
            tunable: "governor",
            action: Action::Write {
                path: format!("/sys/devices/system/cpu/cpufreq/policy{cpu}/scaling_governor"),
                value: "performance".into(),
            },
        });
    }
    steps.push(Step {
        tunable: "sysctl",
        action: Action::Write {
            path: "/proc/sys/vm/stat_interval".into(),
            value: "120".into(),
        },
    });
    steps
}

#[test]
fn failure_at_every_step_restores_everything() {
    // Killed on drop, also when an assertion below fails.
    let thread = Thread::start();
    let (pid, original) = (thread.pid, thread.original.clone());
    let plan = steps(pid);
    for fail_at in 1..=plan.len() {
        let tree = fixture::host_copy("ryzen-5900x");
        let before = fixture::snapshot(&tree.path);
        let root = Root::new(&tree.path);
        let store = Store::new(&root);
        let host = FailAt::new(RealHost, fail_at);
        let mut exec = Executor::new(&root, &host, &store, store.load().unwrap(), 100);
        let err = exec
            .apply(plan.clone())
            .expect_err("the injected failure must surface");
        assert!(
            err.to_string().contains("Input/output error"),
            "step {fail_at}: {err}"
        );
        assert_eq!(
            fixture::snapshot(&tree.path),
            before,
            "files after a failure at step {fail_at}"
        );
        assert_eq!(
            RealHost.get_affinity(pid).unwrap(),
            original,
            "affinity after step {fail_at}"
        );
        assert!(
            store.load().unwrap().is_empty(),
            "ledger after step {fail_at}"
        );
    }
    // And without a failure everything is applied, then rolled back.
    let tree = fixture::host_copy("ryzen-5900x");
    let before = fixture::snapshot(&tree.path);
    let root = Root::new(&tree.path);
    let store = Store::new(&root);
    let mut exec = Executor::new(&root, &RealHost, &store, store.load().unwrap(), 100);
    let applied = exec.apply(plan.clone()).unwrap();
    assert_eq!(applied.changed, plan.len());
    assert_eq!(
        fixture::read(&tree.path, "/proc/sys/vm/stat_interval"),
        "120\n"
    );
    assert_eq!(RealHost.get_affinity(pid).unwrap(), CpuSet::range(0, 0));
    assert!(exec.rollback(true).is_empty());
    assert_eq!(fixture::snapshot(&tree.path), before);
    assert_eq!(RealHost.get_affinity(pid).unwrap(), original);
}

#[test]
fn ledger_written_before_the_change_lets_a_later_run_undo_a_crash() {
    // Simulate a crash right after the ledger was saved and the file written: a fresh
    // executor built from the ledger alone restores the original.
    let tree = fixture::host_copy("ryzen-5900x");
    let before = fixture::snapshot(&tree.path);
    let root = Root::new(&tree.path);
    let store = Store::new(&root);
    let plan = &steps(0)[1..];
    {
        let mut exec = Executor::new(&root, &RealHost, &store, store.load().unwrap(), 100);
        exec.apply(plan.to_vec()).unwrap();
    } // the process "dies" here: nothing in memory survives
    let mut later = Executor::new(&root, &RealHost, &store, store.load().unwrap(), 100);
    assert!(later.rollback(false).is_empty());
    assert_eq!(fixture::snapshot(&tree.path), before);
}

/// What a `kill -9` leaves: the process stops where it is, no undo runs, nothing in memory
/// survives. Raised by [`CrashAt`] and caught by [`crashes`].
struct Crash;

/// A host that "dies" just before its `crash_at`-th mutation (1-based), passing everything
/// else to `inner`. The first mutation of a batch comes right after its journal append, so
/// crash 1 is a crash between the append and the writes; later ones are mid-batch.
struct CrashAt<H: Host> {
    inner: H,
    crash_at: usize,
    count: Cell<usize>,
}

impl<H: Host> CrashAt<H> {
    fn new(inner: H, crash_at: usize) -> Self {
        CrashAt {
            inner,
            crash_at,
            count: Cell::new(0),
        }
    }

    fn tick(&self) {
        self.count.set(self.count.get() + 1);
        if self.count.get() == self.crash_at {
            // No panic message: this is the expected way out.
            std::panic::resume_unwind(Box::new(Crash));
        }
    }
}

impl<H: Host> Host for CrashAt<H> {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.inner.read(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        self.tick();
        self.inner.write(path, value)
    }
    fn get_affinity(&self, tid: i32) -> io::Result<CpuSet> {
        self.inner.get_affinity(tid)
    }
    fn set_affinity(&self, tid: i32, cpus: &CpuSet) -> io::Result<()> {
        self.tick();
        self.inner.set_affinity(tid, cpus)
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        self.tick();
        self.inner.mkdir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        self.tick();
        self.inner.rmdir(path)
    }
}

/// Runs `f`; true when it crashed (rather than returned).
fn crashes(f: impl FnOnce()) -> bool {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => false,
        Err(payload) if payload.is::<Crash>() => true,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// A thread to pin (a sleeping child process, killed on drop) and its affinity before.
struct Thread {
    child: std::process::Child,
    pid: i32,
    original: CpuSet,
}

impl Thread {
    fn start() -> Self {
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        let original = RealHost.get_affinity(pid).unwrap();
        Thread {
            child,
            pid,
            original,
        }
    }
}

impl Drop for Thread {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One crash point: a fresh tree with just the files `steps` writes (as the Ryzen example
/// host has them), its snapshot, and its ledger.
struct Scene {
    tree: fixture::Root,
    before: BTreeMap<String, Vec<u8>>,
    root: Root,
    store: Store,
}

impl Scene {
    fn new() -> Self {
        Scene::with_irqs(0)
    }

    /// With `irqs` IRQs too (`/proc/irq/<n>/smp_affinity_list`, every CPU of the Ryzen host).
    fn with_irqs(irqs: u32) -> Self {
        let tree = fixture::temp_dir("crash");
        let path = tree.path.clone();
        for irq in 0..irqs {
            let file = format!("/proc/irq/{irq}/smp_affinity_list");
            fixture::write(&path, &file, "0-23\n");
        }
        for cpu in [6, 7, 8] {
            fixture::write(
                &path,
                &format!("/sys/devices/system/cpu/cpufreq/policy{cpu}/scaling_governor"),
                "schedutil\n",
            );
        }
        fixture::write(&path, "/proc/sys/vm/stat_interval", "1\n");
        let root = Root::new(&path);
        Scene {
            before: fixture::snapshot(&path),
            store: Store::new(&root),
            root,
            tree,
        }
    }

    fn executor<'a, H: Host>(&'a self, host: &'a H, vmid: u32) -> Executor<'a, H> {
        Executor::new(
            &self.root,
            host,
            &self.store,
            self.store.load().unwrap(),
            vmid,
        )
    }

    /// Change `fail_at` of `plan` fails and the undo crashes at mutation `crash_at`: a later
    /// run restores everything.
    fn crash_in_undo_is_undone(
        &self,
        thread: &Thread,
        plan: &[Step],
        fail_at: usize,
        crash_at: usize,
    ) {
        let host = CrashAt::new(FailAt::new(RealHost, fail_at), crash_at);
        let mut exec = self.executor(&host, 100);
        let crashed = crashes(|| {
            let _ = exec.apply(plan.to_vec());
        });
        assert!(crashed, "fail {fail_at}, crash {crash_at}");
        self.later_rollback_restores(
            thread,
            &format!("failure {fail_at} then a crash in its undo at {crash_at}"),
        );
    }

    /// After whatever happened, a later run built from the ledger alone (a fresh store and
    /// executor, as the next hook's reconcile or `pvetune rollback` would) restores
    /// everything.
    fn later_rollback_restores(&self, thread: &Thread, what: &str) {
        let store = Store::new(&self.root);
        let state = store.load().unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut later = Executor::new(&self.root, &RealHost, &store, state, 100);
        let errors = later.rollback(true);
        assert!(errors.is_empty(), "{what}: {errors:?}");
        store.compact(&mut later.state).unwrap();
        assert!(
            fixture::snapshot(&self.tree.path) == self.before,
            "files after {what}"
        );
        assert_eq!(
            RealHost.get_affinity(thread.pid).unwrap(),
            thread.original,
            "affinity after {what}"
        );
        assert!(store.load().unwrap().is_empty(), "ledger after {what}");
    }
}

#[test]
fn crash_at_every_point_of_a_batch_is_undone_by_a_later_run() {
    let thread = Thread::start();
    let plan = steps(thread.pid);
    // 1: after the journal append, before the first change; 2..: mid-batch; len + 1: the
    // batch completed and the process died before post-stop.
    for crash_at in 1..=plan.len() + 1 {
        let scene = Scene::new();
        let host = CrashAt::new(RealHost, crash_at);
        let mut exec = scene.executor(&host, 100);
        let crashed = crashes(|| {
            exec.apply(plan.clone()).unwrap();
        });
        assert_eq!(crashed, crash_at <= plan.len(), "crash {crash_at}");
        // Change 1 is the pin: from crash 3 on, files were changed before the crash.
        if crash_at > 2 {
            assert!(
                fixture::snapshot(&scene.tree.path) != scene.before,
                "crash {crash_at}"
            );
        }
        scene.later_rollback_restores(&thread, &format!("a crash before change {crash_at}"));
    }
}

/// `steps` with `irqs` IRQ steps before the sysctl: more than a batch holds (`exec::CHUNK`),
/// so the phase is made in two batches, of which only the intents the ledger cannot take back
/// are kept. Its mutations: the pin, 3 governors, the IRQs, the sysctl.
fn steps_with_irqs(pid: i32, irqs: u32) -> Vec<Step> {
    let mut plan = steps(pid);
    let sysctl = plan.pop().unwrap();
    plan.extend((0..irqs).map(|irq| Step {
        tunable: "irqs",
        action: Action::Exclude {
            path: format!("/proc/irq/{irq}/smp_affinity_list"),
            cpus: "6-11,18-23".parse().unwrap(),
            format: CpuFormat::List,
            fallback: "0-5,12-17".parse().unwrap(),
            refusable: true,
        },
    }));
    plan.push(sysctl);
    plan
}

/// A crash in either batch of a phase of several, or while a failure at its end is undone
/// (the last batch's intents, the first batch's kept ones, then its new IRQ claims released
/// from the ledger), leaves a ledger from which a later run restores everything; the failure
/// alone is undone by the phase itself.
#[test]
fn crashes_in_a_phase_of_several_batches_are_undone_by_a_later_run() {
    let thread = Thread::start();
    let irqs = pvetune::exec::CHUNK as u32 + 40;
    let plan = steps_with_irqs(thread.pid, irqs);
    let last = plan.len();
    let chunk = pvetune::exec::CHUNK;
    for crash_at in [
        1,
        5,
        500,
        chunk,
        chunk + 1,
        chunk + 2,
        chunk + 20,
        last,
        last + 1,
    ] {
        let scene = Scene::with_irqs(irqs);
        let host = CrashAt::new(RealHost, crash_at);
        let mut exec = scene.executor(&host, 100);
        let crashed = crashes(|| {
            exec.apply(plan.clone()).unwrap();
        });
        assert_eq!(crashed, crash_at <= last, "crash {crash_at}");
        scene.later_rollback_restores(&thread, &format!("a crash before change {crash_at}"));
    }
    // The sysctl, the last change, fails: 1,068 changes to take back (the pin, 3 governors,
    // 1,064 IRQs). The batches: the pin, the governors and 1,020 IRQs; 44 IRQs and the sysctl.
    let scene = Scene::with_irqs(irqs);
    let host = FailAt::new(RealHost, last);
    let mut exec = scene.executor(&host, 100);
    exec.apply(plan.clone())
        .expect_err("the injected failure must surface");
    assert!(fixture::snapshot(&scene.tree.path) == scene.before);
    assert_eq!(RealHost.get_affinity(thread.pid).unwrap(), thread.original);
    assert!(scene.store.load().unwrap().is_empty());
    // The undo's writes: the second batch's 44 IRQs, the governors and the pin (the first
    // batch's kept intents), its 1,020 IRQs released from the ledger; a crash in each, the
    // last one at its very last write.
    let undo = [1, 22, 44, 45, 48, 49, 600, 1068];
    for crash_at in undo.map(|n| last + n) {
        Scene::with_irqs(irqs).crash_in_undo_is_undone(&thread, &plan, last, crash_at);
    }
}

#[test]
fn crash_while_undoing_a_failed_batch_is_undone_by_a_later_run() {
    let thread = Thread::start();
    let plan = steps(thread.pid);
    // Change `fail_at` fails; the undo then makes `fail_at - 1` restoring mutations (the
    // failed change left its file as it was), and the crash hits each of them in turn.
    for fail_at in 2..=plan.len() {
        for crash_at in fail_at + 1..fail_at + fail_at {
            Scene::new().crash_in_undo_is_undone(&thread, &plan, fail_at, crash_at);
        }
    }
}

#[test]
fn crash_in_the_middle_of_a_rollback_is_finished_by_a_later_run() {
    let thread = Thread::start();
    let plan = steps(thread.pid);
    for crash_at in 1..=plan.len() {
        let scene = Scene::new();
        scene.executor(&RealHost, 100).apply(plan.clone()).unwrap();
        let host = CrashAt::new(RealHost, crash_at);
        let mut stopping = scene.executor(&host, 100);
        let crashed = crashes(|| {
            stopping.rollback(true);
        });
        assert!(crashed, "crash {crash_at}");
        scene.later_rollback_restores(
            &thread,
            &format!("a crash in a rollback before its change {crash_at}"),
        );
    }
}

/// Two VMs claim the same files; VM 101's batch crashes midway. Rolling 101 back gives each
/// file VM 100's value again (not the original: VM 100 still runs), and rolling back VM 100
/// then gives the originals.
#[test]
fn crash_of_a_second_claimer_restores_what_the_first_needs() {
    let plan: Vec<Step> = steps(0).into_iter().skip(1).collect();
    let second: Vec<Step> = plan
        .iter()
        .map(|s| match &s.action {
            Action::Write { path, .. } => Step {
                tunable: s.tunable,
                action: Action::Write {
                    path: path.clone(),
                    value: if path.contains("stat_interval") {
                        "60".into()
                    } else {
                        "powersave".into()
                    },
                },
            },
            _ => s.clone(),
        })
        .collect();
    for crash_at in 1..=second.len() {
        let scene = Scene::new();
        scene.executor(&RealHost, 100).apply(plan.clone()).unwrap();
        let applied = fixture::snapshot(&scene.tree.path);
        let host = CrashAt::new(RealHost, crash_at);
        let mut other = scene.executor(&host, 101);
        assert!(crashes(|| {
            other.apply(second.clone()).unwrap();
        }));
        let mut later = scene.executor(&RealHost, 101);
        assert!(later.rollback(false).is_empty());
        assert!(
            fixture::snapshot(&scene.tree.path) == applied,
            "crash {crash_at}: VM 100's values"
        );
        let mut last = scene.executor(&RealHost, 100);
        assert!(last.rollback(false).is_empty());
        assert!(
            fixture::snapshot(&scene.tree.path) == scene.before,
            "crash {crash_at}"
        );
        assert!(last.state.is_empty());
    }
}
