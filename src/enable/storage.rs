//! `/etc/pve/storage.cfg`, reduced to what a hookscript needs: which storages hold
//! `snippets`, where their files are, and whether every node sees the same files.
//!
//! The format is pve-storage's section config: a `<type>: <storeid>` line opens a section, its
//! options follow on lines that start with blanks (`\tpath /var/lib/vz`); a boolean option may
//! be a bare key (`\tshared`). A volume `<storeid>:snippets/<file>` is the file
//! `<path>/snippets/<file>` (pve-storage's `DirPlugin::filesystem_path`).

use std::path::Path;

/// Where Proxmox keeps the storage configuration (cluster-wide, on pmxcfs).
pub const STORAGE_CFG: &str = "/etc/pve/storage.cfg";
/// The storage every Proxmox VE node has (`dir: local`, path `/var/lib/vz`), also when
/// storage.cfg does not mention it: pve-storage then adds it with its defaults.
pub const DEFAULT_STORAGE: &str = "local";
const DEFAULT_LOCAL_PATH: &str = "/var/lib/vz";
/// Storage types whose files are the same on every node (the network file systems).
const SHARED_TYPES: &[&str] = &["nfs", "cifs", "cephfs", "glusterfs"];
/// Storage types that can hold files at all (`snippets` needs a file system).
const FILE_TYPES: &[&str] = &[
    "dir",
    "nfs",
    "cifs",
    "cephfs",
    "glusterfs",
    "btrfs",
    "zfspool",
];

/// One storage section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    pub id: String,
    pub kind: String,
    /// Host-absolute directory the storage's files live under.
    pub path: Option<String>,
    pub content: Vec<String>,
    pub shared: bool,
    pub disabled: bool,
    /// `nodes`: the only nodes the storage is available on (empty: all).
    pub nodes: Vec<String>,
    /// Line of the section header in storage.cfg.
    pub line: usize,
}

impl Storage {
    pub fn has_snippets(&self) -> bool {
        !self.disabled && self.path.is_some() && self.content.iter().any(|c| c == "snippets")
    }

    /// The same files on every node: a network file system, or a directory marked `shared`.
    pub fn is_shared(&self) -> bool {
        self.shared || SHARED_TYPES.contains(&self.kind.as_str())
    }

    /// Host path of `<storeid>:snippets/<file>` on this storage.
    pub fn snippet_path(&self, file: &str) -> Option<String> {
        self.path
            .as_ref()
            .map(|p| format!("{}/snippets/{file}", p.trim_end_matches('/')))
    }
}

/// Parses storage.cfg text. Unknown types and options are kept out of the way (a newer
/// Proxmox release adds them); a line that is neither a header nor an option is an error with
/// its line number, since guessing would put a hookscript where Proxmox does not look.
pub fn parse(text: &str) -> Result<Vec<Storage>, String> {
    let mut out: Vec<Storage> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let Some(storage) = out.last_mut() else {
                return Err(format!(
                    "line {number}: an option before the first '<type>: <storage>' line"
                ));
            };
            let mut words = line.split_whitespace();
            let key = words.next().unwrap_or_default();
            let value = words.collect::<Vec<_>>().join(" ");
            let flag = matches!(value.as_str(), "" | "1");
            match key {
                "path" => storage.path = Some(value),
                "content" => storage.content = split_list(&value),
                "shared" => storage.shared = flag,
                "disable" => storage.disabled = flag,
                "nodes" => storage.nodes = split_list(&value),
                _ => {}
            }
            continue;
        }
        let Some((kind, id)) = line.split_once(':') else {
            return Err(format!(
                "line {number}: expected '<type>: <storage>' or an indented option, found {:?}",
                crate::excerpt::excerpt(line)
            ));
        };
        let (kind, id) = (kind.trim(), id.trim());
        if !valid_storage_id(id) {
            return Err(format!(
                "line {number}: invalid storage id {:?} (letters, digits, '-', '_', '.')",
                crate::excerpt::excerpt(id)
            ));
        }
        let path = match kind {
            // Network storages mount under /mnt/pve/<id> unless `path` says otherwise.
            k if SHARED_TYPES.contains(&k) => Some(format!("/mnt/pve/{id}")),
            _ => None,
        };
        out.push(Storage {
            id: id.to_string(),
            kind: kind.to_string(),
            path,
            content: Vec::new(),
            shared: false,
            disabled: false,
            nodes: Vec::new(),
            line: number,
        });
    }
    out.retain(|s| FILE_TYPES.contains(&s.kind.as_str()) || s.path.is_some());
    Ok(out)
}

/// Reads `<root>/etc/pve/storage.cfg`. Without one, `local` as pve-storage assumes it (whose
/// default content has no `snippets`).
pub fn read(root: &crate::root::Root) -> Result<Vec<Storage>, String> {
    let path = root.path(STORAGE_CFG);
    let mut list = match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).map_err(|e| format!("{STORAGE_CFG}: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{STORAGE_CFG}: cannot read: {e}")),
    };
    if !list.iter().any(|s| s.id == DEFAULT_STORAGE) {
        list.push(Storage {
            id: DEFAULT_STORAGE.into(),
            kind: "dir".into(),
            path: Some(DEFAULT_LOCAL_PATH.into()),
            content: split_list("iso,vztmpl,backup"),
            shared: false,
            disabled: false,
            nodes: Vec::new(),
            line: 0,
        });
    }
    for s in &mut list {
        if s.id == DEFAULT_STORAGE && s.path.is_none() {
            s.path = Some(DEFAULT_LOCAL_PATH.into());
        }
    }
    Ok(list)
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split([',', ';', ' '])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// pve-storage's storage id pattern (`[a-z][a-z0-9\-\_\.]*[a-z0-9]`, case-insensitive).
pub fn valid_storage_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A hookscript volume `<storeid>:snippets/<file>`, split; `None` for any other shape (a file
/// name with `/` or starting with `.` could reach outside the snippets directory).
pub fn split_volume(volid: &str) -> Option<(&str, &str)> {
    let (store, rest) = volid.split_once(':')?;
    let file = rest.strip_prefix("snippets/")?;
    let ok = valid_storage_id(store)
        && !file.is_empty()
        && !file.starts_with('.')
        && !file.contains('/')
        && !file.contains('\0');
    ok.then_some((store, file))
}

/// The host path of a hookscript volume, from the storages of storage.cfg.
pub fn volume_path(storages: &[Storage], volid: &str) -> Result<String, String> {
    let (store, file) = split_volume(volid)
        .ok_or_else(|| format!("'{volid}' is not a '<storage>:snippets/<file>' volume"))?;
    let storage = storages
        .iter()
        .find(|s| s.id == store)
        .ok_or_else(|| format!("storage '{store}' of '{volid}' is not in {STORAGE_CFG}"))?;
    storage
        .snippet_path(file)
        .ok_or_else(|| format!("storage '{store}' has no path for snippets"))
}

/// Nodes of the cluster (`/etc/pve/nodes/<name>`), sorted; this node's name is among them.
pub fn cluster_nodes(root: &crate::root::Root) -> Vec<String> {
    let mut nodes: Vec<String> = std::fs::read_dir(root.path("/etc/pve/nodes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    nodes.sort();
    nodes
}

/// Whether `path` (already under the root) exists as anything, a dangling link included.
pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup,snippets\n\n\
lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n\n\
nfs: nas\n\texport /srv\n\tserver 10.0.0.2\n\tcontent snippets,images\n\n\
dir: scratch\n\tpath /scratch/\n\tcontent snippets\n\tshared\n\tnodes pve1,pve2\n\tdisable 0\n";

    #[test]
    fn parses_sections_and_flags() {
        let list = parse(CFG).unwrap();
        let ids: Vec<&str> = list.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["local", "nas", "scratch"]);
        assert!(list[0].has_snippets() && !list[0].is_shared());
        assert_eq!(list[1].path.as_deref(), Some("/mnt/pve/nas"));
        assert!(list[1].is_shared());
        assert!(list[2].is_shared() && !list[2].disabled);
        assert_eq!(list[2].nodes, ["pve1", "pve2"]);
        assert_eq!(
            list[2].snippet_path("pvetune").as_deref(),
            Some("/scratch/snippets/pvetune")
        );
    }

    #[test]
    fn refuses_garbage_with_its_line() {
        assert_eq!(
            parse("dir: local\nnonsense\n").unwrap_err(),
            "line 2: expected '<type>: <storage>' or an indented option, found \"nonsense\""
        );
        assert!(parse("\tpath /x\n").unwrap_err().starts_with("line 1:"));
        assert!(
            parse("dir: ../x\n")
                .unwrap_err()
                .contains("invalid storage id")
        );
    }

    #[test]
    fn volumes_stay_inside_snippets() {
        assert_eq!(
            split_volume("local:snippets/gpu.sh"),
            Some(("local", "gpu.sh"))
        );
        for bad in [
            "local:snippets/../x",
            "local:snippets/a/b",
            "local:iso/x",
            "local:snippets/",
            "local:snippets/.hidden",
            "/usr/bin/x",
        ] {
            assert_eq!(split_volume(bad), None, "{bad}");
        }
        let list = parse(CFG).unwrap();
        assert_eq!(
            volume_path(&list, "nas:snippets/hook.pl").unwrap(),
            "/mnt/pve/nas/snippets/hook.pl"
        );
        assert!(volume_path(&list, "gone:snippets/x").is_err());
    }
}
