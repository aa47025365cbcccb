//! `hugepages:` (pre-start): getting qemu-server's hugepage allocation to succeed.
//!
//! Kernel files: `/proc/sys/vm/drop_caches` and `/proc/sys/vm/compact_memory` (write-only
//! triggers), `/sys/devices/system/node/nodeN/compact` (write-only, per node), and per node
//! `hugepages/hugepages-<kB>kB/{nr,free}_hugepages`.
//!
//! qemu-server raises each node's pool by what it lacks (`hugepages_allocate`: needed minus
//! free) under `/var/lock/hugepages.lck`, with no compaction, and fails the start with
//! "hugepage allocation failed" and no detail. pre-start runs before that, so pvetune can
//! (1) flush and drop caches and compact the nodes the VM's pages come from, (2) check that
//! the start can succeed at all and say why not (node, size, pages wanted and free, what to
//! do), and (3) with `reserve: true`, raise each pool by the VM's pages itself, under the
//! same lock, and read back what the kernel gave: qemu-server then finds them free and
//! allocates nothing.

use crate::memory::{self, MemoryFacts, NodeNeed, size_name};
use crate::plan::{Action, Inputs, Plan, PlanError, Step};
use crate::profile::{Compact, Hugepages, Preflight};

const TUNABLE: &str = "hugepages";

/// What the VM needs, or why the profile cannot work for it.
fn needs(inp: &Inputs, hp: &Hugepages) -> Result<Vec<NodeNeed>, PlanError> {
    let err = |m: String| PlanError::at(TUNABLE, &hp.at, m);
    if inp.config.hugepages.is_none() {
        return Err(err(
            "the VM config has no 'hugepages:' (2, 1024 or any): qemu-server \
                        backs its memory with normal pages, so there is nothing to prepare"
                .into(),
        ));
    }
    let facts = inp.memory;
    let needs = memory::need(inp.config, &facts.sizes).map_err(err)?;
    for n in &needs {
        let Some(node) = facts.nodes.get(&n.node) else {
            return Err(err(format!(
                "the VM's memory is bound to host node {} ({}), which this host does not have",
                n.node,
                memory::NODE_DIR
            )));
        };
        if !node.pools.contains_key(&n.size_kb) {
            return Err(err(format!(
                "node {} has no {} pool ({})",
                n.node,
                size_name(n.size_kb),
                n.file("nr_hugepages")
            )));
        }
        if n.size_kb == 1 << 20 && facts.pdpe1gb == Some(false) {
            return Err(err(
                "1 GiB pages, but this CPU has no pdpe1gb flag (/proc/cpuinfo): use \
                 'hugepages: 2' in the VM config"
                    .into(),
            ));
        }
        match hp.compact {
            Compact::Nodes if !node.compact => {
                return Err(err(format!(
                    "compact: nodes, but {}/node{}/compact does not exist (a kernel without \
                     CONFIG_COMPACTION): use compact: none",
                    memory::NODE_DIR,
                    n.node
                )));
            }
            Compact::Global if !facts.compact_memory => {
                return Err(err(format!(
                    "compact: global, but {} does not exist: use compact: none",
                    memory::facts::COMPACT_MEMORY
                )));
            }
            _ => {}
        }
    }
    Ok(needs)
}

/// The preflight for one node: None when the pages can be had, else why not.
fn shortfall(facts: &MemoryFacts, hp: &Hugepages, n: &NodeNeed) -> Option<String> {
    let node = facts.nodes.get(&n.node)?;
    let pool = node.pools.get(&n.size_kb)?;
    // What qemu-server would have to allocate. With `reserve`, pvetune adds the VM's pages
    // even when others are free (they may be another VM's), and its read back is the verdict;
    // the preflight only refuses what cannot work in any case (a VM whose pages `pvetune
    // reserve` holds finds them free).
    let lacking = n.pages.saturating_sub(pool.free);
    let droppable = if hp.drop_caches.is_some_and(|d| d & 1 == 1) {
        node.file_pages_kb
    } else {
        0
    };
    let room = (node.mem_free_kb + droppable) / n.size_kb;
    (lacking > room).then(|| {
        format!(
            "node {}: the VM needs {} pages of {} there ({} MiB); the pool has {} of {} free, \
             and the node's free memory{} is room for at most {room} more, so the start would \
             fail with qemu-server's 'hugepage allocation failed'. Free memory on node {} \
             (stop a VM there; hugepages.drop-caches: 1), bind the VM to another node \
             (numaN: hostnodes=), or reserve the pages at boot (pvetune reserve)",
            n.node,
            n.pages,
            size_name(n.size_kb),
            n.pages * n.size_kb / 1024,
            pool.free,
            pool.nr,
            if droppable > 0 {
                " with the page cache dropped"
            } else {
                ""
            },
            n.node
        )
    })
}

pub fn validate(inp: &Inputs) -> Result<(), PlanError> {
    let Some(hp) = &inp.profile.hugepages else {
        return Ok(());
    };
    let needs = needs(inp, hp)?;
    if hp.preflight == Preflight::Fail
        && !inp.memory.vm_running
        && let Some(why) = needs.iter().find_map(|n| shortfall(inp.memory, hp, n))
    {
        return Err(PlanError::at(TUNABLE, &hp.at, why));
    }
    Ok(())
}

/// Pre-start: sync, drop caches, compaction, then (a batch of its own, under qemu-server's
/// lock) the reservations.
pub fn plan(inp: &Inputs, plan: &mut Plan) -> Result<(), PlanError> {
    let Some(hp) = &inp.profile.hugepages else {
        return Ok(());
    };
    let needs = needs(inp, hp)?;
    let step = |action| Step {
        tunable: TUNABLE,
        action,
    };
    if hp.preflight == Preflight::Warn {
        for why in needs.iter().filter_map(|n| shortfall(inp.memory, hp, n)) {
            plan.notes.push(format!("warning: {why}"));
        }
    }
    if hp.sync {
        plan.steps.push(step(Action::Sync));
    }
    if let Some(level) = hp.drop_caches {
        plan.steps.push(step(Action::Trigger {
            path: memory::facts::DROP_CACHES.into(),
            value: level.to_string(),
        }));
    }
    match hp.compact {
        Compact::Nodes => {
            let mut nodes: Vec<u32> = needs.iter().map(|n| n.node).collect();
            nodes.dedup();
            for node in nodes {
                plan.steps.push(step(Action::Trigger {
                    path: format!("{}/node{node}/compact", memory::NODE_DIR),
                    value: "1".into(),
                }));
            }
        }
        Compact::Global => plan.steps.push(step(Action::Trigger {
            path: memory::facts::COMPACT_MEMORY.into(),
            value: "1".into(),
        })),
        Compact::Off => {}
    }
    if hp.reserve && !needs.is_empty() {
        // Compaction is not held under qemu-server's lock: only the reservations are.
        plan.steps.push(step(Action::Barrier));
        for n in &needs {
            plan.steps.push(step(Action::Reserve {
                node: n.node,
                size_kb: n.size_kb,
                pages: n.pages,
                keep: false,
            }));
        }
        if !inp.config.keephugepages {
            plan.notes.push(
                "hugepages: after the start qemu-server shrinks the pools to the boot default \
                 (no 'keephugepages: 1'); the pages this VM uses stay, and its release after \
                 stop never raises a pool"
                    .into(),
            );
        }
    } else if !needs.is_empty() {
        let want: Vec<String> = needs
            .iter()
            .map(|n| format!("{} x {} on node {}", n.pages, size_name(n.size_kb), n.node))
            .collect();
        plan.notes.push(format!(
            "hugepages: qemu-server allocates {} itself (reserve: false)",
            want.join(", ")
        ));
    }
    Ok(())
}
