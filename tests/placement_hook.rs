//! Placement through real hook runs on a fixture tree of the 5900X: the CPUs chosen at
//! pre-start are recorded in the ledger and used by post-start; two VMs never overlap; a third
//! that does not fit fails pre-start (exit 2) with the message and changes nothing; stopping
//! one frees exactly its CPUs.

mod fixture;

use fixture::{FakeVm, host_copy, pvetune, snapshot, start_vm, stderr, stdout, write};
use std::collections::BTreeMap;
use std::path::Path;

/// The CPUs the ledger records per VM (read as pvetune reads it: snapshot and journal).
fn owned(root: &Path) -> BTreeMap<u32, String> {
    let store = pvetune::state::Store::new(&pvetune::root::Root::new(root));
    let state = store.load().expect("ledger");
    state
        .vms
        .iter()
        .map(|(id, rec)| (*id, rec.cpus.to_string()))
        .collect()
}

/// A VM with a portable profile and `vcpus` vCPUs (guest SMT when even).
fn portable_vm(root: &Path, vmid: u32, vcpus: u32, extra: &str) {
    write(
        root,
        &format!("/etc/pve/pvetune/{vmid}.yaml"),
        &format!("cpus:\n  smt: prefer\n{extra}"),
    );
    let smp = if vcpus.is_multiple_of(2) {
        format!(
            "args: -smp {vcpus},sockets=1,cores={},threads=2\n",
            vcpus / 2
        )
    } else {
        String::new()
    };
    write(
        root,
        &format!("/etc/pve/qemu-server/{vmid}.conf"),
        &format!("{smp}cores: {vcpus}\nmemory: 2048\nsockets: 1\n"),
    );
}

fn stop(root: &Path, vmid: u32, vm: &mut FakeVm) {
    vm.kill();
    let out = pvetune(root, &[&vmid.to_string(), "post-stop"]);
    assert!(out.status.success(), "post-stop: {}", stderr(&out));
}

#[test]
fn two_placed_vms_never_overlap_a_third_fails_and_a_stop_frees_exactly_its_cpus() {
    let root = host_copy("ryzen-5900x");
    let pristine = snapshot(&root.path);
    portable_vm(&root.path, 120, 12, "");
    portable_vm(&root.path, 121, 8, "");
    portable_vm(&root.path, 122, 4, "");
    let mut a = start_vm(&root.path, 120);
    assert_eq!(
        owned(&root.path),
        BTreeMap::from([(120, "6-11,18-23".into())])
    );
    let mut b = start_vm(&root.path, 121);
    let held = owned(&root.path);
    assert_eq!(held[&121], "1-4,13-16");

    // The third does not fit: pre-start fails before any change, and says why.
    let before = snapshot(&root.path);
    let out = pvetune(&root.path, &["122", "pre-start"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("122.yaml:2:3: cpus: nothing fits: asked 4 CPUs (smt prefer)"),
        "{err}"
    );
    assert!(err.contains("this host has CPU 5,17 free"), "{err}");
    assert!(
        err.contains("held by running VMs: VM 120: 6-11,18-23, VM 121: 1-4,13-16"),
        "{err}"
    );
    assert_eq!(
        snapshot(&root.path),
        before,
        "a refused start changes nothing"
    );

    // Stopping VM 120 frees exactly its CPUs: VM 121 keeps its own, 122 now fits.
    stop(&root.path, 120, &mut a);
    assert_eq!(
        owned(&root.path),
        BTreeMap::from([(121, "1-4,13-16".into())])
    );
    let mut c = start_vm(&root.path, 122);
    let held = owned(&root.path);
    assert_eq!(held[&121], "1-4,13-16");
    assert_eq!(held[&122], "6-7,18-19", "the freed CCD, tightest fit");
    stop(&root.path, 122, &mut c);
    stop(&root.path, 121, &mut b);
    assert!(owned(&root.path).is_empty());
    let mut after = snapshot(&root.path);
    after.retain(|k, _| !k.contains("/12"));
    let mut want = pristine;
    want.retain(|k, _| !k.contains("/12"));
    assert_eq!(after, want, "every change undone");
}

#[test]
fn post_start_uses_the_cpus_recorded_at_pre_start() {
    let root = host_copy("ryzen-5900x");
    portable_vm(&root.path, 120, 4, "");
    let out = pvetune(&root.path, &["120", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(owned(&root.path)[&120], "1-2,13-14");
    // The profile changes between the phases (a new placement would give 2 CPUs now): the
    // running VM keeps what pre-start placed and recorded.
    portable_vm(&root.path, 120, 4, "  count: 2\n");
    let _vm = FakeVm::start(&root.path, 120);
    let plan = pvetune(&root.path, &["plan", "120", "--phase", "post-start"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let text = stdout(&plan);
    // The stand-in QEMU's one thread is an emulator thread: on the CPUs the VM does not own.
    assert!(text.contains("-> 0,3-12,15-23"), "{text}");
    let out = pvetune(&root.path, &["120", "post-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(owned(&root.path)[&120], "1-2,13-14");
}

#[test]
fn a_profile_without_cpus_tunes_nothing_cpu_related() {
    let root = host_copy("ryzen-5900x");
    write(
        &root.path,
        "/etc/pve/pvetune/120.yaml",
        "sysctl:\n  vm.stat_interval: 30\n",
    );
    write(
        &root.path,
        "/etc/pve/qemu-server/120.conf",
        "cores: 2\nmemory: 512\n",
    );
    let out = pvetune(&root.path, &["plan", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("/proc/sys/vm/stat_interval: 1 -> 30"),
        "{text}"
    );
    assert!(!text.contains("vCPU"), "{text}");
    assert!(!text.contains("scaling_governor"), "{text}");
    let mut vm = start_vm(&root.path, 120);
    assert_eq!(
        fixture::read(&root.path, "/proc/sys/vm/stat_interval"),
        "30\n"
    );
    stop(&root.path, 120, &mut vm);
    assert_eq!(
        fixture::read(&root.path, "/proc/sys/vm/stat_interval"),
        "1\n"
    );
    // A key that needs CPUs, without them: refused, naming the key.
    write(
        &root.path,
        "/etc/pve/pvetune/120.yaml",
        "governor: performance\n",
    );
    let out = pvetune(&root.path, &["check", "120"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("120.yaml:1:11: governor: governor acts on the VM's CPUs: it needs 'cpus'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_says_when_the_guest_does_not_see_the_smt_it_is_pinned_on() {
    let root = host_copy("ryzen-5900x");
    // 4 vCPUs on two host cores' sibling threads, the guest told nothing about SMT.
    write(
        &root.path,
        "/etc/pve/pvetune/120.yaml",
        "cpus: 1-2,13-14\nvcpus: smt-pairs\n",
    );
    write(
        &root.path,
        "/etc/pve/qemu-server/120.conf",
        "cores: 4\nmemory: 512\n",
    );
    let out = pvetune(&root.path, &["check", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("2 host core(s) run two of this VM's vCPUs on their sibling threads, but the guest sees no SMT: add `args: -smp 4,sockets=1,cores=2,threads=2`"),
        "{text}"
    );
    // With the guest topology given, nothing to say.
    write(
        &root.path,
        "/etc/pve/qemu-server/120.conf",
        "args: -smp 4,sockets=1,cores=2,threads=2\ncores: 4\nmemory: 512\n",
    );
    let out = pvetune(&root.path, &["check", "120"]);
    assert!(!stdout(&out).contains("sees no SMT"), "{}", stdout(&out));
}

#[test]
fn near_devices_reads_the_passthrough_device_node_from_sysfs() {
    let root = host_copy("ryzen-5900x");
    write(
        &root.path,
        "/sys/bus/pci/devices/0000:0b:00.0/numa_node",
        "1\n",
    );
    portable_vm(&root.path, 120, 4, "  near-devices: true\n");
    let conf = root.path.join("etc/pve/qemu-server/120.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("hostpci0: 0000:0b:00,pcie=1\n");
    std::fs::write(&conf, text).unwrap();
    let out = pvetune(&root.path, &["plan", "120", "--phase", "pre-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("placement: near-devices: node 1"), "{text}");
    assert!(text.contains("placed on 6-7,18-19"), "{text}");
}

#[test]
fn smt_isolate_runs_one_vcpu_per_core_and_keeps_the_siblings_idle() {
    let root = host_copy("ryzen-5900x");
    portable_vm(&root.path, 120, 4, "");
    write(
        &root.path,
        "/etc/pve/pvetune/120.yaml",
        "cpus:\n  smt: isolate\n",
    );
    let out = pvetune(&root.path, &["plan", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for (vcpu, cpu) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
        assert!(
            text.contains(&format!("vCPU {vcpu} (not running): - -> {cpu}\n")),
            "vCPU {vcpu} -> {cpu}: {text}"
        );
    }
    assert!(text.contains("layout cores-first"), "{text}");
    // The idle siblings 13-16 are the VM's too: not housekeeping.
    assert!(
        text.contains("emulator threads (not running): - -> 0,5-12,17-23"),
        "{text}"
    );
    assert!(text.contains("placement: placed on 1-4,13-16"), "{text}");
}

#[test]
fn emulator_cpus_are_placed_with_the_vm_and_take_its_emulator_threads() {
    let root = host_copy("ryzen-5900x");
    portable_vm(&root.path, 120, 4, "  emulator-cpus: 2\n");
    let profile = root.path.join("etc/pve/pvetune/120.yaml");
    let mut text = std::fs::read_to_string(&profile).unwrap();
    text.push_str("emulator: vm\n");
    std::fs::write(&profile, text).unwrap();
    let out = pvetune(&root.path, &["plan", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("placement: asked 6 CPUs"), "{text}");
    assert!(text.contains("placement: placed on 1-3,13-15"), "{text}");
    for (vcpu, cpu) in [(0, 1), (1, 13), (2, 2), (3, 14)] {
        assert!(
            text.contains(&format!("vCPU {vcpu} (not running): - -> {cpu}\n")),
            "vCPU {vcpu} -> {cpu}: {text}"
        );
    }
    assert!(
        text.contains("emulator threads (not running): - -> 3,15"),
        "{text}"
    );
}
