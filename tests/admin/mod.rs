//! Shared by tests/enable.rs and tests/chain.rs: the Ryzen 5900X fixture with storage.cfg, the
//! installed binary and cluster nodes under the root, and a stand-in `qm` (`PVETUNE_QM`) that
//! records its argv, one argument per line, and exits with `QM_EXIT`.
#![allow(dead_code)]

use crate::fixture::{Root, host_copy, read, write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const STORAGE: &str = "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup,snippets\n\n\
lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n\n\
nfs: nas\n\texport /srv/pve\n\tpath /mnt/pve/nas\n\tserver 10.0.0.2\n\tcontent snippets,images\n";

/// The Ryzen host with VM 100 (its profile validates there), storage.cfg, two cluster nodes,
/// the installed binary, and VM 100's hookscript line set to `hook` (or none).
pub fn host(hook: Option<&str>) -> Root {
    let root = host_copy("ryzen-5900x");
    // VM 100 the only tuned VM: the demo's other tuned VMs (a portable profile, ...) are other
    // tests' business, and node-wide commands (doctor, status) would report them too.
    for entry in std::fs::read_dir(root.path.join("etc/pve/pvetune")).unwrap() {
        let path = entry.unwrap().path();
        let Some(vmid) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if vmid != "100" {
            std::fs::remove_file(&path).unwrap();
            let _ =
                std::fs::remove_file(root.path.join(format!("etc/pve/qemu-server/{vmid}.conf")));
        }
    }
    let conf = "/etc/pve/qemu-server/100.conf";
    let mut text: String = read(&root.path, conf)
        .lines()
        .filter(|l| !l.starts_with("hookscript:"))
        .map(|l| format!("{l}\n"))
        .collect();
    if let Some(hook) = hook {
        text.push_str(&format!("hookscript: {hook}\n"));
    }
    write(&root.path, conf, &text);
    write(&root.path, "/etc/pve/storage.cfg", STORAGE);
    for node in ["pve1", "pve2"] {
        std::fs::create_dir_all(root.path.join("etc/pve/nodes").join(node)).unwrap();
    }
    write(
        &root.path,
        "/usr/bin/pvetune",
        "stand-in for the installed binary\n",
    );
    std::fs::create_dir_all(root.path.join("run")).unwrap();
    script(
        &root.path,
        "stand-in/qm",
        "printf '%s\\n' \"$@\" >> \"$QM_LOG\"; printf -- '--\\n' >> \"$QM_LOG\"\n\
         [ \"${QM_EXIT:-0}\" = 0 ] || echo 'VM 100 is locked (backup)' >&2\nexit ${QM_EXIT:-0}\n",
    );
    root
}

/// An executable `#!/bin/sh` script at `rel` under `root`.
pub fn script(root: &Path, rel: &str, body: &str) -> PathBuf {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Inside the root (removed with it), where `fixture::snapshot` does not look.
pub fn qm_log(root: &Path) -> PathBuf {
    root.join("run/qm.log")
}

/// `pvetune --root <root> <args>` with the stand-in qm; `QM_EXIT` from `env`.
pub fn run(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pvetune"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("PVETUNE_QM", root.join("stand-in/qm"))
        .env("QM_LOG", qm_log(root))
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .env_remove("PVETUNE_ROOT")
        .output()
        .expect("run pvetune")
}

/// Every `qm` call so far, each as its argv.
pub fn qm_calls(root: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(qm_log(root)).unwrap_or_default();
    let _ = std::fs::remove_file(qm_log(root));
    text.split_terminator("--\n")
        .map(|call| call.lines().map(String::from).collect())
        .collect()
}

pub fn argv(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
