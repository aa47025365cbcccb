//! `isolation: {irqs: true, irqbalance: ban}` on the Ryzen 5900X fixture host with a fake
//! irqbalance (tests/fake_irqbalance) serving its socket under the fixture root: the hooks run
//! as the real binary (`--root`), and irqbalance's banned CPUs are a composed claim: its own
//! ban plus every running VM's CPUs, in any stop order, the last stop sending back exactly
//! what it had (`NULL`, or the explicit list). An irqbalance that is gone, refuses or hangs
//! never fails a hook. The real irqbalance is never run.

mod fake_irqbalance;
mod fixture;

use fake_irqbalance::{Fake, Mode, our_uid};
use fixture::{
    FakeVm, host_copy, pvetune, read, snapshot, start_vm as start, stderr, stdout, write,
};
use pvetune::cpuset::CpuSet;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

/// The fake irqbalance's pid: `/proc/4242/comm` in the fixture says `irqbalance`.
const PID: u32 = 4242;
const SOCKET: &str = "/run/irqbalance/irqbalance4242.sock";
/// What the fake irqbalance detects by itself (`IRQBALANCE_BANNED_CPULIST` in its environ).
const DETECTED: &str = "2";
const VMS: [(u32, &str); 3] = [(100, "6-11,18-23"), (101, "3-5,15-17"), (102, "1-2,13-14")];

fn add_vm(root: &Path, vmid: u32, cpus: &str) {
    write(
        root,
        &format!("/etc/pve/pvetune/{vmid}.yaml"),
        &format!("cpus: {cpus}\nvcpus: sequential\nisolation:\n  irqs: true\n  irqbalance: ban\n"),
    );
    write(
        root,
        &format!("/etc/pve/qemu-server/{vmid}.conf"),
        "cores: 2\nmemory: 512\n",
    );
}

/// The fixture host with the three VMs' profiles, and irqbalance's process in its /proc.
fn host() -> fixture::Root {
    let root = host_copy("ryzen-5900x");
    for (vmid, cpus) in VMS {
        add_vm(&root.path, vmid, cpus);
    }
    write(&root.path, &format!("/proc/{PID}/comm"), "irqbalance\n");
    write(
        &root.path,
        &format!("/proc/{PID}/environ"),
        &format!("PATH=/usr/bin\0IRQBALANCE_BANNED_CPULIST={DETECTED}\0"),
    );
    root
}

fn irqbalance(root: &Path) -> Fake {
    Fake::start(root, PID, DETECTED, Mode::Irqbalance, None, our_uid())
}

type Tree = std::collections::BTreeMap<String, Vec<u8>>;

/// The host as it was, and irqbalance with `vmids` started.
fn running(vmids: &[u32]) -> (fixture::Root, Tree, Fake, Vec<FakeVm>) {
    let root = host();
    let before = snapshot(&root.path);
    let fake = irqbalance(&root.path);
    let vms = vmids.iter().map(|&vmid| start(&root.path, vmid)).collect();
    (root, before, fake, vms)
}

/// The VM stops; post-stop's log.
fn stop(root: &Path, vmid: u32, vm: &mut FakeVm) -> String {
    vm.kill();
    let out = pvetune(root, &[&vmid.to_string(), "post-stop"]);
    assert!(out.status.success(), "post-stop {vmid}: {}", stderr(&out));
    stderr(&out)
}

/// `text` (a command's output or log) has `line` in it.
#[track_caller]
fn has(text: &str, line: &str) {
    assert!(text.contains(line), "no '{line}' in:\n{text}");
}

fn set(s: &str) -> CpuSet {
    s.parse().unwrap()
}

/// What irqbalance should ban with `running` VMs, from its own ban `base`.
fn want(base: &str, running: &[(u32, &str)]) -> CpuSet {
    running
        .iter()
        .fold(set(base), |acc, (_, cpus)| acc.union(&set(cpus)))
}

fn ledger_is_empty(root: &Path) -> bool {
    !root.join("run/pvetune/state.json").exists()
}

/// The tree is byte for byte `before`, and pvetune holds nothing.
#[track_caller]
fn as_before(root: &Path, before: &Tree) {
    assert_eq!(snapshot(root), *before);
    assert!(ledger_is_empty(root));
}

/// `vms` start, then stop in `order`: after each step irqbalance bans its own CPUs and
/// exactly the running VMs'; the last stop sends `restore` (`NULL`: irqbalance detects again).
fn stop_in(vms: &[(u32, &'static str)], order: &[usize], explicit: Option<&str>) {
    let root = host();
    let fake = irqbalance(&root.path);
    fake.state.lock().unwrap().ui = explicit.map(str::to_string);
    let base = explicit.unwrap_or(DETECTED);
    let before = snapshot(&root.path);
    let mut running: Vec<(u32, &str)> = Vec::new();
    let mut started = Vec::new();
    for &(vmid, cpus) in vms {
        started.push(Some(start(&root.path, vmid)));
        running.push((vmid, cpus));
        assert_eq!(fake.banned(), want(base, &running), "started {running:?}");
    }
    for &i in order {
        let (vmid, _) = vms[i];
        stop(&root.path, vmid, started[i].as_mut().unwrap());
        running.retain(|(v, _)| *v != vmid);
        assert_eq!(
            fake.banned(),
            want(base, &running),
            "stop order {order:?}, {running:?} left"
        );
    }
    let commands = fake.finish();
    let restore = format!("settings cpus {}", explicit.unwrap_or("NULL"));
    assert_eq!(commands.last(), Some(&restore), "{commands:?}");
    assert_eq!(snapshot(&root.path), before, "stop order {order:?}");
    assert!(ledger_is_empty(&root.path));
}

#[test]
fn two_vms_ban_their_cpus_in_both_stop_orders() {
    for order in [[0, 1], [1, 0]] {
        stop_in(&VMS[..2], &order, None);
    }
}

#[test]
fn three_vms_ban_their_cpus_in_every_stop_order() {
    let mut orders = 0;
    for a in 0..3 {
        for b in (0..3).filter(|&b| b != a) {
            stop_in(&VMS, &[a, b, 3 - a - b], None);
            orders += 1;
        }
    }
    assert_eq!(orders, 6);
}

#[test]
fn an_explicit_ban_is_given_back_as_it_was() {
    // Someone set `settings cpus 0` (irqbalance-ui): it replaced the detection (2).
    for order in [[0, 1], [1, 0]] {
        stop_in(&VMS[..2], &order, Some("0"));
    }
}

#[test]
fn plan_and_status_show_the_ban() {
    let root = host();
    let fake = irqbalance(&root.path);
    let plan = |vmid: &str, phase: &str| {
        let out = pvetune(&root.path, &["plan", vmid, "--phase", phase]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let text = plan("100", "pre-start");
    has(
        &text,
        &format!("irqbalance ban ({SOCKET}): 2 -> 2,6-11,18-23\n"),
    );
    has(
        &text,
        "irqbalance (pid 4242) is told to ban CPUs 6-11,18-23",
    );
    assert!(!text.contains("warning"), "{text}");
    let mut a = start(&root.path, 100);
    let text = plan("101", "pre-start");
    has(
        &text,
        &format!("irqbalance ban ({SOCKET}): 2,6-11,18-23 -> 2-11,15-23\n"),
    );
    let mut b = start(&root.path, 101);
    let status = stdout(&pvetune(&root.path, &["status", "100"]));
    has(
        &status,
        &format!("{SOCKET}: irqbalance bans 2-11,15-23 (original NULL; CPUs 6-11,18-23 banned)\n"),
    );
    let status = stdout(&pvetune(&root.path, &["status"]));
    has(
        &status,
        &format!("{SOCKET}: NULL -> 2-11,15-23 (VM 100 bans 6-11,18-23, VM 101 bans 3-5,15-17)\n"),
    );
    // Someone resets irqbalance behind pvetune's back: status says so.
    fake.state.lock().unwrap().ui = None;
    let status = stdout(&pvetune(&root.path, &["status", "101"]));
    has(
        &status,
        "CPUs 3-5,15-17 banned) [changed outside pvetune: now 2]",
    );
    let text = plan("100", "post-stop");
    has(
        &text,
        &format!(
            "note: {SOCKET}: settings cpus 2-5,15-17 (irqbalance's ban without this VM's CPUs)"
        ),
    );
    stop(&root.path, 100, &mut a);
    let text = plan("101", "post-stop");
    has(
        &text,
        &format!("note: {SOCKET}: settings cpus NULL (irqbalance's ban as it was)"),
    );
    stop(&root.path, 101, &mut b);
    assert_eq!(fake.finish().last().unwrap(), "settings cpus NULL");
}

#[test]
fn an_irqbalance_gone_before_post_stop_is_dropped_and_the_vms_stop_cleanly() {
    let (root, before, fake, mut vms) = running(&[100, 101]);
    let [a, b] = &mut vms[..] else { unreachable!() };
    // irqbalance exits cleanly (it removes its socket); its process is still being reaped.
    let socket = fake.socket.clone();
    drop(fake);
    std::fs::remove_file(&socket).unwrap();
    let log = stop(&root.path, 100, a);
    has(&log, "does not exist");
    has(&log, "VM 100's ban dropped, nothing to give back");
    // Then it is gone for good: killed hard, its stale socket left behind.
    drop(UnixListener::bind(&socket).unwrap());
    std::fs::remove_file(root.path.join(format!("proc/{PID}/comm"))).unwrap();
    let log = stop(&root.path, 101, b);
    has(&log, "the process is gone: VM 101's ban dropped");
    as_before(&root.path, &before);
}

#[test]
fn a_release_a_hung_irqbalance_does_not_take_stays_held_and_is_retried() {
    let (root, before, fake, mut vms) = running(&[100]);
    assert_eq!(fake.finish().last().unwrap(), "settings cpus 2,6-11,18-23");
    // irqbalance hangs (reads commands, never closes): the stop is not held up by it.
    let hung = Fake::start(&root.path, PID, DETECTED, Mode::Silent, None, our_uid());
    hung.state.lock().unwrap().ui = Some("2,6-11,18-23".into());
    let log = stop(&root.path, 100, &mut vms[0]);
    has(
        &log,
        "VM 100's ban stays held; the next hook on this node retries",
    );
    let status = stdout(&pvetune(&root.path, &["status"]));
    has(
        &status,
        &format!("{SOCKET}: NULL -> 2,6-11,18-23 (VM 100 bans"),
    );
    has(&status, "not done within the deadline");
    // The release, then status's reads (per VM and node-wide), each cut off at its deadline.
    assert_eq!(hung.finish(), ["settings cpus NULL", "setup", "setup"]);
    // It answers again: the rollback gives irqbalance its detection back.
    let fake = irqbalance(&root.path);
    fake.state.lock().unwrap().ui = Some("2,6-11,18-23".into());
    let out = pvetune(&root.path, &["rollback", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fake.finish(), ["settings cpus NULL"]);
    as_before(&root.path, &before);
}

#[test]
fn a_refusing_socket_is_a_warning_and_the_irqs_still_move() {
    let root = host();
    let before = snapshot(&root.path);
    // A stale socket: irqbalance killed hard, or restarting.
    let socket = root.path.join(&SOCKET[1..]);
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(UnixListener::bind(&socket).unwrap());
    let out = pvetune(&root.path, &["100", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    has(&log, "refuses connections");
    has(&log, "CPUs 6-11,18-23 not banned in irqbalance");
    assert_eq!(
        read(&root.path, "/proc/irq/0/smp_affinity_list"),
        "0-5,12-17\n"
    );
    let status = stdout(&pvetune(&root.path, &["status"]));
    assert!(!status.contains(SOCKET), "{status}");
    let mut vm = FakeVm::start(&root.path, 100);
    stop(&root.path, 100, &mut vm);
    assert_eq!(snapshot(&root.path), before);
}

#[test]
fn without_its_socket_ban_is_the_warning_with_the_reason() {
    let root = host();
    let out = pvetune(&root.path, &["plan", "100", "--phase", "pre-start"]);
    let text = stdout(&out);
    has(
        &text,
        "warning: irqbalance runs (pid 4242) and will move IRQs back onto CPUs \
             6-11,18-23; it cannot be told to ban them: /run/irqbalance/irqbalance4242.sock \
             does not exist",
    );
    assert!(!text.contains("irqbalance ban ("), "{text}");
}

#[test]
fn a_hung_irqbalance_holds_pre_start_for_one_deadline_only() {
    let root = host();
    let fake = Fake::start(&root.path, PID, DETECTED, Mode::Silent, None, our_uid());
    let t = Instant::now();
    let out = pvetune(&root.path, &["100", "pre-start"]);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("within the deadline"),
        "{}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(5), "pre-start took {took:?}");
    assert_eq!(fake.finish(), ["setup"]);
    let out = pvetune(&root.path, &["rollback", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// irqbalance answers `setup` in the plan stage, then goes away before the ban is sent: the
/// batch goes on (the IRQ is moved), the claim goes back to what it was (none), and the ban is
/// not counted as an IRQ the kernel refused.
#[test]
fn a_ban_that_fails_when_sent_is_skipped_not_held() {
    use pvetune::cpuset::CpuFormat;
    use pvetune::exec::Executor;
    use pvetune::host::RealHost;
    use pvetune::plan::{Action, Step};
    use pvetune::root::Root;
    use pvetune::state::Store;
    let tree = host();
    let fake = Fake::start(
        &tree.path,
        PID,
        DETECTED,
        Mode::Irqbalance,
        Some(1),
        our_uid(),
    );
    let root = Root::new(&tree.path);
    let store = Store::new(&root);
    let steps = [
        Step {
            tunable: "irqs",
            action: Action::Exclude {
                path: "/proc/irq/0/smp_affinity_list".into(),
                cpus: set("6-11,18-23"),
                format: CpuFormat::List,
                fallback: set("0-5,12-17"),
                refusable: true,
            },
        },
        Step {
            tunable: "irqbalance",
            action: Action::Ban {
                socket: SOCKET.into(),
                cpus: set("6-11,18-23"),
            },
        },
    ];
    let mut exec = Executor::new(&root, &RealHost, &store, store.load().unwrap(), 100);
    // The fake serves the plan stage's `setup`, then stops listening: the send fails (refused,
    // or reset while queued).
    let applied = exec
        .apply(steps.to_vec())
        .expect("a failed ban is no failure");
    assert_eq!(fake.finish(), ["setup"]);
    assert_eq!(applied.changed, 1);
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
    let state = store.load().unwrap();
    assert!(!state.claims.contains_key(SOCKET));
    assert!(state.claims.contains_key("/proc/irq/0/smp_affinity_list"));
    let mut exec = Executor::new(&root, &RealHost, &store, state, 100);
    assert!(exec.rollback(false).is_empty());
    assert!(store.load().unwrap().is_empty());
}
