//! IRQs off the VMs' CPUs (`isolation: {irqs: true}`) on the Ryzen 5900X fixture host, whose
//! `/proc/irq` is shaped like the kernel's (tests/common/hostgen.rs): every IRQ affinity and
//! the default affinity are composed from every VM that holds them, in any stop order, and the
//! last stop gives back the original bytes. Refused IRQs (managed: EPERM) are skipped.

mod fixture;

use fixture::{
    FakeVm, host_copy, pvetune, read, snapshot, start_vm as start, stderr, stdout, write,
};
use pvetune::cpuset::{CpuFormat, CpuSet};
use pvetune::exec::Executor;
use pvetune::host::{Host, RealHost};
use pvetune::plan::{Action, Step};
use pvetune::root::Root;
use pvetune::state::Store;
use std::io;
use std::path::Path;

/// The three VMs: the second CCD (the shipped example profile), then two more on the first.
const VMS: [(u32, &str); 3] = [(100, "6-11,18-23"), (101, "3-5,15-17"), (102, "1-2,13-14")];
const ALL: &str = "0-23";

fn add_vm(root: &Path, vmid: u32, cpus: &str) {
    write(
        root,
        &format!("/etc/pve/pvetune/{vmid}.yaml"),
        &format!("cpus: {cpus}\nvcpus: sequential\nisolation:\n  irqs: true\n"),
    );
    write(
        root,
        &format!("/etc/pve/qemu-server/{vmid}.conf"),
        "cores: 2\nmemory: 512\n",
    );
}

fn stop(root: &Path, vmid: u32, vm: &mut FakeVm) {
    vm.kill();
    let out = pvetune(root, &[&vmid.to_string(), "post-stop"]);
    assert!(out.status.success(), "post-stop {vmid}: {}", stderr(&out));
}

fn set(s: &str) -> CpuSet {
    s.parse().unwrap()
}

/// Every IRQ's affinity and the default affinity, given the VMs that run.
fn assert_irqs_off(root: &Path, running: &[(u32, &str)]) {
    let taken = running
        .iter()
        .fold(CpuSet::new(), |acc, (_, c)| acc.union(&set(c)));
    let left = set(ALL).difference(&taken);
    let who: Vec<u32> = running.iter().map(|(v, _)| *v).collect();
    for irq in [0, 1, 9, 16, 24, 27, 28] {
        let now = read(root, &format!("/proc/irq/{irq}/smp_affinity_list"));
        assert_eq!(set(now.trim()), left, "IRQ {irq} with VMs {who:?} running");
    }
    let mask = read(root, "/proc/irq/default_smp_affinity");
    let want = if running.is_empty() {
        "ffffff".to_string()
    } else {
        CpuFormat::Mask.render(&left, "ffffff")
    };
    assert_eq!(
        mask.trim(),
        want,
        "default affinity with VMs {who:?} running"
    );
    // NVMe queue 7 is managed on core 6 (CPUs 6,18), all VM 100's: with VM 100 running it
    // goes to housekeeping CPUs, never to another VM's.
    let q7 = set(read(root, "/proc/irq/35/smp_affinity_list").trim());
    if who.contains(&100) {
        assert!(q7.is_disjoint(&taken), "IRQ 35 on {q7} with {who:?}");
        assert!(!q7.is_empty());
    } else {
        assert_eq!(q7, set("6,18"));
    }
}

/// Three VMs start, then stop in `order`; after each stop the remaining VMs' CPUs stay free
/// of IRQs, and the end is the tree from before, byte for byte.
fn three_vms_stop_in(order: [usize; 3]) {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    for (vmid, cpus) in &VMS[1..] {
        add_vm(&root.path, *vmid, cpus);
    }
    let with_profiles = snapshot(&root.path);
    let mut vms: Vec<Option<FakeVm>> = VMS
        .iter()
        .map(|(vmid, _)| Some(start(&root.path, *vmid)))
        .collect();
    assert_irqs_off(&root.path, &VMS);
    let mut running: Vec<(u32, &str)> = VMS.to_vec();
    for i in order {
        let (vmid, _) = VMS[i];
        let mut vm = vms[i].take().unwrap();
        stop(&root.path, vmid, &mut vm);
        running.retain(|(v, _)| *v != vmid);
        assert_irqs_off(&root.path, &running);
    }
    assert_eq!(snapshot(&root.path), with_profiles, "stop order {order:?}");
    drop(before);
}

#[test]
fn three_isolated_vms_stopped_in_every_order_give_back_exactly_their_cpus() {
    for order in [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ] {
        three_vms_stop_in(order);
    }
}

#[test]
fn two_isolated_vms_stopped_in_both_orders() {
    for order in [[0usize, 1], [1, 0]] {
        let root = host_copy("ryzen-5900x");
        add_vm(&root.path, 101, VMS[1].1);
        let before = snapshot(&root.path);
        let mut a = start(&root.path, 100);
        let mut b = start(&root.path, 101);
        assert_irqs_off(&root.path, &VMS[..2]);
        let status = stdout(&pvetune(&root.path, &["status"]));
        assert!(
            status.contains(
                "/proc/irq/0/smp_affinity_list: 0-23 -> 0-2,12-14 (VM 100 takes out 6-11,18-23, VM 101 takes out 3-5,15-17)"
            ),
            "{status}"
        );
        let status = stdout(&pvetune(&root.path, &["status", "101"]));
        assert!(
            status.contains(
                "/proc/irq/0/smp_affinity_list: 0-2,12-14 (original 0-23; CPUs 3-5,15-17 taken out)\n"
            ),
            "{status}"
        );
        // Someone (irqbalance, an admin's echo) moves an IRQ back: status says so.
        let irq9 = "/proc/irq/9/smp_affinity_list";
        write(&root.path, irq9, "0-23\n");
        let status = stdout(&pvetune(&root.path, &["status", "101"]));
        assert!(
            status.contains(&format!(
                "{irq9}: 0-2,12-14 (original 0-23; CPUs 3-5,15-17 taken out) [changed outside pvetune: now 0-23]"
            )),
            "{status}"
        );
        write(&root.path, irq9, "0-2,12-14\n");
        // The kernel still fires an IRQ on a VM CPU (effective_affinity_list): status names it.
        let eff = "/proc/irq/24/effective_affinity_list";
        let was = fixture::read(&root.path, eff);
        write(&root.path, eff, "4\n");
        let status = stdout(&pvetune(&root.path, &["status", "101"]));
        assert!(
            status.contains("still firing on them (effective_affinity_list): /proc/irq/24"),
            "{status}"
        );
        write(&root.path, eff, &was);
        let (first, second) = if order[0] == 0 {
            ((100, &mut a), (101, &mut b))
        } else {
            ((101, &mut b), (100, &mut a))
        };
        stop(&root.path, first.0, first.1);
        let left: Vec<(u32, &str)> = VMS[..2]
            .iter()
            .filter(|(v, _)| *v == second.0)
            .copied()
            .collect();
        assert_irqs_off(&root.path, &left);
        stop(&root.path, second.0, second.1);
        assert_eq!(snapshot(&root.path), before, "stop order {order:?}");
    }
}

#[test]
fn plan_shows_every_irq_and_the_default_affinity_before_qemu_starts() {
    let root = host_copy("ryzen-5900x");
    let out = pvetune(&root.path, &["plan", "100", "--phase", "pre-start"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in [
        "/proc/irq/default_smp_affinity: ffffff -> 03f03f",
        "/proc/irq/0/smp_affinity_list: 0-23 -> 0-5,12-17",
        "/proc/irq/29/smp_affinity_list: 0,12 -> 0,12 (unchanged)",
        "/proc/irq/35/smp_affinity_list: 6,18 -> 0-5,12-17",
        "note: irqs: 23 IRQs off CPUs 6-11,18-23",
    ] {
        assert!(text.contains(line), "missing '{line}' in:\n{text}");
    }
}

/// The kernel refuses managed IRQs (EPERM on 6.12 and later, EIO on 6.8): the rest of the
/// batch is applied, the refused IRQ is reported and not held, and rollback restores the rest.
struct RefusesIrq<'a> {
    path: &'a Path,
    errno: i32,
}

impl Host for RefusesIrq<'_> {
    fn read(&self, path: &Path) -> io::Result<String> {
        RealHost.read(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        if path == self.path {
            return Err(io::Error::from_raw_os_error(self.errno));
        }
        RealHost.write(path, value)
    }
    fn get_affinity(&self, tid: i32) -> io::Result<pvetune::cpuset::CpuSet> {
        RealHost.get_affinity(tid)
    }
    fn set_affinity(&self, tid: i32, cpus: &pvetune::cpuset::CpuSet) -> io::Result<()> {
        RealHost.set_affinity(tid, cpus)
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        RealHost.mkdir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        RealHost.rmdir(path)
    }
}

fn exclude(irq: u32) -> Step {
    Step {
        tunable: "irqs",
        action: Action::Exclude {
            path: format!("/proc/irq/{irq}/smp_affinity_list"),
            cpus: set("6-11,18-23"),
            format: CpuFormat::List,
            fallback: set("0-5,12-17"),
            refusable: true,
        },
    }
}

#[test]
fn a_refused_irq_is_skipped_not_held_and_the_rest_rolls_back() {
    for errno in [
        nix::libc::EPERM,
        nix::libc::EIO,
        nix::libc::ENOSPC,
        nix::libc::EBUSY,
    ] {
        let tree = host_copy("ryzen-5900x");
        let before = snapshot(&tree.path);
        let root = Root::new(&tree.path);
        let store = Store::new(&root);
        let refused = root.path("/proc/irq/35/smp_affinity_list");
        let host = RefusesIrq {
            path: &refused,
            errno,
        };
        let steps = [exclude(0), exclude(35), exclude(36)];
        let mut exec = Executor::new(&root, &host, &store, store.load().unwrap(), 100);
        let applied = exec
            .apply(steps.to_vec())
            .expect("a refused IRQ is no failure");
        assert_eq!(applied.changed, 2);
        assert_eq!(applied.refused.len(), 1, "errno {errno}");
        assert_eq!(applied.refused[0].0, "/proc/irq/35/smp_affinity_list");
        let state = store.load().unwrap();
        assert!(!state.claims.contains_key("/proc/irq/35/smp_affinity_list"));
        assert!(state.claims.contains_key("/proc/irq/36/smp_affinity_list"));
        assert_eq!(
            read(&tree.path, "/proc/irq/36/smp_affinity_list"),
            "0-5,12-17\n"
        );
        let mut exec = Executor::new(&root, &host, &store, store.load().unwrap(), 100);
        assert!(exec.rollback(false).is_empty());
        assert_eq!(snapshot(&tree.path), before, "errno {errno}");
    }
}

#[test]
fn an_irq_that_is_not_refusable_fails_the_batch_and_is_undone() {
    let tree = host_copy("ryzen-5900x");
    let before = snapshot(&tree.path);
    let root = Root::new(&tree.path);
    let store = Store::new(&root);
    let refused = root.path("/proc/irq/default_smp_affinity");
    let host = RefusesIrq {
        path: &refused,
        errno: nix::libc::EINVAL,
    };
    let steps = vec![exclude(0), default_affinity()];
    let mut exec = Executor::new(&root, &host, &store, store.load().unwrap(), 100);
    exec.apply(steps)
        .expect_err("EINVAL on the default affinity is a failure");
    assert_eq!(snapshot(&tree.path), before);
    assert!(store.load().unwrap().claims.is_empty());
}

fn default_affinity() -> Step {
    Step {
        tunable: "irqs",
        action: Action::Exclude {
            path: "/proc/irq/default_smp_affinity".into(),
            cpus: set("6-11,18-23"),
            format: CpuFormat::Mask,
            fallback: set("0-5,12-17"),
            refusable: false,
        },
    }
}

/// More IRQs than a batch holds (`exec::CHUNK`) are made in several batches, of which only
/// the intents the ledger cannot take back are kept: a failure in the last batch (the default
/// affinity refused) still undoes them all. The IRQs that only VM 100 claimed come back from
/// the ledger, those that VM 101 held before get back VM 101's claim exactly, and the ledger
/// holds what it held before.
#[test]
fn a_failure_after_several_batches_of_irqs_undoes_them_all() {
    let tree = host_copy("ryzen-5900x");
    let first = 1000;
    let last = first + 2 * pvetune::exec::CHUNK as u32 + 100;
    for irq in first..last {
        let path = format!("/proc/irq/{irq}/smp_affinity_list");
        write(&tree.path, &path, "0-23\n");
    }
    let root = Root::new(&tree.path);
    let store = Store::new(&root);
    // VM 101 holds IRQs of the first and of the last batch.
    let theirs = |irq| Step {
        tunable: "irqs",
        action: Action::Exclude {
            path: format!("/proc/irq/{irq}/smp_affinity_list"),
            cpus: set("3-5,15-17"),
            format: CpuFormat::List,
            fallback: set("0-2,12-14"),
            refusable: true,
        },
    };
    let held: Vec<Step> = (first..first + 10)
        .chain(last - 10..last)
        .map(theirs)
        .collect();
    let mut other = Executor::new(&root, &RealHost, &store, store.load().unwrap(), 101);
    assert_eq!(other.apply(held).unwrap().changed, 20);
    let before = snapshot(&tree.path);
    let ledger = store.load().unwrap();

    let refused = root.path("/proc/irq/default_smp_affinity");
    let host = RefusesIrq {
        path: &refused,
        errno: nix::libc::EINVAL,
    };
    let mut steps: Vec<Step> = (first..last).map(exclude).collect();
    steps.push(default_affinity());
    let mut exec = Executor::new(&root, &host, &store, store.load().unwrap(), 100);
    exec.apply(steps.clone())
        .expect_err("EINVAL on the default affinity is a failure");
    assert_eq!(snapshot(&tree.path), before, "every IRQ as it was");
    let after = store.load().unwrap();
    assert_eq!(after.claims, ledger.claims, "VM 101's claims as they were");
    assert_eq!(after.vms, ledger.vms);

    // Without the failure: every IRQ off both VMs' CPUs, and both rollbacks give back all.
    steps.pop();
    let mut exec = Executor::new(&root, &RealHost, &store, store.load().unwrap(), 100);
    assert_eq!(exec.apply(steps).unwrap().changed as u32, last - first);
    assert_eq!(
        read(&tree.path, &format!("/proc/irq/{first}/smp_affinity_list")),
        "0-2,12-14\n"
    );
    assert_eq!(
        read(
            &tree.path,
            &format!("/proc/irq/{}/smp_affinity_list", first + 1500)
        ),
        "0-5,12-17\n"
    );
    assert!(exec.rollback(false).is_empty());
    assert_eq!(snapshot(&tree.path), before);
}

#[test]
fn a_running_irqbalance_is_warned_about() {
    let root = host_copy("ryzen-5900x");
    let plan = |root: &Path| stdout(&pvetune(root, &["plan", "100", "--phase", "pre-start"]));
    assert!(!plan(&root.path).contains("irqbalance"));
    write(&root.path, "/proc/4242/comm", "irqbalance\n");
    write(&root.path, "/proc/4243/comm", "irqbalance-ui\n");
    let text = plan(&root.path);
    assert!(
        text.contains(
            "warning: irqbalance runs (pid 4242) and will move IRQs back onto CPUs 6-11,18-23"
        ),
        "{text}"
    );
}

/// VM 100 crashes (no post-stop): the next hook on the node (VM 102's pre-start) rolls it
/// back, and the IRQs keep VM 101's CPUs out while they get VM 100's back.
#[test]
fn a_crashed_isolated_vm_gives_back_its_cpus_at_the_next_hook() {
    let root = host_copy("ryzen-5900x");
    add_vm(&root.path, 101, VMS[1].1);
    add_vm(&root.path, 102, VMS[2].1);
    let before = snapshot(&root.path);
    let mut a = start(&root.path, 100);
    let mut b = start(&root.path, 101);
    a.kill();
    let mut c = start(&root.path, 102);
    assert_irqs_off(&root.path, &VMS[1..]);
    stop(&root.path, 101, &mut b);
    stop(&root.path, 102, &mut c);
    assert_eq!(snapshot(&root.path), before);
}

/// IRQ 35 had only VM 100's CPUs (6,18), so with VM 100 running it is on the fallback, the
/// housekeeping CPUs; VM 101 joins the claim. Whichever stops first, the IRQ ends where the
/// other VM alone puts it: a stopped VM's CPUs come back to it. Before, the fallback recorded
/// was the latest claimer's housekeeping view, which had both VMs' CPUs out, and after VM 101
/// stopped the IRQ stayed off its CPUs (found by tests/crash_syscalls.rs).
#[test]
fn an_irq_on_the_fallback_gets_a_stopped_vms_cpus_back_in_either_stop_order() {
    let irq35 = "/proc/irq/35/smp_affinity_list";
    for first in [101u32, 100] {
        let root = host_copy("ryzen-5900x");
        add_vm(&root.path, 101, VMS[1].1);
        let before = snapshot(&root.path);
        let mut a = start(&root.path, 100);
        assert_eq!(set(read(&root.path, irq35).trim()), set("0-5,12-17"));
        let mut b = start(&root.path, 101);
        assert_eq!(set(read(&root.path, irq35).trim()), set("0-2,12-14"));
        let (alone, vm) = if first == 101 {
            ("0-5,12-17\n", &mut b)
        } else {
            ("6,18\n", &mut a)
        };
        stop(&root.path, first, vm);
        assert_eq!(read(&root.path, irq35), alone, "VM {first} stopped first");
        let (last, vm) = if first == 101 {
            (100, &mut a)
        } else {
            (101, &mut b)
        };
        stop(&root.path, last, vm);
        assert_eq!(snapshot(&root.path), before, "VM {first} stopped first");
    }
}
