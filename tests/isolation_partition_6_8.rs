//! The isolated partition on kernel 6.8 (Proxmox VE 8's default), on a fixture host whose
//! cgroup tree follows 6.8's rules (tests/cgroup_kernel/v6_8.rs): `cpuset.cpus` on the whole
//! chain, each before its exclusive CPUs; several VMs in every stop order; and the one thing
//! 6.8 (up to 6.17) refuses, emptying `cpuset.cpus` of a cgroup with tasks, given back by a
//! later run once the cgroup is empty. The real 6.8 kernel: the lab's cell pve8.k68.

mod cgroup_kernel;
mod fixture;

use cgroup_kernel::lab::{ALL, Lab, VMS, permutations, set};
use fixture::read;
use pvetune::cpuset::CpuSet;
use pvetune::host::{FailAt, Host};
use pvetune::plan::Phase;
use pvetune::state::Store;

const K68: &str = "6.8.12-4-pve";

fn cpus_of(lab: &Lab, cg: &str) -> String {
    read(lab.path(), &format!("/sys/fs/cgroup/{cg}/cpuset.cpus"))
        .trim()
        .to_string()
}

fn ledger_empty(lab: &Lab) -> bool {
    Store::new(&lab.env.root).load().unwrap().is_empty()
}

#[test]
fn on_6_8_the_chain_gets_cpuset_cpus_and_the_tree_comes_back_byte_for_byte() {
    let lab = Lab::new(K68);
    let before = lab.cgroups();
    let plan = pvetune::report::render_plan(&lab.env, &lab.kernel, 100, &[Phase::PostStart])
        .unwrap()
        .join("\n");
    for want in [
        "/sys/fs/cgroup/qemu.slice/cpuset.cpus: (empty) -> 0-31",
        "/sys/fs/cgroup/qemu.slice/100.scope/cpuset.cpus: ",
        "/sys/fs/cgroup/qemu.slice/100.scope/vcpus/cpuset.cpus: ",
        "also needs cpuset.cpus on qemu.slice, the scope and vcpus",
    ] {
        assert!(plan.contains(want), "missing {want:?} in\n{plan}");
    }
    lab.start(100);
    lab.assert_isolated(100, VMS[0].1, &[100]);
    assert_eq!(cpus_of(&lab, "qemu.slice"), ALL);
    assert_eq!(cpus_of(&lab, "qemu.slice/100.scope"), ALL);
    assert_eq!(cpus_of(&lab, "qemu.slice/100.scope/vcpus"), VMS[0].1);
    lab.stop(100, true);
    assert_eq!(lab.cgroups(), before, "post-stop gives back the tree");
    assert!(ledger_empty(&lab));
}

#[test]
fn without_cpuset_cpus_6_8_reads_the_partition_back_invalid() {
    // What the layout of 6.12 and later gives on 6.8: the kernel's verdict, as the lab saw it.
    let lab = Lab::new(K68);
    lab.hook(&lab.kernel, 100, Phase::PreStart).unwrap();
    lab.qemu_starts(100);
    let before = lab.cgroups();
    // 6.12's layout: this release makes pvetune leave cpuset.cpus alone.
    fixture::write(lab.path(), "/proc/sys/kernel/osrelease", "6.12.1\n");
    let err = lab.hook(&lab.kernel, 100, Phase::PostStart).unwrap_err();
    assert!(
        err.contains("isolated invalid (cpuset.cpus is empty)"),
        "{err}"
    );
    assert_eq!(lab.cgroups(), before, "and it is all undone");
}

#[test]
fn three_isolated_vms_on_6_8_stop_in_every_order_without_invalidating_the_others() {
    let lab = Lab::new(K68);
    let before = lab.cgroups();
    for order in permutations(&[100, 101, 102]) {
        let mut running = vec![];
        for (vmid, _) in VMS {
            lab.start(vmid);
            running.push(vmid);
            for &v in &running {
                let cpus = VMS.iter().find(|(id, _)| *id == v).unwrap().1;
                lab.assert_isolated(v, cpus, &running);
            }
        }
        for (i, &vmid) in order.iter().enumerate() {
            // Every other stop leaves the scope to post-stop (systemd trims it later).
            lab.stop(vmid, i % 2 == 0);
            if i % 2 != 0 {
                lab.kernel.trim(&format!("qemu.slice/{vmid}.scope"));
            }
            running.retain(|v| *v != vmid);
            for &v in &running {
                let cpus = VMS.iter().find(|(id, _)| *id == v).unwrap().1;
                lab.assert_isolated(v, cpus, &running);
            }
            // qemu.slice keeps every online CPU while any VM is in it.
            if !running.is_empty() {
                assert_eq!(cpus_of(&lab, "qemu.slice"), ALL, "order {order:?}");
            }
        }
        // The last VM's post-stop found qemu.slice empty and gave back its cpuset.cpus.
        assert_eq!(lab.cgroups(), before, "stop order {order:?}");
        assert!(ledger_empty(&lab), "stop order {order:?}");
    }
}

/// What systemd does once any unit has AllowedCPUs=: cpuset on at the root and in qemu.slice.
/// (Without it, pvetune's own `-cpuset` on release takes the cpuset files away with their
/// values, and nothing waits.)
fn systemd_manages_cpuset(lab: &Lab) {
    for cg in ["", "qemu.slice/"] {
        lab.kernel
            .write(
                &lab.path()
                    .join(format!("sys/fs/cgroup/{cg}cgroup.subtree_control")),
                "+cpuset",
            )
            .unwrap();
    }
}

/// A VM pvetune does not tune (no profile), running in qemu.slice the whole time.
fn plain_vm_runs(lab: &Lab) {
    lab.kernel
        .mkdir(&lab.path().join("sys/fs/cgroup/qemu.slice/300.scope"))
        .unwrap();
    lab.kernel.spawn(
        30000,
        &["/usr/bin/kvm", "-id", "300"],
        &[(30000, "kvm"), (30001, "CPU 0/KVM")],
        "qemu.slice/300.scope",
    );
}

#[test]
fn qemu_slice_cpuset_cpus_waits_for_the_last_vm_and_a_later_run_gives_it_back() {
    let lab = Lab::new(K68);
    systemd_manages_cpuset(&lab);
    let before = lab.cgroups();
    plain_vm_runs(&lab);
    lab.start(100);
    lab.stop(100, true);
    // 6.8 refuses an empty cpuset.cpus on qemu.slice while VM 300 is in it: the claim stays.
    assert_eq!(cpus_of(&lab, "qemu.slice"), ALL);
    let state = Store::new(&lab.env.root).load().unwrap();
    assert_eq!(
        state.claims.keys().collect::<Vec<_>>(),
        ["/sys/fs/cgroup/qemu.slice/cpuset.cpus"],
        "only qemu.slice's cpuset.cpus is left"
    );
    let status = pvetune::report::status(&lab.env, None).unwrap().join("\n");
    assert!(status.contains("qemu.slice/cpuset.cpus"), "{status}");
    // Every hook on the node tries again; VM 300 still runs, so nothing changes and nothing fails.
    lab.hook(&lab.kernel, 300, Phase::PreStop).unwrap();
    assert_eq!(cpus_of(&lab, "qemu.slice"), ALL);
    // VM 300 stops (qemu-server's post-stop of a VM without a profile still runs pvetune).
    lab.kernel.exit(30000);
    lab.kernel.trim("qemu.slice/300.scope");
    lab.hook(&lab.kernel, 300, Phase::PostStop).unwrap();
    assert_eq!(lab.cgroups(), before, "the tree is as it was");
    assert!(ledger_empty(&lab));
}

#[test]
fn rollback_of_a_running_vm_on_6_8_leaves_the_scope_cpus_until_qemu_exits() {
    let lab = Lab::new(K68);
    systemd_manages_cpuset(&lab);
    let before = lab.cgroups();
    lab.start(100);
    lab.rollback_running(100);
    for tid in 10000..10006 {
        assert_eq!(
            lab.kernel.get_affinity(tid).unwrap(),
            set(ALL),
            "thread {tid}"
        );
    }
    // QEMU is still in its scope: the scope and qemu.slice keep every online CPU for now.
    assert_eq!(cpus_of(&lab, "qemu.slice/100.scope"), ALL);
    lab.stop(100, true);
    assert_eq!(lab.cgroups(), before);
    assert!(ledger_empty(&lab));
}

#[test]
fn a_failure_at_any_step_of_post_start_on_6_8_is_undone_as_far_as_the_kernel_allows() {
    let lab = Lab::new(K68);
    let idle = lab.cgroups();
    lab.hook(&lab.kernel, 100, Phase::PreStart).unwrap();
    lab.qemu_starts(100);
    let before = lab.cgroups();
    let affinities: Vec<CpuSet> = (10000..10006)
        .map(|t| lab.kernel.get_affinity(t).unwrap())
        .collect();
    let mut failed_at = 0;
    for n in 1.. {
        let host = FailAt::new(&lab.kernel, n);
        match lab.hook(&host, 100, Phase::PostStart) {
            Ok(_) => break,
            Err(e) => {
                failed_at = n;
                assert!(e.contains("EIO") || e.contains("Input/output"), "{e}");
            }
        }
        // Everything is as before except what 6.8 will not empty while QEMU runs: the scope's
        // and qemu.slice's cpuset.cpus, which hold every online CPU (what empty means).
        let mut now = lab.cgroups();
        for cg in ["qemu.slice", "qemu.slice/100.scope"] {
            let key = format!("{cg}/cpuset.cpus");
            if let Some(v) = now.get(&key)
                && String::from_utf8_lossy(v).trim() == ALL
            {
                now.insert(key.clone(), before[&key].clone());
            }
        }
        assert_eq!(now, before, "failure at change {n}");
        let aff: Vec<CpuSet> = (10000..10006)
            .map(|t| lab.kernel.get_affinity(t).unwrap())
            .collect();
        assert_eq!(
            aff, affinities,
            "thread affinities after a failure at change {n}"
        );
    }
    // 6.12's 14 changes and the three cpuset.cpus.
    assert!(failed_at >= 17, "only {failed_at} changes were tried");
    lab.stop(100, true);
    assert_eq!(lab.cgroups(), idle, "post-stop gives back what was left");
    assert!(ledger_empty(&lab));
}

#[test]
fn on_6_8_a_host_slice_with_overlapping_cpuset_cpus_makes_the_kernel_refuse_and_all_is_undone() {
    // 6.8 checks qemu.slice's exclusive CPUs against a sibling's cpuset.cpus (an admin's
    // AllowedCPUs= on system.slice that covers the VM's CPUs).
    let lab = Lab::new(K68);
    lab.kernel
        .write(
            &lab.path().join("sys/fs/cgroup/cgroup.subtree_control"),
            "+cpuset",
        )
        .unwrap();
    lab.kernel
        .write(
            &lab.path().join("sys/fs/cgroup/system.slice/cpuset.cpus"),
            "0-15",
        )
        .unwrap();
    lab.hook(&lab.kernel, 100, Phase::PreStart).unwrap();
    lab.qemu_starts(100);
    let before = lab.cgroups();
    let err = lab.hook(&lab.kernel, 100, Phase::PostStart).unwrap_err();
    assert!(err.contains("qemu.slice/cpuset.cpus.exclusive"), "{err}");
    assert_eq!(lab.cgroups(), before);
}
