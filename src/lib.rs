//! pvetune: per-VM host tuning for latency-sensitive Proxmox VE guests.
//!
//! The binary is a Proxmox hookscript (`pvetune <vmid> <phase>`). Everything that decides is
//! pure (`plan`, `tunables`); everything that changes the host goes through two seams:
//! [`root::Root`] (a path prefix for every host file) and [`host::Host`] (every mutation and
//! syscall). `exec` applies a plan with a write-ahead ledger (`state`) and undoes it.
#![forbid(unsafe_code)]

pub mod assets;
pub mod attr;
pub mod cgroup;
pub mod chain;
pub mod cli;
pub mod cpuset;
pub mod devices;
pub mod doctor;
pub mod enable;
pub mod error;
pub mod excerpt;
pub mod exec;
pub mod facts;
pub mod hook;
pub mod host;
pub mod irqbalance;
pub mod json;
pub mod kthreads;
pub mod memory;
pub mod pci;
pub mod placement;
pub mod plan;
pub mod procstat;
pub mod profile;
pub mod qmp;
pub mod report;
pub mod reserve;
pub mod root;
pub mod state;
pub mod suggest;
pub mod topology;
pub mod topoview;
pub mod tunables;
pub mod vm;
pub mod vmconfig;
