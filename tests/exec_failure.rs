//! A phase whose Nth change fails leaves nothing behind, for every N: files byte-identical,
//! thread affinities as before, the ledger empty. Uses the `Host` seam with a host that fails
//! on the Nth mutation.

mod fixture;

use pvetune::cpuset::CpuSet;
use pvetune::exec::Executor;
use pvetune::host::{FailAt, Host, RealHost};
use pvetune::plan::{Action, Step, ThreadRef};
use pvetune::root::Root;
use pvetune::state::Store;
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
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id() as i32;
    let original = RealHost.get_affinity(pid).unwrap();
    let plan = steps(pid);
    for fail_at in 1..=plan.len() {
        let tree = fixture::host_copy("ryzen-5900x");
        let before = fixture::snapshot(&tree.path);
        let root = Root::new(&tree.path);
        let store = Store::new(&root);
        let host = FailAt::new(RealHost, fail_at);
        let mut exec = Executor::new(&root, &host, &store, store.load().unwrap(), 100);
        let err = exec
            .apply(&plan)
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
    let applied = exec.apply(&plan).unwrap();
    assert_eq!(applied.changed, plan.len());
    assert_eq!(
        fixture::read(&tree.path, "/proc/sys/vm/stat_interval"),
        "120\n"
    );
    assert_eq!(RealHost.get_affinity(pid).unwrap(), CpuSet::range(0, 0));
    assert!(exec.rollback(true).is_empty());
    assert_eq!(fixture::snapshot(&tree.path), before);
    assert_eq!(RealHost.get_affinity(pid).unwrap(), original);
    let _ = child.kill();
    let _ = child.wait();
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
        exec.apply(plan).unwrap();
    } // the process "dies" here: nothing in memory survives
    let mut later = Executor::new(&root, &RealHost, &store, store.load().unwrap(), 100);
    assert!(later.rollback(false).is_empty());
    assert_eq!(fixture::snapshot(&tree.path), before);
}
