//! Reading small kernel attribute files (sysfs, procfs) with as few system calls as possible.
//!
//! `fs::read_to_string` costs five system calls per file: open, a `statx` for a size hint, a
//! read, a second read that sees the end, close. Planning reads about ten such files per CPU
//! it places threads on, so [`read`] does it in three: open, one read, close.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The size of the first read. A kernel attribute is printed into one page and one `read` of
/// at least that much hands it out whole; binary attributes (the cpulists of very large
/// machines, since Linux 5.14) hand out a page per `read`, and a page is at least this big.
const FIRST_READ: usize = 4096;

/// The whole content of a one-value kernel attribute, as text.
///
/// A first read shorter than [`FIRST_READ`] has seen the end: true of sysfs attributes, of
/// one-record procfs files and of the regular files in fixture trees. Only a read that fills
/// the buffer can have more behind it, and then reading goes on to the end. Not for files of
/// many records (`/proc/<pid>/maps`, `cgroup.procs`): the kernel hands those out a page of
/// whole records at a time, so a short read can come before the end.
pub fn read(path: &Path) -> io::Result<String> {
    read_at_most(path, usize::MAX)
}

/// [`read`] for a file whose length the kernel bounds (`/proc/<pid>/stat`, a cpumask): one
/// longer than `limit` bytes is refused with `InvalidData` after reading at most `limit + 1`
/// of them, so a file that is not what it should be costs neither time nor memory.
pub fn read_at_most(path: &Path, limit: usize) -> io::Result<String> {
    thread_local! {
        /// The first read's buffer, zeroed once per thread rather than once per file (a phase
        /// reads thousands of IRQ files).
        static FIRST: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; FIRST_READ]);
    }
    let mut file = File::open(path)?;
    let (mut buf, n) = FIRST.with_borrow_mut(|first| {
        let n = loop {
            match file.read(first) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        io::Result::Ok((first[..n].to_vec(), n))
    })?;
    if n == FIRST_READ {
        let more = limit.saturating_sub(n).saturating_add(1);
        (&mut file).take(more as u64).read_to_end(&mut buf)?;
    }
    if buf.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {limit} bytes"),
        ));
    }
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test's own temp dir, removed on drop (also when the test panics).
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(test: &str) -> Dir {
            let dir = std::env::temp_dir()
                .join(format!("pvetune-test-attr-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn join(&self, name: &str) -> std::path::PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_short_page_sized_and_long_files_whole() {
        let dir = Dir::new("lengths");
        for len in [
            0,
            1,
            FIRST_READ - 1,
            FIRST_READ,
            FIRST_READ + 1,
            3 * FIRST_READ + 7,
        ] {
            let path = dir.join(&format!("len{len}"));
            let text: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            std::fs::write(&path, &text).unwrap();
            assert_eq!(read(&path).unwrap(), text, "{len} bytes");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn reads_this_machines_attributes_as_read_to_string_does() {
        for path in [
            "/sys/devices/system/cpu/online",
            "/sys/devices/system/cpu/cpu0/topology/thread_siblings_list",
            "/sys/devices/system/cpu/cpu0/cache/index0/level",
            // Not meminfo: its counters change between the two reads (a flaky test, seen).
            "/sys/devices/system/node/node0/distance",
            "/proc/sys/kernel/ostype",
        ] {
            let path = Path::new(path);
            if let Ok(want) = std::fs::read_to_string(path) {
                assert_eq!(read(path).unwrap(), want, "{}", path.display());
            }
        }
    }

    #[test]
    fn refuses_what_is_longer_than_its_limit() {
        let dir = Dir::new("limit");
        for (len, limit, ok) in [
            (10, 10, true),
            (11, 10, false),
            (FIRST_READ, FIRST_READ, true),
            (FIRST_READ + 1, FIRST_READ, false),
            (3 * FIRST_READ, 3 * FIRST_READ, true),
            (3 * FIRST_READ, 2 * FIRST_READ, false),
        ] {
            let path = dir.join(&format!("len{len}-{limit}"));
            std::fs::write(&path, "x".repeat(len)).unwrap();
            match read_at_most(&path, limit) {
                Ok(text) => assert!(ok && text.len() == len, "{len} bytes, limit {limit}"),
                Err(e) => assert!(
                    !ok && e.kind() == io::ErrorKind::InvalidData,
                    "{len} bytes, limit {limit}: {e}"
                ),
            }
        }
    }

    #[test]
    fn keeps_the_error_kinds() {
        let dir = Dir::new("errors");
        let missing = dir.join("missing");
        assert_eq!(read(&missing).unwrap_err().kind(), io::ErrorKind::NotFound);
        let binary = dir.join("binary");
        std::fs::write(&binary, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read(&binary).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        std::fs::remove_file(&binary).unwrap();
    }
}
