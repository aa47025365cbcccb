//! The ledger under load and under kill -9, through the real hook:
//!
//! - its cost grows with the changes only: the number of full rewrites of `state.json` (and
//!   of journal appends) per phase is the same for 100 and for 1,000 claimed files, counted
//!   through the store, not timed;
//! - a `kill -9` of the real binary at any moment of post-start or post-stop is undone by the
//!   next hook: every file byte for byte, the thread's affinity, an empty ledger.

mod fixture;

use fixture::{FakeVm, fake_qmp, host_copy, pvetune, snapshot, stderr, write};
use pvetune::cpuset::CpuSet;
use pvetune::exec::Executor;
use pvetune::hook::{Env, run_hook_with};
use pvetune::host::{Host, RealHost};
use pvetune::plan::{Action, Phase, Step};
use pvetune::root::Root;
use pvetune::state::{Change, State, Store, StoreStats, VmRecord};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The Ryzen example host, its VM 100 profile claiming `n` more sysctl-like files
/// (`/proc/sys/pvetune/k<i>`, each "1" before).
fn host_with_claims(n: usize) -> fixture::Root {
    let root = host_copy("ryzen-5900x");
    let mut profile =
        String::from("cpus: 6-11,18-23\ngovernor: performance\nsysctl:\n  vm.stat_interval: 120\n");
    for i in 0..n {
        write(&root.path, &format!("/proc/sys/pvetune/k{i}"), "1\n");
        profile.push_str(&format!("  pvetune.k{i}: 2\n"));
    }
    write(&root.path, "/etc/pve/pvetune/100.yaml", &profile);
    root
}

/// Store statistics of pre-start, post-start and post-stop for VM 100 with `n` claims.
fn phase_costs(n: usize) -> Vec<(Phase, StoreStats)> {
    let tree = host_with_claims(n);
    let before = snapshot(&tree.path);
    let env = Env {
        root: Root::new(&tree.path),
        profile: None,
    };
    let mut vm = None;
    let mut costs = Vec::new();
    for phase in [Phase::PreStart, Phase::PostStart, Phase::PostStop] {
        if phase == Phase::PostStart {
            vm = Some(FakeVm::start(&tree.path, 100));
            fake_qmp(&tree.path, 100);
        }
        let store = Store::new(&env.root);
        let out = run_hook_with(&env, &RealHost, &store, 100, phase);
        assert!(out.is_ok(), "{phase} with {n} claims: {out:?}");
        if phase == Phase::PostStart {
            assert_eq!(fixture::read(&tree.path, "/proc/sys/pvetune/k0"), "2\n");
        }
        costs.push((phase, store.stats()));
    }
    drop(vm);
    assert_eq!(snapshot(&tree.path), before, "{n} claims rolled back");
    costs
}

#[test]
fn full_rewrites_per_phase_do_not_grow_with_the_number_of_changes() {
    let small = phase_costs(100);
    let large = phase_costs(1000);
    for ((phase, s), (_, l)) in small.iter().zip(&large) {
        assert_eq!(
            (s.rewrites, s.appends),
            (l.rewrites, l.appends),
            "{phase}: 100 claims {s:?}, 1000 claims {l:?}"
        );
        assert!(l.rewrites <= 1, "{phase}: {l:?}");
        assert!(l.appends <= 2, "{phase}: {l:?}");
    }
    // The journal carried every change, in those few appends.
    let post_start = large[1].1;
    assert!(post_start.changes > 1000, "{post_start:?}");
}

/// The executor alone: a batch of `n` claims costs one append, its rollback one more, and
/// the compaction one rewrite.
fn batch_costs(n: usize) -> [StoreStats; 3] {
    let tree = fixture::temp_dir("batch");
    let dir = tree.path.clone();
    let steps: Vec<Step> = (0..n)
        .map(|i| {
            let path = format!("/proc/irq/{i}/smp_affinity_list");
            write(&dir, &path, "0-23\n");
            Step {
                tunable: "irq",
                action: Action::Write {
                    path,
                    value: "0-5".into(),
                },
            }
        })
        .collect();
    let before = snapshot(&dir);
    let root = Root::new(&dir);
    let store = Store::new(&root);
    let mut state = State::empty();
    let record = VmRecord {
        cpus: CpuSet::range(6, 11),
        ..Default::default()
    };
    store
        .append(
            &mut state,
            vec![Change::Vm {
                vmid: 100,
                record: Some(Box::new(record)),
            }],
        )
        .unwrap();
    let seeded = store.stats();
    let mut exec = Executor::new(&root, &RealHost, &store, state, 100);
    let applied = exec.apply(steps.clone()).unwrap();
    assert_eq!(applied.changed, n);
    let after_apply = store.stats();
    assert!(exec.rollback(false).is_empty());
    let after_rollback = store.stats();
    store.compact(&mut exec.state).unwrap();
    assert_eq!(snapshot(&dir), before);
    assert!(store.load().unwrap().is_empty());
    let delta = |a: StoreStats, b: StoreStats| StoreStats {
        rewrites: a.rewrites - b.rewrites,
        appends: a.appends - b.appends,
        changes: a.changes - b.changes,
    };
    [
        delta(after_apply, seeded),
        delta(after_rollback, after_apply),
        delta(store.stats(), after_rollback),
    ]
}

#[test]
fn a_batch_is_one_journal_append_whatever_its_size() {
    for n in [100, 1000] {
        let [apply, rollback, compact] = batch_costs(n);
        let journal_only = |changes| StoreStats {
            rewrites: 0,
            appends: 1,
            changes,
        };
        assert_eq!(apply, journal_only(n), "apply of {n}");
        assert_eq!(rollback, journal_only(n + 1), "rollback of {n}");
        assert_eq!(compact.rewrites, 1, "compaction after {n}");
    }
}

fn affinity(pid: i32) -> CpuSet {
    RealHost.get_affinity(pid).unwrap()
}

/// Runs `pvetune --root R 100 <phase>`, killing it with SIGKILL after `delay` (if it has
/// not finished by then). Returns whether it was killed.
fn run_killed_after(root: &Path, phase: &str, delay: Duration) -> bool {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pvetune"))
        .arg("--root")
        .arg(root)
        .args(["-q", "100", phase])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let killed = matches!(child.try_wait(), Ok(None));
    let _ = child.kill();
    let _ = child.wait();
    killed
}

fn hook(root: &Path, phase: &str) {
    let out = pvetune(root, &["100", phase]);
    assert!(out.status.success(), "{phase}: {}", stderr(&out));
}

#[test]
fn kill_9_at_any_moment_of_a_phase_is_undone_by_the_next_hook() {
    let tree = host_with_claims(400);
    let before: BTreeMap<String, Vec<u8>> = snapshot(&tree.path);
    let vm = FakeVm::start(&tree.path, 100);
    fake_qmp(&tree.path, 100);
    let original = affinity(vm.pid);
    // How long an uninterrupted phase takes here, to spread the kills over it.
    hook(&tree.path, "pre-start");
    let t0 = Instant::now();
    hook(&tree.path, "post-start");
    let start_time = t0.elapsed();
    let t0 = Instant::now();
    hook(&tree.path, "post-stop");
    let stop_time = t0.elapsed();
    let check = |what: &str| {
        assert_eq!(snapshot(&tree.path), before, "files after {what}");
        assert_eq!(affinity(vm.pid), original, "affinity after {what}");
        let status = fixture::stdout(&pvetune(&tree.path, &["status"]));
        assert!(status.contains("holds nothing"), "{what}: {status}");
    };
    check("an uninterrupted run");
    let mut interrupted = 0;
    for k in 0..6u32 {
        hook(&tree.path, "pre-start");
        let what = format!("post-start killed at {k}/4 of its run");
        interrupted += usize::from(run_killed_after(
            &tree.path,
            "post-start",
            start_time * k / 4,
        ));
        // Proxmox runs post-stop when the VM stops; it must undo whatever the killed run did.
        hook(&tree.path, "post-stop");
        check(&what);

        hook(&tree.path, "pre-start");
        hook(&tree.path, "post-start");
        let what = format!("post-stop killed at {k}/4 of its run");
        interrupted += usize::from(run_killed_after(&tree.path, "post-stop", stop_time * k / 4));
        hook(&tree.path, "post-stop");
        check(&what);
    }
    println!("{interrupted} of 12 runs were killed before they finished");
}
