//! `--json` of `plan`, `status`, `check` and `doctor` against committed snapshots
//! (tests/snapshots/*.json): the shapes docs/json.md documents, held exactly. The fixture
//! root's path is replaced by `<root>`. After an intended change (a field added: docs/json.md
//! says so too), `UPDATE_SNAPSHOTS=1 cargo test --test json_output` rewrites them.

mod admin;
mod fixture;

use admin::{host, run};
use fixture::{Root, stderr, write};
use std::path::Path;

fn snapshot(name: &str, root: &Root, out: &std::process::Output) {
    let text = String::from_utf8(out.stdout.clone())
        .unwrap()
        .replace(root.path.to_str().unwrap(), "<root>");
    // Valid JSON, one document.
    let _: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text} {}", stderr(out)));
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.json"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&file)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_SNAPSHOTS=1", file.display()));
    assert_eq!(
        text,
        want,
        "{name}: the JSON differs from {}",
        file.display()
    );
}

#[test]
fn plan_json() {
    let root = host(Some("local:snippets/pvetune"));
    let out = run(&root.path, &["plan", "100", "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    snapshot("plan-100", &root, &out);
    let out = run(&root.path, &["plan", "101", "--json"], &[]);
    snapshot("plan-no-profile", &root, &out);
}

#[test]
fn status_json_with_drift() {
    let root = host(Some("local:snippets/pvetune"));
    let out = run(&root.path, &["status", "--json"], &[]);
    snapshot("status-empty", &root, &out);
    let out = run(&root.path, &["100", "pre-start"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Someone moves IRQ 24 back onto the VM's CPUs behind pvetune's back.
    write(&root.path, "/proc/irq/24/smp_affinity_list", "0-23\n");
    let out = run(&root.path, &["status", "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    snapshot("status-drift", &root, &out);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["vms"][0]["drifted"], 1);
    let out = run(&root.path, &["status", "100", "--json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc.get("claims").is_none(),
        "node-wide claims only without a VMID"
    );
    // The text says it too.
    let out = run(&root.path, &["status", "100"], &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("/proc/irq/24/smp_affinity_list: 0-5,12-17 (original 0-23; CPUs 6-11,18-23 taken out) [changed outside pvetune: now 0-23]")
            && text.contains("holds 18: 1 changed outside pvetune"),
        "{text}"
    );
}

#[test]
fn check_json_valid_and_invalid() {
    let root = host(Some("local:snippets/pvetune"));
    let out = run(&root.path, &["check", "100", "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    snapshot("check-valid", &root, &out);
    write(
        &root.path,
        "/etc/pve/pvetune/100.yaml",
        "cpus: 6-11,18-40\n",
    );
    let out = run(&root.path, &["check", "100", "--json"], &[]);
    assert_eq!(out.status.code(), Some(2));
    snapshot("check-invalid", &root, &out);
}

#[test]
fn doctor_json() {
    let root = host(Some("local:snippets/gpu.sh"));
    write(&root.path, "/proc/731/comm", "irqbalance\n");
    let out = run(&root.path, &["doctor", "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    snapshot("doctor-warnings", &root, &out);
}

#[test]
fn status_shows_a_thread_moved_behind_pvetunes_back() {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let root = host(None);
    // One vCPU on CPU 1, a CPU this machine has, so that the pin really lands.
    write(
        &root.path,
        "/etc/pve/qemu-server/102.conf",
        "cores: 1\nmemory: 512\n",
    );
    write(
        &root.path,
        "/etc/pve/pvetune/102.yaml",
        "cpus: 1\nemulator: vm\n",
    );
    let out = run(&root.path, &["102", "pre-start"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let vm = fixture::FakeVm::start(&root.path, 102);
    fixture::fake_qmp_vcpus(&root.path, 102, &[(0, vm.pid)]);
    let out = run(&root.path, &["102", "post-start"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = |root: &Root| -> serde_json::Value {
        let out = run(&root.path, &["status", "102", "--json"], &[]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let doc = json(&root);
    let thread = &doc["vms"][0]["threads"][0];
    assert_eq!(
        (thread["tid"].as_i64(), &thread["cpus"]),
        (Some(vm.pid as i64), &"1".into())
    );
    assert_eq!(thread["drift"], serde_json::Value::Null);
    assert_eq!(doc["vms"][0]["drifted"], 0);
    // Someone (taskset, qemu-server's affinity) moves the vCPU to CPU 0.
    let mut cpu0 = CpuSet::new();
    cpu0.set(0).unwrap();
    sched_setaffinity(Pid::from_raw(vm.pid), &cpu0).unwrap();
    let doc = json(&root);
    assert_eq!(doc["vms"][0]["threads"][0]["drift"], "0");
    assert_eq!(doc["vms"][0]["drifted"], 1);
    let out = run(&root.path, &["status", "102"], &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("  thread {} (vCPU 0): 1 (was ", vm.pid)))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.ends_with(") [changed outside pvetune: now 0]"),
        "{line}"
    );
    assert!(
        text.contains("holds 1: 1 changed outside pvetune"),
        "{text}"
    );
}
