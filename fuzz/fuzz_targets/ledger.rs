//! The ledger loader, through its one public entry: `state::Store::load` on a root whose
//! `run/pvetune/` (mode 0700, owned by the fuzzing user) holds the input. There is no public
//! parser from bytes (the snapshot and journal readers are private), so this is the honest
//! surface: the snapshot's serde deserialisation, the format-version check, `path_refusal` on
//! every claim of the snapshot and of every journal line, and the journal replay
//! (`State::apply`).
//!
//! Input: `state.json` bytes, then optionally a NUL and the `state.journal` bytes (a NUL
//! cannot occur in JSON text, escaped or not, so nothing the loader could accept is lost).
//! After a successful load, every claim's `effective()` value is computed (it composes
//! cpulists) and the ledger's queries are run.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pvetune::root::Root;
use pvetune::state::Store;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::OnceLock;

/// A fixture root on tmpfs when there is one, created once per process.
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let root = base.join(format!("pvetune-fuzz-ledger-{}", std::process::id()));
        let run = root.join("run/pvetune");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&run)
            .expect("create the fixture run directory");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
            .expect("chmod 0700 the fixture run directory");
        root
    })
}

fuzz_target!(|data: &[u8]| {
    let root = root();
    let run = root.join("run/pvetune");
    let (snapshot, journal) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    std::fs::write(run.join("state.json"), snapshot).expect("write state.json");
    match journal {
        Some(journal) => std::fs::write(run.join("state.journal"), journal),
        None => match std::fs::remove_file(run.join("state.journal")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
    .expect("write or remove state.journal");

    let store = Store::new(&Root::new(root));
    match store.load() {
        Ok(state) => {
            for claim in state.claims.values() {
                let _ = claim.effective();
                let _ = claim.op();
                for holder in &claim.holders {
                    let _ = claim.holder(holder.vmid);
                }
            }
            for vmid in state.held_vms() {
                let _ = state.owned_by_others(vmid);
            }
            let _ = state.is_empty();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
