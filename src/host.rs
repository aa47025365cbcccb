//! `Host`: the one seam through which pvetune changes anything.
//!
//! Every write to a kernel file and every thread affinity goes through this trait: the real
//! implementation does the syscalls, tests wrap it in [`FailAt`] to make the Nth mutation fail
//! and prove that a phase that fails halfway leaves nothing behind.

use crate::cpuset::CpuSet;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

pub trait Host {
    /// Reads a whole kernel file.
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Reads a one-value kernel attribute (an IRQ's affinity, a sysctl, a cgroup's cpuset
    /// file): one `read` where [`Host::read`] needs a second to see the end (thousands of IRQs
    /// per phase). Never for files of many records (`cgroup.threads`): see `attr::read`.
    fn read_value(&self, path: &Path) -> io::Result<String> {
        self.read(path)
    }
    /// Writes a kernel attribute in a single write; never creates a file, so a misspelled
    /// attribute is an error instead of a stray file.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    fn get_affinity(&self, tid: i32) -> io::Result<CpuSet>;
    fn set_affinity(&self, tid: i32, cpus: &CpuSet) -> io::Result<()>;
    /// Creates one directory (a cgroup); its parent must exist.
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    /// Removes one empty directory (a cgroup without threads or children).
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    /// `sync(2)`: dirty pages written back (before `drop_caches`). Test hosts need not flush
    /// anything, so the default does nothing; [`RealHost`] calls the kernel.
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl<H: Host + ?Sized> Host for &H {
    fn read(&self, path: &Path) -> io::Result<String> {
        (**self).read(path)
    }
    fn read_value(&self, path: &Path) -> io::Result<String> {
        (**self).read_value(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        (**self).write(path, value)
    }
    fn get_affinity(&self, tid: i32) -> io::Result<CpuSet> {
        (**self).get_affinity(tid)
    }
    fn set_affinity(&self, tid: i32, cpus: &CpuSet) -> io::Result<()> {
        (**self).set_affinity(tid, cpus)
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        (**self).mkdir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        (**self).rmdir(path)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
}

/// The real machine (under whatever root the paths were mapped with).
pub struct RealHost;

impl Host for RealHost {
    fn read(&self, path: &Path) -> io::Result<String> {
        // Through `Read::take`, which reads to the end without asking for the file's size
        // first: sysfs and procfs report sizes of 4096 or 0 anyway, and a phase reads every
        // file it changes (thousands of IRQs), so the statx per file is saved.
        let mut text = String::new();
        File::open(path)?.take(u64::MAX).read_to_string(&mut text)?;
        Ok(text)
    }

    fn read_value(&self, path: &Path) -> io::Result<String> {
        crate::attr::read(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
        file.write_all(value.as_bytes())
    }

    fn get_affinity(&self, tid: i32) -> io::Result<CpuSet> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid))?;
        let max = nix::sched::CpuSet::count() as u32;
        Ok((0..max)
            .filter(|&cpu| set.is_set(cpu as usize).unwrap_or(false))
            .collect())
    }

    fn set_affinity(&self, tid: i32, cpus: &CpuSet) -> io::Result<()> {
        let mut set = nix::sched::CpuSet::new();
        for cpu in cpus.iter() {
            set.set(cpu as usize)?;
        }
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)?;
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn sync(&self) -> io::Result<()> {
        nix::unistd::sync();
        Ok(())
    }
}

/// Test double: passes everything to `inner`, but the `fail_at`-th mutation (1-based) fails
/// with EIO, as a kernel that refuses a value would.
pub struct FailAt<H: Host> {
    pub inner: H,
    pub fail_at: usize,
    count: Cell<usize>,
}

impl<H: Host> FailAt<H> {
    pub fn new(inner: H, fail_at: usize) -> Self {
        FailAt {
            inner,
            fail_at,
            count: Cell::new(0),
        }
    }

    fn tick(&self) -> io::Result<()> {
        self.count.set(self.count.get() + 1);
        if self.count.get() == self.fail_at {
            return Err(io::Error::from_raw_os_error(nix::libc::EIO));
        }
        Ok(())
    }
}

impl<H: Host> Host for FailAt<H> {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.inner.read(path)
    }
    fn read_value(&self, path: &Path) -> io::Result<String> {
        self.inner.read_value(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        self.tick()?;
        self.inner.write(path, value)
    }
    fn get_affinity(&self, tid: i32) -> io::Result<CpuSet> {
        self.inner.get_affinity(tid)
    }
    fn set_affinity(&self, tid: i32, cpus: &CpuSet) -> io::Result<()> {
        self.tick()?;
        self.inner.set_affinity(tid, cpus)
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        self.tick()?;
        self.inner.mkdir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        self.tick()?;
        self.inner.rmdir(path)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}
