//! The real binary against fixture roots shaped like the kernel's files: plans on real CPU
//! layouts, bad input refused without a change, apply -> rollback byte-identical, failures in
//! the middle of a phase, crashed VMs reconciled, and claims shared by two VMs.

mod fixture;

use fixture::{
    FakeVm, host_copy, pvetune, read, snapshot, start_vm as start, stderr, stdout, write,
};
use std::path::Path;

fn lines(out: &str) -> Vec<&str> {
    out.lines().map(str::trim).collect()
}

/// The post-start plan of VM `vmid` on the example host `host`.
fn post_start_plan(host: &str, vmid: &str) -> String {
    let host = fixture::example_host(host);
    let out = pvetune(&host, &["plan", vmid, "--phase", "post-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// Asserts that the plan (VM not running) pins each vCPU on its host CPU.
fn assert_vcpu_pins(text: &str, pins: &[(u32, u32)]) {
    let l = lines(text);
    for (vcpu, cpu) in pins {
        assert!(
            l.contains(&format!("vCPU {vcpu} (not running): - -> {cpu}").as_str()),
            "vCPU {vcpu} -> {cpu}: {text}"
        );
    }
}

#[test]
fn plan_on_ryzen_pairs_guest_siblings_with_host_siblings() {
    let text = post_start_plan("ryzen-5900x", "100");
    let l = lines(&text);
    // Guest core k (vCPUs 2k, 2k+1) -> host core 6+k (CPUs 6+k and 18+k): the seed's
    // libvirt layout, derived from sysfs instead of a hard-coded table.
    assert_vcpu_pins(
        &text,
        &[(0, 6), (1, 18), (2, 7), (3, 19), (10, 11), (11, 23)],
    );
    assert!(
        l.contains(&"emulator threads (not running): - -> 0-5,12-17"),
        "{text}"
    );
    assert!(
        l.contains(&"iothreads (not running): - -> 0-5,12-17"),
        "{text}"
    );
    assert!(
        l.contains(&"/proc/sys/vm/stat_interval: 1 -> 120"),
        "{text}"
    );
    let governors = l
        .iter()
        .filter(|s| s.contains("scaling_governor: schedutil -> performance"))
        .count();
    assert_eq!(governors, 12, "{text}");
}

#[test]
fn plan_on_xeon_puts_one_vcpu_per_core_on_node_1() {
    let text = post_start_plan("xeon-2s", "200");
    let l = lines(&text);
    let pins: Vec<(u32, u32)> = (0..8).map(|vcpu| (vcpu, 8 + vcpu)).collect();
    assert_vcpu_pins(&text, &pins);
    assert!(l.contains(&"iothreads (not running): - -> 24-31"), "{text}");
    assert!(
        l.contains(&"emulator threads (not running): - -> 0-7,16-31"),
        "{text}"
    );
    // intel_pstate: one policy per CPU.
    assert!(
        l.contains(
            &"/sys/devices/system/cpu/cpufreq/policy8/scaling_governor: powersave -> performance"
        ),
        "{text}"
    );
}

/// The Xeon example host is a Proxmox VE 8 node on kernel 6.8: its VM 200's isolated
/// partition needs `cpuset.cpus` beside each `cpuset.cpus.exclusive` (qemu.slice, the scope:
/// every online CPU; vcpus: the VM's), each right after it, and the plan says why.
#[test]
fn plan_on_xeon_a_kernel_6_8_host_writes_cpuset_cpus_beside_each_exclusive() {
    let text = post_start_plan("xeon-2s", "200");
    let l = lines(&text);
    let cg = "/sys/fs/cgroup/qemu.slice";
    for (dir, cpus) in [
        (cg.to_string(), "0-31"),
        (format!("{cg}/200.scope"), "0-31"),
        (format!("{cg}/200.scope/vcpus"), "8-15"),
    ] {
        let exclusive = format!("{dir}/cpuset.cpus.exclusive: (empty) -> 8-15");
        let at = l.iter().position(|line| *line == exclusive);
        let at = at.unwrap_or_else(|| panic!("no {exclusive}: {text}"));
        assert_eq!(
            l[at + 1],
            format!("{dir}/cpuset.cpus: (empty) -> {cpus}"),
            "{text}"
        );
    }
    assert!(
        text.contains("kernel 6.8.12-4-pve also needs cpuset.cpus on qemu.slice"),
        "{text}"
    );
}

#[test]
fn plan_on_hybrid_keeps_p_core_pairs() {
    let text = post_start_plan("intel-hybrid", "300");
    let l = lines(&text);
    assert_vcpu_pins(&text, &[(0, 8), (1, 9), (2, 10), (7, 15)]);
    // Housekeeping: the other P-cores and the E-cores.
    assert!(
        l.contains(&"emulator threads (not running): - -> 0-7,16-19"),
        "{text}"
    );
}

#[test]
fn auto_layout_on_cores_without_smt_is_cores_first() {
    // The guest has SMT and so do the host's P-cores, but the VM owns only E-cores: pairs of
    // host siblings do not exist inside its CPUs, so `auto` spreads the vCPUs over cores.
    let root = host_copy("intel-hybrid");
    write(&root.path, "/etc/pve/pvetune/300.yaml", "cpus: 16-19\n");
    let conf = root.path.join("etc/pve/qemu-server/300.conf");
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        "-smp 8,sockets=1,cores=4,threads=2",
        "-smp 4,sockets=1,cores=2,threads=2",
    );
    std::fs::write(&conf, text).unwrap();
    let out = pvetune(&root.path, &["plan", "300", "--phase", "post-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_vcpu_pins(&text, &[(0, 16), (1, 17), (2, 18), (3, 19)]);
    assert!(text.contains("layout cores-first"), "{text}");
}

#[test]
fn plan_without_cpufreq_says_the_governor_is_skipped() {
    let host = fixture::example_host("guest-nocpufreq");
    let out = pvetune(&host, &["plan", "400"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("skip governor: no cpufreq on CPU 4-7"),
        "{text}"
    );
    assert!(
        text.contains("pre-start:") && text.contains("post-start:"),
        "{text}"
    );
}

#[test]
fn plan_writes_nothing() {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    for phase in ["pre-start", "post-start", "pre-stop", "post-stop"] {
        let out = pvetune(&root.path, &["plan", "100", "--phase", phase]);
        assert!(out.status.success(), "{phase}: {}", stderr(&out));
    }
    assert_eq!(snapshot(&root.path), before);
    assert!(
        !root.path.join("run").exists(),
        "plan created its state directory"
    );
}

#[test]
fn cpu_not_on_host_is_refused_with_its_line_and_nothing_changes() {
    let root = host_copy("ryzen-5900x");
    write(
        &root.path,
        "/etc/pve/pvetune/100.yaml",
        "# comment\ncpus: 20-31\n",
    );
    let before = snapshot(&root.path);
    for args in [
        &["100", "pre-start"][..],
        &["check", "100"],
        &["plan", "100"],
    ] {
        let out = pvetune(&root.path, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains("100.yaml:2:7: cpus: CPU 24-31 does not exist or is offline on this host (online: 0-23)"), "{err}");
    }
    assert_eq!(snapshot(&root.path), before);
}

#[test]
fn bad_input_is_refused_before_anything_changes() {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    let cases: [(&str, &[&str], &str); 5] = [
        (
            "cpus: 6-11,18-23\ngovernor: performance\npinning: yes\n",
            &["100", "pre-start"],
            "100.yaml:3:1: unknown field `pinning`",
        ),
        (
            "cpus: 6-11,18-23\ngovernor: turbo\n",
            &["100", "pre-start"],
            "100.yaml:2:11: governor: 'turbo' is not available on CPU 6",
        ),
        (
            "cpus: 6-11,18-23\nsysctl:\n  vm.no_such_knob: 1\n",
            &["100", "pre-start"],
            "no such sysctl",
        ),
        (
            "cpus: 6-11,18-23\n",
            &["100", "started"],
            "unknown phase 'started'",
        ),
        (
            "cpus: 6-11,18-23\n",
            &["../100", "pre-start"],
            "invalid VMID",
        ),
    ];
    for (profile, args, expected) in cases {
        write(&root.path, "/etc/pve/pvetune/100.yaml", profile);
        let out = pvetune(&root.path, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
    }

    // The profile file of the tests above was rewritten; the rest of the host is untouched.
    let mut after = snapshot(&root.path);
    after.remove("etc/pve/pvetune/100.yaml");
    let mut expected = before.clone();
    expected.remove("etc/pve/pvetune/100.yaml");
    assert_eq!(after, expected);
}

#[test]
fn profile_writable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let root = host_copy("ryzen-5900x");
    let path = root.path.join("etc/pve/pvetune/100.yaml");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = pvetune(&root.path, &["100", "pre-start"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("has mode 666: writable by group or others"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn vm_without_profile_is_left_alone() {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    for phase in ["pre-start", "post-start", "pre-stop", "post-stop"] {
        let out = pvetune(&root.path, &["101", phase]);
        assert!(out.status.success(), "{phase}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "{phase}");
    }
    assert_eq!(snapshot(&root.path), before);
    assert!(!root.path.join("run/pvetune/state.json").exists());
}

fn stop(root: &Path, vmid: u32, vm: &mut FakeVm) {
    let id = vmid.to_string();
    assert!(pvetune(root, &[&id, "pre-stop"]).status.success());
    vm.kill();
    let out = pvetune(root, &[&id, "post-stop"]);
    assert!(out.status.success(), "post-stop: {}", stderr(&out));
}

const GOV6: &str = "/sys/devices/system/cpu/cpufreq/policy6/scaling_governor";
const STAT: &str = "/proc/sys/vm/stat_interval";

#[test]
fn apply_then_rollback_leaves_the_tree_byte_identical() {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    let mut vm = start(&root.path, 100);
    assert_eq!(read(&root.path, GOV6), "performance\n");
    assert_eq!(read(&root.path, STAT), "120\n");
    let status = stdout(&pvetune(&root.path, &["status"]));
    assert!(
        status.contains(&format!("VM 100: running (pid {})", vm.pid)),
        "{status}"
    );
    assert!(
        status.contains("/proc/sys/vm/stat_interval: 1 -> 120 (VM 100=120)"),
        "{status}"
    );
    let plan = stdout(&pvetune(
        &root.path,
        &["plan", "100", "--phase", "post-stop"],
    ));
    assert!(
        plan.contains("/proc/sys/vm/stat_interval: 120 -> 1"),
        "{plan}"
    );
    stop(&root.path, 100, &mut vm);
    assert_eq!(snapshot(&root.path), before);
    assert!(!root.path.join("run/pvetune/state.json").exists());
}

#[test]
fn emulator_thread_of_the_running_vm_is_pinned_and_restored() {
    let root = host_copy("ryzen-5900x");
    let out = pvetune(&root.path, &["100", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let vm = FakeVm::start(&root.path, 100);
    let original = affinity(vm.pid);
    // Only CPUs that exist here can be checked; the fixture's housekeeping set contains 0.
    let out = pvetune(&root.path, &["100", "post-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pinned = affinity(vm.pid);
    assert!(
        pinned.split(',').all(|r| !r.contains("6")),
        "pinned to {pinned}"
    );
    let out = pvetune(&root.path, &["100", "post-stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(affinity(vm.pid), original);
}

fn affinity(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn failure_in_the_middle_of_post_start_undoes_that_phase() {
    let root = host_copy("ryzen-5900x");
    let out = pvetune(&root.path, &["100", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // What pre-start did (the IRQs) stays: only post-start's own changes are undone.
    let before = snapshot(&root.path);
    let _vm = FakeVm::start(&root.path, 100);
    // The last governor policy of the VM's CPUs cannot be written (a directory where the
    // attribute should be): the 11 governors before it and the pins must be undone.
    let last = root
        .path
        .join("sys/devices/system/cpu/cpufreq/policy23/scaling_governor");
    std::fs::remove_file(&last).unwrap();
    std::fs::create_dir(&last).unwrap();
    let out = pvetune(&root.path, &["100", "post-start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("post-start failed") && err.contains("policy23/scaling_governor"),
        "{err}"
    );
    assert!(
        err.contains("every change of this phase was undone"),
        "{err}"
    );
    std::fs::remove_dir(&last).unwrap();
    std::fs::write(&last, "schedutil\n").unwrap();
    assert_eq!(snapshot(&root.path), before);
}

#[test]
fn crashed_vm_is_rolled_back_by_the_next_hook() {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    let mut vm = start(&root.path, 100);
    assert_eq!(read(&root.path, STAT), "120\n");
    vm.kill(); // no post-stop: QEMU crashed, or the node's qmeventd missed it
    write(&root.path, "/etc/pve/pvetune/102.yaml", "cpus: 0-1\n");
    write(
        &root.path,
        "/etc/pve/qemu-server/102.conf",
        "cores: 2\nmemory: 512\n",
    );
    let out = pvetune(&root.path, &["102", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("VM 100 no longer runs"),
        "{}",
        stderr(&out)
    );
    let mut after = snapshot(&root.path);
    for f in ["etc/pve/pvetune/102.yaml", "etc/pve/qemu-server/102.conf"] {
        after.remove(f);
    }
    assert_eq!(after, before);
}

#[test]
fn rollback_command_undoes_a_vm() {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    let _vm = start(&root.path, 100);
    let out = pvetune(&root.path, &["rollback", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(snapshot(&root.path), before);
    assert!(stdout(&pvetune(&root.path, &["status"])).contains("holds nothing"));
}

#[test]
fn overlapping_cpus_of_a_running_vm_are_refused() {
    let root = host_copy("ryzen-5900x");
    let _vm = start(&root.path, 100);
    write(&root.path, "/etc/pve/pvetune/102.yaml", "cpus: 10-13\n");
    write(
        &root.path,
        "/etc/pve/qemu-server/102.conf",
        "cores: 2\nmemory: 512\n",
    );
    let out = pvetune(&root.path, &["102", "pre-start"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("CPU 10-11 is already owned by running VM 100"),
        "{}",
        stderr(&out)
    );
}

/// Two VMs claim the same sysctl; each order of stopping ends with the original value.
fn shared_sysctl(stop_first: u32) {
    let root = host_copy("ryzen-5900x");
    let before = snapshot(&root.path);
    write(
        &root.path,
        "/etc/pve/pvetune/102.yaml",
        "cpus: 4-5\nsysctl:\n  vm.stat_interval: 60\n",
    );
    write(
        &root.path,
        "/etc/pve/qemu-server/102.conf",
        "cores: 2\nmemory: 512\n",
    );
    let mut a = start(&root.path, 100);
    assert_eq!(read(&root.path, STAT), "120\n");
    let mut b = start(&root.path, 102);
    assert_eq!(read(&root.path, STAT), "60\n");
    if stop_first == 100 {
        stop(&root.path, 100, &mut a);
        assert_eq!(
            read(&root.path, STAT),
            "60\n",
            "VM 102 still needs its value"
        );
        stop(&root.path, 102, &mut b);
    } else {
        stop(&root.path, 102, &mut b);
        assert_eq!(
            read(&root.path, STAT),
            "120\n",
            "VM 100 still needs its value"
        );
        stop(&root.path, 100, &mut a);
    }
    let mut after = snapshot(&root.path);
    for f in ["etc/pve/pvetune/102.yaml", "etc/pve/qemu-server/102.conf"] {
        after.remove(f);
    }
    assert_eq!(after, before);
}

#[test]
fn shared_sysctl_first_started_stops_first() {
    shared_sysctl(100);
}

#[test]
fn shared_sysctl_last_started_stops_first() {
    shared_sysctl(102);
}

#[test]
fn backup_start_gets_no_isolation() {
    let root = host_copy("ryzen-5900x");
    let conf = root.path.join("etc/pve/qemu-server/100.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("lock: backup\n");
    std::fs::write(&conf, text).unwrap();
    let _vm = start(&root.path, 100);
    assert_eq!(read(&root.path, STAT), "1\n");
}

#[test]
fn a_vm_between_pre_start_and_post_start_is_not_reconciled_away() {
    use nix::fcntl::{Flock, FlockArg};
    let root = host_copy("ryzen-5900x");
    let out = pvetune(&root.path, &["100", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // qemu-server holds VM 100's config lock for the whole start.
    write(&root.path, "/var/lock/qemu-server/lock-100.conf", "");
    let file = std::fs::File::open(root.path.join("var/lock/qemu-server/lock-100.conf")).unwrap();
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    write(&root.path, "/etc/pve/pvetune/102.yaml", "cpus: 10-13\n");
    write(
        &root.path,
        "/etc/pve/qemu-server/102.conf",
        "cores: 2\nmemory: 512\n",
    );
    let out = pvetune(&root.path, &["102", "pre-start"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "VM 100 is starting and owns 10-11"
    );
    assert!(
        stderr(&out).contains("already owned by running VM 100"),
        "{}",
        stderr(&out)
    );
    // Once the start is over without a QEMU (the start failed), the next hook cleans up.
    drop(lock);
    let out = pvetune(&root.path, &["102", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("VM 100 no longer runs"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn plan_warns_when_vcpus_run_away_from_their_guest_numa_memory() {
    let root = host_copy("xeon-2s");
    let plan = stdout(&pvetune(
        &root.path,
        &["plan", "200", "--phase", "post-start"],
    ));
    assert!(!plan.contains("remote memory"), "{plan}");
    let conf = root.path.join("etc/pve/qemu-server/200.conf");
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("hostnodes=1", "hostnodes=0");
    std::fs::write(&conf, text).unwrap();
    let plan = stdout(&pvetune(
        &root.path,
        &["plan", "200", "--phase", "post-start"],
    ));
    assert!(
        plan.contains("guest NUMA node 0 has its memory on host node 0 but its vCPUs would run on CPU 8-15 of another node"),
        "{plan}"
    );
}
