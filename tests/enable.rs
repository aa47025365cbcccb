//! `pvetune enable` / `disable` on fixture roots (tests/admin: the Ryzen 5900X host with
//! storage.cfg, the installed binary and snippets directories under the root) with a stand-in
//! `qm` that records its argv. No real `qm` runs and nothing outside the root changes.

mod admin;
mod fixture;

use admin::{argv, host, qm_calls, run};
use fixture::{FakeVm, read, snapshot, stderr, stdout, write};
use std::path::Path;

#[test]
fn enable_links_the_snippet_and_sets_the_hookscript_with_qm_as_an_argv() {
    let root = host(None);
    let out = run(&root.path, &["enable", "100"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let link = root.path.join("var/lib/vz/snippets/pvetune");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("/usr/bin/pvetune")
    );
    assert_eq!(
        qm_calls(&root.path),
        [argv(&[
            "set",
            "100",
            "--hookscript",
            "local:snippets/pvetune"
        ])]
    );
    assert!(text.contains("100.yaml is valid on this host"), "{text}");
    assert!(
        text.contains("link /var/lib/vz/snippets/pvetune -> /usr/bin/pvetune"),
        "{text}"
    );
    assert!(
        text.contains("ran: qm set 100 --hookscript local:snippets/pvetune"),
        "{text}"
    );
    assert!(
        text.contains("storage 'local' is local to each node")
            && text.contains("every node (pve1, pve2)"),
        "{text}"
    );
    // Again: the link is in place, qm set runs again (harmless), nothing else changes.
    let out = run(&root.path, &["enable", "100"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("/var/lib/vz/snippets/pvetune -> /usr/bin/pvetune: in place"));
    assert_eq!(qm_calls(&root.path).len(), 1);
}

#[test]
fn enable_on_a_shared_storage_says_every_node_sees_the_snippet() {
    let root = host(None);
    let out = run(&root.path, &["enable", "100", "--storage", "nas"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_link(root.path.join("mnt/pve/nas/snippets/pvetune")).unwrap(),
        Path::new("/usr/bin/pvetune")
    );
    assert_eq!(
        qm_calls(&root.path),
        [argv(&[
            "set",
            "100",
            "--hookscript",
            "nas:snippets/pvetune"
        ])]
    );
    assert!(
        stdout(&out).contains("storage 'nas' is shared"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn dry_runs_change_nothing_and_print_the_commands() {
    let root = host(Some("local:snippets/gpu.sh"));
    let before = snapshot(&root.path);
    let out = run(&root.path, &["enable", "100", "--chain", "--dry-run"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("would link /var/lib/vz/snippets/pvetune -> /usr/bin/pvetune"),
        "{text}"
    );
    assert!(
        text.contains("would record local:snippets/gpu.sh in /etc/pve/pvetune/100.chain"),
        "{text}"
    );
    assert!(
        text.contains("would run: qm set 100 --hookscript local:snippets/pvetune"),
        "{text}"
    );
    let root2 = host(Some("local:snippets/pvetune"));
    let before2 = snapshot(&root2.path);
    let out = run(&root2.path, &["disable", "100", "--dry-run"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("would run: qm set 100 --delete hookscript"));
    assert_eq!(snapshot(&root.path), before);
    assert_eq!(snapshot(&root2.path), before2);
    assert!(qm_calls(&root.path).is_empty() && qm_calls(&root2.path).is_empty());
}

#[test]
fn enable_refuses_another_hookscript_unless_asked_to_chain_it() {
    let root = host(Some("local:snippets/gpu.sh"));
    let before = snapshot(&root.path);
    let out = run(&root.path, &["enable", "100"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("VM 100 has a hookscript already (local:snippets/gpu.sh): pass --chain"),
        "{err}"
    );
    assert!(qm_calls(&root.path).is_empty());
    assert_eq!(snapshot(&root.path), before);

    let out = run(&root.path, &["enable", "100", "--chain"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        read(&root.path, "/etc/pve/pvetune/100.chain"),
        "local:snippets/gpu.sh\n"
    );
    assert_eq!(
        qm_calls(&root.path),
        [argv(&[
            "set",
            "100",
            "--hookscript",
            "local:snippets/pvetune"
        ])]
    );
}

#[test]
fn a_failing_qm_leaves_no_chain_record_and_says_why() {
    let root = host(Some("local:snippets/gpu.sh"));
    let out = run(
        &root.path,
        &["enable", "100", "--chain"],
        &[("QM_EXIT", "2")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("qm set 100 --hookscript local:snippets/pvetune failed")
            && err.contains("VM 100 is locked (backup)"),
        "{err}"
    );
    assert!(!root.path.join("etc/pve/pvetune/100.chain").exists());
}

#[test]
fn enable_refuses_without_a_snippets_storage_a_profile_or_the_binary() {
    let root = host(None);
    write(
        &root.path,
        "/etc/pve/storage.cfg",
        "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup\n",
    );
    let out = run(&root.path, &["enable", "100"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no storage in /etc/pve/storage.cfg has the 'snippets' content type: give it the content type with `pvesm set local --content <its content>,snippets`"),
        "{}",
        stderr(&out)
    );
    let root = host(None);
    std::fs::remove_file(root.path.join("usr/bin/pvetune")).unwrap();
    let out = run(&root.path, &["enable", "100"], &[]);
    assert!(stderr(&out).contains("/usr/bin/pvetune does not exist: install the pvetune package"));
    let out = run(&root.path, &["enable", "101"], &[]);
    assert!(
        stderr(&out).contains("VM 101 has no profile"),
        "{}",
        stderr(&out)
    );
    // A profile that does not fit the host is refused as `check` refuses it (exit 2).
    write(
        &root.path,
        "/etc/pve/pvetune/100.yaml",
        "cpus: 6-11,18-40\n",
    );
    let out = run(&root.path, &["enable", "100"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("100.yaml:1:7: cpus:"),
        "{}",
        stderr(&out)
    );
    assert!(qm_calls(&root.path).is_empty());
}

#[test]
fn disable_gives_the_vm_its_chained_hookscript_back() {
    let root = host(Some("local:snippets/pvetune"));
    write(
        &root.path,
        "/etc/pve/pvetune/100.chain",
        "local:snippets/gpu.sh\n",
    );
    let out = run(&root.path, &["disable", "100"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        qm_calls(&root.path),
        [argv(&[
            "set",
            "100",
            "--hookscript",
            "local:snippets/gpu.sh"
        ])]
    );
    assert!(!root.path.join("etc/pve/pvetune/100.chain").exists());

    let root = host(Some("local:snippets/pvetune"));
    let out = run(&root.path, &["disable", "100"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        qm_calls(&root.path),
        [argv(&["set", "100", "--delete", "hookscript"])]
    );
    let root = host(Some("local:snippets/gpu.sh"));
    let out = run(&root.path, &["disable", "100"], &[]);
    assert!(stdout(&out).contains("pvetune is not its hookscript (local:snippets/gpu.sh)"));
    assert!(qm_calls(&root.path).is_empty());
}

#[test]
fn disable_rolls_back_a_stopped_vm_first_and_leaves_a_running_one_alone() {
    let root = host(Some("local:snippets/pvetune"));
    let before = snapshot(&root.path);
    let out = run(&root.path, &["100", "pre-start"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(snapshot(&root.path), before, "pre-start moved the IRQs");
    // Running: nothing is rolled back under the running VM.
    let vm = FakeVm::start(&root.path, 100);
    let held = snapshot(&root.path);
    let out = run(&root.path, &["disable", "100"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("VM 100 runs: what pvetune holds for it stays"));
    assert_eq!(snapshot(&root.path), held);
    assert_eq!(qm_calls(&root.path).len(), 1);
    drop(vm);
    // Stopped: the IRQs come back before the hookscript goes.
    std::fs::remove_file(root.path.join("var/run/qemu-server/100.pid")).unwrap();
    let out = run(&root.path, &["disable", "100"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("pvetune: VM 100 rollback:"),
        "{}",
        stdout(&out)
    );
    assert_eq!(snapshot(&root.path), before);
    let status = run(&root.path, &["status"], &[]);
    assert!(stdout(&status).contains("pvetune holds nothing"));
    assert_eq!(
        qm_calls(&root.path),
        [argv(&["set", "100", "--delete", "hookscript"])]
    );
}

#[test]
fn enable_refuses_a_snippet_that_is_not_its_link_and_a_storage_without_snippets() {
    let root = host(None);
    // A copy of the binary from the old install instructions.
    write(
        &root.path,
        "/var/lib/vz/snippets/pvetune",
        "an old pvetune binary\n",
    );
    let before = snapshot(&root.path);
    let out = run(&root.path, &["enable", "100"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("/var/lib/vz/snippets/pvetune exists and is not a link to /usr/bin/pvetune"),
        "{}",
        stderr(&out)
    );
    let out = run(
        &root.path,
        &["enable", "100", "--storage", "local-lvm"],
        &[],
    );
    assert!(
        stderr(&out).contains("storage 'local-lvm' is not a file storage"),
        "{}",
        stderr(&out)
    );
    write(
        &root.path,
        "/etc/pve/storage.cfg",
        &format!(
            "{}dir: backup\n\tpath /backup\n\tcontent backup\n",
            admin::STORAGE
        ),
    );
    let out = run(&root.path, &["enable", "100", "--storage", "backup"], &[]);
    assert!(
        stderr(&out).contains("storage 'backup' has no 'snippets' content type"),
        "{}",
        stderr(&out)
    );
    let mut after = snapshot(&root.path);
    after.insert(
        "etc/pve/storage.cfg".into(),
        before["etc/pve/storage.cfg"].clone(),
    );
    assert_eq!(after, before);
    assert!(qm_calls(&root.path).is_empty());
}
