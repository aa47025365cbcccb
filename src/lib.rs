//! pvetune: per-VM host tuning for latency-sensitive Proxmox VE guests.
//!
//! The binary is a Proxmox hookscript (`pvetune <vmid> <phase>`). The library is split so that
//! everything that decides is pure and everything that changes the host goes through two seams:
//! [`root::Root`] (a path prefix for every host file) and [`host::Host`] (every mutation and
//! syscall).
#![forbid(unsafe_code)]

pub mod cpuset;
pub mod qmp;
pub mod topology;
pub mod vm;
pub mod vmconfig;
