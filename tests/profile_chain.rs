//! Profiles are trusted only through a safe chain: the profile, every directory on the way to
//! it and every symlink followed must be root's (here: the test's euid, root) and writable by
//! nobody else; refusals name the offending path. Runs as root (it chowns to uid 65534).

mod common;

use std::os::unix::fs::{PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};

use common::TempDir;
use pvetune::profile::{ProfileError, load};

const NOBODY: u32 = 65534;
const PROFILE: &str = "cpus: 4-7\n";

/// A temp dir for a test that chowns to another uid, or `None` (skipped) when not root.
fn as_root(tag: &str) -> Option<TempDir> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to chown");
        return None;
    }
    Some(TempDir::new(tag))
}

fn mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn dir(path: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&path).unwrap();
    mode(&path, 0o755);
    path
}

fn profile(path: PathBuf) -> PathBuf {
    std::fs::write(&path, PROFILE).unwrap();
    mode(&path, 0o644);
    path
}

/// The refusal of `path`, which must name `offender`.
fn refused(path: &Path, offender: &Path) -> String {
    match load(path) {
        Err(e @ ProfileError::Unsafe { .. }) => {
            let message = e.to_string();
            let named = format!("{} ", offender.display());
            assert!(
                message.contains(&named),
                "does not name {named:?}: {message}"
            );
            message
        }
        other => panic!(
            "{}: expected a refusal naming {}, got {other:?}",
            path.display(),
            offender.display()
        ),
    }
}

#[test]
fn a_safe_chain_and_a_safe_symlink_are_accepted() {
    let t = TempDir::new("chain-ok");
    let real = profile(dir(t.path().join("a/b")).join("100.yaml"));
    load(&real).unwrap();
    let link = dir(t.path().join("links")).join("100.yaml");
    symlink("../a/b/100.yaml", &link).unwrap();
    let cpus = load(&link).unwrap().cpus.unwrap().value;
    assert_eq!(
        cpus,
        pvetune::profile::CpuRequest::List("4-7".parse().unwrap())
    );
}

#[test]
fn a_group_writable_dir_two_levels_up_is_refused() {
    let t = TempDir::new("chain-gw");
    let top = dir(t.path().join("top"));
    let file = profile(dir(top.join("mid/low")).join("100.yaml"));
    mode(&top, 0o775);
    let message = refused(&file, &top);
    assert!(
        message.contains("writable by group or others (mode 775)"),
        "{message}"
    );
}

#[test]
fn a_symlink_to_a_profile_in_a_world_writable_dir_is_refused() {
    let t = TempDir::new("chain-ww-target");
    let open = dir(t.path().join("open"));
    profile(open.join("p.yaml"));
    mode(&open, 0o777);
    let link = dir(t.path().join("safe")).join("100.yaml");
    symlink(open.join("p.yaml"), &link).unwrap();
    refused(&link, &open);
}

#[test]
fn a_symlink_from_a_safe_dir_to_an_unsafe_target_is_refused() {
    let Some(t) = as_root("chain-target-owner") else {
        return;
    };
    let target = profile(dir(t.path().join("elsewhere")).join("p.yaml"));
    chown(&target, Some(NOBODY), None).unwrap();
    let link = dir(t.path().join("safe")).join("100.yaml");
    symlink(&target, &link).unwrap();
    let message = refused(&link, &target);
    assert!(message.contains("owned by uid 65534"), "{message}");

    // A target directory owned by another user: it could swap the file.
    let theirs = dir(t.path().join("theirs"));
    profile(theirs.join("p.yaml"));
    chown(&theirs, Some(NOBODY), None).unwrap();
    let link = t.path().join("safe/101.yaml");
    symlink(theirs.join("p.yaml"), &link).unwrap();
    refused(&link, &theirs);
}

#[test]
fn a_symlink_in_an_unsafe_dir_is_refused_even_to_a_safe_target() {
    let t = TempDir::new("chain-ww-link");
    let real = profile(dir(t.path().join("safe")).join("100.yaml"));
    let open = dir(t.path().join("open"));
    mode(&open, 0o777);
    let link = open.join("100.yaml");
    symlink(&real, &link).unwrap();
    refused(&link, &open);
    // And a symlinked directory whose holder is unsafe.
    let holder = dir(t.path().join("holder"));
    symlink(t.path().join("safe"), holder.join("d")).unwrap();
    mode(&holder, 0o757);
    refused(&holder.join("d/100.yaml"), &holder);
}

#[test]
fn sticky_world_writable_dirs_pass_only_over_a_root_owned_dir() {
    let Some(t) = as_root("chain-sticky") else {
        return;
    };
    let sticky = dir(t.path().join("tmp"));
    mode(&sticky, 0o1777);
    // Directly in the sticky dir: anyone could have created that name first.
    let message = refused(&profile(sticky.join("100.yaml")), &sticky);
    assert!(message.contains("sticky bit"), "{message}");
    // Below a root-owned directory inside it: nobody else can rename or replace that.
    load(&profile(dir(sticky.join("rootdir")).join("100.yaml"))).unwrap();
    // Below a directory another user owns there: refused (that user could swap it).
    let theirs = dir(sticky.join("theirs"));
    profile(theirs.join("100.yaml"));
    chown(&theirs, Some(NOBODY), None).unwrap();
    refused(&theirs.join("100.yaml"), &sticky);
}

#[test]
fn a_foreign_group_is_refused_outside_pmxcfs() {
    let Some(t) = as_root("chain-group") else {
        return;
    };
    let file = profile(dir(t.path().join("etc/pve/pvetune")).join("100.yaml"));
    // www-data is pmxcfs's group, but only on /etc/pve itself, not in a tree that looks like it.
    chown(&file, None, Some(33)).unwrap();
    let message = refused(&file, &file);
    assert!(message.contains("has group gid 33"), "{message}");
}
