//! `Topology::read` on generated hosts (checked whole) and on real sysfs captures from
//! hwloc's and util-linux's test suites (checked against what those projects report).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::TempDir;
use common::hostgen::{self, HostSpec, write_host};
use pvetune::cpuset::CpuSet;
use pvetune::topology::{Cpu, CpuKind, HugePool, NumaNode, Topology, TopologyError};

fn set(s: &str) -> CpuSet {
    s.parse().expect("cpulist")
}

fn strings(sets: &[CpuSet]) -> Vec<String> {
    sets.iter().map(CpuSet::to_string).collect()
}

fn example(name: &str) -> HostSpec {
    hostgen::example_hosts()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s)
        .expect("example host")
}

fn generated(spec: &HostSpec) -> (TempDir, Topology) {
    let dir = TempDir::new("host");
    write_host(dir.path(), spec);
    let topo = Topology::read(dir.path()).expect("read generated host");
    read_for_is_read_restricted(dir.path(), &topo);
    (dir, topo)
}

/// `Topology::read_for(cpus)` is `Topology::read` with the CPU entries of `cpus` only, for
/// some CPUs of every core (every third CPU, and one the host does not have).
fn read_for_is_read_restricted(root: &Path, full: &Topology) {
    let mut cpus: CpuSet = full.online.iter().filter(|c| c % 3 == 1).collect();
    cpus.insert(8000);
    let part = Topology::read_for(root, &cpus).expect("read_for");
    let mut want = full.clone();
    want.cpus.retain(|id, _| cpus.contains(*id));
    assert_eq!(part, want, "{}", root.display());
    for cpu in full.online.iter() {
        assert_eq!(part.node_of(cpu), full.node_of(cpu), "node of CPU {cpu}");
    }
}

/// Node ids with their CPU lists.
fn node_cpus(t: &Topology) -> Vec<(u32, String)> {
    t.nodes
        .values()
        .map(|n| (n.id, n.cpus.to_string()))
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
    let path = root.join(rel);
    let meta = fs::symlink_metadata(&path).expect("stat");
    let entry = if meta.file_type().is_symlink() {
        Entry::Link(fs::read_link(&path).expect("readlink"))
    } else if meta.is_dir() {
        for child in fs::read_dir(&path).expect("read_dir") {
            walk(root, &rel.join(child.expect("entry").file_name()), out);
        }
        Entry::Dir
    } else {
        Entry::File(fs::read(&path).expect("read"))
    };
    out.insert(rel.to_path_buf(), entry);
}

fn tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    for top in ["sys", "proc"] {
        if root.join(top).exists() {
            walk(root, Path::new(top), &mut out);
        }
    }
    out
}

#[test]
fn committed_example_hosts_match_generator() {
    let hosts = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hosts");
    let regen = std::env::var_os("PVETUNE_REGEN_HOSTS").is_some_and(|v| v == "1");
    for (name, spec) in hostgen::example_hosts() {
        let committed = hosts.join(name);
        if regen {
            for top in ["sys", "proc"] {
                let _ = fs::remove_dir_all(committed.join(top));
            }
            write_host(&committed, &spec);
            continue;
        }
        let fresh = TempDir::new("regen");
        write_host(fresh.path(), &spec);
        let (want, got) = (tree(fresh.path()), tree(&committed));
        let differ: Vec<_> = want
            .keys()
            .chain(got.keys())
            .filter(|k| want.get(*k) != got.get(*k))
            .collect();
        assert!(
            differ.is_empty(),
            "examples/hosts/{name} is stale (run with PVETUNE_REGEN_HOSTS=1): {differ:?}"
        );
    }
}

#[test]
fn ryzen_5900x_has_two_ccds_as_numa_nodes() {
    let (_dir, t) = generated(&example("ryzen-5900x"));
    assert_eq!(t.online, set("0-23"));
    assert_eq!(t.isolated, CpuSet::new());
    assert_eq!(t.cores().len(), 12);
    assert_eq!(t.cores()[0], set("0,12"));
    assert_eq!(strings(&t.l3_domains()), ["0-5,12-17", "6-11,18-23"]);
    assert_eq!(t.node_of(18), Some(1));
    assert_eq!(t.smt_width(), 2);
    assert_eq!(t.hybrid, None);
    assert_eq!(
        t.cpu(18),
        Some(&Cpu {
            id: 18,
            package: 0,
            die: Some(0),
            core_id: 6,
            siblings: set("6,18"),
            l3: Some(set("6-11,18-23")),
            l3_id: Some(1),
            node: Some(1),
            kind: CpuKind::Unknown,
        })
    );
    let pools = BTreeMap::from([(2048, HugePool::default()), (1048576, HugePool::default())]);
    assert_eq!(
        t.nodes[&0],
        NumaNode {
            id: 0,
            cpus: set("0-5,12-17"),
            mem_total_kib: Some(64 * 1024 * 1024),
            hugepages: pools,
        }
    );
    assert_eq!(
        strings(&t.cores_in(&set("4-7,16"))),
        ["4,16", "5", "6", "7"]
    );
}

#[test]
fn xeon_2s_has_one_l3_and_node_per_socket() {
    let (_dir, t) = generated(&example("xeon-2s"));
    assert_eq!(t.cores().len(), 16);
    assert_eq!(t.cores()[1], set("1,17"));
    assert_eq!(strings(&t.l3_domains()), ["0-7,16-23", "8-15,24-31"]);
    let packages: Vec<_> = t
        .packages()
        .into_iter()
        .map(|(p, s)| (p, s.to_string()))
        .collect();
    assert_eq!(
        packages,
        [(0, "0-7,16-23".into()), (1, "8-15,24-31".into())]
    );
    assert_eq!(
        node_cpus(&t),
        [(0, "0-7,16-23".into()), (1, "8-15,24-31".into())]
    );
}

#[test]
fn intel_hybrid_kinds_come_from_the_pmus() {
    let (_dir, t) = generated(&example("intel-hybrid"));
    let hybrid = t.hybrid.clone().expect("hybrid");
    assert_eq!(
        (hybrid.performance, hybrid.efficiency),
        (set("0-15"), set("16-19"))
    );
    assert_eq!(t.cpu(15).map(|c| c.kind), Some(CpuKind::Performance));
    assert_eq!(t.cpu(16).map(|c| c.kind), Some(CpuKind::Efficiency));
    assert_eq!(t.cores().len(), 12);
    assert_eq!(t.cores()[0], set("0-1"));
    assert_eq!(strings(&t.l3_domains()), ["0-19"]);
    assert_eq!(t.smt_width(), 2);
}

#[test]
fn guest_without_cpufreq_reads_like_a_host() {
    let (_dir, t) = generated(&example("guest-nocpufreq"));
    assert_eq!(strings(&t.cores()), ["0-1", "2-3", "4-5", "6-7"]);
    assert_eq!(strings(&t.l3_domains()), ["0-3", "4-7"]);
    assert_eq!(node_cpus(&t), [(0, "0-3".into()), (1, "4-7".into())]);
}

#[test]
fn offline_cpus_leave_cores_and_nodes() {
    let spec = HostSpec {
        offline: set("3,12"),
        isolated: set("6-11,18-23"),
        ..example("ryzen-5900x")
    };
    let (_dir, t) = generated(&spec);
    assert_eq!(t.online, set("0-2,4-11,13-23"));
    assert_eq!(t.isolated, set("6-11,18-23"));
    assert!(t.cpu(3).is_none());
    assert_eq!(t.cores()[0], set("0"));
    assert_eq!(t.cpu(15).map(|c| c.siblings.clone()), Some(set("15")));
    assert_eq!(t.nodes[&0].cpus, set("0-2,4-5,13-17"));
}

#[test]
fn read_for_reads_nothing_of_the_other_cpus() {
    let spec = example("ryzen-5900x");
    let intact = TempDir::new("intact");
    write_host(intact.path(), &spec);
    let (dir, _) = generated(&spec);
    let vm = set("6-11,18-23");
    // The other CPUs' topology and caches are gone: reading them would fall back to
    // "its own core, no L3" and differ from the intact host.
    for cpu in set("0-5,12-17").iter() {
        let cpu_dir = dir.path().join(format!("sys/devices/system/cpu/cpu{cpu}"));
        fs::remove_dir_all(cpu_dir.join("topology")).unwrap();
        fs::remove_dir_all(cpu_dir.join("cache")).unwrap();
    }
    let want = Topology::read_for(intact.path(), &vm).unwrap();
    let got = Topology::read_for(dir.path(), &vm).unwrap();
    assert_eq!(got, want);
    assert_eq!(strings(&got.cores_in(&vm))[..2], ["6,18", "7,19"]);
    assert_eq!(strings(&got.l3_domains()), ["6-11,18-23"]);
    assert_eq!(got.smt_width(), 2);
    assert_eq!(got.node_of(0), Some(0));
}

#[test]
fn l3_is_found_whatever_its_index_and_missing_levels_are_passed_over() {
    let (dir, full) = generated(&example("xeon-2s"));
    let cache = dir.path().join("sys/devices/system/cpu/cpu9/cache");
    // Old Intel kernels: no L1i entry, L3 at index2 (and no index3).
    fs::remove_dir_all(cache.join("index1")).unwrap();
    fs::rename(cache.join("index2"), cache.join("index1")).unwrap();
    fs::rename(cache.join("index3"), cache.join("index2")).unwrap();
    let t = Topology::read(dir.path()).unwrap();
    assert_eq!(t.cpu(9), full.cpu(9));
    // An entry without a level does not end the scan.
    fs::remove_file(cache.join("index0/level")).unwrap();
    let t = Topology::read(dir.path()).unwrap();
    assert_eq!(t.cpu(9), full.cpu(9));
    // No cache directory at all: no L3.
    fs::remove_dir_all(&cache).unwrap();
    let t = Topology::read(dir.path()).unwrap();
    assert_eq!(
        t.cpu(9).map(|c| (c.l3.clone(), c.l3_id)),
        Some((None, None))
    );
}

#[test]
fn unreadable_cpu_dir_and_bad_online_are_errors() {
    let dir = TempDir::new("broken");
    let err = Topology::read(dir.path()).unwrap_err();
    assert!(matches!(err, TopologyError::CpuDir { ref path, .. } if path.ends_with("system/cpu")));
    fs::create_dir_all(dir.path().join("sys/devices/system/cpu/cpu1")).unwrap();
    fs::write(
        dir.path().join("sys/devices/system/cpu/cpu1/online"),
        "yes\n",
    )
    .unwrap();
    let err = Topology::read(dir.path()).unwrap_err();
    assert!(matches!(err, TopologyError::OnlineFlag { ref value, .. } if value == "yes"));
    fs::write(dir.path().join("sys/devices/system/cpu/online"), "0-x\n").unwrap();
    let err = Topology::read(dir.path()).unwrap_err();
    assert!(matches!(err, TopologyError::OnlineList { ref path, .. } if path.ends_with("online")));
}

#[test]
fn online_cpu_without_topology_is_its_own_core() {
    let dir = TempDir::new("bare");
    fs::create_dir_all(dir.path().join("sys/devices/system/cpu/cpu0")).unwrap();
    fs::write(dir.path().join("sys/devices/system/cpu/online"), "0-1\n").unwrap();
    let t = Topology::read(dir.path()).unwrap();
    assert_eq!(strings(&t.cores()), ["0", "1"]);
    assert_eq!(t.packages()[&0], set("0-1"));
    assert_eq!(node_cpus(&t), [(0, "0-1".into())]);
    assert_eq!(t.nodes[&0].mem_total_kib, None);
}

/// Reads one capture, or `None` (after saying why) when peer-data is absent.
fn capture(rel: &str) -> Option<(TempDir, Topology)> {
    let (dir, root, topo) = common::read_capture(rel)?;
    read_for_is_read_restricted(&root, &topo);
    Some((dir, topo))
}

/// Packages, sibling groups, SMT width, L3 domain sizes.
fn shape(t: &Topology) -> (usize, usize, usize, Vec<usize>) {
    let l3: Vec<usize> = t.l3_domains().iter().map(CpuSet::len).collect();
    (t.packages().len(), t.cores().len(), t.smt_width(), l3)
}

#[test]
fn capture_skylake_sp_dual_socket() {
    let Some((_d, t)) = capture("hwloc/linux/32intel64-2p8co2t+8ve.tar.bz2") else {
        return;
    };
    assert_eq!(t.online, set("0-31"));
    assert_eq!(shape(&t), (2, 16, 2, vec![16, 16]));
    assert_eq!(
        node_cpus(&t),
        [(0, "0-7,16-23".into()), (1, "8-15,24-31".into())]
    );
    assert_eq!(
        t.nodes[&0].hugepages[&2048],
        HugePool {
            nr: 2048,
            free: 2048
        }
    );
    assert_eq!(t.nodes[&0].mem_total_kib, Some(47925628));
    assert!(
        t.cpus
            .values()
            .all(|c| c.die == Some(0) && c.l3_id.is_some())
    );
}

#[test]
fn capture_old_kernel_with_masks_only() {
    let Some((_d, t)) = capture("hwloc/linux/16em64t-4s2c2t.tar.bz2") else {
        return;
    };
    assert_eq!(t.online, set("0-15"));
    assert_eq!(shape(&t), (4, 8, 2, vec![4, 4, 4, 4]));
    assert_eq!(t.cores()[0], set("0,8"));
    assert_eq!(node_cpus(&t), [(0, "0-15".into())]);
    assert_eq!(t.cpu(0).and_then(|c| c.die), None);
}

#[test]
fn capture_old_kernel_with_offline_cpus() {
    let Some((_d, t)) = capture("hwloc/linux/16em64t-4s2c2t-offlines.tar.bz2") else {
        return;
    };
    assert_eq!(t.online, set("0-1,3-4,6-12,15"));
    // L3s in lowest-CPU order: package 0 {0,4,8,12}, 1 {1,9}, 3 {3,7,11,15}, 2 {6,10}.
    assert_eq!(shape(&t), (4, 7, 2, vec![4, 2, 4, 2]));
    assert_eq!(t.cpu(10).map(|c| c.siblings.clone()), Some(set("10")));
}

#[test]
fn capture_sparse_node_ids() {
    let Some((_d, t)) = capture("hwloc/linux/48amd64-4pa2n6c-sparse.tar.bz2") else {
        return;
    };
    let ids: Vec<u32> = t.nodes.keys().copied().collect();
    assert_eq!(ids, [0, 1, 2, 33, 34, 45, 72, 73]);
    assert!(t.nodes.values().all(|n| n.cpus.len() == 6));
    assert_eq!(t.node_of(47), Some(73));
    assert_eq!(shape(&t), (4, 48, 1, vec![6; 8]));
}

#[test]
fn capture_cpuless_gpu_nodes() {
    let Some((_d, t)) = capture("hwloc/linux/nvidiagpunumanodes.tar.bz2") else {
        return;
    };
    assert_eq!(t.online, set("0-15,88-103"));
    let cpus = node_cpus(&t);
    assert_eq!(cpus[..2], [(0, "0-15".into()), (8, "88-103".into())]);
    for id in 250..=255 {
        assert!(t.nodes[&id].cpus.is_empty());
        assert_eq!(t.nodes[&id].mem_total_kib, Some(15728640));
    }
    assert_eq!(t.smt_width(), 4);
    assert_eq!(t.cores().len(), 8);
}

#[test]
fn capture_buggy_numa_gives_each_cpu_the_lowest_node() {
    let Some((_d, t)) = capture("hwloc/linux/8em64t-2s2ca2c-buggynuma.tar.bz2") else {
        return;
    };
    assert_eq!(t.nodes.len(), 8);
    assert_eq!(t.nodes[&0].cpus, set("0-7"));
    assert!(t.nodes.values().skip(1).all(|n| n.cpus.is_empty()));
    assert!(t.cpus.values().all(|c| c.node == Some(0)));
}

#[test]
fn capture_hybrid_without_pmu_dirs() {
    let Some((_d, t)) = capture("hwloc/linux/20em64t-hybrid-1p6c2t+2ca4co1t.tar.bz2") else {
        return;
    };
    assert_eq!(shape(&t), (1, 14, 2, vec![20]));
    assert_eq!(t.hybrid, None);
    assert!(t.cpus.values().all(|c| c.kind == CpuKind::Unknown));
}

#[test]
fn capture_without_cache_dirs() {
    let Some((_d, t)) = capture("hwloc/linux/fakememinitiators-1np2c+1npp+gi.tar.bz2") else {
        return;
    };
    assert_eq!(t.l3_domains(), Vec::<CpuSet>::new());
    assert_eq!(t.cores().len(), 8);
    let cpus = node_cpus(&t);
    assert_eq!(
        cpus[..4],
        [
            (0, "0-1".into()),
            (1, "2-3".into()),
            (2, "4-5".into()),
            (3, "6-7".into())
        ]
    );
    assert_eq!(t.nodes[&0].mem_total_kib, Some(0));
    assert_eq!(t.nodes.len(), 11);
}

#[test]
fn capture_vmware_guest() {
    let Some((_d, t)) = capture("util-linux-lscpu/vmware_fpe.tar.gz") else {
        return;
    };
    assert_eq!(t.online, set("0-15"));
    assert_eq!(shape(&t), (2, 8, 2, vec![4, 4, 4, 4]));
    assert_eq!(t.nodes.len(), 4);
    assert!(
        t.nodes
            .values()
            .all(|n| n.cpus.len() == 4 && n.mem_total_kib.is_none())
    );
}
