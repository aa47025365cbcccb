//! Tunables: each turns its part of the profile into primitive actions, and validates it.
//!
//! They say *what*; `exec` says *how*, once per primitive.

pub mod cycle;
pub mod governor;
pub mod irqbalance;
pub mod irqs;
pub mod partition;
pub mod pinning;
pub mod sysctl;
