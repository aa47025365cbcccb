//! `pvetune doctor` on fixture VM configs: the Ryzen 5900X host with VM 100 enabled (its
//! snippet linked) has no finding; each test changes one thing (the VM config, the profile,
//! the host's /proc or /etc/pve) and expects exactly its finding, as `doctor --json` codes,
//! with exit 2 for a finding that makes a start fail and 0 for a warning.

mod admin;
mod fixture;

use admin::{host, run};
use fixture::{Root, read, stderr, stdout, write};

const CONF: &str = "/etc/pve/qemu-server/100.conf";
const PROFILE: &str = "/etc/pve/pvetune/100.yaml";

/// VM 100 with pvetune as its hookscript and the snippet in place.
fn enabled() -> Root {
    let root = host(Some("local:snippets/pvetune"));
    let dir = root.path.join("var/lib/vz/snippets");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink("/usr/bin/pvetune", dir.join("pvetune")).unwrap();
    root
}

/// Replaces (or with `None` removes) the line of `key` in VM 100's config, or appends it.
fn set(root: &Root, key: &str, value: Option<&str>) {
    let mut found = false;
    let mut text: String = read(&root.path, CONF)
        .lines()
        .filter_map(|l| match l.split_once(':') {
            Some((k, _)) if k == key => {
                found = true;
                value.map(|v| format!("{key}: {v}\n"))
            }
            _ => Some(format!("{l}\n")),
        })
        .collect();
    if let (false, Some(v)) = (found, value) {
        text.push_str(&format!("{key}: {v}\n"));
    }
    write(&root.path, CONF, &text);
}

fn profile_line(root: &Root, from: &str, to: &str) {
    let text = read(&root.path, PROFILE);
    assert!(text.contains(from), "{text}");
    write(&root.path, PROFILE, &text.replacen(from, to, 1));
}

/// A process named `comm` in the root's /proc.
fn process(root: &Root, pid: u32, comm: &str) {
    write(
        &root.path,
        &format!("/proc/{pid}/comm"),
        &format!("{comm}\n"),
    );
}

/// The finding codes of `doctor 100 --json`, and the exit code.
fn codes(root: &Root) -> (Vec<String>, i32) {
    let out = run(&root.path, &["doctor", "100", "--json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)));
    let codes = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect();
    (codes, out.status.code().unwrap())
}

fn expect(root: &Root, wanted: &[&str], exit: i32) {
    assert_eq!(
        codes(root),
        (wanted.iter().map(|s| s.to_string()).collect(), exit)
    );
}

#[test]
fn a_sound_setup_has_no_finding() {
    let root = enabled();
    expect(&root, &[], 0);
    let out = run(&root.path, &["doctor", "100"], &[]);
    assert_eq!(stdout(&out), "doctor: nothing found for VM 100\n");
}

#[test]
fn ballooning_with_passthrough() {
    let root = enabled();
    set(&root, "balloon", None);
    expect(&root, &["balloon-passthrough"], 0);
    set(&root, "balloon", Some("4096"));
    expect(&root, &["balloon-passthrough"], 0);
    set(&root, "hostpci0", None);
    expect(&root, &[], 0);
}

#[test]
fn hugepages_without_numa_fails_the_start() {
    let root = enabled();
    set(&root, "hugepages", Some("1024"));
    expect(&root, &[], 0);
    set(&root, "numa", Some("0"));
    expect(&root, &["hugepages-without-numa"], 2);
    let out = run(&root.path, &["doctor", "100"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stdout(&out),
        "VM 100: error: hugepages is set but numa is not: qemu-server refuses to start the VM [hugepages-without-numa]\n  fix: `qm set 100 --numa 1`\ndoctor: 1 error(s), 0 warning(s) for VM 100\n"
    );
    assert!(stderr(&out).contains("doctor: 1 finding(s) would make a start fail"));
}

#[test]
fn memory_bound_to_another_node_than_the_vcpus() {
    let root = enabled();
    // CPUs 6-11,18-23 are node 1's; the memory on node 0 is remote for every vCPU.
    set(
        &root,
        "numa0",
        Some("cpus=0-11,hostnodes=0,memory=16384,policy=bind"),
    );
    expect(&root, &["numa-memory-remote"], 0);
    set(
        &root,
        "numa0",
        Some("cpus=0-11,hostnodes=3,memory=16384,policy=bind"),
    );
    expect(&root, &["numa-node-missing"], 2);
}

#[test]
fn affinity_that_contradicts_the_profile() {
    let root = enabled();
    set(&root, "affinity", Some("0-11"));
    expect(&root, &["affinity-conflict"], 0);
    set(&root, "affinity", Some("0-23"));
    expect(&root, &[], 0);
}

#[test]
fn amd_guest_smt_without_topoext() {
    let root = enabled();
    set(
        &root,
        "args",
        Some("-smp 12,sockets=1,cores=6,threads=2,maxcpus=12"),
    );
    set(&root, "cpu", Some("EPYC-Rome"));
    write(
        &root.path,
        "/proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\n",
    );
    expect(&root, &["cpu-not-host"], 0);
    write(
        &root.path,
        "/proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: AuthenticAMD\n",
    );
    expect(&root, &["cpu-not-host", "amd-smt-without-topoext"], 0);
    set(&root, "cpu", Some("EPYC-Rome,flags=+pcid"));
    set(
        &root,
        "args",
        Some("-cpu EPYC-Rome,topoext=on -smp 12,sockets=1,cores=6,threads=2"),
    );
    expect(&root, &["cpu-not-host"], 0);
}

#[test]
fn guest_topology_that_does_not_match_the_pinning() {
    let root = enabled();
    // threads=1 guest with 12 vCPUs on 6 host cores: sibling pairs under "independent" cores.
    set(&root, "args", None);
    set(&root, "cores", Some("12"));
    expect(&root, &["guest-topology-mismatch"], 0);
    let out = run(&root.path, &["doctor", "100"], &[]);
    assert!(
        stdout(&out).contains("the guest has threads=1 but vCPU 0+vCPU 6, vCPU 1+vCPU 7"),
        "{}",
        stdout(&out)
    );
    // threads=2 guest pinned sequentially: a guest core's threads on two host cores.
    let root = enabled();
    profile_line(&root, "vcpus: auto", "vcpus: sequential");
    expect(&root, &["guest-topology-mismatch"], 0);
}

#[test]
fn cpu_type_not_host() {
    let root = enabled();
    set(&root, "cpu", None);
    expect(&root, &["cpu-not-host"], 0);
    set(&root, "cpu", Some("cputype=host,flags=+pdpe1gb"));
    expect(&root, &[], 0);
}

#[test]
fn irqbalance_running() {
    let root = enabled();
    process(&root, 731, "irqbalance");
    expect(&root, &["irqbalance-running"], 0);
    profile_line(&root, "isolation:\n", "isolation:\n  irqbalance: ban\n");
    expect(&root, &[], 0);
}

#[test]
fn ksmtuned_with_a_hugepage_vm() {
    let root = enabled();
    process(&root, 812, "ksmtuned");
    expect(&root, &[], 0);
    set(&root, "hugepages", Some("2"));
    expect(&root, &["ksmtuned-hugepages"], 0);
}

#[test]
fn the_vms_cpus_include_cpu_0s_core() {
    let root = enabled();
    // Node 0's cores (CPU 12 is CPU 0's SMT sibling); the memory binding moves along.
    profile_line(&root, "cpus: 6-11,18-23", "cpus: 0-5,12-17");
    set(
        &root,
        "numa0",
        Some("cpus=0-11,hostnodes=0,memory=16384,policy=bind"),
    );
    expect(&root, &["cpu0-core"], 0);
    // CPU 12 without CPU 0: still CPU 0's core (cores-first, since CPU 12 has no pair here;
    // CPU 6 is node 1's).
    profile_line(&root, "cpus: 0-5,12-17", "cpus: 1-6,12-17");
    set(
        &root,
        "numa0",
        Some("cpus=0-11,hostnodes=0;1,memory=16384,policy=bind"),
    );
    profile_line(&root, "vcpus: auto", "vcpus: cores-first");
    expect(&root, &["cpu0-core", "guest-topology-mismatch"], 0);
}

#[test]
fn a_governor_the_cpus_do_not_have_fails_the_start() {
    let root = enabled();
    profile_line(&root, "governor: performance", "governor: turbo");
    expect(&root, &["governor-unavailable"], 2);
    let out = run(&root.path, &["doctor", "100"], &[]);
    assert!(
        stdout(&out).contains("100.yaml:6:11: governor: 'turbo' is not available on CPU 6"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_node_local_profile_for_an_ha_vm() {
    let root = enabled();
    write(
        &root.path,
        "/etc/pve/ha/resources.cfg",
        "vm: 100\n\tstate started\n\tgroup gpu-nodes\n",
    );
    expect(&root, &[], 0);
    let text = read(&root.path, PROFILE);
    std::fs::remove_file(root.path.join(PROFILE.trim_start_matches('/'))).unwrap();
    write(&root.path, "/etc/pvetune/profiles/100.yaml", &text);
    expect(&root, &["ha-profile-node-local"], 0);
}

#[test]
fn hookscript_snippet_and_profile_problems() {
    let root = enabled();
    // The package removed: the link dangles.
    std::fs::remove_file(root.path.join("usr/bin/pvetune")).unwrap();
    expect(&root, &["snippet-missing"], 2);
    std::fs::remove_file(root.path.join("var/lib/vz/snippets/pvetune")).unwrap();
    expect(&root, &["snippet-missing"], 2);
    let root = host(Some("local:snippets/gpu.sh"));
    expect(&root, &["not-enabled"], 0);
    let root = enabled();
    profile_line(&root, "cpus: 6-11,18-23", "cpus: 6-11,18-40");
    expect(&root, &["profile-invalid"], 2);
    set(&root, "cores", Some("zero"));
    expect(&root, &["vm-config"], 2);
}

#[test]
fn without_a_vmid_every_tuned_vm_of_the_node_is_checked() {
    let root = enabled();
    set(&root, "balloon", None);
    // VM 101 has neither a profile nor pvetune as its hookscript: not checked.
    write(&root.path, "/etc/pvetune/profiles/102.yaml", "cpus: 2-3\n");
    let out = run(&root.path, &["doctor", "--json"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found: Vec<(u64, &str)> = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["vmid"].as_u64().unwrap(), f["code"].as_str().unwrap()))
        .collect();
    assert_eq!(found, [(100, "balloon-passthrough"), (102, "vm-config")]);
}
