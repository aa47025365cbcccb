//! The ledger: what pvetune holds, per VM and for the node, kept durably under `/run/pvetune`.
//!
//! Host-wide settings are *claims*, not overwrites. A claim on a kernel file keeps the value
//! from before the first claimer (`original`) and every claimer's wanted value in claim order;
//! the file holds the last claimer's value. Releasing one VM's claim writes the value the
//! remaining claimers need, and releasing the last writes `original` back. So two VMs that
//! share a sysctl can stop in any order and the host ends where it started.
//!
//! `/run` is a tmpfs: after a reboot the ledger is gone, and so are the kernel values it
//! described, which is exactly right.

use crate::cpuset::CpuSet;
use crate::root::{Root, paths};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
const FORMAT_VERSION: u32 = 1;
/// How long a hook waits for another pvetune run on this node before giving up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub vms: BTreeMap<u32, VmRecord>,
    /// Host path -> claim.
    pub claims: BTreeMap<String, Claim>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// CPUs the VM owns exclusively while it runs (or starts).
    pub cpus: CpuSet,
    /// QEMU's pid and its start time (`/proc/<pid>/stat` field 22): together they identify
    /// the process even after the pid is reused.
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    /// The last phase that ran for this VM.
    pub phase: String,
    pub pins: Vec<PinRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    pub tid: i32,
    pub label: String,
    /// Affinity before pvetune first pinned the thread.
    pub old: CpuSet,
    pub new: CpuSet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Exact file content before the first claim.
    pub original: String,
    pub holders: Vec<Holder>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub vmid: u32,
    pub value: String,
}

impl Claim {
    /// The value the file should hold: the last claimer's, or the original when none is left.
    pub fn effective(&self) -> &str {
        self.holders
            .last()
            .map(|h| h.value.as_str())
            .unwrap_or(&self.original)
    }
}

impl State {
    /// CPUs owned by every VM in the ledger except `vmid`.
    pub fn owned_by_others(&self, vmid: u32) -> BTreeMap<u32, CpuSet> {
        self.vms
            .iter()
            .filter(|(id, _)| **id != vmid)
            .map(|(id, rec)| (*id, rec.cpus.clone()))
            .collect()
    }

    /// Every VM that pvetune holds anything for (a record or a claim).
    pub fn held_vms(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.vms.keys().copied().collect();
        for claim in self.claims.values() {
            ids.extend(claim.holders.iter().map(|h| h.vmid));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.claims.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: corrupt ledger ({source}); it is kept as is: inspect it, undo by hand, then remove it"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: ledger format {found} is newer than this pvetune understands ({FORMAT_VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("another pvetune run held {path} for {}s; giving up", LOCK_TIMEOUT.as_secs())]
    LockTimeout { path: PathBuf },
}

/// Where the ledger lives, and its atomic, durable replacement.
pub struct Store {
    dir: PathBuf,
}

/// The node-wide lock; released on drop.
pub struct NodeLock {
    _lock: nix::fcntl::Flock<File>,
}

impl Store {
    pub fn new(root: &Root) -> Self {
        Store {
            dir: root.path(paths::STATE_DIR),
        }
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(std::io::Error) -> StateError {
        move |source| StateError::Io { path, source }
    }

    /// Reads the ledger; an absent one is empty.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: FORMAT_VERSION,
                    ..State::default()
                });
            }
            Err(e) => return Err(StateError::Io { path, source: e }),
        };
        let state: State = serde_json::from_str(&text).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        if state.version > FORMAT_VERSION {
            return Err(StateError::Version {
                path,
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Replaces the ledger atomically and durably (write, fsync, rename, fsync the directory):
    /// after a crash it is either the old or the new ledger, never a torn one.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        self.ensure_dir()?;
        let path = self.dir.join(STATE_FILE);
        if state.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io(path)(e)),
                _ => self.sync_dir(),
            };
        }
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut text =
            serde_json::to_string_pretty(state).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        text.push('\n');
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(self.io(tmp.clone()))?;
        file.write_all(text.as_bytes())
            .map_err(self.io(tmp.clone()))?;
        file.sync_all().map_err(self.io(tmp.clone()))?;
        fs::rename(&tmp, &path).map_err(self.io(path.clone()))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), StateError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io(self.dir.clone()))
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(self.io(self.dir.clone()))
    }

    /// Serializes pvetune runs on this node (qemu-server runs hooks of different VMs in
    /// parallel). Waits up to a minute, polling, so a stuck run cannot hang a start forever.
    pub fn lock(&self) -> Result<NodeLock, StateError> {
        use nix::fcntl::{Flock, FlockArg};
        self.ensure_dir()?;
        let path = self.dir.join(LOCK_FILE);
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(self.io(path.clone()))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(NodeLock { _lock: lock }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StateError::LockTimeout { path });
                }
                Err((_, errno)) => return Err(self.io(path)(errno.into())),
            }
        }
    }
}

/// Whether qemu-server holds the VM's config lock right now (a start, with its hooks, runs
/// under it). Probed with a non-blocking flock that is released at once.
pub fn config_lock_held(root: &Root, vmid: u32) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let path = root.path(format!("{}/lock-{vmid}.conf", paths::QEMU_LOCK_DIR));
    let Ok(file) = File::open(path) else {
        return false;
    };
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_value_is_the_last_claimers() {
        let mut claim = Claim {
            original: "1\n".into(),
            holders: vec![],
        };
        assert_eq!(claim.effective(), "1\n");
        claim.holders.push(Holder {
            vmid: 100,
            value: "120".into(),
        });
        claim.holders.push(Holder {
            vmid: 101,
            value: "60".into(),
        });
        assert_eq!(claim.effective(), "60");
    }

    #[test]
    fn save_and_load_round_trip_and_empty_removes_file() {
        let dir = std::env::temp_dir().join(format!("pvetune-state-{}", std::process::id()));
        let root = Root::new(&dir);
        let store = Store::new(&root);
        let mut state = store.load().unwrap();
        state.vms.insert(
            100,
            VmRecord {
                cpus: CpuSet::range(4, 7),
                ..Default::default()
            },
        );
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        store
            .save(&State {
                version: FORMAT_VERSION,
                ..Default::default()
            })
            .unwrap();
        assert!(!root.path("/run/pvetune/state.json").exists());
        let _lock = store.lock().unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
