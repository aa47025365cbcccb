//! A minimal writer of the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Written here rather than piping `find | cpio` so the archive is assembled straight from
//! host files (the QEMU binary, its libraries, busybox) without copying them into a staging
//! tree first, and so owners and modes are exactly what the lab says (root, the host file's mode).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::util::{Ctx, LabResult};

enum Entry {
    Dir,
    File { host: PathBuf, mode: u32 },
}

/// An initramfs being assembled; paths are absolute paths inside the guest.
#[derive(Default)]
pub struct Archive {
    // Sorted by path, so every directory comes before what it holds.
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn dir(&mut self, path: &str) {
        self.parents(path);
        self.entries.entry(normal(path)).or_insert(Entry::Dir);
    }

    /// Adds a host file, following symlinks on the host, keeping its permission bits.
    pub fn host_file(&mut self, path: &str, host: &Path) -> LabResult<()> {
        let meta = fs::metadata(host).ctx(|| format!("reading {}", host.display()))?;
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        self.insert(
            path,
            Entry::File {
                host: host.to_path_buf(),
                mode,
            },
        );
        Ok(())
    }

    /// Adds every file below host directory `host` at guest path `path`.
    pub fn host_tree(&mut self, path: &str, host: &Path) -> LabResult<()> {
        self.dir(path);
        for entry in fs::read_dir(host).ctx(|| format!("listing {}", host.display()))? {
            let entry = entry.ctx(|| format!("listing {}", host.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let guest = format!("{}/{name}", normal(path));
            if entry.path().is_dir() {
                self.host_tree(&guest, &entry.path())?;
            } else {
                self.host_file(&guest, &entry.path())?;
            }
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        self.parents(path);
        self.entries.insert(normal(path), entry);
    }

    fn parents(&mut self, path: &str) {
        let path = normal(path);
        let mut at = 0;
        while let Some(i) = path[at + 1..].find('/') {
            at += i + 1;
            self.entries
                .entry(path[..at].to_string())
                .or_insert(Entry::Dir);
        }
    }

    pub fn write(&self, out: &Path) -> LabResult<()> {
        let file = fs::File::create(out).ctx(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::new(file);
        for (ino, (path, entry)) in (1..).zip(&self.entries) {
            // The kernel wants names relative to the root, without the leading `/`.
            let name = &path[1..];
            let (mode, data) = match entry {
                Entry::Dir => (0o040755, Vec::new()),
                Entry::File { host, mode } => {
                    let data = fs::read(host).ctx(|| format!("reading {}", host.display()))?;
                    (0o100000 | mode, data)
                }
            };
            write_entry(&mut w, ino, name, mode, &data)
                .ctx(|| format!("writing {}", out.display()))?;
        }
        write_entry(&mut w, 0, "TRAILER!!!", 0, &[])
            .ctx(|| format!("writing {}", out.display()))?;
        w.flush().ctx(|| format!("writing {}", out.display()))
    }
}

fn normal(path: &str) -> String {
    format!("/{}", path.trim_matches('/'))
}

fn write_entry(
    w: &mut impl Write,
    ino: u32,
    name: &str,
    mode: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid: root
        0, // gid: root
        nlink,
        0, // mtime
        data.len() as u32,
        0, // dev major
        0, // dev minor
        0, // rdev major
        0, // rdev minor
        name.len() as u32 + 1,
        0, // check
    ];
    let mut header = String::from("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad(w, data.len())
}

/// newc aligns both the header+name and the data to 4 bytes.
fn pad(w: &mut impl Write, len: usize) -> std::io::Result<()> {
    let n = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..n])
}
