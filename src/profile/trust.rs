//! Whether a profile may be trusted as root: the chain of owners and modes from `/` to the
//! file, through every symlink (see [`check_owner`]).

use super::*;

/// The most symlinks [`check_owner`] follows (the kernel's limit, `MAXSYMLINKS`).
const MAX_SYMLINKS: u32 = 40;

/// pmxcfs, the cluster file system Proxmox mounts on `/etc/pve`, shows every entry as owned by
/// root with group `www-data` (files 0640, directories 0755; it refuses chmod and chown).
const PMXCFS_MOUNT: &str = "/etc/pve";
const PMXCFS_GROUP: &str = "www-data";

/// Refuses a profile that anyone but root (or the invoking user, for fixture trees) could have
/// written or swapped: pvetune runs it as root. Returns the profile's real path.
///
/// The path is resolved one component at a time, as the kernel does, and every entry it passes
/// through is checked: each directory (from `/`), each symlink followed (the directory that
/// holds a symlink can redirect it, so a safe directory linking to an unsafe target, or an
/// unsafe directory linking to a safe one, is refused), and the file itself. Each must be
///
/// - owned by root or the invoking euid;
/// - not writable by group or others;
/// - of group root or the invoking egid, with one exception: entries under pmxcfs's mount
///   `/etc/pve` (the real path) may have group `www-data`, which is how pmxcfs shows every
///   entry; the write bits are checked there as everywhere, and nowhere else is `www-data`
///   (or any other group) accepted.
///
/// **Sticky world-writable directories (`/tmp`).** The sticky bit stops others from deleting or
/// renaming what they do not own, not from creating new names: anyone can pre-create
/// `/tmp/100.yaml`, or a symlink there, before root writes it. So such a directory is accepted
/// on the path only when the entry of the path inside it is a directory owned by root (which
/// nobody else can rename or replace there): `/tmp/<root-owned dir>/.../100.yaml` passes,
/// `/tmp/100.yaml` and `/tmp/link -> ...` are refused, as is a group-writable or
/// world-writable directory without the sticky bit anywhere on the path. For fixture trees a
/// directory of the invoking euid counts as root's (the sticky bit protects it from others just
/// the same; when pvetune runs as root, as a hook does, that is root alone).
pub(super) fn check_owner(path: &Path) -> Result<PathBuf, ProfileError> {
    let refuse = |reason: String| ProfileError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    let read_error = |source| ProfileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let me = nix::unistd::geteuid().as_raw();
    let my_gid = nix::unistd::getegid().as_raw();
    let pmxcfs_gid = nix::unistd::Group::from_name(PMXCFS_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    // Owner and group of one entry (its real path `at`).
    let owned = |at: &Path, meta: &std::fs::Metadata, what: &str| -> Result<(), ProfileError> {
        if meta.uid() != 0 && meta.uid() != me {
            return Err(refuse(format!(
                "{what} {} is owned by uid {}",
                at.display(),
                meta.uid()
            )));
        }
        let pmxcfs = at.starts_with(PMXCFS_MOUNT) && Some(meta.gid()) == pmxcfs_gid;
        if meta.gid() != 0 && meta.gid() != my_gid && !pmxcfs {
            return Err(refuse(format!(
                "{what} {} has group gid {} (only root's group, or www-data under /etc/pve)",
                at.display(),
                meta.gid()
            )));
        }
        Ok(())
    };
    // A directory that holds `below` on the path: nobody else may add, remove or swap it.
    let holder = |dir: &Path, below: &std::fs::Metadata| -> Result<(), ProfileError> {
        let meta = std::fs::symlink_metadata(dir).map_err(read_error)?;
        owned(dir, &meta, "directory")?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            let sticky_over_root_dir =
                mode & 0o1000 != 0 && below.is_dir() && (below.uid() == 0 || below.uid() == me);
            if !sticky_over_root_dir {
                return Err(refuse(format!(
                    "directory {} is writable by group or others (mode {mode:o}){}",
                    dir.display(),
                    if mode & 0o1000 != 0 {
                        ": its sticky bit protects entries from deletion, not from being \
                         created by others"
                    } else {
                        ""
                    }
                )));
            }
        }
        Ok(())
    };

    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(read_error)?.join(path)
    };
    // Components still to resolve, the next one last.
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    let push = |pending: &mut Vec<std::ffi::OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                std::path::Component::Normal(name) => pending.push(name.to_os_string()),
                std::path::Component::ParentDir => pending.push("..".into()),
                _ => {}
            }
        }
    };
    push(&mut pending, &absolute);
    let mut current = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            // `current` is a real path (no symlinks): its parent is the lexical one.
            current.pop();
            continue;
        }
        let next = current.join(&name);
        let meta = std::fs::symlink_metadata(&next).map_err(read_error)?;
        holder(&current, &meta)?;
        if meta.file_type().is_symlink() {
            owned(&next, &meta, "symlink")?;
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(refuse(format!("more than {MAX_SYMLINKS} symlinks")));
            }
            let target = std::fs::read_link(&next).map_err(read_error)?;
            if target.is_absolute() {
                current = PathBuf::from("/");
            }
            push(&mut pending, &target);
            continue;
        }
        if pending.is_empty() {
            owned(&next, &meta, "profile")?;
            if !meta.is_file() {
                return Err(refuse(format!("{} is not a regular file", next.display())));
            }
            let mode = meta.mode() & 0o7777;
            if mode & 0o022 != 0 {
                return Err(refuse(format!(
                    "profile {} has mode {mode:o}: writable by group or others",
                    next.display()
                )));
            }
            return Ok(next);
        }
        if !meta.is_dir() {
            return Err(refuse(format!("{} is not a directory", next.display())));
        }
        current = next;
    }
    // The path named a directory (`/`, or ending in `..`).
    Err(refuse(format!(
        "{} is not a regular file",
        current.display()
    )))
}
