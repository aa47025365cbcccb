//! Hookscript chaining (`pvetune enable --chain`): the VM's own hookscript runs after
//! pvetune's work in every phase with the same arguments, and its exit code is passed on in
//! pre-start (after pvetune undid its own pre-start, since no post-stop follows).
//! The chained script is a stand-in in the fixture's snippets directory that logs its argv and
//! what it saw of pvetune's work, and exits with `CHAIN_EXIT`.

mod admin;
mod fixture;

use admin::{host, run, script};
use fixture::{FakeVm, Root, read, snapshot, stderr, stdout, write};

/// VM 100 enabled with `local:snippets/gpu.sh` chained.
fn chained() -> Root {
    let root = host(Some("local:snippets/gpu.sh"));
    script(
        &root.path,
        "var/lib/vz/snippets/gpu.sh",
        // What the default IRQ affinity is when it runs: pvetune's pre-start has set it then.
        &format!(
            "echo \"gpu.sh $*\"\necho \"$* $(cat {}/proc/irq/default_smp_affinity)\" >> \"$CHAIN_LOG\"\nexit ${{CHAIN_EXIT:-0}}\n",
            root.path.display()
        ),
    );
    let out = run(&root.path, &["enable", "100", "--chain"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The stand-in qm did not change the config: do what `qm set` would have done.
    let conf = read(&root.path, "/etc/pve/qemu-server/100.conf").replace(
        "hookscript: local:snippets/gpu.sh",
        "hookscript: local:snippets/pvetune",
    );
    write(&root.path, "/etc/pve/qemu-server/100.conf", &conf);
    root
}

fn log(root: &Root) -> String {
    read(&root.path, "/chain.log")
}

fn hook(root: &Root, phase: &str, exit: &str) -> std::process::Output {
    let log = root.path.join("chain.log");
    let log = log.to_str().unwrap();
    run(
        &root.path,
        &["100", phase],
        &[("CHAIN_LOG", log), ("CHAIN_EXIT", exit)],
    )
}

#[test]
fn the_chained_script_runs_after_pvetune_in_every_phase_with_the_same_arguments() {
    let root = chained();
    let before = snapshot(&root.path);
    let out = hook(&root, "pre-start", "0");
    assert!(out.status.success(), "{}", stderr(&out));
    // pvetune's line first, then the chained script's, in the task log.
    assert_eq!(
        stdout(&out)
            .lines()
            .map(|l| l.split(':').next().unwrap())
            .collect::<Vec<_>>(),
        ["pvetune", "gpu.sh 100 pre-start"]
    );
    let vm = FakeVm::start(&root.path, 100);
    for phase in ["post-start", "pre-stop"] {
        let out = hook(&root, phase, "0");
        assert!(out.status.success(), "{phase}: {}", stderr(&out));
        assert!(
            stdout(&out).ends_with(&format!("gpu.sh 100 {phase}\n")),
            "{}",
            stdout(&out)
        );
    }
    drop(vm);
    let out = hook(&root, "post-stop", "0");
    assert!(out.status.success(), "{}", stderr(&out));
    // The script saw pvetune's pre-start done (CPUs 6-11,18-23 out of the default affinity),
    // and post-stop's rollback done before it ran.
    assert_eq!(
        log(&root),
        "100 pre-start 03f03f\n100 post-start 03f03f\n100 pre-stop 03f03f\n100 post-stop ffffff\n"
    );
    let mut after = snapshot(&root.path);
    after.remove("chain.log");
    assert_eq!(after, before);
}

#[test]
fn a_failing_chained_pre_start_aborts_the_start_with_its_code_and_pvetune_undoes_its_own() {
    let root = chained();
    let before = snapshot(&root.path);
    let out = hook(&root, "pre-start", "7");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("pre-start: chained hookscript local:snippets/gpu.sh exited with code 7"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("pvetune: VM 100 rollback:"),
        "{}",
        stdout(&out)
    );
    let mut after = snapshot(&root.path);
    after.remove("chain.log");
    assert_eq!(after, before, "pvetune's pre-start was undone");
    let status = run(&root.path, &["status"], &[]);
    assert!(stdout(&status).contains("pvetune holds nothing"));
}

/// A start the chained script aborts is undone as post-stop would undo it: the VM's boot-time
/// hugepage reservation (`pvetune reserve`) stays kept for its next start; only `pvetune
/// rollback` gives it back.
#[test]
fn an_aborted_start_keeps_the_vms_boot_time_reservation() {
    let root = chained();
    let pool = "/sys/devices/system/node/node1/hugepages/hugepages-1048576kB";
    let conf = read(&root.path, "/etc/pve/qemu-server/100.conf");
    write(
        &root.path,
        "/etc/pve/qemu-server/100.conf",
        &format!("{conf}hugepages: 1024\n"),
    );
    let profile = read(&root.path, "/etc/pve/pvetune/100.yaml");
    write(
        &root.path,
        "/etc/pve/pvetune/100.yaml",
        &format!("{profile}hugepages:\n  boot: true\n"),
    );
    let out = run(&root.path, &["reserve"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        read(&root.path, &format!("{pool}/nr_hugepages")).trim(),
        "16"
    );
    // What the kernel's pool shows once it holds them (a fixture file does not follow).
    write(&root.path, &format!("{pool}/free_hugepages"), "16\n");
    let out = hook(&root, "pre-start", "7");
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(
        read(&root.path, &format!("{pool}/nr_hugepages")).trim(),
        "16",
        "kept for the VM's next start"
    );
    let out = run(&root.path, &["rollback", "100"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        read(&root.path, &format!("{pool}/nr_hugepages")).trim(),
        "0"
    );
}

#[test]
fn pvetunes_own_failed_pre_start_does_not_run_the_chained_script() {
    let root = chained();
    write(
        &root.path,
        "/etc/pve/pvetune/100.yaml",
        "cpus: 6-11,18-40\n",
    );
    let out = hook(&root, "pre-start", "0");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(log(&root), "");
}

#[test]
fn outside_pre_start_the_chained_script_runs_and_its_code_is_passed_on() {
    let root = chained();
    let out = hook(&root, "pre-start", "0");
    assert!(out.status.success(), "{}", stderr(&out));
    let before_stop = log(&root);
    let out = hook(&root, "post-stop", "5");
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(log(&root), before_stop + "100 post-stop ffffff\n");
    let status = run(&root.path, &["status"], &[]);
    assert!(
        stdout(&status).contains("pvetune holds nothing"),
        "rolled back anyway"
    );
}

#[test]
fn a_chain_record_that_is_not_a_snippet_volume_is_refused() {
    let root = chained();
    write(
        &root.path,
        "/etc/pve/pvetune/100.chain",
        "/bin/sh -c reboot\n",
    );
    let out = hook(&root, "pre-stop", "0");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("100.chain:1:1: expected one '<storage>:snippets/<file>' volume"),
        "{}",
        stderr(&out)
    );
    // In pre-start it stops the start before pvetune changes anything.
    let before = snapshot(&root.path);
    let out = hook(&root, "pre-start", "0");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(snapshot(&root.path), before);
}

#[test]
fn a_chained_script_missing_on_this_node_aborts_the_start_and_pvetune_undoes_its_own() {
    let root = chained();
    std::fs::remove_file(root.path.join("var/lib/vz/snippets/gpu.sh")).unwrap();
    let before = snapshot(&root.path);
    let out = hook(&root, "pre-start", "0");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("chained hookscript local:snippets/gpu.sh: ")
            && stderr(&out).contains("var/lib/vz/snippets/gpu.sh: cannot run"),
        "{}",
        stderr(&out)
    );
    assert_eq!(snapshot(&root.path), before);
}
