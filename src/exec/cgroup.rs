//! The executor's primitives for cgroup v2 files that are not written as plain text:
//! `cgroup.subtree_control` (written as `+word`/`-word` deltas), cgroup directories (created
//! and removed), and thread moves (`cgroup.threads`).
//!
//! Each is one read and at most a few writes, all through [`Host`], so fixture roots and the
//! failure-injecting test hosts see them like every other change.

use super::{ExecError, Executor, gone};
use crate::cgroup::{CGROUP_ROOT, parent_of, thread_cgroup_path};
use crate::host::Host;
use crate::root::Root;
use crate::state::{ComposeOp, DIR_ABSENT};
use std::io;

/// What a claimed target holds now, as its claim composes it: the file's text; for `Words`
/// only the managed `words` that are on, sorted (`cpuset memory` holds `cpuset` of
/// `[cpuset]`); for `Dir` the cgroup's `cgroup.type`, or `absent`; for `Ban` the CPUs
/// irqbalance reports banned (`exec/irqbalance.rs`).
pub fn read_claimed(
    host: &impl Host,
    root: &Root,
    path: &str,
    op: Option<ComposeOp>,
    words: &[String],
) -> io::Result<String> {
    match op {
        Some(ComposeOp::Words) => {
            let text = host.read(&root.path(path))?;
            let mut on: Vec<&str> = text
                .split_whitespace()
                .filter(|w| words.iter().any(|m| m == w))
                .collect();
            on.sort_unstable();
            on.dedup();
            Ok(on.join(" "))
        }
        Some(ComposeOp::Dir) => match host.read(&root.path(format!("{path}/cgroup.type"))) {
            Ok(kind) => Ok(kind.trim().to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DIR_ABSENT.to_string()),
            Err(e) => Err(e),
        },
        Some(ComposeOp::Ban) => super::irqbalance::read_banned(root, path),
        _ => host.read_value(&root.path(path)),
    }
}

impl<H: Host> Executor<'_, H> {
    pub(super) fn read_as(
        &self,
        path: &str,
        op: Option<ComposeOp>,
        words: &[String],
    ) -> Result<String, ExecError> {
        read_claimed(self.host, self.root, path, op, words).map_err(|source| ExecError::Read {
            path: path.to_string(),
            source,
        })
    }

    /// Makes a claimed target go from `current` (as [`Self::read_as`] gives it) to `target`:
    /// Some(true) if something was written, Some(false) if it already held it.
    pub(super) fn put(
        &self,
        path: &str,
        current: &str,
        target: &str,
        op: Option<ComposeOp>,
    ) -> Result<Option<bool>, ExecError> {
        match op {
            Some(ComposeOp::Words) => self.put_words(path, current, target),
            Some(ComposeOp::Dir) => self.put_dir(path, current, target),
            Some(ComposeOp::Ban) => self.put_ban(path, target),
            _ => self.write_if_different(path, current, target),
        }
    }

    /// `+w` for every word of `target` not on, `-w` for every word on that `target` lacks, in
    /// one write (the kernel applies a subtree_control write all or nothing).
    fn put_words(
        &self,
        path: &str,
        current: &str,
        target: &str,
    ) -> Result<Option<bool>, ExecError> {
        let on: Vec<&str> = current.split_whitespace().collect();
        let want: Vec<&str> = target.split_whitespace().collect();
        let delta: Vec<String> = want
            .iter()
            .filter(|w| !on.contains(w))
            .map(|w| format!("+{w}"))
            .chain(
                on.iter()
                    .filter(|w| !want.contains(w))
                    .map(|w| format!("-{w}")),
            )
            .collect();
        if delta.is_empty() {
            return Ok(Some(false));
        }
        let value = delta.join(" ");
        match self.host.write(&self.root.path(path), &value) {
            Ok(()) => Ok(Some(true)),
            // Switching a controller off that a child cgroup switched on meanwhile (systemd
            // starting to manage cpuset): it is needed below, so it stays on.
            Err(e)
                if e.raw_os_error() == Some(nix::libc::EBUSY)
                    && !want.iter().any(|w| !on.contains(w)) =>
            {
                log::warn!("{path}: '{value}' refused (busy: a child cgroup uses it); left on");
                Ok(Some(false))
            }
            Err(source) => Err(ExecError::Write {
                path: path.to_string(),
                value,
                source,
            }),
        }
    }

    /// A cgroup from `current` (`absent` or its type) to `target`: created and given its
    /// type, or emptied into its parent and removed. A cgroup that existed before keeps its
    /// type on release (the kernel never turns a threaded cgroup back into a domain).
    fn put_dir(&self, path: &str, current: &str, target: &str) -> Result<Option<bool>, ExecError> {
        if current == target {
            return Ok(Some(false));
        }
        let write_error = |value: &str, source| ExecError::Write {
            path: path.to_string(),
            value: value.to_string(),
            source,
        };
        if target == DIR_ABSENT {
            self.evacuate(path)?;
            return match self.host.rmdir(&self.root.path(path)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(write_error("(rmdir)", e)),
                _ => Ok(Some(true)),
            };
        }
        if current == DIR_ABSENT {
            self.host
                .mkdir(&self.root.path(path))
                .map_err(|e| write_error("(mkdir)", e))?;
        } else if target != "threaded" {
            return Ok(Some(false));
        }
        if target != "domain" {
            let type_file = format!("{path}/cgroup.type");
            self.write_if_different(&type_file, "domain", target)?;
        }
        Ok(Some(true))
    }

    /// Moves every thread left in the cgroup `path` to its parent, so that it can be removed:
    /// only threads pvetune put there (a VM's vCPUs) or that they started are in it. A thread
    /// that exits meanwhile is not an error.
    fn evacuate(&self, path: &str) -> Result<(), ExecError> {
        let threads = match self.read(&format!("{path}/cgroup.threads")) {
            Ok(text) => text,
            Err(ExecError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let Some(parent) = parent_of(path).filter(|p| p.starts_with(CGROUP_ROOT)) else {
            return Ok(());
        };
        for tid in threads
            .split_whitespace()
            .filter_map(|t| t.parse::<i32>().ok())
        {
            match self.move_thread(tid, parent) {
                Err(e) if !gone(&e) => {
                    return Err(ExecError::Move {
                        thread: format!("thread {tid}"),
                        cgroup: parent.to_string(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes `tid` to the `cgroup.threads` of the cgroup `to` (host-absolute).
    pub(super) fn move_thread(&self, tid: i32, to: &str) -> io::Result<()> {
        self.host.write(
            &self.root.path(format!("{to}/cgroup.threads")),
            &format!("{tid}\n"),
        )
    }

    /// The cgroup a thread is in now, host-absolute (`/sys/fs/cgroup/qemu.slice/100.scope`).
    pub(super) fn thread_cgroup(&self, pid: i32, tid: i32) -> io::Result<String> {
        let text = self
            .host
            .read(&self.root.path(thread_cgroup_path(pid, tid)))?;
        crate::cgroup::unified_path(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no cgroup v2 line in /proc/{pid}/task/{tid}/cgroup"),
            )
        })
    }
}
