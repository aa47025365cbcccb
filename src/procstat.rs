//! `/proc/<pid>/stat`, split as the kernel prints it (`do_task_stat`), in one place.
//!
//! Field 2 is `(comm)`, and a comm may hold spaces, `(` and `)`: anyone can name a process
//! `a) (b c`. The fields resume after the *last* `)`, which no later field can contain (they
//! are all numbers and the one-letter state). Splitting on whitespace from the start, or on the
//! first `)`, reads another field than the one asked for, and for pvetune that would mean
//! taking a user process for a kernel thread or a reused pid for a live QEMU.

use std::path::Path;

/// The longest `stat` accepted: the kernel's is a comm of at most 64 bytes and 52 numbers of
/// at most 20 digits, about 1,200 bytes; anything longer is not a `stat`.
pub const MAX_STAT_BYTES: usize = 4096;

/// `flags` (field 9): the task is a kernel thread (`PF_KTHREAD`, `include/linux/sched.h`).
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `flags` (field 9): the task's affinity cannot be changed (`PF_NO_SETAFFINITY`): per-CPU
/// threads and every workqueue worker, bound or unbound (`kthread_bind_mask`).
pub const PF_NO_SETAFFINITY: u32 = 0x0400_0000;

/// One `/proc/<pid>/stat` line; fields are taken out on demand, so a field that is not asked
/// for is never parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    text: String,
    /// Byte index of the `(` opening comm.
    open: usize,
    /// Byte index of the last `)`, closing comm.
    close: usize,
}

impl Stat {
    /// The `stat` at `path` (bounded to [`MAX_STAT_BYTES`]), or `None` if the process is gone
    /// or the file is not shaped like a `stat`.
    pub fn read(path: &Path) -> Option<Stat> {
        let text = crate::attr::read_at_most(path, MAX_STAT_BYTES).ok()?;
        Stat::parse(text)
    }

    /// `None` without a `(` that comes before the last `)`.
    pub fn parse(text: String) -> Option<Stat> {
        let close = text.rfind(')')?;
        let open = text[..close].find('(')?;
        Some(Stat { text, open, close })
    }

    /// Field 1, the pid the line is about.
    pub fn pid(&self) -> Option<i32> {
        self.text[..self.open].trim().parse().ok()
    }

    /// Field 2 without its parentheses.
    pub fn comm(&self) -> &str {
        &self.text[self.open + 1..self.close]
    }

    /// Field `n` in proc(5)'s numbering (3 is the state), for `n >= 3`.
    pub fn field(&self, n: usize) -> Option<&str> {
        self.text[self.close + 1..]
            .split_ascii_whitespace()
            .nth(n.checked_sub(3)?)
    }

    /// Field 9, the `PF_*` flags.
    pub fn flags(&self) -> Option<u32> {
        self.field(9)?.parse().ok()
    }

    /// Field 22, the start time in clock ticks after boot: with the pid, it names one process
    /// even after the pid is reused.
    pub fn start_time(&self) -> Option<u64> {
        self.field(22)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(text: &str) -> Option<Stat> {
        Stat::parse(text.to_string())
    }

    #[test]
    fn fields_resume_after_the_last_parenthesis() {
        // This machine's kthreadd, as the kernel printed it.
        let kthreadd = stat(
            "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 2 0 0 20 0 1 0 30 0 0 \
             18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
        )
        .unwrap();
        assert_eq!(kthreadd.pid(), Some(2));
        assert_eq!(kthreadd.comm(), "kthreadd");
        assert_eq!(kthreadd.field(3), Some("S"));
        assert_eq!(kthreadd.field(4), Some("0"));
        assert_eq!(kthreadd.flags(), Some(0x0020_8040));
        assert_eq!(kthreadd.start_time(), Some(30));
        assert_eq!(kthreadd.field(2), None);

        let odd =
            stat("77 (a) (b ) c) R 1 77 77 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 999 0\n").unwrap();
        assert_eq!(odd.comm(), "a) (b ) c");
        assert_eq!(odd.field(3), Some("R"));
        assert_eq!(odd.flags(), Some(0x0040_0100));
        assert_eq!(odd.start_time(), Some(999));
    }

    #[test]
    fn odd_lines_give_nothing_rather_than_another_field() {
        assert_eq!(stat(""), None);
        assert_eq!(stat("5 kthreadd S 0"), None);
        assert_eq!(stat("5 ) (kthreadd S 0"), None);
        let short = stat("5 (k) S 0 0 0 0 -1").unwrap();
        assert_eq!(short.flags(), None);
        assert_eq!(short.start_time(), None);
        let junk = stat("x (k) S 0 0 0 0 -1 zz 0 0 0 0 0 0 0 0 20 0 1 0 -4").unwrap();
        assert_eq!(junk.pid(), None);
        assert_eq!(junk.flags(), None);
        assert_eq!(junk.start_time(), None);
    }
}
