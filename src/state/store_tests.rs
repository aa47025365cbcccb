//! Tests of the ledger on disk: round trips, the journal, crashes mid-append, old and newer
//! formats, refused paths and planted links.

use super::*;

/// A private ledger directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("pvetune-test-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Dir(dir)
    }
    fn store(&self) -> Store {
        Store::new(&Root::new(&self.0))
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join("run/pvetune").join(name)
    }
    /// `/run/pvetune` as pvetune creates it: mode 0700.
    fn make_run_dir(&self) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.file(""))
            .unwrap();
    }
    /// A ledger with a snapshot (VM 100's record) and one journal line (a claim on `/a`).
    fn with_journal(name: &str) -> (Dir, Store, State) {
        let dir = Dir::new(name);
        let store = dir.store();
        let mut state = store.load().unwrap();
        store.append(&mut state, vec![vm_record()]).unwrap();
        store
            .append(&mut state, vec![claim("/proc/sys/pvetune/a", 100, "2")])
            .unwrap();
        (dir, store, state)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn claim(path: &str, vmid: u32, value: &str) -> Change {
    Change::Claim {
        path: path.into(),
        claim: Some(Box::new(Claim {
            original: "1\n".into(),
            holders: smallvec::smallvec![Holder {
                vmid,
                value: value.into(),
                seq: 0,
                extra: Extra::new(),
            }],
            compose: None,
            extra: Extra::new(),
        })),
    }
}

fn pin(tid: i32, cpu: u32) -> Change {
    Change::Pin {
        vmid: 100,
        tid,
        pin: Some(Box::new(PinRecord {
            tid,
            label: format!("t{tid}"),
            old: CpuSet::range(0, 1),
            new: CpuSet::range(cpu, cpu),
            start_time: None,
            extra: Extra::new(),
        })),
    }
}

fn vm_record() -> Change {
    Change::Vm {
        vmid: 100,
        record: Some(Box::new(VmRecord {
            cpus: CpuSet::range(4, 7),
            ..Default::default()
        })),
    }
}

#[test]
fn save_and_load_round_trip_and_empty_removes_files() {
    let dir = Dir::new("round-trip");
    let store = dir.store();
    let mut state = store.load().unwrap();
    state.vms.insert(
        100,
        VmRecord {
            cpus: CpuSet::range(4, 7),
            ..Default::default()
        },
    );
    store.save(&mut state).unwrap();
    assert_eq!(state.generation, 1);
    assert_eq!(store.load().unwrap(), state);
    store
        .append(&mut state, vec![claim("/proc/sys/pvetune/a", 100, "2")])
        .unwrap();
    assert!(dir.file(JOURNAL_FILE).exists());
    store.save(&mut State::empty()).unwrap();
    assert!(!dir.file(STATE_FILE).exists());
    assert!(!dir.file(JOURNAL_FILE).exists());
    let _lock = store.lock().unwrap();
}

#[test]
fn appends_replay_on_load_and_compaction_folds_them() {
    let dir = Dir::new("journal");
    let store = dir.store();
    let mut state = store.load().unwrap();
    // No snapshot yet: the first batch becomes one.
    store.append(&mut state, vec![vm_record()]).unwrap();
    assert_eq!(store.stats().rewrites, 1);
    assert!(!dir.file(JOURNAL_FILE).exists());
    let batch: Vec<Change> = (0..50)
        .map(|i| claim(&format!("/proc/irq/{i}/smp_affinity_list"), 100, "3"))
        .chain((0..20).map(|tid| pin(1000 + tid, 2)))
        .collect();
    store.append(&mut state, batch.clone()).unwrap();
    store.append(&mut state, vec![pin(1005, 3)]).unwrap();
    assert_eq!(
        store.stats(),
        StoreStats {
            rewrites: 1,
            appends: 2,
            changes: 71
        }
    );
    let loaded = dir.store().load().unwrap();
    assert_eq!(loaded, state);
    assert_eq!(loaded.claims.len(), 50);
    assert_eq!(loaded.vms[&100].pins.len(), 20);
    assert_eq!(loaded.vms[&100].pins[5].new, CpuSet::range(3, 3));
    assert_eq!(loaded.vms[&100].cpus, CpuSet::range(4, 7));
    store.compact(&mut state).unwrap();
    assert_eq!(store.stats().rewrites, 2);
    assert!(!dir.file(JOURNAL_FILE).exists());
    assert_eq!(dir.store().load().unwrap(), state);
    // Nothing journaled since: nothing to fold.
    store.compact(&mut state).unwrap();
    assert_eq!(store.stats().rewrites, 2);
}

#[test]
fn pin_changes_keep_order_and_remove_in_place() {
    let mut state = State::empty();
    state.apply(vec![pin(1, 0), pin(2, 0), pin(3, 0), pin(2, 1)]);
    let tids = |s: &State| s.vms[&100].pins.iter().map(|p| p.tid).collect::<Vec<_>>();
    assert_eq!(tids(&state), [1, 2, 3]);
    assert_eq!(state.vms[&100].pins[1].new, CpuSet::range(1, 1));
    let remove = |tid| Change::Pin {
        vmid: 100,
        tid,
        pin: None,
    };
    state.apply(vec![remove(2), remove(9), pin(4, 0), remove(1)]);
    assert_eq!(tids(&state), [3, 4]);
    state.apply(vec![
        Change::Vm {
            vmid: 100,
            record: None,
        },
        remove(3),
    ]);
    assert!(state.is_empty(), "removing a pin creates no record");
    state.apply(vec![pin(5, 0), vm_record(), pin(6, 0)]);
    assert_eq!(
        tids(&state),
        [6],
        "a whole record replaces the pins before it"
    );
}

#[test]
fn a_line_torn_by_a_crash_is_ignored_then_cut() {
    let (dir, _, state) = Dir::with_journal("torn");
    let before = state.clone();
    // The process died in the middle of the next append.
    let mut journal = OpenOptions::new()
        .append(true)
        .open(dir.file(JOURNAL_FILE))
        .unwrap();
    journal
        .write_all(b"{\"v\":2,\"generation\":1,\"chan")
        .unwrap();
    let later = dir.store();
    let mut state = later.load().unwrap();
    assert_eq!(state, before);
    later
        .append(&mut state, vec![claim("/proc/sys/pvetune/b", 100, "3")])
        .unwrap();
    let text = fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert_eq!(dir.store().load().unwrap(), state);
    assert_eq!(state.claims.len(), 2);
}

#[test]
fn lines_of_an_older_generation_are_ignored() {
    let (dir, store, mut state) = Dir::with_journal("stale");
    let stale = fs::read(dir.file(JOURNAL_FILE)).unwrap();
    // Compaction, then a change that the stale line would undo if it were replayed.
    store.compact(&mut state).unwrap();
    store
        .append(
            &mut state,
            vec![Change::Claim {
                path: "/proc/sys/pvetune/a".into(),
                claim: None,
            }],
        )
        .unwrap();
    store.save(&mut state).unwrap();
    // As if the journal's removal after the rename had been lost.
    fs::write(dir.file(JOURNAL_FILE), &stale).unwrap();
    let loaded = dir.store().load().unwrap();
    assert!(loaded.claims.is_empty());
    assert_eq!(loaded, state);
}

#[test]
fn a_journal_without_snapshot_is_dropped_before_the_next_snapshot() {
    let (dir, store, _) = Dir::with_journal("orphan");
    let orphan = fs::read(dir.file(JOURNAL_FILE)).unwrap();
    store.save(&mut State::empty()).unwrap();
    // As if emptying the ledger had stopped between removing the snapshot and the journal.
    fs::write(dir.file(JOURNAL_FILE), &orphan).unwrap();
    let later = dir.store();
    let mut state = later.load().unwrap();
    assert!(state.is_empty());
    // The next snapshot is generation 1 again: the orphan lines must not follow it.
    later.append(&mut state, vec![vm_record()]).unwrap();
    assert!(!dir.file(JOURNAL_FILE).exists());
    assert!(dir.store().load().unwrap().claims.is_empty());
}

#[test]
fn format_1_loads_and_is_rewritten_as_format_2() {
    let dir = Dir::new("v1");
    dir.make_run_dir();
    fs::write(
        dir.file(STATE_FILE),
        r#"{"version":1,"vms":{"100":{"cpus":"4-7","pid":null,"start_time":null,"phase":"pre-start","pins":[]}},
           "claims":{"/proc/sys/vm/stat_interval":{"original":"1\n","holders":[{"vmid":100,"value":"120"}]}}}"#,
    )
    .unwrap();
    let store = dir.store();
    let mut state = store.load().unwrap();
    assert_eq!(state.vms[&100].cpus, CpuSet::range(4, 7));
    assert_eq!(
        state.claims["/proc/sys/vm/stat_interval"].effective(),
        "120"
    );
    store
        .append(&mut state, vec![claim("/proc/sys/pvetune/a", 100, "2")])
        .unwrap();
    let text = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
    assert!(text.contains("\"version\":2"), "{text}");
    assert_eq!(dir.store().load().unwrap(), state);
}

#[test]
fn newer_or_corrupt_ledgers_are_refused_with_their_path() {
    let dir = Dir::new("refused");
    let store = dir.store();
    let mut state = store.load().unwrap();
    store.append(&mut state, vec![vm_record()]).unwrap();
    let snapshot = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
    fs::write(
        dir.file(STATE_FILE),
        snapshot.replace("\"version\":2", "\"version\":3"),
    )
    .unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(
        err.contains("state.json: ledger format 3 is newer than this pvetune understands (2)"),
        "{err}"
    );
    fs::write(dir.file(STATE_FILE), &snapshot).unwrap();
    fs::write(dir.file(JOURNAL_FILE), "{\"v\":2,\"generation\":1}\n").unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(
        err.contains("state.journal: corrupt ledger") && err.contains("changes"),
        "{err}"
    );
    fs::write(
        dir.file(JOURNAL_FILE),
        "{\"v\":3,\"generation\":1,\"changes\":[]}\n",
    )
    .unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(
        err.contains("state.journal: ledger format 3 is newer"),
        "{err}"
    );
}

#[test]
fn a_ledger_naming_another_path_is_refused_whole() {
    let (dir, store, _) = Dir::with_journal("bad-path");
    let snapshot = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
    let journal = fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap();
    // In the snapshot.
    let mut bad: serde_json::Value = serde_json::from_str(&snapshot).unwrap();
    bad["claims"]["/etc/shadow"] = serde_json::json!({"original": "x", "holders": []});
    fs::write(dir.file(STATE_FILE), bad.to_string()).unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(
        err.contains("state.json: corrupt ledger (path \"/etc/shadow\" is not a kernel file"),
        "{err}"
    );
    // In a journal line; the path shown is bounded.
    fs::write(dir.file(STATE_FILE), &snapshot).unwrap();
    let long = format!("/proc/sys/{}/../../../etc/shadow", "x".repeat(5000));
    let line = journal.replace("/proc/sys/pvetune/a", &long);
    fs::write(dir.file(JOURNAL_FILE), format!("{journal}{line}")).unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(
        err.contains("state.journal: corrupt ledger (path \"/proc/sys/xxx")
            && err.contains("...\" is not normalized"),
        "{err}"
    );
    assert!(err.len() < 400, "{} bytes: {err}", err.len());
    fs::write(
        dir.file(JOURNAL_FILE),
        format!(
            "{journal}{}",
            line.replace("\"generation\":1", "\"generation\":0")
        ),
    )
    .unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(
        err.contains("is not normalized"),
        "a line of another generation: {err}"
    );
    // Nor is such a path ever recorded.
    fs::write(dir.file(JOURNAL_FILE), &journal).unwrap();
    let mut state = store.load().unwrap();
    let err = store
        .append(&mut state, vec![claim_on("/etc/shadow")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing to record \"/etc/shadow\""), "{err}");
    assert_eq!(fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap(), journal);
}

fn claim_on(path: &str) -> Change {
    claim(path, 100, "2")
}

#[test]
fn fields_this_version_does_not_know_survive_a_change_and_compaction() {
    let dir = Dir::new("extra");
    dir.make_run_dir();
    fs::write(
        dir.file(STATE_FILE),
        r#"{"version":2,"generation":4,"future":{"a":[1,2]},
           "vms":{"100":{"cpus":"4-7","pid":null,"start_time":null,"phase":"pre-start",
                         "cgroup":"/qemu.slice/100.scope",
                         "pins":[{"tid":7,"label":"CPU 0","old":"0-7","new":"4","prio":5}]}},
           "claims":{"/proc/irq/9/smp_affinity_list":{"original":"0-7\n",
               "holders":[{"vmid":100,"value":"4-7","since":"boot"}],
               "compose":{"format":"list","fallback":"0-3","numa":1},
               "kind":"irq"}}}"#,
    )
    .unwrap();
    let store = dir.store();
    let mut state = store.load().unwrap();
    store
        .append(
            &mut state,
            vec![claim("/proc/sys/vm/stat_interval", 100, "120")],
        )
        .unwrap();
    store.save(&mut state).unwrap();
    let text = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["generation"], 5, "{text}");
    assert_eq!(json["future"], serde_json::json!({"a": [1, 2]}), "{text}");
    let vm = &json["vms"]["100"];
    assert_eq!(vm["cgroup"], "/qemu.slice/100.scope", "{text}");
    assert_eq!(vm["pins"][0]["prio"], 5, "{text}");
    let irq = &json["claims"]["/proc/irq/9/smp_affinity_list"];
    assert_eq!(irq["kind"], "irq", "{text}");
    assert_eq!(irq["holders"][0]["since"], "boot", "{text}");
    assert_eq!(irq["compose"]["numa"], 1, "{text}");
    assert_eq!(
        json["claims"]["/proc/sys/vm/stat_interval"]["holders"][0]["value"],
        "120"
    );
    assert_eq!(dir.store().load().unwrap(), state);
}

/// A file outside the run directory holding `text`, and a link to it planted as `name`.
fn plant(dir: &Dir, name: &str, text: &str) -> PathBuf {
    let outside = dir.0.join(format!("outside-{name}"));
    fs::write(&outside, text).unwrap();
    let _ = fs::remove_file(dir.file(name));
    std::os::unix::fs::symlink(&outside, dir.file(name)).unwrap();
    outside
}

#[test]
fn a_link_planted_as_the_snapshot_is_not_followed() {
    // A link to a file that would even read as a valid ledger.
    let (dir, _, _) = Dir::with_journal("link-snapshot");
    let text = fs::read_to_string(dir.file(STATE_FILE)).unwrap();
    let outside = plant(&dir, STATE_FILE, &text);
    let err = dir.store().load().unwrap_err().to_string();
    assert!(
        err.contains("state.json is a symbolic link or not a regular file"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&outside).unwrap(), text);
}

#[test]
fn a_link_planted_as_the_journal_is_neither_replayed_nor_appended_to() {
    let (dir, _, mut state) = Dir::with_journal("link-journal");
    let text = fs::read_to_string(dir.file(JOURNAL_FILE)).unwrap();
    let outside = plant(&dir, JOURNAL_FILE, &text);
    let err = dir.store().load().unwrap_err().to_string();
    assert!(err.contains("state.journal is a symbolic link"), "{err}");
    let err = dir
        .store()
        .append(&mut state, vec![claim_on("/proc/sys/pvetune/b")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("state.journal is a symbolic link"), "{err}");
    assert_eq!(fs::read_to_string(&outside).unwrap(), text);
}

#[test]
fn a_link_planted_as_the_temp_file_is_removed_not_followed() {
    // As a temp file a crash left: removed, the link not followed, the snapshot written.
    let (dir, store, mut state) = Dir::with_journal("link-temp");
    let outside = plant(&dir, &format!("{STATE_FILE}.tmp"), "precious\n");
    store.compact(&mut state).unwrap();
    assert_eq!(fs::read_to_string(&outside).unwrap(), "precious\n");
    assert!(fs::symlink_metadata(dir.file(&format!("{STATE_FILE}.tmp"))).is_err());
    assert!(
        fs::symlink_metadata(dir.file(STATE_FILE))
            .unwrap()
            .is_file()
    );
    assert_eq!(dir.store().load().unwrap(), state);
}

#[test]
fn a_link_planted_as_the_lock_file_is_not_followed() {
    let dir = Dir::new("link-lock");
    dir.make_run_dir();
    let outside = plant(&dir, LOCK_FILE, "precious\n");
    let err = dir.store().lock().err().unwrap().to_string();
    assert!(
        err.contains("run/pvetune/lock is a symbolic link or not a regular file"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&outside).unwrap(), "precious\n");
}

#[test]
fn a_run_directory_others_could_write_or_a_link_is_refused() {
    let (dir, store, _) = Dir::with_journal("dir-mode");
    let run = dir.0.join("run/pvetune");
    assert_eq!(
        fs::metadata(&run).unwrap().mode() & 0o7777,
        0o700,
        "created 0700"
    );
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
    for err in [
        store.load().unwrap_err().to_string(),
        store.lock().err().unwrap().to_string(),
    ] {
        assert!(
            err.contains("refused as pvetune's run directory: its mode is 0755"),
            "{err}"
        );
    }
    fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
    if nix::unistd::geteuid().is_root() {
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        nix::unistd::chown(&run, nobody, None).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("it is owned by uid 65534"), "{err}");
        nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    }
    assert!(store.load().is_ok());

    // A link to a directory that would pass every other check.
    let real = dir.0.join("elsewhere");
    fs::rename(&run, &real).unwrap();
    std::os::unix::fs::symlink(&real, &run).unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(err.contains("it is a symbolic link"), "{err}");
    let err = store.lock().err().unwrap().to_string();
    assert!(err.contains("it is a symbolic link"), "{err}");
    assert!(!real.join(LOCK_FILE).exists());
}

#[test]
fn compaction_waits_until_the_journal_is_a_quarter_of_the_snapshot() {
    let dir = Dir::new("threshold");
    let store = dir.store();
    let mut state = store.load().unwrap();
    let irqs: Vec<Change> = (0..1000)
        .map(|i| claim(&format!("/proc/irq/{i}/smp_affinity_list"), 100, "3"))
        .collect();
    store.append(&mut state, irqs.clone()).unwrap();
    store.save(&mut state).unwrap();
    let rewrites = store.stats().rewrites;
    // A post-start's few pins next to a thousand claims: one line, no rewrite.
    store
        .append(&mut state, vec![pin(1000, 2), pin(1001, 3)])
        .unwrap();
    store.compact(&mut state).unwrap();
    assert_eq!(store.stats().rewrites, rewrites, "a small journal stays");
    assert!(dir.file(JOURNAL_FILE).exists());
    assert_eq!(dir.store().load().unwrap(), state, "and is replayed");
    // A post-stop that releases them all: the journal outgrows a quarter of the snapshot.
    let release: Vec<Change> = (0..1000)
        .map(|i| Change::Claim {
            path: format!("/proc/irq/{i}/smp_affinity_list"),
            claim: None,
        })
        .collect();
    store.append(&mut state, release.clone()).unwrap();
    store.compact(&mut state).unwrap();
    assert_eq!(store.stats().rewrites, rewrites + 1, "folded");
    assert!(!dir.file(JOURNAL_FILE).exists());
    assert_eq!(dir.store().load().unwrap(), state);
}
