//! `VmConfig` against hand-written configs (whole-struct equality) and against every `.conf`
//! Proxmox ships in its own test suite (read from `../shared/peer-data`, never copied here,
//! because those files are AGPL).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pvetune::cpuset::CpuSet;
use pvetune::vmconfig::{
    HostPci, HugepageSize, NumaPolicy, NumaSpec, PciId, PciSource, VmConfig, VmConfigError,
};

fn pci(domain: u16, bus: u8, device: u8, function: Option<u8>) -> PciId {
    PciId {
        domain,
        bus,
        device,
        function,
    }
}

fn invalid(text: &str) -> (usize, String, String, String) {
    match VmConfig::parse(text) {
        Err(VmConfigError::Invalid {
            line,
            key,
            value,
            expected,
            ..
        }) => (line, key, value, expected),
        other => panic!("expected Invalid for {text:?}, got {other:?}"),
    }
}

#[test]
fn empty_config_has_qemu_server_defaults() {
    let config = VmConfig::parse("").unwrap();
    assert_eq!(config, VmConfig::default());
    assert_eq!(
        (config.cores, config.sockets, config.memory_mib),
        (1, 1, 512)
    );
    assert_eq!((config.vcpu_count(), config.threads_per_core()), (1, 1));
}

#[test]
fn full_config_parses_every_key_pvetune_reads() {
    let text = "\
#Latency VM%3A pinned
#
affinity: 2-5, 10-13 ,
args: -cpu host -smp '8,sockets=1,cores=4,threads=2' -device foo,bar=1
balloon: 0
boot: order=scsi0
cores: 4
cpu: host,flags=+pdpe1gb
hookscript: local:snippets/pvetune
hostpci0: 0000:0b:00.0,pcie=1,x-vga=on,rombar=0
hostpci1: host=0c:00;0d:00.1,pcie=yes
hostpci2: mapping=gpu1,mdev=nvidia-35
hugepages: 1024
keephugepages: true
allow-ksm: 0
lock: backup
memory: current=8192
name: rt-vm
numa: 1
numa0: cpus=0-1;4-5,hostnodes=0,memory=4096,policy=bind
numa1: cpus=2-3;6-7,hostnodes=1-2,memory=4096,policy=interleave
sockets: 1
vcpus: 6
future-key: whatever=1
";
    let expected = VmConfig {
        name: Some("rt-vm".into()),
        cores: 4,
        sockets: 1,
        vcpus: Some(6),
        smp_threads: Some(2),
        smp_cpus: Some(8),
        memory_mib: 8192,
        balloon: Some(0),
        numa: true,
        numa_nodes: BTreeMap::from([
            (
                0,
                NumaSpec {
                    cpus: vec![0, 1, 4, 5],
                    hostnodes: Some(vec![0]),
                    memory_mib: Some(4096),
                    policy: Some(NumaPolicy::Bind),
                },
            ),
            (
                1,
                NumaSpec {
                    cpus: vec![2, 3, 6, 7],
                    hostnodes: Some(vec![1, 2]),
                    memory_mib: Some(4096),
                    policy: Some(NumaPolicy::Interleave),
                },
            ),
        ]),
        hugepages: Some(HugepageSize::Gib1),
        keephugepages: true,
        allow_ksm: Some(false),
        hotplug_memory: false,
        affinity: Some("2-5,10-13".parse().unwrap()),
        hostpci: BTreeMap::from([
            (
                0,
                HostPci {
                    source: PciSource::Host(vec![pci(0, 0x0b, 0, Some(0))]),
                    pcie: true,
                    x_vga: true,
                },
            ),
            (
                1,
                HostPci {
                    source: PciSource::Host(vec![pci(0, 0x0c, 0, None), pci(0, 0x0d, 0, Some(1))]),
                    pcie: true,
                    x_vga: false,
                },
            ),
            (
                2,
                HostPci {
                    source: PciSource::Mapping("gpu1".into()),
                    pcie: false,
                    x_vga: false,
                },
            ),
        ]),
        lock: Some("backup".into()),
        cpu: Some("host,flags=+pdpe1gb".into()),
        args: Some("-cpu host -smp '8,sockets=1,cores=4,threads=2' -device foo,bar=1".into()),
        hookscript: Some("local:snippets/pvetune".into()),
    };
    let config = VmConfig::parse(text).unwrap();
    assert_eq!(config, expected);
    // The -smp in args wins over `vcpus: 6`: qemu-server appends args after its own -smp.
    assert_eq!(config.vcpu_count(), 8);
    assert_eq!(config.threads_per_core(), 2);
}

#[test]
fn sections_after_the_main_one_do_not_leak() {
    let text = "cores: 2\nmemory: 2048\n\n[PENDING]\ncores: 8\n\n[snap1]\ncores: 16\nnuma: not a bool\naffinity: 3-1\n";
    let config = VmConfig::parse(text).unwrap();
    assert_eq!(
        config,
        VmConfig {
            cores: 2,
            memory_mib: 2048,
            ..VmConfig::default()
        }
    );
}

#[test]
fn unsorted_affinity_is_the_set_it_names() {
    // The shape of karpenter-provider-proxmox's documented VM: SMT siblings interleaved.
    let text = "affinity: 0-7,32-39,8-15,40-47,16-23,48-55,24-31,56-63\nnuma: 1\n\
        numa0: cpus=0-15,hostnodes=0,memory=126976\nnuma3: cpus=48-63,hostnodes=3,memory=126976\n";
    let config = VmConfig::parse(text).unwrap();
    assert_eq!(config.affinity, Some(CpuSet::range(0, 63)));
    assert_eq!(config.numa_nodes[&3].cpus, (48..=63).collect::<Vec<_>>());
    assert_eq!(config.numa_nodes[&3].policy, None);
}

#[test]
fn smp_threads_come_from_the_last_smp_in_args() {
    let threads = |args: &str| {
        VmConfig::parse(&format!("args: {args}"))
            .unwrap()
            .smp_threads
    };
    assert_eq!(threads("-smp 4,sockets=1,cores=2,threads=2"), Some(2));
    assert_eq!(
        threads("-smp \"4,threads=2\" -smp cores=2,threads=1"),
        Some(1)
    );
    assert_eq!(threads("-smp 4,cores=4"), None);
    assert_eq!(threads("-machine smp=3 -name threads=4"), None);
    let (line, key, _, expected) = invalid("cores: 2\nargs: -smp 4,threads=zero\n");
    assert_eq!((line, key.as_str()), (2, "args"));
    assert!(expected.contains("threads="), "{expected}");
}

#[test]
fn booleans_memory_and_hugepages_accept_every_proxmox_spelling() {
    for (word, value) in [("1", true), ("On", true), ("YES", true), ("true", true)] {
        assert_eq!(
            VmConfig::parse(&format!("numa: {word}")).unwrap().numa,
            value
        );
    }
    for word in ["0", "off", "No", "false"] {
        assert!(
            !VmConfig::parse(&format!("keephugepages: {word}"))
                .unwrap()
                .keephugepages
        );
    }
    assert_eq!(VmConfig::parse("memory: 8192").unwrap().memory_mib, 8192);
    assert_eq!(
        VmConfig::parse("memory: current=4096,").unwrap().memory_mib,
        4096
    );
    assert_eq!(
        VmConfig::parse("hugepages: any").unwrap().hugepages,
        Some(HugepageSize::Any)
    );
    assert_eq!(
        VmConfig::parse("hugepages: 2").unwrap().hugepages,
        Some(HugepageSize::Mib2)
    );
}

#[test]
fn invalid_values_name_line_key_value_and_expectation() {
    let (line, key, value, expected) = invalid("#desc\ncores: 2\n\naffinity: 0-3,,5\n");
    assert_eq!(
        (line, key.as_str(), value.as_str()),
        (4, "affinity", "0-3,,5")
    );
    assert!(expected.contains("CPU list"), "{expected}");

    for text in [
        "cores: 0",
        "sockets: -1",
        "vcpus: 2.5",
        "memory: 8",
        "memory: max=8192",
        "balloon: lots",
        "numa: maybe",
        "hugepages: 1g",
        "affinity: all",
        "affinity: 0-N",
        "affinity: 0-7:2/4",
        "numa0: hostnodes=0,memory=1024",
        "numa0: cpus=3-1",
        "numa0: cpus=0,1",
        "numa1: cpus=0-1,policy=strict",
        "hostpci0: 0B:00.0",
        "hostpci0: 0b:00.0,mapping=gpu",
        "hostpci0: 000:0b:00.0",
        "hostpci0: 0b:0.0",
        "hostpci0: pcie=1",
        "hostpci0: 0b:00.0,pcie=maybe",
    ] {
        let (line, key, value, _) = invalid(text);
        assert_eq!(line, 1, "{text}");
        assert_eq!(format!("{key}: {value}"), text);
    }
}

#[test]
fn error_message_is_actionable() {
    let err = VmConfig::parse("numa: sure").unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 1: invalid numa 'sure': expected a boolean: 1|0, on|off, yes|no or true|false"
    );
}

#[test]
fn keys_pvetune_does_not_read_are_accepted() {
    let text = "net0: virtio=AA:BB,bridge=vmbr0\nnuma8: cpus=x\nhostpci16: junk\n\
        tablet: 0\nnot a key line\n  indented: 1\nmeta: creation-qemu=9.0.2\n";
    assert_eq!(VmConfig::parse(text).unwrap(), VmConfig::default());
}

#[test]
fn pci_ids_parse_the_hostpci_grammar_and_print_sysfs_names() {
    let cases = [
        ("0b:00.0", pci(0, 0x0b, 0, Some(0)), "0000:0b:00.0"),
        ("0000:0b:00.0", pci(0, 0x0b, 0, Some(0)), "0000:0b:00.0"),
        ("0b:00", pci(0, 0x0b, 0, None), "0000:0b:00"),
        ("1234:f0:43", pci(0x1234, 0xf0, 0x43, None), "1234:f0:43"),
        ("00001:00:ff.1", pci(1, 0, 0xff, Some(1)), "0001:00:ff.1"),
    ];
    for (text, id, shown) in cases {
        assert_eq!(text.parse::<PciId>().unwrap(), id, "{text}");
        assert_eq!(id.to_string(), shown);
    }
    for bad in [
        "0B:00.0",
        "b:00.0",
        "0b:00.",
        "0b:00.10",
        "10000:00:00.0",
        "0b-00.0",
        "",
    ] {
        assert!(bad.parse::<PciId>().is_err(), "{bad} accepted");
    }
    assert_eq!(
        PciId::parse_sysfs("0000:0b:1f.7").unwrap(),
        pci(0, 0x0b, 0x1f, Some(7))
    );
    for bad in [
        "0b:00.0",
        "0000:0b:00",
        "0000:0B:00.0",
        "0000:0b:20.0",
        "0000:0b:00.8",
        "0000.0b:00:0",
    ] {
        assert!(PciId::parse_sysfs(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn read_attaches_the_path_and_reports_a_missing_file() {
    let tree = common::TempDir::new("vmconfig");
    let root = tree.path().to_path_buf();
    let dir = root.join("etc/pve/qemu-server");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("101.conf"), "cores: 3\nsockets: 2\n").unwrap();
    std::fs::write(dir.join("102.conf"), "cores: 3\nsockets: two\n").unwrap();

    assert_eq!(VmConfig::read(&root, 101).unwrap().vcpu_count(), 6);
    match VmConfig::read(&root, 102) {
        Err(VmConfigError::Invalid { path, line: 2, .. }) => {
            assert_eq!(path, Some(dir.join("102.conf")))
        }
        other => panic!("{other:?}"),
    }
    match VmConfig::read(&root, 103) {
        Err(VmConfigError::NotFound { path }) => assert_eq!(path, dir.join("103.conf")),
        other => panic!("{other:?}"),
    }
}

// ---- Proxmox's own test configs -------------------------------------------------------------

fn peer_data() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peer-data/qemu-server");
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipped: {} is absent (it sits beside the clone in CI)",
            dir.display()
        );
        None
    }
}

fn conf_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            conf_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "conf") {
            out.push(path);
        }
    }
}

fn parse_file(path: &Path) -> VmConfig {
    let text = std::fs::read_to_string(path).unwrap();
    VmConfig::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_proxmox_test_config_parses() {
    let Some(dir) = peer_data() else { return };
    let mut files = Vec::new();
    for sub in [
        "cfg2cmd",
        "parse-config-input",
        "restore-config-input",
        "snapshot-input",
        "real-world",
    ] {
        conf_files(&dir.join(sub), &mut files);
    }
    assert!(files.len() >= 170, "only {} configs found", files.len());
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("aarch64"))
    );
    for file in &files {
        let config = parse_file(file);
        assert!(config.vcpu_count() >= 1, "{}", file.display());
    }
}

#[test]
fn proxmox_configs_give_the_documented_facts() {
    let Some(dir) = peer_data() else { return };
    let cfg2cmd = dir.join("cfg2cmd");

    let multi = parse_file(&cfg2cmd.join("q35-linux-hostpci-multifunction.conf"));
    assert_eq!(
        multi.hostpci[&0].source,
        PciSource::Host(vec![pci(0, 0xf0, 0x43, None)])
    );
    assert_eq!(
        multi.hostpci[&1].source,
        PciSource::Host(vec![pci(0x1234, 0xf0, 0x43, None)])
    );
    assert_eq!(pci(0x1234, 0xf0, 0x43, None).to_string(), "1234:f0:43");

    let mapping = parse_file(&cfg2cmd.join("q35-linux-hostpci-mapping.conf"));
    assert_eq!(
        mapping.hostpci[&1].source,
        PciSource::Mapping("someGpu".into())
    );

    let huge = parse_file(&cfg2cmd.join("memory-hugepages-1g.conf"));
    assert_eq!(
        (
            huge.hugepages,
            huge.sockets,
            huge.cores,
            huge.memory_mib,
            huge.numa
        ),
        (Some(HugepageSize::Gib1), 2, 2, 8192, true)
    );
    let huge2m = parse_file(&cfg2cmd.join("memory-hugepages-2m.conf"));
    assert_eq!(huge2m.hugepages, Some(HugepageSize::Mib2));

    // The invalid `numa:` lives in a snapshot section: it must neither fail nor leak.
    let verify = parse_file(&dir.join("parse-config-input/verify-snapshot.conf"));
    assert_eq!(
        (verify.numa, verify.cores, verify.memory_mib),
        (false, 2, 4096)
    );
    // The main section of this snapshot test holds the lock; its snapshots do not matter.
    let locked = parse_file(&dir.join("snapshot-input/commit/qemu-server/101.conf"));
    assert_eq!(locked.lock.as_deref(), Some("snapshot"));
    let chain = parse_file(&cfg2cmd.join("simple-backingchain.conf"));
    assert_eq!(chain.name.as_deref(), Some("simple"));
}

#[test]
fn real_world_configs_give_the_documented_facts() {
    let Some(dir) = peer_data() else { return };
    let real = dir.join("real-world");

    let vga = parse_file(&real.join("ayufan-206-ubuntu19-vga.conf"));
    assert_eq!(vga.hookscript.as_deref(), Some("local:snippets/exec-cmds"));
    assert!(
        vga.args
            .as_deref()
            .unwrap()
            .contains("out.dev=swapped -soundhw hda")
    );
    assert_eq!(vga.smp_threads, None);
    assert_eq!(vga.balloon, Some(0));
    assert_eq!((vga.cores, vga.hugepages), (5, Some(HugepageSize::Gib1)));
    assert_eq!(
        vga.hostpci,
        BTreeMap::from([
            (
                0,
                HostPci {
                    source: PciSource::Host(vec![pci(0, 2, 0, None)]),
                    pcie: false,
                    x_vga: true,
                }
            ),
            (
                1,
                HostPci {
                    source: PciSource::Host(vec![pci(0, 4, 0, None)]),
                    pcie: false,
                    x_vga: false,
                }
            ),
        ])
    );

    let win = parse_file(&real.join("ayufan-204-win10-vga.conf"));
    assert!(win.hostpci[&0].pcie && win.hostpci[&0].x_vga);
    assert_eq!(win.memory_mib, 10240);

    let karpenter = real.join("karpenter-node-capacity.conf");
    if !karpenter.exists() {
        println!("skipped: {} is absent", karpenter.display());
        return;
    }
    let node = parse_file(&karpenter);
    assert_eq!(node.affinity, Some(CpuSet::range(0, 63)));
    assert!(node.numa);
    assert_eq!(
        node.numa_nodes.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(node.numa_nodes.values().all(|n| n.policy.is_none()));
}
