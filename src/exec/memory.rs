//! The executor's memory and device primitives: hugepage reservations read back under
//! qemu-server's lock, kernel triggers, and removing and rescanning PCI functions.
//!
//! The PCI race (seed 003: removing and rescanning "too fast" crashed kernels up to 6.2):
//! functions are removed one at a time, the non-zero functions first and function 0 last,
//! each waited for until its sysfs entry is gone; the rescan comes [`SETTLE`] after the last
//! one is gone; then every function is waited for until it is back with the driver it had.
//! Every wait polls every [`POLL`] and gives up after the profile's timeout with an error
//! naming the function and what it was waiting for.

use super::{ExecError, Executor};
use crate::host::Host;
use crate::memory::HUGEPAGES_LOCK;
use crate::pci::{PciId, driver_name};
use crate::root::Root;
use std::fs::{File, OpenOptions};
use std::time::{Duration, Instant};

pub use crate::devices::PCI_DEVICES;
pub const PCI_RESCAN: &str = "/sys/bus/pci/rescan";
/// Between the last function gone and the rescan.
const SETTLE: Duration = Duration::from_millis(250);
const POLL: Duration = Duration::from_millis(20);
/// qemu-server waits up to 60 s for the same lock ("could be long if a lot of hugepages need
/// to be allocated").
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// qemu-server's hugepage lock, held (an exclusive flock, as `PVE::Tools::lock_file` takes
/// it) while pvetune changes a pool, so that its allocation and pvetune's never interleave.
pub struct HugepageLock {
    _lock: nix::fcntl::Flock<File>,
}

pub fn hugepage_lock(root: &Root) -> Result<HugepageLock, ExecError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = root.path(HUGEPAGES_LOCK);
    let error = |source| ExecError::Read {
        path: HUGEPAGES_LOCK.to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(error)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(HugepageLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(POLL);
            }
            Err((_, errno)) => return Err(error(std::io::Error::from(errno))),
        }
    }
}

/// A function's sysfs entry.
pub fn device_dir(id: &PciId) -> String {
    format!("{PCI_DEVICES}/{id}")
}

/// The driver a function is bound to (`driver` is a link to `/sys/bus/pci/drivers/<name>`),
/// None when it has none.
pub fn driver_of(root: &Root, id: &PciId) -> Option<String> {
    let link = std::fs::read_link(root.path(format!("{}/driver", device_dir(id)))).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn present(root: &Root, id: &PciId) -> bool {
    root.path(device_dir(id)).exists()
}

impl<H: Host> Executor<'_, H> {
    /// Fails unless the pool at `path` (a node's `nr_hugepages`) now holds `wanted` pages.
    pub(super) fn verify_pool(&self, path: &str, wanted: &str) -> Result<(), ExecError> {
        let got = self.read(path)?;
        let (got_n, wanted_n) = (got.trim().parse::<u64>(), wanted.trim().parse::<u64>());
        match (got_n, wanted_n) {
            (Ok(g), Ok(w)) if g >= w => Ok(()),
            (g, w) => Err(ExecError::Shortfall {
                path: path.to_string(),
                wanted: w.unwrap_or(0),
                got: g.unwrap_or(0),
                place: crate::memory::describe_pool(path),
            }),
        }
    }

    /// Removes the functions, rescans, and waits until every one is back with its driver.
    pub(super) fn remove_rescan(
        &self,
        functions: &[(PciId, Option<String>)],
        timeout: Duration,
    ) -> Result<(), ExecError> {
        let mut order: Vec<&(PciId, Option<String>)> = functions.iter().collect();
        // Function 0 last: it is what the bus scan finds the slot by.
        order.sort_by_key(|(id, _)| std::cmp::Reverse((id.function != Some(0), *id)));
        for (id, _) in order {
            if present(self.root, id) {
                let remove = format!("{}/remove", device_dir(id));
                self.trigger(&remove, "1")?;
            }
            self.wait(timeout, id, "removed", || !present(self.root, id))?;
        }
        std::thread::sleep(SETTLE);
        self.trigger(PCI_RESCAN, "1")?;
        for (id, driver) in functions {
            let what = format!("back after the rescan with {}", driver_name(driver));
            self.wait(timeout, id, &what, || {
                present(self.root, id) && driver_of(self.root, id) == *driver
            })?;
        }
        Ok(())
    }

    /// A write with no state behind it (a trigger): the value is written as is.
    pub(super) fn trigger(&self, path: &str, value: &str) -> Result<(), ExecError> {
        self.host
            .write(&self.root.path(path), &format!("{value}\n"))
            .map_err(|source| ExecError::Write {
                path: path.to_string(),
                value: value.to_string(),
                source,
            })
    }

    /// Rescans the PCI bus unless every function in `functions` is there: undo and rollback
    /// of a removal.
    pub(super) fn rescan_missing(&self, functions: &[PciId]) -> Result<(), ExecError> {
        if functions.iter().all(|id| present(self.root, id)) {
            return Ok(());
        }
        self.trigger(PCI_RESCAN, "1")
    }

    fn wait(
        &self,
        timeout: Duration,
        id: &PciId,
        what: &str,
        done: impl Fn() -> bool,
    ) -> Result<(), ExecError> {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() >= deadline {
                let now = if present(self.root, id) {
                    format!("present, {}", driver_name(&driver_of(self.root, id)))
                } else {
                    "absent".to_string()
                };
                return Err(ExecError::Device {
                    device: id.to_string(),
                    message: format!("not {what} within {} ms (now {now})", timeout.as_millis()),
                });
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

/// The functions a `Rescan` claim's holder value lists (`0000:00:11.0 0000:00:11.1`).
pub fn listed_functions(value: &str) -> Vec<PciId> {
    value
        .split_whitespace()
        .filter_map(|w| PciId::parse_sysfs(w).ok())
        .collect()
}
