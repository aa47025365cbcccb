//! Writes fixture host trees (`sys/` and `proc/`) shaped like a 6.x kernel prints them, from a
//! small description of the machine. The committed `examples/hosts/*` trees come from here.
//!
//! Shapes copied from real kernels: every file ends with a newline; masks (`%*pb`) are 32-bit
//! hex words, most significant first, the top word only as many digits as `nr_cpu_ids` needs
//! (`fffff` for 20 CPUs); lists (`%*pbl`) are collapsed ranges; offline CPUs keep only their
//! `online` file (the kernel removes `topology/` and `cache/` on unplug); `cpuN/cpufreq` is a
//! symlink to `../cpufreq/policyN`.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use pvetune::cpuset::CpuSet;

/// How the kernel numbers SMT threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbering {
    /// CPU N and N + cores are siblings (AMD, most Intel servers).
    SiblingsLast,
    /// CPUs 2N and 2N + 1 are siblings (Intel clients, QEMU guests).
    Interleaved,
    /// Packages take turns (CPU 0 on package 0, CPU 1 on package 1, ...), siblings after
    /// every core's first thread: many 2-socket Xeon servers (hwloc's `16em64t-4s2c2t`).
    PackagesInterleaved,
}

#[derive(Debug, Clone)]
pub struct CpuFreqSpec {
    pub driver: &'static str,
    pub governors: &'static [&'static str],
    pub governor: &'static str,
}

#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Core indexes (0-based across packages) whose CPUs belong to this node.
    pub cores: Vec<u32>,
    pub mem_total_kib: u64,
    /// (page size in kB, nr_hugepages) per pool.
    pub hugepages: Vec<(u64, u64)>,
}

/// Intel hybrid: `p_cores` with `threads_per_core` threads numbered first, then `e_cores`
/// single-threaded cores.
#[derive(Debug, Clone, Copy)]
pub struct HybridSpec {
    pub p_cores: u32,
    pub e_cores: u32,
}

#[derive(Debug, Clone)]
pub struct HostSpec {
    pub packages: u32,
    /// Ignored when `hybrid` is set (then there is one package of p_cores + e_cores).
    pub cores_per_package: u32,
    pub threads_per_core: u32,
    pub numbering: Numbering,
    pub cores_per_l3: u32,
    /// Node N is `nodes[N]`; empty means no `node/` directory at all.
    pub nodes: Vec<NodeSpec>,
    pub cpufreq: Option<CpuFreqSpec>,
    pub isolated: CpuSet,
    pub offline: CpuSet,
    pub hybrid: Option<HybridSpec>,
    /// `/proc/sys/kernel/osrelease` (what pvetune reads the kernel's cpuset rules from).
    pub kernel: &'static str,
}

/// The kernel of the example hosts: Proxmox VE 9's.
pub const PVE9_KERNEL: &str = "6.17.2-1-pve";

/// One physical core of the generated machine.
struct Core {
    index: u32,
    package: u32,
    core_id: u32,
    l3: u32,
    cpus: CpuSet,
    performance: bool,
}

fn layout(spec: &HostSpec) -> Vec<Core> {
    let tpc = spec.threads_per_core;
    if let Some(h) = spec.hybrid {
        let p = (0..h.p_cores).map(|c| Core {
            index: c,
            package: 0,
            core_id: c,
            l3: 0,
            cpus: (c * tpc..(c + 1) * tpc).collect(),
            performance: true,
        });
        let e = (0..h.e_cores).map(|e| Core {
            index: h.p_cores + e,
            package: 0,
            core_id: h.p_cores + e,
            l3: 0,
            cpus: [h.p_cores * tpc + e].into_iter().collect(),
            performance: false,
        });
        return p.chain(e).collect();
    }
    let cpp = spec.cores_per_package;
    let ncores = spec.packages * cpp;
    let l3_per_package = cpp.div_ceil(spec.cores_per_l3);
    (0..ncores)
        .map(|c| Core {
            index: c,
            package: c / cpp,
            core_id: c % cpp,
            l3: (c / cpp) * l3_per_package + (c % cpp) / spec.cores_per_l3,
            cpus: (0..tpc)
                .map(|t| match spec.numbering {
                    Numbering::SiblingsLast => c + t * ncores,
                    Numbering::Interleaved => c * tpc + t,
                    Numbering::PackagesInterleaved => {
                        (c % cpp) * spec.packages + c / cpp + t * ncores
                    }
                })
                .collect(),
            performance: true,
        })
        .collect()
}

/// The kernel's `%*pb`: 32-bit words, most significant first, the top word `ceil(bits/4)`
/// digits wide.
pub fn mask(set: &CpuSet, nbits: u32) -> String {
    let nwords = nbits.div_ceil(32).max(1);
    (0..nwords)
        .rev()
        .map(|w| {
            let value: u32 = (0..32)
                .filter(|b| set.contains(w * 32 + b))
                .fold(0, |acc, b| acc | (1 << b));
            let width = if w == nwords - 1 {
                (nbits - 32 * w).div_ceil(4).max(1) as usize
            } else {
                8
            };
            format!("{value:0width$x}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes `text` plus the newline every sysfs/procfs show function ends with.
fn put(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("create fixture dir");
    fs::write(&path, format!("{text}\n")).expect("write fixture file");
}

/// An empty file, as write-only procfs entries (`drop_caches`) look in a copy.
fn put_empty(root: &Path, rel: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("create fixture dir");
    fs::write(&path, "").expect("write fixture file");
}

fn union<'a>(sets: impl Iterator<Item = &'a CpuSet>) -> CpuSet {
    sets.fold(CpuSet::new(), |acc, s| acc.union(s))
}

pub fn write_host(root: &Path, spec: &HostSpec) {
    let cores = layout(spec);
    let all = union(cores.iter().map(|c| &c.cpus));
    let nbits = all.last().map_or(1, |l| l + 1); // nr_cpu_ids: possible = present here
    let online = all.difference(&spec.offline);
    let cpu = "sys/devices/system/cpu";
    put(root, &format!("{cpu}/online"), &online.to_string());
    put(root, &format!("{cpu}/possible"), &all.to_string());
    put(root, &format!("{cpu}/present"), &all.to_string());
    put(root, &format!("{cpu}/offline"), &spec.offline.to_string());
    put(root, &format!("{cpu}/isolated"), &spec.isolated.to_string());
    put(root, &format!("{cpu}/kernel_max"), "8191");

    for core in &cores {
        let package = union(
            cores
                .iter()
                .filter(|c| c.package == core.package)
                .map(|c| &c.cpus),
        )
        .intersection(&online);
        let l3 =
            union(cores.iter().filter(|c| c.l3 == core.l3).map(|c| &c.cpus)).intersection(&online);
        let thread = core.cpus.intersection(&online);
        for id in core.cpus.iter() {
            let dir = format!("{cpu}/cpu{id}");
            // The boot CPU cannot be unplugged on x86, so it has no `online` attribute.
            if id != 0 {
                put(
                    root,
                    &format!("{dir}/online"),
                    if online.contains(id) { "1" } else { "0" },
                );
            }
            if !online.contains(id) {
                continue;
            }
            let t = format!("{dir}/topology");
            put(
                root,
                &format!("{t}/physical_package_id"),
                &core.package.to_string(),
            );
            put(root, &format!("{t}/die_id"), "0");
            put(root, &format!("{t}/core_id"), &core.core_id.to_string());
            put(root, &format!("{t}/cluster_id"), &core.core_id.to_string());
            for (name, set) in [
                ("thread_siblings", &thread),
                ("core_cpus", &thread),
                ("core_siblings", &package),
                ("package_cpus", &package),
            ] {
                put(root, &format!("{t}/{name}"), &mask(set, nbits));
                put(root, &format!("{t}/{name}_list"), &set.to_string());
            }
            put(root, &format!("{t}/die_cpus_list"), &package.to_string());
            let caches = [
                (1, "Data", core.index, "32K", &thread),
                (1, "Instruction", core.index, "32K", &thread),
                (2, "Unified", core.index, "512K", &thread),
                (3, "Unified", core.l3, "32768K", &l3),
            ];
            for (k, (level, kind, cache_id, size, shared)) in caches.into_iter().enumerate() {
                let c = format!("{dir}/cache/index{k}");
                put(root, &format!("{c}/level"), &level.to_string());
                put(root, &format!("{c}/type"), kind);
                put(root, &format!("{c}/id"), &cache_id.to_string());
                put(root, &format!("{c}/size"), size);
                put(root, &format!("{c}/shared_cpu_list"), &shared.to_string());
                put(root, &format!("{c}/shared_cpu_map"), &mask(shared, nbits));
            }
            if let Some(freq) = &spec.cpufreq {
                write_policy(root, id, freq);
            }
        }
    }
    write_nodes(root, spec, &cores, &online, nbits);
    if spec.hybrid.is_some() {
        let pick = |p: bool| {
            union(cores.iter().filter(|c| c.performance == p).map(|c| &c.cpus)).to_string()
        };
        put(root, "sys/devices/cpu_core/cpus", &pick(true));
        put(root, "sys/devices/cpu_atom/cpus", &pick(false));
    }
    write_irqs(root, &cores, &online, nbits);
    write_cpuinfo(root, spec, &cores, &online);
    put(root, "proc/sys/vm/stat_interval", "1");
    put(root, "proc/sys/vm/swappiness", "60");
    put_empty(root, "proc/sys/vm/compact_memory");
    put_empty(root, "proc/sys/vm/drop_caches");
    let balancing = if spec.nodes.len() > 1 { "1" } else { "0" };
    put(root, "proc/sys/kernel/numa_balancing", balancing);
    put(root, "proc/sys/kernel/sched_rt_runtime_us", "950000");
    put(root, "proc/sys/kernel/osrelease", spec.kernel);
    write_cgroups(root, &online, spec.nodes.len().max(1));
    write_ksm(root);
    write_pci(root, spec.nodes.len());
}

/// `/sys/kernel/mm/ksm` as Proxmox leaves it with ksmtuned idle: KSM running, its defaults.
fn write_ksm(root: &Path) {
    let ksm = "sys/kernel/mm/ksm";
    for (file, value) in [
        ("run", "1"),
        ("pages_to_scan", "100"),
        ("sleep_millisecs", "20"),
        ("merge_across_nodes", "1"),
        ("pages_shared", "0"),
        ("pages_sharing", "0"),
        ("full_scans", "0"),
    ] {
        put(root, &format!("{ksm}/{file}"), value);
    }
}

/// PCI functions as the kernel shows them: `/sys/bus/pci/devices/<id>` a link into
/// `/sys/devices/pci0000:00/...`, each device with `vendor`, `device`, `class`, `numa_node`,
/// `reset_method`, the write-only `reset` and `remove`, and `driver` a link to
/// `/sys/bus/pci/drivers/<name>` when bound; `/sys/bus/pci/rescan` write-only. Every example
/// host has a two-function GPU at 0b:00 (VGA and HDMI audio) bound to vfio-pci, as for a
/// passthrough, and an NVMe disk at 01:00.0 that the host uses (driver nvme).
fn write_pci(root: &Path, nodes: usize) {
    let gpu_node = if nodes > 1 { "1" } else { "0" };
    let functions = [
        (
            "0000:01:00.0",
            "0000:00:01.1",
            "0x144d",
            "0xa80a",
            "0x010802",
            "nvme",
            "flr bus",
            "0",
        ),
        (
            "0000:0b:00.0",
            "0000:00:03.1",
            "0x10de",
            "0x2204",
            "0x030000",
            "vfio-pci",
            "bus",
            gpu_node,
        ),
        (
            "0000:0b:00.1",
            "0000:00:03.1",
            "0x10de",
            "0x1aef",
            "0x040300",
            "vfio-pci",
            "bus",
            gpu_node,
        ),
    ];
    put_empty(root, "sys/bus/pci/rescan");
    for (id, bridge, vendor, device, class, driver, methods, numa) in functions {
        let real = format!("sys/devices/pci0000:00/{bridge}/{id}");
        for (file, value) in [
            ("vendor", vendor),
            ("device", device),
            ("class", class),
            ("numa_node", numa),
            ("reset_method", methods),
        ] {
            put(root, &format!("{real}/{file}"), value);
        }
        put_empty(root, &format!("{real}/reset"));
        put_empty(root, &format!("{real}/remove"));
        // The driver's directory with its write-only attributes, as the kernel has them (and
        // so that git keeps the directory of an example host).
        let drivers = format!("sys/bus/pci/drivers/{driver}");
        for attr in ["bind", "unbind", "new_id", "remove_id", "uevent"] {
            put_empty(root, &format!("{drivers}/{attr}"));
        }
        link(
            root,
            &format!("../../../../bus/pci/drivers/{driver}"),
            &format!("{real}/driver"),
        );
        link(
            root,
            &format!("../../../devices/pci0000:00/{bridge}/{id}"),
            &format!("sys/bus/pci/devices/{id}"),
        );
    }
}

fn link(root: &Path, target: &str, rel: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("create fixture dir");
    let _ = fs::remove_file(&path);
    std::os::unix::fs::symlink(target, &path).expect("symlink");
}

/// The CPU vendor of a generated machine. The specs name none: SMT numbered siblings-last with
/// acpi-cpufreq and no hybrid cores is how the example Ryzen is described (AMD's Zen
/// numbering, and AMD boards without amd-pstate use acpi-cpufreq); every other spec is Intel.
pub fn vendor(spec: &HostSpec) -> &'static str {
    let acpi = spec
        .cpufreq
        .as_ref()
        .is_some_and(|f| f.driver == "acpi-cpufreq");
    if spec.numbering == Numbering::SiblingsLast && acpi && spec.hybrid.is_none() {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    }
}

/// The `flags` of every example CPU (`pdpe1gb`: what 1 GiB hugepages need; AMD adds
/// `topoext`).
const FLAGS: &str = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 \
    clflush mmx fxsr sse sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc nopl xtopology pni \
    ssse3 cx16 sse4_1 sse4_2 x2apic popcnt aes xsave avx hypervisor lahf_lm";

/// `/proc/cpuinfo` as x86's `show_cpuinfo` prints it, the fields pvetune may read (one block
/// per online CPU, a blank line after each).
fn write_cpuinfo(root: &Path, spec: &HostSpec, cores: &[Core], online: &CpuSet) {
    let vendor = vendor(spec);
    let (family, model) = if vendor == "AuthenticAMD" {
        ("25", "AMD Ryzen 9 5900X 12-Core Processor")
    } else {
        ("6", "Intel(R) Xeon(R) CPU")
    };
    let mut text = String::new();
    for cpu in online.iter() {
        let Some(core) = cores.iter().find(|c| c.cpus.contains(cpu)) else {
            continue;
        };
        let siblings = cores
            .iter()
            .filter(|c| c.package == core.package)
            .map(|c| c.cpus.intersection(online).len())
            .sum::<usize>();
        let ncores = cores.iter().filter(|c| c.package == core.package).count();
        text.push_str(&format!(
            "processor\t: {cpu}\nvendor_id\t: {vendor}\ncpu family\t: {family}\n\
             model name\t: {model}\nphysical id\t: {}\nsiblings\t: {siblings}\n\
             core id\t\t: {}\ncpu cores\t: {ncores}\nflags\t\t: {FLAGS}{}\n\n",
            core.package,
            core.core_id,
            if vendor == "AuthenticAMD" {
                " topoext"
            } else {
                ""
            }
        ));
    }
    // `put` adds the final newline; the kernel's last block ends with a blank line too.
    put(root, "proc/cpuinfo", text.trim_end_matches('\n'));
}

/// `/sys/fs/cgroup` as systemd leaves it on a Proxmox VE 9 host before any VM is isolated: cpuset
/// is available but switched on nowhere (so `qemu.slice` has no `cpuset.*` files yet), the
/// root-only `cpuset.cpus.isolated` is empty (docs/kernel-facts.md: boot.*-controllers).
fn write_cgroups(root: &Path, online: &CpuSet, nodes: usize) {
    let cg = "sys/fs/cgroup";
    put(
        root,
        &format!("{cg}/cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma misc",
    );
    put(
        root,
        &format!("{cg}/cgroup.subtree_control"),
        "cpu io memory pids",
    );
    put(
        root,
        &format!("{cg}/cpuset.cpus.effective"),
        &online.to_string(),
    );
    put(root, &format!("{cg}/cpuset.cpus.isolated"), "");
    put(
        root,
        &format!("{cg}/cpuset.mems.effective"),
        &format!("0-{}", nodes - 1),
    );
    for slice in ["init.scope", "system.slice", "user.slice", "qemu.slice"] {
        let dir = format!("{cg}/{slice}");
        put(
            root,
            &format!("{dir}/cgroup.controllers"),
            "cpu io memory pids",
        );
        let below = if slice == "init.scope" {
            ""
        } else {
            "cpu io memory pids"
        };
        put(root, &format!("{dir}/cgroup.subtree_control"), below);
        put(root, &format!("{dir}/cgroup.type"), "domain");
        put_empty(root, &format!("{dir}/cgroup.procs"));
        put_empty(root, &format!("{dir}/cgroup.threads"));
    }
}

/// `/proc/irq` of a host with the usual legacy IRQs, a 4-queue NIC and an NVMe drive: the
/// legacy and NIC IRQs may go anywhere (affinity: every CPU, the default), NVMe's admin queue
/// too, and its I/O queues are managed, one per core, on that core's threads. Each IRQ has the
/// files the kernel creates.
fn write_irqs(root: &Path, cores: &[Core], online: &CpuSet, nbits: u32) {
    put(root, "proc/irq/default_smp_affinity", &mask(online, nbits));
    let mut irqs: Vec<(u32, String, CpuSet, &str)> = [
        (0, "timer"),
        (1, "i8042"),
        (8, "rtc0"),
        (9, "acpi"),
        (12, "i8042"),
        (16, "ehci_hcd:usb1"),
    ]
    .into_iter()
    .map(|(n, name)| (n, name.to_string(), online.clone(), "-1"))
    .collect();
    for q in 0..4 {
        irqs.push((24 + q, format!("enp5s0-TxRx-{q}"), online.clone(), "0"));
    }
    irqs.push((28, "nvme0q0".into(), online.clone(), "0"));
    for (k, core) in cores.iter().enumerate() {
        let cpus = core.cpus.intersection(online);
        if !cpus.is_empty() {
            irqs.push((29 + k as u32, format!("nvme0q{}", k + 1), cpus, "0"));
        }
    }
    for (n, action, cpus, node) in irqs {
        write_irq(root, n, &cpus, node, nbits);
        // The kernel's (empty) action directory, `<dir>/<action>/`, is left out: git keeps
        // no empty directory, and pvetune never reads it.
        let _ = action;
    }
}

/// One `/proc/irq/<n>/` directory with the files the kernel creates for it.
fn write_irq(root: &Path, n: u32, cpus: &CpuSet, node: &str, nbits: u32) {
    let dir = format!("proc/irq/{n}");
    put(root, &format!("{dir}/smp_affinity"), &mask(cpus, nbits));
    put(root, &format!("{dir}/smp_affinity_list"), &cpus.to_string());
    let target: CpuSet = cpus.first().into_iter().collect();
    put(
        root,
        &format!("{dir}/effective_affinity"),
        &mask(&target, nbits),
    );
    put(
        root,
        &format!("{dir}/effective_affinity_list"),
        &target.to_string(),
    );
    put(root, &format!("{dir}/node"), node);
    put(
        root,
        &format!("{dir}/spurious"),
        "count 0\nunhandled 0\nlast_unhandled 0 ms",
    );
}

/// Adds movable MSI-X IRQs (as a big host's NIC and HBA queues are: any CPU, node 0) after
/// the ones `write_host` made, numbered from 1024 up, until `/proc/irq` holds `total` IRQs.
/// For the benchmark (bench/run), whose host has thousands of IRQs.
pub fn add_msi_irqs(root: &Path, spec: &HostSpec, total: u32) {
    let cores = layout(spec);
    let all = union(cores.iter().map(|c| &c.cpus));
    let nbits = all.last().map_or(1, |l| l + 1);
    let online = all.difference(&spec.offline);
    let have = fs::read_dir(root.join("proc/irq"))
        .expect("proc/irq")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count() as u32;
    for k in 0..total.saturating_sub(have) {
        write_irq(root, 1024 + k, &online, "0", nbits);
    }
}

/// One policy per CPU, as acpi-cpufreq and intel_pstate create them. Only online CPUs get one
/// here: a CPU offline since boot never had its policy created.
fn write_policy(root: &Path, id: u32, freq: &CpuFreqSpec) {
    let p = format!("sys/devices/system/cpu/cpufreq/policy{id}");
    // Setpolicy drivers print their two fixed names; the others print "name " per governor.
    let governors = if matches!(freq.driver, "intel_pstate" | "amd-pstate-epp") {
        freq.governors.join(" ")
    } else {
        freq.governors.iter().map(|g| format!("{g} ")).collect()
    };
    put(root, &format!("{p}/scaling_governor"), freq.governor);
    put(
        root,
        &format!("{p}/scaling_available_governors"),
        &governors,
    );
    put(root, &format!("{p}/scaling_driver"), freq.driver);
    put(root, &format!("{p}/affected_cpus"), &id.to_string());
    put(root, &format!("{p}/related_cpus"), &id.to_string());
    let link = root.join(format!("sys/devices/system/cpu/cpu{id}/cpufreq"));
    std::os::unix::fs::symlink(format!("../cpufreq/policy{id}"), link).expect("cpufreq symlink");
}

fn write_nodes(root: &Path, spec: &HostSpec, cores: &[Core], online: &CpuSet, nbits: u32) {
    if spec.nodes.is_empty() {
        return;
    }
    let node = "sys/devices/system/node";
    let ids = CpuSet::range(0, spec.nodes.len() as u32 - 1).to_string();
    let cpus: Vec<CpuSet> = spec
        .nodes
        .iter()
        .map(|n| {
            union(
                cores
                    .iter()
                    .filter(|c| n.cores.contains(&c.index))
                    .map(|c| &c.cpus),
            )
            .intersection(online)
        })
        .collect();
    let with = |f: &dyn Fn(usize) -> bool| -> String {
        (0..spec.nodes.len() as u32)
            .filter(|&i| f(i as usize))
            .collect::<CpuSet>()
            .to_string()
    };
    put(root, &format!("{node}/online"), &ids);
    put(root, &format!("{node}/possible"), &ids);
    put(
        root,
        &format!("{node}/has_cpu"),
        &with(&|i| !cpus[i].is_empty()),
    );
    let has_mem = with(&|i| spec.nodes[i].mem_total_kib > 0);
    put(root, &format!("{node}/has_memory"), &has_mem);
    put(root, &format!("{node}/has_normal_memory"), &has_mem);
    let mut sizes = BTreeSet::new();
    for (i, n) in spec.nodes.iter().enumerate() {
        let dir = format!("{node}/node{i}");
        put(root, &format!("{dir}/cpulist"), &cpus[i].to_string());
        put(root, &format!("{dir}/cpumap"), &mask(&cpus[i], nbits));
        put(root, &format!("{dir}/meminfo"), &meminfo(i, n));
        for &(size, nr) in &n.hugepages {
            sizes.insert(size);
            let h = format!("{dir}/hugepages/hugepages-{size}kB");
            put(root, &format!("{h}/nr_hugepages"), &nr.to_string());
            put(root, &format!("{h}/free_hugepages"), &nr.to_string());
            put(root, &format!("{h}/surplus_hugepages"), "0");
        }
        // Write-only (0200) in the kernel: an empty file here.
        put_empty(root, &format!("{dir}/compact"));
    }
    for size in sizes {
        let nr: u64 = spec
            .nodes
            .iter()
            .flat_map(|n| &n.hugepages)
            .filter(|(s, _)| *s == size)
            .map(|(_, nr)| nr)
            .sum();
        let h = format!("sys/kernel/mm/hugepages/hugepages-{size}kB");
        put(root, &format!("{h}/nr_hugepages"), &nr.to_string());
        put(root, &format!("{h}/free_hugepages"), &nr.to_string());
        put(root, &format!("{h}/resv_hugepages"), "0");
        put(root, &format!("{h}/surplus_hugepages"), "0");
        put(root, &format!("{h}/nr_overcommit_hugepages"), "0");
    }
}

/// The first lines of `nodeN/meminfo` in the kernel's `"Node %d MemTotal: %8lu kB"` layout,
/// plus the default-size hugepage counters it prints at the end.
fn meminfo(id: usize, node: &NodeSpec) -> String {
    let total = node.mem_total_kib;
    let free = total / 4 * 3;
    let huge = node
        .hugepages
        .iter()
        .find(|(s, _)| *s == 2048)
        .map_or(0, |(_, nr)| *nr);
    [
        format!("Node {id} MemTotal:       {total:8} kB"),
        format!("Node {id} MemFree:        {free:8} kB"),
        format!("Node {id} MemUsed:        {:8} kB", total - free),
        format!("Node {id} FilePages:      {:8} kB", total / 16),
        format!("Node {id} HugePages_Total: {huge:5}"),
        format!("Node {id} HugePages_Free:  {huge:5}"),
        format!("Node {id} HugePages_Surp:  {:5}", 0),
    ]
    .join("\n")
}

const GIB_KIB: u64 = 1024 * 1024;

fn node(cores: std::ops::Range<u32>, mem_gib: u64) -> NodeSpec {
    NodeSpec {
        cores: cores.collect(),
        mem_total_kib: mem_gib * GIB_KIB,
        hugepages: vec![(2048, 0), (1048576, 0)],
    }
}

const ACPI_CPUFREQ: CpuFreqSpec = CpuFreqSpec {
    driver: "acpi-cpufreq",
    governors: &[
        "conservative",
        "ondemand",
        "userspace",
        "powersave",
        "performance",
        "schedutil",
    ],
    governor: "schedutil",
};

const INTEL_PSTATE: CpuFreqSpec = CpuFreqSpec {
    driver: "intel_pstate",
    governors: &["performance", "powersave"],
    governor: "powersave",
};

/// The committed example hosts, by directory name under `examples/hosts/`.
pub fn example_hosts() -> Vec<(&'static str, HostSpec)> {
    let ryzen = HostSpec {
        packages: 1,
        cores_per_package: 12,
        threads_per_core: 2,
        numbering: Numbering::SiblingsLast,
        cores_per_l3: 6,
        nodes: vec![node(0..6, 64), node(6..12, 64)],
        cpufreq: Some(ACPI_CPUFREQ),
        isolated: CpuSet::new(),
        offline: CpuSet::new(),
        hybrid: None,
        kernel: PVE9_KERNEL,
    };
    // A Proxmox VE 8 node on its default kernel, 6.8: the partition's 6.8 path shows in its
    // plan (cpuset.cpus beside each cpuset.cpus.exclusive).
    let xeon = HostSpec {
        packages: 2,
        cores_per_package: 8,
        cores_per_l3: 8,
        nodes: vec![node(0..8, 64), node(8..16, 64)],
        cpufreq: Some(INTEL_PSTATE),
        kernel: "6.8.12-4-pve",
        ..ryzen.clone()
    };
    let hybrid = HostSpec {
        packages: 1,
        cores_per_package: 12,
        numbering: Numbering::Interleaved,
        cores_per_l3: 12,
        nodes: vec![node(0..12, 32)],
        cpufreq: Some(INTEL_PSTATE),
        hybrid: Some(HybridSpec {
            p_cores: 8,
            e_cores: 4,
        }),
        ..ryzen.clone()
    };
    let guest = HostSpec {
        packages: 2,
        cores_per_package: 2,
        numbering: Numbering::Interleaved,
        cores_per_l3: 2,
        nodes: vec![node(0..2, 4), node(2..4, 4)],
        cpufreq: None,
        ..ryzen.clone()
    };
    vec![
        ("ryzen-5900x", ryzen),
        ("xeon-2s", xeon),
        ("intel-hybrid", hybrid),
        ("guest-nocpufreq", guest),
    ]
}

/// The benchmark's big host (bench/run): 256 CPUs, two packages of 64 cores with SMT numbered
/// as QEMU guests and Intel clients do (CPUs 2N and 2N + 1 are siblings, so CPUs 0 and 1, the
/// only ones a 2-CPU machine can pin threads to, are one core), 4 NUMA nodes of 32 cores, 8 L3
/// domains of 16 cores, acpi-cpufreq on every CPU.
pub fn bench_host() -> HostSpec {
    HostSpec {
        packages: 2,
        cores_per_package: 64,
        threads_per_core: 2,
        numbering: Numbering::Interleaved,
        cores_per_l3: 16,
        nodes: vec![
            node(0..32, 128),
            node(32..64, 128),
            node(64..96, 128),
            node(96..128, 128),
        ],
        cpufreq: Some(ACPI_CPUFREQ),
        isolated: CpuSet::new(),
        offline: CpuSet::new(),
        hybrid: None,
        kernel: PVE9_KERNEL,
    }
}
