//! Output cut short: `pvetune plan 100 | head`, a pager quit early, a closed stderr. The real
//! binary must end quietly (exit 0, or death by SIGPIPE) or with its usual exit code, never
//! with a panic.

use std::fs::File;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};

fn ryzen() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/hosts/ryzen-5900x")
}

fn pvetune(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pvetune"));
    cmd.arg("--root")
        .arg(ryzen())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PVETUNE_ROOT");
    cmd
}

/// A pipe whose read end is already closed: every write to it fails with EPIPE, so the
/// outcome does not depend on how fast a reader would have gone away.
fn closed_pipe() -> io::PipeWriter {
    let (reader, writer) = io::pipe().expect("pipe");
    drop(reader);
    writer
}

fn quiet_end(status: ExitStatus) -> bool {
    status.success() || status.signal() == Some(nix::sys::signal::Signal::SIGPIPE as i32)
}

fn with_closed_stdout(args: &[&str]) -> Output {
    pvetune(args)
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .expect("run pvetune")
}

#[test]
fn plan_and_status_end_quietly_when_the_reader_is_gone() {
    for args in [
        &["plan", "100"][..],
        &["plan", "100", "--phase", "post-start"],
        &["plan", "999"],
        &["check", "100"],
        &["status"],
        &["status", "100"],
    ] {
        let out = with_closed_stdout(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(quiet_end(out.status), "{args:?}: {:?} {stderr}", out.status);
        assert_eq!(stderr, "", "{args:?}");
    }
}

#[test]
fn the_same_commands_print_when_stdout_is_open() {
    let out = pvetune(&["plan", "100"]).output().expect("run pvetune");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("pre-start:\n"), "{text}");
    assert!(text.contains("\npost-start:\n"), "{text}");
}

#[test]
fn an_error_with_stderr_closed_keeps_its_exit_code() {
    let out = pvetune(&["plan", "99"])
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .output()
        .expect("run pvetune");
    assert_eq!(out.status.code(), Some(2), "{:?}", out.status);
}

#[test]
fn a_full_disk_is_an_error_not_a_quiet_end() {
    let Ok(full) = File::options().write(true).open("/dev/full") else {
        println!("skipped: no /dev/full");
        return;
    };
    let out = pvetune(&["plan", "100"])
        .stdout(full)
        .output()
        .expect("run pvetune");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the output"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
