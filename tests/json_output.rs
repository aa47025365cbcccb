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
