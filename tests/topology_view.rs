//! `pvetune topology` (snapshots of the picture and the JSON on several hosts, with VMs holding
//! CPUs from the ledger) and `pvetune suggest` (seed 003's layout on the 5900X), through the
//! real binary on fixture trees.
//!
//! Snapshots live in tests/snapshots/; `PVETUNE_REGEN_SNAPSHOTS=1` rewrites them.

mod common;
mod fixture;

use common::hostgen::{self, HostSpec, write_host};
use fixture::{host_copy, pvetune, start_vm, stderr, stdout, temp_dir, write};
use pvetune::cpuset::CpuSet;
use pvetune::topoview;
use std::path::{Path, PathBuf};

fn snapshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name)
}

fn assert_snapshot(name: &str, got: &str) {
    let path = snapshot_path(name);
    if std::env::var_os("PVETUNE_REGEN_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (PVETUNE_REGEN_SNAPSHOTS=1 writes it)",
            path.display()
        )
    });
    assert_eq!(got, want, "{name} differs from its snapshot");
}

fn topology(root: &Path, args: &[&str]) -> String {
    let mut all = vec!["topology"];
    all.extend(args);
    let out = pvetune(root, &all);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn topology_of_the_example_hosts() {
    for host in ["ryzen-5900x", "xeon-2s", "intel-hybrid", "guest-nocpufreq"] {
        let root = fixture::example_host(host);
        let text = topology(&root, &[]);
        assert!(
            !text.contains('\x1b'),
            "no colour without a terminal: {text}"
        );
        assert_snapshot(&format!("topology-{host}.txt"), &text);
    }
}

#[test]
fn topology_json_of_the_xeon() {
    let root = fixture::example_host("xeon-2s");
    let text = topology(&root, &["--json"]);
    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(value["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(
        value["nodes"][1]["packages"][0]["l3"][0]["cpus"],
        "8-15,24-31"
    );
    assert_snapshot("topology-xeon-2s.json", &text);
}

#[test]
fn topology_shows_who_holds_each_cpu() {
    let root = host_copy("ryzen-5900x");
    let _vm = start_vm(&root.path, 100);
    let text = topology(&root.path, &[]);
    assert!(
        text.contains("core 6,18        6 VM 100    18 VM 100"),
        "{text}"
    );
    assert!(
        text.contains("core 0,12        0 host    12 host"),
        "{text}"
    );
    assert!(text.contains("held: VM 100: 6-11,18-23"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&topology(&root.path, &["--json"])).unwrap();
    assert_eq!(json["vms"]["100"], "6-11,18-23");
    let thread = &json["nodes"][1]["packages"][0]["l3"][0]["cores"][0]["threads"][1];
    assert_eq!(thread["cpu"], 18);
    assert_eq!(thread["vm"], 100);
}

#[test]
fn topology_with_offline_and_isolated_cpus() {
    let root = temp_dir("offline");
    let ryzen = hostgen::example_hosts().remove(0).1;
    write_host(
        &root.path,
        &HostSpec {
            offline: "5,13-14,17".parse::<CpuSet>().unwrap(),
            isolated: "8-11,20-23".parse::<CpuSet>().unwrap(),
            ..ryzen
        },
    );
    let text = topology(&root.path, &[]);
    assert_snapshot("topology-ryzen-offline.txt", &text);
    assert!(text.contains("offline 5,13-14,17"), "{text}");
    assert!(text.contains("      core 1           1 host\n"), "{text}");
    assert!(text.contains("8 host isolated"), "{text}");
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    use std::ffi::OsStr;
    assert!(topoview::use_colour(true, None));
    assert!(topoview::use_colour(true, Some(OsStr::new(""))));
    assert!(!topoview::use_colour(true, Some(OsStr::new("1"))));
    assert!(!topoview::use_colour(false, None));
    let root = host_copy("ryzen-5900x");
    let _vm = start_vm(&root.path, 100);
    let view = topoview::read(&pvetune::root::Root::new(&root.path)).unwrap();
    let coloured = topoview::render(&view, true).join("\n");
    assert!(coloured.contains("\x1b[36mVM 100\x1b[0m"), "{coloured}");
    let plain = topoview::render(&view, false).join("\n");
    assert!(!plain.contains('\x1b'));
    assert_eq!(
        plain,
        strip_ansi(&coloured),
        "the same picture, colour aside"
    );
}

/// `text` without its `ESC [ ... m` sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("\x1b[") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        rest = after.find('m').map_or("", |m| &after[m + 1..]);
    }
    out.push_str(rest);
    out
}

#[test]
fn suggest_on_the_5900x_gives_seed_003s_layout() {
    let root = host_copy("ryzen-5900x");
    let before = fixture::snapshot(&root.path);
    let out = pvetune(&root.path, &["suggest", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    // The VM on the second CCD, vCPU pairs on sibling threads, emulator and iothreads on the
    // first CCD: the libvirt layout the seed writes by hand.
    assert!(
        lines.contains(&"# Where it lands on this host now: CPUs 6-11,18-23"),
        "{text}"
    );
    assert!(
        text.contains("#   vCPU 0 -> 6, vCPU 1 -> 18, vCPU 2 -> 7, vCPU 3 -> 19"),
        "{text}"
    );
    assert!(
        lines.contains(&"#   emulator threads and iothreads -> 0-5,12-17"),
        "{text}"
    );
    // A portable profile: no host CPU number in it.
    let profile: String = lines
        .iter()
        .skip_while(|l| !l.starts_with("cpus:"))
        .take_while(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(profile.starts_with("cpus:\n  within: l3"), "{profile}");
    assert!(
        !profile.chars().any(|c| c.is_ascii_digit() && c != '3'),
        "{profile}"
    );
    // The VM config lines, each after its explanation.
    for line in [
        "cores: 6",
        "sockets: 1",
        "numa: 1",
        "numa0: cpus=0-11,hostnodes=1,memory=16384,policy=bind",
        "affinity: 6-11,18-23",
        "args: -cpu host,topoext=on -smp 12,sockets=1,cores=6,threads=2,maxcpus=12",
    ] {
        let at = lines
            .iter()
            .position(|l| *l == line)
            .unwrap_or_else(|| panic!("{line}: {text}"));
        assert!(
            lines[at - 1].starts_with('#') || line == "sockets: 1",
            "{line}: {text}"
        );
    }
    assert_eq!(
        fixture::snapshot(&root.path),
        before,
        "suggest changes nothing"
    );
    // The suggested profile, used as the VM's profile, places the VM exactly there.
    let profile_text: String = profile
        .lines()
        .map(|l| l.split('#').next().unwrap().trim_end())
        .map(|l| format!("{l}\n"))
        .collect();
    write(&root.path, "/etc/pve/pvetune/100.yaml", &profile_text);
    let plan = pvetune(&root.path, &["plan", "100", "--phase", "post-start"]);
    let plan = stdout(&plan);
    assert!(plan.contains("vCPU 1 (not running): - -> 18"), "{plan}");
    assert!(
        plan.contains("emulator threads (not running): - -> 0-5,12-17"),
        "{plan}"
    );
}

#[test]
fn suggest_on_an_intel_host_has_no_topoext_and_a_vm_without_smt() {
    let root = host_copy("xeon-2s");
    write(
        &root.path,
        "/etc/pve/qemu-server/201.conf",
        "cores: 3\nmemory: 4096\nname: odd\n",
    );
    let out = pvetune(&root.path, &["suggest", "201"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("args: -smp 3,sockets=1,cores=3,threads=1,maxcpus=3"),
        "{text}"
    );
    assert!(!text.contains("topoext"), "{text}");
}

#[test]
fn topology_of_real_captures() {
    let Some(peer) = common::peer_data() else {
        println!("skipped: ../shared/peer-data not present");
        return;
    };
    for (rel, name) in [
        // 4 sockets whose CPUs take turns, some offline (hwloc).
        (
            "hwloc/linux/16em64t-4s2c2t-offlines.tar.bz2",
            "16em64t-4s2c2t-offlines",
        ),
        // 8 NUMA nodes, an L3 each (hwloc).
        (
            "hwloc/linux/64amd64-4s2n4ca2co.tar.bz2",
            "64amd64-4s2n4ca2co",
        ),
    ] {
        let (_dir, root) = common::extract_capture(&peer.join(rel));
        let text = topology(&root, &[]);
        assert_snapshot(&format!("topology-capture-{name}.txt"), &text);
    }
}
