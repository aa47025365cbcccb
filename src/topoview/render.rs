//! The terminal picture of a [`View`]: one line per core, each thread with its holder.

use super::{Core, Node, View};

/// ANSI colours: one per VM in turn, the host's CPUs plain, offline red, isolated yellow.
const VM_COLOURS: [&str; 6] = ["36", "35", "34", "32", "33;1", "36;1"];
const RED: &str = "31";
const DIM: &str = "2";

/// The picture, line by line; `colour` adds ANSI escapes.
pub fn render(view: &View, colour: bool) -> Vec<String> {
    let paint = |code: &str, text: String| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text
        }
    };
    let vm_colour = |vmid: u32| {
        let k = view.vms.keys().position(|v| *v == vmid).unwrap_or(0);
        VM_COLOURS[k % VM_COLOURS.len()]
    };
    let mut out = vec![format!(
        "host: CPUs {} online, {} thread(s) per core{}{}{}",
        view.online,
        view.smt,
        if view.hybrid {
            ", hybrid (P/E cores)"
        } else {
            ""
        },
        if view.isolated.is_empty() {
            String::new()
        } else {
            format!(", isolated {}", view.isolated)
        },
        if view.offline.is_empty() {
            String::new()
        } else {
            format!(", {}", paint(RED, format!("offline {}", view.offline)))
        },
    )];
    for node in &view.nodes {
        out.push(node_line(node));
        for package in &node.packages {
            out.push(format!("  package {}", package.id));
            for l3 in &package.l3 {
                out.push(match &l3.cpus {
                    Some(cpus) => format!("    L3 {cpus}"),
                    None => "    (no L3 known)".to_string(),
                });
                for core in &l3.cores {
                    out.push(core_line(core, &paint, &vm_colour));
                }
            }
        }
    }
    if view.vms.is_empty() {
        out.push("held: nothing (every CPU is the host's)".into());
    } else {
        let held: Vec<String> = view
            .vms
            .iter()
            .map(|(vmid, cpus)| paint(vm_colour(*vmid), format!("VM {vmid}: {cpus}")))
            .collect();
        out.push(format!("held: {}", held.join(", ")));
    }
    out
}

fn node_line(node: &Node) -> String {
    let mut line = match node.id {
        Some(id) => format!("NUMA node {id}"),
        None => "no NUMA node".to_string(),
    };
    if let Some(total) = node.mem_total_kib {
        match node.mem_free_kib {
            Some(free) => {
                line.push_str(&format!(": memory {} free of {}", size(free), size(total)))
            }
            None => line.push_str(&format!(": memory {}", size(total))),
        }
    }
    let pools: Vec<String> = node
        .hugepages
        .iter()
        .map(|p| format!("{} {}/{} free", size(p.size_kib), p.free, p.total))
        .collect();
    if !pools.is_empty() {
        line.push_str(&format!("; hugepages {}", pools.join(", ")));
    }
    line
}

fn core_line(
    core: &Core,
    paint: &dyn Fn(&str, String) -> String,
    vm_colour: &dyn Fn(u32) -> &'static str,
) -> String {
    let kind = match core.kind {
        Some("performance") => "P ",
        Some("efficiency") => "E ",
        _ => "",
    };
    let threads: Vec<String> = core
        .threads
        .iter()
        .map(|t| {
            let who = match t.vm {
                Some(vmid) => paint(vm_colour(vmid), format!("VM {vmid}")),
                None => paint(DIM, "host".to_string()),
            };
            let iso = if t.isolated { " isolated" } else { "" };
            format!("{:>4} {who}{iso}", t.cpu)
        })
        .collect();
    format!("      {kind}core {:<8} {}", core.cpus, threads.join("  "))
}

/// kB as the largest whole unit (2048 -> 2M, 1048576 -> 1G, 67108864 -> 64G).
fn size(kib: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "T"), (1 << 20, "G"), (1 << 10, "M")];
    for (unit, name) in UNITS {
        if kib >= unit {
            let whole = kib / unit;
            let tenth = (kib % unit) * 10 / unit;
            return if tenth == 0 {
                format!("{whole}{name}")
            } else {
                format!("{whole}.{tenth}{name}")
            };
        }
    }
    format!("{kib}K")
}
