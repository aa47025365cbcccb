//! A damaged ledger never stops an unrelated VM: the real binary on a fixture root whose
//! ledger cannot be read. A VM without a profile starts (and stops) with a one-line warning; a
//! VM with a profile fails pre-start, changes nothing, and the message says how to recover.

mod fixture;

use fixture::{host_copy, pvetune, snapshot, stderr};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `/run/pvetune` of the fixture, 0700 as pvetune creates it, with a corrupt snapshot.
fn corrupt_ledger(root: &Path) -> PathBuf {
    let run = root.join("run/pvetune");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&run)
        .unwrap();
    let snapshot = run.join("state.json");
    fs::write(&snapshot, "{\"version\": 2, \"vms\": {\"100\": tr").unwrap();
    snapshot
}

#[test]
fn a_vm_without_profile_starts_and_stops_whatever_the_ledger() {
    let root = host_copy("ryzen-5900x");
    let ledger = corrupt_ledger(&root.path);
    let before = snapshot(&root.path);
    for phase in ["pre-start", "post-start", "pre-stop", "post-stop"] {
        let out = pvetune(&root.path, &["101", phase]);
        assert_eq!(out.status.code(), Some(0), "{phase}: {}", stderr(&out));
        let err = stderr(&out);
        if phase != "pre-stop" {
            assert_eq!(err.lines().count(), 1, "{phase}: one line: {err}");
            assert!(
                err.contains(&format!(
                    "VM 101 {phase}: VM has no pvetune profile, going on; the ledger cannot be read"
                )) && err.contains("state.json: corrupt ledger"),
                "{phase}: {err}"
            );
        }
    }
    assert_eq!(snapshot(&root.path), before);
    assert_eq!(
        fs::read_to_string(&ledger).unwrap(),
        "{\"version\": 2, \"vms\": {\"100\": tr",
        "kept as is"
    );
    // A run directory pvetune refuses is no reason to stop it either.
    fs::set_permissions(ledger.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = pvetune(&root.path, &["101", "pre-start"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("its mode is 0755"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_vm_with_a_profile_fails_pre_start_and_is_told_how_to_recover() {
    let root = host_copy("ryzen-5900x");
    let ledger = corrupt_ledger(&root.path);
    let before = snapshot(&root.path);
    let out = pvetune(&root.path, &["100", "pre-start"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("state.json: corrupt ledger"), "{err}");
    assert!(
        err.contains("VM 100 pre-start stopped before any change"),
        "{err}"
    );
    assert!(
        err.contains("`pvetune status`") && err.contains("`pvetune rollback <vmid>`"),
        "{err}"
    );
    assert!(
        err.contains(&format!("inspect {}", ledger.display())),
        "names the ledger file: {err}"
    );
    assert_eq!(snapshot(&root.path), before, "nothing changed");
    // post-stop of a VM with a profile cannot roll it back either: it says so too.
    let out = pvetune(&root.path, &["100", "post-stop"]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("pvetune rollback"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_undo_that_fails_for_another_vm_does_not_stop_a_vm_without_profile() {
    let root = host_copy("ryzen-5900x");
    // VM 102 crashed holding a claim on a file that cannot be restored (a directory now).
    let run = root.path.join("run/pvetune");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&run)
        .unwrap();
    fs::create_dir_all(root.path.join("proc/sys/pvetune/gone")).unwrap();
    fs::write(
        run.join("state.json"),
        r#"{"version":2,"generation":1,"vms":{},"claims":{"/proc/sys/pvetune/gone":
            {"original":"1\n","holders":[{"vmid":102,"value":"2"}]}}}"#,
    )
    .unwrap();
    let out = pvetune(&root.path, &["101", "pre-start"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "VM 101 pre-start: VM has no pvetune profile, going on; rollback of VM 102 incomplete"
        ),
        "{err}"
    );
    // The claim stays held for the next run, and a VM with a profile is told.
    assert!(
        fs::read_to_string(run.join("state.json"))
            .unwrap()
            .contains("/proc/sys/pvetune/gone")
    );
    let out = pvetune(&root.path, &["100", "pre-start"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}
