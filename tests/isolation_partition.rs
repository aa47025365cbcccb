//! The isolated cpuset partition (`isolation: {partition: isolated}`) on a fixture host whose
//! cgroup tree behaves like the kernel's (tests/cgroup_kernel): the layout is built in
//! post-start with every thread where it belongs, several VMs compose `qemu.slice`'s exclusive
//! CPUs and stop in every order without invalidating one another, a failure at any step and
//! an invalid partition leave the tree as it was, and post-stop after systemd removed the
//! scope gives back exactly the tree from before. The real kernels: the lab's scenario
//! 50-isolation-partition.sh.

mod cgroup_kernel;
mod fixture;

use cgroup_kernel::lab::{ALL, Lab, VMS, permutations, set};
use fixture::{read, write};
use pvetune::cpuset::CpuSet;
use pvetune::host::{FailAt, Host};
use pvetune::plan::Phase;
use pvetune::state::Store;

#[test]
fn one_vm_gets_an_isolated_partition_and_gives_back_the_tree() {
    let lab = Lab::new("6.14.8-2-pve");
    let before = lab.cgroups();
    lab.start(100);
    lab.assert_isolated(100, VMS[0].1, &[100]);
    let root = read(lab.path(), "/sys/fs/cgroup/cgroup.subtree_control");
    assert!(root.split_whitespace().any(|w| w == "cpuset"), "{root}");
    let pin = read(
        lab.path(),
        "/sys/fs/cgroup/qemu.slice/100.scope/vcpus/cgroup.subtree_control",
    );
    assert_eq!(
        pin.trim(),
        "cpuset",
        "the pin against systemd 252's daemon-reload"
    );
    let status = || {
        pvetune::report::status(&lab.env, Some(100))
            .unwrap()
            .join("\n")
    };
    assert!(
        status().contains("partition: isolated (valid)"),
        "{}",
        status()
    );
    // The kernel drops the partition (all its CPUs went offline and came back): status says so.
    let file = "/sys/fs/cgroup/qemu.slice/100.scope/vcpus/cpuset.cpus.partition";
    write(
        lab.path(),
        file,
        "isolated invalid (No cpu available due to hotplug)\n",
    );
    let want = "partition: NOT VALID: the kernel reports 'isolated invalid (No cpu available due to hotplug)'";
    assert!(status().contains(want), "{}", status());
    write(lab.path(), file, "isolated\n");
    lab.stop(100, true);
    assert_eq!(
        lab.cgroups(),
        before,
        "post-stop gives back the cgroup tree byte for byte"
    );
    assert!(Store::new(&lab.env.root).load().unwrap().is_empty());
}

#[test]
fn rollback_of_a_running_vm_takes_its_threads_out_of_the_partition_first() {
    let lab = Lab::new("7.0.13+deb13-cloud-amd64");
    lab.start(100);
    lab.rollback_running(100);
    for tid in 10000..10006 {
        assert_eq!(
            lab.kernel.cgroup_of(tid).as_deref(),
            Some("qemu.slice/100.scope")
        );
        assert_eq!(
            lab.kernel.get_affinity(tid).unwrap(),
            set(ALL),
            "thread {tid}"
        );
    }
}

#[test]
fn three_isolated_vms_stop_in_every_order_without_invalidating_the_others() {
    // One host for all orders: each ends with the tree it started from.
    let lab = Lab::new("6.17.13+deb13-cloud-amd64");
    let before = lab.cgroups();
    for order in permutations(&[100, 101, 102]) {
        let mut running = vec![];
        for (vmid, cpus) in VMS {
            lab.start(vmid);
            running.push(vmid);
            for &v in &running {
                let cpus_of = VMS.iter().find(|(id, _)| *id == v).unwrap().1;
                lab.assert_isolated(v, cpus_of, &running);
            }
            let _ = cpus;
        }
        for (i, &vmid) in order.iter().enumerate() {
            // Every other stop leaves the scope to post-stop (busybox hosts, a slow systemd).
            lab.stop(vmid, i % 2 == 0);
            if i % 2 != 0 {
                lab.kernel.trim(&format!("qemu.slice/{vmid}.scope"));
            }
            running.retain(|v| *v != vmid);
            for &v in &running {
                let cpus_of = VMS.iter().find(|(id, _)| *id == v).unwrap().1;
                lab.assert_isolated(v, cpus_of, &running);
            }
        }
        assert_eq!(lab.cgroups(), before, "stop order {order:?}");
    }
}

#[test]
fn a_failure_at_any_step_of_post_start_leaves_the_tree_as_it_was() {
    let mut failed_at = 0;
    // One host for every try: each failure must leave it exactly as it was for the next.
    let lab = Lab::new("6.14.8-2-pve");
    lab.hook(&lab.kernel, 100, Phase::PreStart).unwrap();
    lab.qemu_starts(100);
    let before = lab.cgroups();
    let affinities: Vec<CpuSet> = (10000..10006)
        .map(|t| lab.kernel.get_affinity(t).unwrap())
        .collect();
    for n in 1.. {
        let host = FailAt::new(&lab.kernel, n);
        match lab.hook(&host, 100, Phase::PostStart) {
            Ok(_) => break,
            Err(e) => {
                failed_at = n;
                assert!(e.contains("EIO") || e.contains("Input/output"), "{e}");
            }
        }
        assert_eq!(lab.cgroups(), before, "failure at change {n}");
        let now: Vec<CpuSet> = (10000..10006)
            .map(|t| lab.kernel.get_affinity(t).unwrap())
            .collect();
        assert_eq!(
            now, affinities,
            "thread affinities after a failure at change {n}"
        );
    }
    // Controllers (3), exclusive chain (3), mkdir and its type (2), the pin, the partition,
    // four moves, then the pins: every one of them was made to fail once.
    assert!(failed_at >= 14, "only {failed_at} changes were tried");
}

#[test]
fn an_invalid_partition_fails_post_start_with_the_kernels_reason_and_is_undone() {
    let lab = Lab::new("6.14.8-2-pve");
    lab.hook(&lab.kernel, 100, Phase::PreStart).unwrap();
    lab.qemu_starts(100);
    let before = lab.cgroups();
    *lab.kernel.refuse_partition.borrow_mut() =
        Some("partition config conflicts with housekeeping setup".into());
    let err = lab.hook(&lab.kernel, 100, Phase::PostStart).unwrap_err();
    assert!(
        err.contains("isolated invalid (partition config conflicts with housekeeping setup)"),
        "{err}"
    );
    assert_eq!(lab.cgroups(), before);
}

#[test]
fn check_refuses_kernels_that_cannot_and_placements_that_would_break_the_partition() {
    let lab = Lab::new("6.8.12-4-pve");
    let check = |vmid: u32| pvetune::hook::check(&lab.env, vmid).map_err(|e| format!("{e:#}"));
    // 6.8 gets its own layout (tests/isolation_partition_6_8.rs), not a refusal.
    assert!(check(100).is_ok(), "{:?}", check(100));
    write(lab.path(), "/proc/sys/kernel/osrelease", "6.14.8-2-pve\n");
    assert!(check(100).is_ok());
    std::fs::remove_file(lab.path().join("sys/fs/cgroup/cpuset.cpus.isolated")).unwrap();
    let err = check(100).unwrap_err();
    assert!(err.contains("remote partitions"), "{err}");
    write(lab.path(), "/sys/fs/cgroup/cpuset.cpus.isolated", "\n");
    write(
        lab.path(),
        "/etc/pve/pvetune/100.yaml",
        "cpus: 8-11,24-27\nemulator: vm\nisolation:\n  partition: isolated\n",
    );
    let err = check(100).unwrap_err();
    assert!(
        err.contains("emulator") && err.contains("outside its partition"),
        "{err}"
    );
    write(
        lab.path(),
        "/etc/pve/pvetune/100.yaml",
        "cpus: 0-31\nisolation:\n  partition: isolated\n",
    );
    let err = check(100).unwrap_err();
    assert!(
        err.contains("outside every partition") || err.contains("no housekeeping CPU left"),
        "{err}"
    );
    write(
        lab.path(),
        "/etc/pve/pvetune/100.yaml",
        "cpus: 8-11\nisolation:\n  kthreads: true\n",
    );
    let err = check(100).unwrap_err();
    assert!(
        err.contains("isolation.kthreads") && err.contains("needs isolation.partition"),
        "{err}"
    );
    write(
        lab.path(),
        "/etc/pve/pvetune/100.yaml",
        "cpus: 8-11\nisolation:\n  partition: root\n",
    );
    let err = check(100).unwrap_err();
    assert!(err.contains("line 3") || err.contains(":3:"), "{err}");
}

#[test]
fn plan_shows_the_layout_before_anything_changes() {
    let lab = Lab::new("6.14.8-2-pve");
    let before = lab.cgroups();
    let out = pvetune::report::render_plan(&lab.env, &lab.kernel, 100, &[Phase::PostStart])
        .unwrap()
        .join("\n");
    for want in [
        "/sys/fs/cgroup/cgroup.subtree_control: memory pids -> memory pids cpuset",
        "/sys/fs/cgroup/qemu.slice/cpuset.cpus.exclusive: (empty) -> 8-11,24-27",
        "/sys/fs/cgroup/qemu.slice/cgroup.subtree_control: (empty) -> cpuset",
        "/sys/fs/cgroup/qemu.slice/100.scope/vcpus: absent -> threaded",
        "/sys/fs/cgroup/qemu.slice/100.scope/vcpus/cpuset.cpus.partition: (empty) -> isolated",
        "check /sys/fs/cgroup/qemu.slice/100.scope/vcpus/cpuset.cpus.partition reads 'isolated' (not there yet)",
        "vCPU threads (not running): - -> /sys/fs/cgroup/qemu.slice/100.scope/vcpus",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert_eq!(lab.cgroups(), before, "plan changes nothing");
}
