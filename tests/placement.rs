//! Placement on topologies shaped like real machines' sysfs: generated trees (the 5900X, a
//! 2-socket Xeon whose packages take turns in the numbering, an EPYC with 16 L3 domains on 8
//! NUMA nodes, an Intel hybrid, a host with offline CPUs) and real captures of hwloc's and
//! util-linux's test suites read as they are. The same portable profile on every one; VMs never
//! overlap; a request that does not fit says what was asked, what is free and who holds the rest.

mod common;

use common::TempDir;
use common::hostgen::{self, CpuFreqSpec, HostSpec, NodeSpec, Numbering, write_host};
use pvetune::cpuset::CpuSet;
use pvetune::placement::{Ask, DeviceNode, Placed, place};
use pvetune::profile::{PlaceRequest, SmtPolicy, Within};
use pvetune::topology::Topology;
use std::collections::BTreeMap;

fn set(s: &str) -> CpuSet {
    s.parse().expect("cpulist")
}

fn nodes(per_node: u32, count: u32) -> Vec<NodeSpec> {
    (0..count)
        .map(|n| NodeSpec {
            cores: (n * per_node..(n + 1) * per_node).collect(),
            mem_total_kib: 64 << 20,
            hugepages: vec![(2048, 0)],
        })
        .collect()
}

fn example(name: &str) -> HostSpec {
    hostgen::example_hosts()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s)
        .expect("example host")
}

/// The hosts of the issue, by name.
fn host(name: &str) -> HostSpec {
    let ryzen = example("ryzen-5900x");
    match name {
        "ryzen-5900x" | "intel-hybrid" => example(name),
        // Dual Xeon E5 as many servers number it: CPU 0 on package 0, CPU 1 on package 1, ...
        // the second threads from 16 on (hwloc's 16em64t-4s2c2t has the same pattern).
        "xeon-interleaved" => HostSpec {
            packages: 2,
            cores_per_package: 8,
            numbering: Numbering::PackagesInterleaved,
            cores_per_l3: 8,
            nodes: nodes(8, 2),
            cpufreq: Some(CpuFreqSpec {
                driver: "intel_pstate",
                governors: &["performance", "powersave"],
                governor: "powersave",
            }),
            ..ryzen
        },
        // EPYC 7502 in NPS4: 2 x 32 cores, a CCX (L3) of 4 cores, 4 nodes per package.
        "epyc-nps4" => HostSpec {
            packages: 2,
            cores_per_package: 32,
            cores_per_l3: 4,
            nodes: nodes(8, 8),
            ..ryzen
        },
        // The 5900X with CPU 13 and 14 offline (cores 1 and 2 have one thread left) and the
        // whole of core 5 (5, 17) offline.
        "ryzen-offline" => HostSpec {
            offline: set("5,13-14,17"),
            ..ryzen
        },
        other => panic!("no host {other}"),
    }
}

fn generated(name: &str) -> (TempDir, Topology) {
    let dir = TempDir::new("placement");
    write_host(dir.path(), &host(name));
    let topo = Topology::read(dir.path()).expect("read generated host");
    (dir, topo)
}

fn ask(request: &PlaceRequest, vcpus: u32) -> Ask<'_> {
    Ask {
        request,
        vcpus,
        devices: &[],
        memory_nodes: None,
    }
}

fn place_on(topo: &Topology, request: &PlaceRequest, others: &BTreeMap<u32, CpuSet>) -> Placed {
    place(topo, &ask(request, 4), others).unwrap_or_else(|e| panic!("{e}"))
}

/// What every placement must be: the asked number of CPUs, online, none of another VM's,
/// not CPU 0's core, inside one L3 domain when one can hold it.
fn assert_sensible(topo: &Topology, placed: &Placed, n: usize, others: &BTreeMap<u32, CpuSet>) {
    assert_eq!(placed.cpus.len(), n, "{placed:?}");
    assert!(placed.cpus.is_subset(&topo.online), "{placed:?}");
    for held in others.values() {
        assert!(placed.cpus.is_disjoint(held), "{placed:?} overlaps {held}");
    }
    let core0 = topo.cores().into_iter().find(|c| c.contains(0)).unwrap();
    assert!(placed.cpus.is_disjoint(&core0), "{placed:?}");
    let l3s: std::collections::BTreeSet<_> = placed
        .cpus
        .iter()
        .map(|c| {
            topo.cpu(c)
                .and_then(|c| c.l3.as_ref().and_then(CpuSet::first))
        })
        .collect();
    assert_eq!(l3s.len(), 1, "one L3 domain: {placed:?}");
    assert!(
        placed.why.iter().any(|w| w.starts_with("chose L3 domain")),
        "{placed:?}"
    );
}

/// The portable profile of the issue: 4 CPUs, nothing else said.
#[test]
fn the_same_portable_request_on_every_host() {
    let request = PlaceRequest {
        count: Some(4),
        ..Default::default()
    };
    let none = BTreeMap::new();
    for (name, want) in [
        // The first CCD's second and third cores, both threads (CPU 0's core stays the host's).
        ("ryzen-5900x", "1-2,13-14"),
        // Package 0's cores 1 and 2: CPUs 2 and 4 with their siblings 18 and 20.
        ("xeon-interleaved", "2,4,18,20"),
        // The first CCX (cores 0-3, CPU 0's core left out): cores 1 and 2.
        ("epyc-nps4", "1-2,65-66"),
        // Two P-cores with both threads, never the E-cores (16-19).
        ("intel-hybrid", "2-5"),
        // Whole cores 3 and 4, not the cores left with one online thread.
        ("ryzen-offline", "3-4,15-16"),
    ] {
        let (_dir, topo) = generated(name);
        let placed = place_on(&topo, &request, &none);
        assert_eq!(placed.cpus, set(want), "{name}: {:#?}", placed.why);
        assert_sensible(&topo, &placed, 4, &none);
    }
}

#[test]
fn twelve_vcpus_on_the_5900x_take_the_second_ccd() {
    let (_dir, topo) = generated("ryzen-5900x");
    let request = PlaceRequest::default();
    let placed = place(&topo, &ask(&request, 12), &BTreeMap::new()).unwrap();
    assert_eq!(placed.cpus, set("6-11,18-23"));
    let why = placed.why.join("\n");
    assert!(
        why.contains("not considered: 0,12: CPU 0's core, kept for the host"),
        "{why}"
    );
    assert!(
        why.contains(
            "chose L3 domain 6-11,18-23 (12 usable); rejected 1-5,13-17: 10 usable, too few free"
        ),
        "{why}"
    );
}

#[test]
fn two_vms_never_overlap_and_a_third_that_does_not_fit_says_why() {
    let (_dir, topo) = generated("ryzen-5900x");
    let twelve = PlaceRequest::default();
    let mut held = BTreeMap::new();
    let a = place(&topo, &ask(&twelve, 12), &held).unwrap();
    held.insert(100, a.cpus.clone());
    let b = place(&topo, &ask(&twelve, 8), &held).unwrap();
    assert_sensible(&topo, &b, 8, &held);
    assert_eq!(b.cpus, set("1-4,13-16"));
    held.insert(101, b.cpus.clone());
    assert!(
        b.why.iter().any(|w| w == "held by VM 100: 6-11,18-23"),
        "{b:?}"
    );
    let err = place(&topo, &ask(&twelve, 4), &held)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "nothing fits: asked 4 CPUs (smt prefer); this host has CPU 5,17 free (2 usable for \
         this request); held by running VMs: VM 100: 6-11,18-23, VM 101: 1-4,13-16; not \
         considered: 0,12 (CPU 0's core, kept for the host unless cpu0-core: allow)"
    );
    // Stopping VM 100 frees exactly its CPUs: the same request then fits there.
    held.remove(&100);
    let c = place(&topo, &ask(&twelve, 4), &held).unwrap();
    assert!(c.cpus.is_subset(&set("5-11,17-23")), "{c:?}");
}

#[test]
fn within_l3_refuses_what_only_spans_two() {
    let (_dir, topo) = generated("ryzen-5900x");
    let request = PlaceRequest {
        count: Some(16),
        within: Within::L3,
        ..Default::default()
    };
    let err = place(&topo, &ask(&request, 16), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("nothing fits: asked 16 CPUs (smt prefer, within one l3)"),
        "{err}"
    );
    assert!(err.contains("at most 12 in one L3 domain"), "{err}");
    // Without the constraint it spans both, fewest domains first.
    let any = PlaceRequest {
        within: Within::Any,
        ..request
    };
    let placed = place(&topo, &ask(&any, 16), &BTreeMap::new()).unwrap();
    assert_eq!(
        placed.cpus,
        set("1-2,6-11,13-14,18-23"),
        "{:#?}",
        placed.why
    );
    assert!(
        placed.why.iter().any(|w| w.contains("2 L3 domain(s)")),
        "{placed:?}"
    );
}

#[test]
fn epyc_fills_one_node_across_its_ccxs_before_another_node() {
    let (_dir, topo) = generated("epyc-nps4");
    // 12 CPUs: no CCX holds them (8 threads each); node 0 (two CCXs, CPU 0's core out) does.
    let request = PlaceRequest {
        count: Some(12),
        ..Default::default()
    };
    let placed = place(&topo, &ask(&request, 12), &BTreeMap::new()).unwrap();
    let nodes: std::collections::BTreeSet<_> =
        placed.cpus.iter().map(|c| topo.node_of(c)).collect();
    assert_eq!(nodes.len(), 1, "{placed:?}");
    assert!(
        placed
            .why
            .iter()
            .any(|w| w.starts_with("no L3 domain has 12 usable"))
    );
    assert!(placed.why.iter().any(|w| w.starts_with("chose NUMA node")));
    // Node 0 has 14 usable (CPU 0's core out), the others 16: the tighter one, node 0; in it
    // the whole second CCX (cores 4-7) and two cores of the first.
    assert_eq!(placed.cpus, set("1-2,4-7,65-66,68-71"), "{:#?}", placed.why);
    assert!(
        placed
            .why
            .iter()
            .any(|w| w.contains("6 core(s), 2 L3 domain(s), 1 NUMA node(s)"))
    );
}

#[test]
fn smt_isolate_holds_the_siblings_idle() {
    let (_dir, topo) = generated("ryzen-5900x");
    let request = PlaceRequest {
        smt: SmtPolicy::Isolate,
        ..Default::default()
    };
    let placed = place(&topo, &ask(&request, 4), &BTreeMap::new()).unwrap();
    assert_eq!(placed.cpus, set("1-4,13-16"));
    assert!(placed.why.iter().any(|w| w.contains("stay idle")));
}

#[test]
fn smt_require_fails_without_smt_and_whole_cores_round_up() {
    let (_dir, topo) = generated("ryzen-5900x");
    let whole = PlaceRequest {
        whole_cores: true,
        ..Default::default()
    };
    let placed = place(&topo, &ask(&whole, 3), &BTreeMap::new()).unwrap();
    assert_eq!(placed.cpus, set("1-2,13-14"), "3 CPUs round up to 2 cores");
    let dir = TempDir::new("nosmt");
    write_host(
        dir.path(),
        &HostSpec {
            threads_per_core: 1,
            ..host("ryzen-5900x")
        },
    );
    let nosmt = Topology::read(dir.path()).unwrap();
    let require = PlaceRequest {
        smt: SmtPolicy::Require,
        ..Default::default()
    };
    let err = place(&nosmt, &ask(&require, 4), &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("this host has no SMT"), "{err}");
}

#[test]
fn memory_and_devices_pick_the_node() {
    let (_dir, topo) = generated("xeon-interleaved");
    let request = PlaceRequest {
        near_devices: true,
        ..Default::default()
    };
    let gpu = [DeviceNode {
        device: "hostpci0 0000:81:00.0".into(),
        node: Some(1),
    }];
    let on_dev = place(
        &topo,
        &Ask {
            devices: &gpu,
            ..ask(&request, 4)
        },
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(
        on_dev.cpus,
        set("1,3,17,19"),
        "package 1 = node 1: {:#?}",
        on_dev.why
    );
    let on_mem = place(
        &topo,
        &Ask {
            memory_nodes: Some(vec![1]),
            ..ask(&PlaceRequest::default(), 4)
        },
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(on_mem.cpus, on_dev.cpus);
    let conflict = place(
        &topo,
        &Ask {
            devices: &gpu,
            memory_nodes: Some(vec![0]),
            ..ask(&request, 4)
        },
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(
        conflict.to_string().contains("no CPU is near both"),
        "{conflict}"
    );
}

#[test]
fn performance_only_and_host_cores() {
    let (_dir, topo) = generated("intel-hybrid");
    let p_only = PlaceRequest {
        performance_only: true,
        ..Default::default()
    };
    // 14 P-threads besides CPU 0's core: 16 do not fit on P-cores only.
    let err = place(&topo, &ask(&p_only, 16), &BTreeMap::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("16-19 (E-cores (core-type: performance))"),
        "{err}"
    );
    let placed = place(&topo, &ask(&p_only, 14), &BTreeMap::new()).unwrap();
    assert_eq!(placed.cpus, set("2-15"));
    // Leaving 5 whole cores to the host: CPU 0's core and the 4 E-cores are only 5.
    let keep = PlaceRequest {
        host_cores: 6,
        ..p_only
    };
    let err = place(&topo, &ask(&keep, 14), &BTreeMap::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("would leave the host 5 whole core(s)"),
        "{err}"
    );
}

/// Real sysfs from hwloc's test suite, read as it is.
fn capture(rel: &str) -> Option<(TempDir, Topology)> {
    common::read_capture(rel).map(|(dir, _, topo)| (dir, topo))
}

#[test]
fn portable_request_on_real_captures() {
    let none = BTreeMap::new();
    for (rel, want) in [
        // 4 sockets of 2 cores, packages take turns, siblings +8: core (4,12) of package 0.
        ("hwloc/linux/16em64t-4s2c2t.tar.bz2", "4,12"),
        // The same machine with CPUs offline.
        // The same machine with CPUs offline: package 1 has one core left, a whole L3 of 2
        // CPUs, the tightest fit.
        ("hwloc/linux/16em64t-4s2c2t-offlines.tar.bz2", "1,9"),
        // Opteron 6276: 8 NUMA nodes, an L3 each; the kernel reports each Bulldozer module's
        // two cores as siblings: the module after CPU 0's.
        ("hwloc/linux/64amd64-4s2n4ca2co.tar.bz2", "2-3"),
        // Raptor Lake i7-1370P (no PMU directories in the capture): a P-core pair.
        ("hwloc/linux/20em64t-hybrid-1p6c2t+2ca4co1t.tar.bz2", "2-3"),
        // Skylake-SP, 2 packages, siblings +16.
        ("hwloc/linux/32intel64-2p8co2t+8ve.tar.bz2", "1,17"),
        // util-linux's 4-socket Xeon X7550: packages take turns in fours, sparse node ids
        // (0, 2, 3): package 0 (CPUs 0,4,8,...), its second and third cores.
        ("util-linux-lscpu/x86_64-64cpu.tar.gz", "4,8,36,40"),
    ] {
        let Some((_dir, topo)) = capture(rel) else {
            return;
        };
        let n = set(want).len();
        let request = PlaceRequest {
            count: Some(n as u32),
            ..Default::default()
        };
        let placed = place_on(&topo, &request, &none);
        assert_eq!(placed.cpus, set(want), "{rel}: {:#?}", placed.why);
        assert_sensible(&topo, &placed, n, &none);
    }
}
