//! Tunables: each turns its part of the profile into primitive actions, and validates it.
//!
//! They say *what*; `exec` says *how*, once per primitive.

pub mod cycle;
pub mod governor;
pub mod hugepages;
pub mod irqbalance;
pub mod irqs;
pub mod ksm;
pub mod partition;
pub mod pcireset;
pub mod pinning;
pub mod sysctl;
