//! Only the VM's own threads are ever touched (issue 10, invariant 1): before a rollback puts
//! a thread's affinity back, the tid from the ledger must still be listed under the recorded
//! QEMU process (whose pid and start time are checked first) with the start time it had when
//! it was pinned. A thread that fails the proof is dropped from the ledger and left alone.

mod cgroup_kernel;
mod fixture;

use cgroup_kernel::lab::{ALL, Lab, set};
use pvetune::host::Host;
use pvetune::plan::Phase;
use pvetune::state::Store;
use std::fs;

#[test]
fn rollback_leaves_alone_a_tid_that_is_no_longer_the_pinned_thread() {
    let lab = Lab::new("6.14.8-2-pve");
    lab.hook(&lab.kernel, 100, Phase::PreStart).unwrap();
    lab.qemu_starts(100);
    lab.hook(&lab.kernel, 100, Phase::PostStart).unwrap();
    let pins = Store::new(&lab.env.root).load().unwrap().vms[&100]
        .pins
        .clone();
    assert!(
        pins.iter().all(|p| p.start_time == Some(777)),
        "every pin records its thread's start time: {pins:?}"
    );
    // vCPU 1's tid now names a thread started later (the tid was reused), and vCPU 2's thread
    // is no longer listed under QEMU at all (it exited; the tid may be anyone's).
    let task = |tid: i32| lab.path().join(format!("proc/10000/task/{tid}"));
    let stat = fs::read_to_string(task(10002).join("stat")).unwrap();
    fs::write(task(10002).join("stat"), stat.replace(" 777 ", " 999 ")).unwrap();
    fs::remove_dir_all(task(10003)).unwrap();
    let pinned_1 = lab.kernel.get_affinity(10002).unwrap();
    let pinned_2 = lab.kernel.get_affinity(10003).unwrap();

    let out = pvetune::hook::rollback_command(&lab.env, &lab.kernel, 100);
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(
        lab.kernel.get_affinity(10002).unwrap(),
        pinned_1,
        "a reused tid is not touched"
    );
    assert_eq!(
        lab.kernel.get_affinity(10003).unwrap(),
        pinned_2,
        "an exited tid is not touched"
    );
    for tid in [10000, 10001, 10004, 10005] {
        assert_eq!(
            lab.kernel.get_affinity(tid).unwrap(),
            set(ALL),
            "thread {tid} restored"
        );
    }
    assert!(
        Store::new(&lab.env.root).load().unwrap().is_empty(),
        "the pins are dropped"
    );
}
