//! A model of the kernel's cgroup v2 cpuset interface over a fixture tree, for tests that
//! need more than files: `mkdir` creates a cgroup's interface files, `cgroup.subtree_control`
//! takes `+word`/`-word`, `cgroup.threads` moves a thread, `cpuset.cpus.partition` is read
//! back valid or `isolated invalid (<reason>)`, effective CPU sets and thread affinities follow
//! partitions, and `sched_setaffinity` fails with EINVAL outside a thread's cpuset, as on
//! 6.12 to 7.0 (docs/kernel-facts.md; `cpuset.c`), or with 6.8's extra rules (v6_8.rs). Its rules are the strict reading where
//! kernels differ (a child's exclusive CPUs must stay inside its parent's), so an order of
//! steps that passes here passes on every kernel of the lab matrix. The real kernels are the
//! lab's job (tests/lab/scenarios/50-isolation-partition.sh); this is for combinatorics:
//! several VMs in every stop order, a failure at every step.
//!
//! Threads are fake: a VM is a `/proc/<pid>` tree in the fixture (its `task/<tid>` entries,
//! `comm`, `stat`, `cgroup` files) and a row per thread here; nothing real is touched.
#![allow(dead_code)]

pub mod lab;
mod v6_8;

use pvetune::cpuset::CpuSet;
use pvetune::host::Host;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const CG: &str = "sys/fs/cgroup";

pub struct CgroupKernel {
    base: PathBuf,
    all: CpuSet,
    /// tid -> (pid, cgroup relative to the cgroup root: "" for the root, "qemu.slice/100.scope").
    threads: RefCell<BTreeMap<i32, (i32, String)>>,
    affinity: RefCell<BTreeMap<i32, CpuSet>>,
    /// What each thread last asked for with sched_setaffinity (the kernel's user_cpus_ptr).
    requested: RefCell<BTreeMap<i32, CpuSet>>,
    /// Partition files written `isolated`, relative cgroup -> the kernel's verdict so far.
    partitions: RefCell<BTreeMap<String, String>>,
    /// A reason to make the next `isolated` partition invalid with (a kernel that refuses).
    pub refuse_partition: RefCell<Option<String>>,
    /// Kernel 6.8's rules on top (v6_8.rs): `cpuset.cpus` on the whole chain, siblings
    /// checked by their `cpuset.cpus` too.
    pub v6_8: bool,
}

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

impl CgroupKernel {
    /// Builds the cgroup root in `base` as systemd leaves it on a Proxmox host with no VM
    /// isolated: cpuset available but switched on nowhere, `qemu.slice` and `system.slice`.
    pub fn new(base: &Path, all: &CpuSet) -> Self {
        let k = CgroupKernel {
            base: base.to_path_buf(),
            all: all.clone(),
            threads: RefCell::default(),
            affinity: RefCell::default(),
            requested: RefCell::default(),
            partitions: RefCell::default(),
            refuse_partition: RefCell::default(),
            v6_8: false,
        };
        let root = k.dir("");
        // The fixture's static tree is replaced by this live one.
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        put(
            &root,
            "cgroup.controllers",
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        );
        put(&root, "cgroup.subtree_control", "memory pids\n");
        put(&root, "cgroup.threads", "");
        put(&root, "cgroup.procs", "");
        put(&root, "cpuset.cpus.effective", &format!("{all}\n"));
        put(&root, "cpuset.cpus.isolated", "\n");
        put(&root, "cpuset.mems.effective", "0-1\n");
        for slice in ["init.scope", "system.slice", "qemu.slice", "user.slice"] {
            k.make(slice).unwrap();
        }
        k
    }

    fn dir(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.base.join(CG)
        } else {
            self.base.join(CG).join(rel)
        }
    }

    /// The cgroup of `path` relative to the cgroup root, and the file name.
    fn split(&self, path: &Path) -> Option<(String, String)> {
        let rel = path.strip_prefix(self.base.join(CG)).ok()?;
        let name = rel.file_name()?.to_string_lossy().into_owned();
        let cg = rel.parent()?.to_string_lossy().into_owned();
        Some((cg, name))
    }

    /// The cgroup a directory path names (relative), and its parent's.
    fn cgroup_at(&self, path: &Path) -> Option<(String, String)> {
        let (parent, name) = self.split(path)?;
        let cg = if parent.is_empty() {
            name
        } else {
            format!("{parent}/{name}")
        };
        Some((cg, parent))
    }

    fn parent(cg: &str) -> Option<String> {
        if cg.is_empty() {
            return None;
        }
        Some(
            cg.rsplit_once('/')
                .map_or(String::new(), |(p, _)| p.to_string()),
        )
    }

    fn read_file(&self, cg: &str, name: &str) -> String {
        fs::read_to_string(self.dir(cg).join(name)).unwrap_or_default()
    }

    fn words(&self, cg: &str, name: &str) -> Vec<String> {
        self.read_file(cg, name)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    fn has_cpuset(&self, cg: &str) -> bool {
        match Self::parent(cg) {
            None => true,
            Some(p) => self
                .words(&p, "cgroup.subtree_control")
                .iter()
                .any(|w| w == "cpuset"),
        }
    }

    fn children(&self, cg: &str) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.dir(cg))
            .map(|it| {
                it.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if cg.is_empty() {
                            n
                        } else {
                            format!("{cg}/{n}")
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    fn all_cgroups(&self) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut i = 0;
        while i < out.len() {
            let c = self.children(&out[i]);
            out.extend(c);
            i += 1;
        }
        out
    }

    /// mkdir in cgroupfs: the directory comes with its interface files.
    fn make(&self, cg: &str) -> io::Result<()> {
        let dir = self.dir(cg);
        let parent = Self::parent(cg).unwrap_or_default();
        if !self.dir(&parent).is_dir() {
            return Err(err(nix::libc::ENOENT));
        }
        fs::create_dir(&dir)?;
        put(&dir, "cgroup.type", "domain\n");
        put(&dir, "cgroup.threads", "");
        put(&dir, "cgroup.procs", "");
        put(&dir, "cgroup.subtree_control", "\n");
        let ctl = self.read_file(&parent, "cgroup.subtree_control");
        put(&dir, "cgroup.controllers", &ctl);
        if self.has_cpuset(cg) {
            self.cpuset_files(cg);
        }
        self.settle();
        Ok(())
    }

    fn cpuset_files(&self, cg: &str) {
        let dir = self.dir(cg);
        put(&dir, "cpuset.cpus", "\n");
        put(&dir, "cpuset.cpus.exclusive", "\n");
        put(&dir, "cpuset.cpus.exclusive.effective", "\n");
        put(&dir, "cpuset.cpus.partition", "member\n");
        put(&dir, "cpuset.cpus.effective", "\n");
    }

    fn list(&self, cg: &str, name: &str) -> CpuSet {
        self.read_file(cg, name).trim().parse().unwrap_or_default()
    }

    /// Whether a partition written `isolated` is valid now, and why not.
    fn verdict(&self, cg: &str) -> Result<(), String> {
        if let Some(reason) = self.refuse_partition.borrow().clone() {
            return Err(reason);
        }
        let mine = self.list(cg, "cpuset.cpus.exclusive");
        let chain_ok = !mine.is_empty() && {
            let mut a = Self::parent(cg);
            let mut ok = true;
            while let Some(p) = a {
                if p.is_empty() {
                    break;
                }
                if !mine
                    .difference(&self.list(&p, "cpuset.cpus.exclusive"))
                    .is_empty()
                {
                    ok = false;
                }
                a = Self::parent(&p);
            }
            ok
        };
        if !chain_ok {
            return Err("Invalid cpu list in cpuset.cpus.exclusive".into());
        }
        if self.v6_8 {
            self.verdict_6_8(cg, &mine)?;
        }
        let others: CpuSet = self
            .partitions
            .borrow()
            .iter()
            .filter(|(c, v)| c.as_str() != cg && v.as_str() == "isolated")
            .fold(CpuSet::new(), |acc, (c, _)| {
                acc.union(&self.list(c, "cpuset.cpus.exclusive"))
            });
        if !others.intersection(&mine).is_empty() {
            return Err("Cpu list in cpuset.cpus not exclusive".into());
        }
        if self.all.difference(&others.union(&mine)).is_empty() {
            return Err("Parent unable to distribute cpu downstream".into());
        }
        Ok(())
    }

    /// Recomputes what the kernel derives: partition verdicts, effective CPU sets, the root's
    /// isolated CPUs, and the affinity of every thread whose cpuset changed.
    fn settle(&self) {
        let names: Vec<String> = self.partitions.borrow().keys().cloned().collect();
        for cg in names {
            if !self.dir(&cg).is_dir() {
                self.partitions.borrow_mut().remove(&cg);
                continue;
            }
            // Judge each against the others as they stand (the kernel does it one at a time).
            self.partitions
                .borrow_mut()
                .insert(cg.clone(), "pending".into());
            let v = match self.verdict(&cg) {
                Ok(()) => "isolated".to_string(),
                Err(reason) => format!("isolated invalid ({reason})"),
            };
            self.partitions.borrow_mut().insert(cg.clone(), v.clone());
            put(&self.dir(&cg), "cpuset.cpus.partition", &format!("{v}\n"));
        }
        let valid = self.valid_partitions();
        let isolated = valid.iter().fold(CpuSet::new(), |a, (_, c)| a.union(c));
        put(
            &self.dir(""),
            "cpuset.cpus.isolated",
            &format!("{isolated}\n"),
        );
        put(
            &self.dir(""),
            "cpuset.cpus.effective",
            &format!("{}\n", self.all.difference(&isolated)),
        );
        for cg in self.all_cgroups().into_iter().filter(|c| !c.is_empty()) {
            if self.dir(&cg).join("cpuset.cpus.effective").exists() {
                put(
                    &self.dir(&cg),
                    "cpuset.cpus.effective",
                    &format!("{}\n", self.effective(&cg, &valid)),
                );
            }
        }
        let threads = self.threads.borrow().clone();
        for (tid, (_, cg)) in threads {
            let eff = self.effective(&cg, &valid);
            let mut aff = self.affinity.borrow_mut();
            let req = self
                .requested
                .borrow()
                .get(&tid)
                .cloned()
                .unwrap_or(self.all.clone());
            let now = req.intersection(&eff);
            aff.insert(tid, if now.is_empty() { eff } else { now });
        }
    }

    fn effective(&self, cg: &str, valid: &[(String, CpuSet)]) -> CpuSet {
        // Inside a valid partition: its CPUs; elsewhere: everything no partition took.
        for (p, cpus) in valid {
            if cg == p || cg.starts_with(&format!("{p}/")) {
                return cpus.clone();
            }
        }
        valid
            .iter()
            .fold(self.all.clone(), |acc, (_, c)| acc.difference(c))
    }

    /// The valid partitions and their CPUs.
    fn valid_partitions(&self) -> Vec<(String, CpuSet)> {
        self.partitions
            .borrow()
            .iter()
            .filter(|(_, v)| v.as_str() == "isolated")
            .map(|(c, _)| (c.clone(), self.list(c, "cpuset.cpus.exclusive")))
            .collect()
    }

    fn effective_now(&self, cg: &str) -> CpuSet {
        let valid = self.valid_partitions();
        self.effective(cg, &valid)
    }

    /// A process with threads `tids` (the first is the main thread) in cgroup `cg`, with a
    /// `/proc/<pid>` tree in the fixture shaped like the kernel's.
    pub fn spawn(&self, pid: i32, cmdline: &[&str], threads: &[(i32, &str)], cg: &str) {
        let proc = self.base.join(format!("proc/{pid}"));
        fs::create_dir_all(proc.join("task")).unwrap();
        let mut cmd = cmdline.join("\0");
        cmd.push('\0');
        fs::write(proc.join("cmdline"), cmd).unwrap();
        let stat = format!(
            "{pid} (kvm) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 {} 0 777 0 0\n",
            threads.len()
        );
        fs::write(proc.join("stat"), &stat).unwrap();
        fs::write(proc.join("cgroup"), format!("0::/{cg}\n")).unwrap();
        for (tid, comm) in threads {
            let t = proc.join(format!("task/{tid}"));
            fs::create_dir_all(&t).unwrap();
            fs::write(t.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(
                t.join("stat"),
                stat.replacen(&pid.to_string(), &tid.to_string(), 1),
            )
            .unwrap();
            self.threads.borrow_mut().insert(*tid, (pid, String::new()));
            self.attach(*tid, cg).unwrap();
        }
    }

    /// The process exits: its threads leave their cgroups and its /proc entry goes.
    pub fn exit(&self, pid: i32) {
        let tids: Vec<i32> = self
            .threads
            .borrow()
            .iter()
            .filter(|(_, (p, _))| *p == pid)
            .map(|(t, _)| *t)
            .collect();
        for tid in tids {
            let (_, cg) = self.threads.borrow_mut().remove(&tid).unwrap();
            self.rewrite_threads(&cg);
            self.affinity.borrow_mut().remove(&tid);
        }
        let _ = fs::remove_dir_all(self.base.join(format!("proc/{pid}")));
        self.settle();
    }

    /// systemd removing a unit's cgroup once it is empty (recursively, as `cg_trim` does).
    pub fn trim(&self, cg: &str) {
        assert!(
            self.all_cgroups()
                .iter()
                .filter(|c| c.starts_with(cg))
                .all(|c| self.read_file(c, "cgroup.threads").is_empty()),
            "systemd trims only empty cgroups"
        );
        let _ = fs::remove_dir_all(self.dir(cg));
        self.settle();
    }

    fn rewrite_threads(&self, cg: &str) {
        let tids: Vec<String> = self
            .threads
            .borrow()
            .iter()
            .filter(|(_, (_, c))| c == cg)
            .map(|(t, _)| t.to_string())
            .collect();
        let text: String = tids.iter().map(|t| format!("{t}\n")).collect();
        if self.dir(cg).is_dir() {
            put(&self.dir(cg), "cgroup.threads", &text);
        }
    }

    fn attach(&self, tid: i32, cg: &str) -> io::Result<()> {
        let Some((pid, old)) = self.threads.borrow().get(&tid).cloned() else {
            return Err(err(nix::libc::ESRCH));
        };
        if !self.dir(cg).is_dir() {
            return Err(err(nix::libc::ENOENT));
        }
        self.threads.borrow_mut().insert(tid, (pid, cg.to_string()));
        self.rewrite_threads(&old);
        self.rewrite_threads(cg);
        let task = self.base.join(format!("proc/{pid}/task/{tid}/cgroup"));
        // A thread the test made vanish from /proc keeps no file.
        let _ = fs::write(task, format!("0::/{cg}\n"));
        self.settle();
        Ok(())
    }

    /// Where a thread is now, relative to the cgroup root.
    pub fn cgroup_of(&self, tid: i32) -> Option<String> {
        self.threads.borrow().get(&tid).map(|(_, c)| c.clone())
    }

    pub fn partition_of(&self, cg: &str) -> String {
        self.read_file(cg, "cpuset.cpus.partition")
            .trim()
            .to_string()
    }

    pub fn effective_of(&self, cg: &str) -> CpuSet {
        self.effective_now(cg)
    }

    fn write_control(&self, cg: &str, value: &str) -> io::Result<()> {
        let mut words = self.words(cg, "cgroup.subtree_control");
        for token in value.split_whitespace() {
            let (on, word) = match token.split_at(1) {
                ("+", w) => (true, w),
                ("-", w) => (false, w),
                _ => return Err(err(nix::libc::EINVAL)),
            };
            if !self
                .words(cg, "cgroup.controllers")
                .iter()
                .any(|c| c == word)
                && !cg.is_empty()
            {
                return Err(err(nix::libc::ENOENT));
            }
            if on && !words.iter().any(|w| w == word) {
                words.push(word.to_string());
                if word == "cpuset" {
                    for child in self.children(cg) {
                        self.cpuset_files(&child);
                    }
                }
            } else if !on && words.iter().any(|w| w == word) {
                if self.children(cg).iter().any(|c| {
                    self.words(c, "cgroup.subtree_control")
                        .iter()
                        .any(|w| w == word)
                }) {
                    return Err(err(nix::libc::EBUSY));
                }
                words.retain(|w| w != word);
                if word == "cpuset" {
                    for child in self.children(cg) {
                        for f in [
                            "cpuset.cpus",
                            "cpuset.cpus.exclusive",
                            "cpuset.cpus.exclusive.effective",
                            "cpuset.cpus.partition",
                            "cpuset.cpus.effective",
                        ] {
                            let _ = fs::remove_file(self.dir(&child).join(f));
                        }
                        self.partitions.borrow_mut().remove(&child);
                    }
                }
            }
        }
        put(
            &self.dir(cg),
            "cgroup.subtree_control",
            &format!("{}\n", words.join(" ")),
        );
        for child in self.children(cg) {
            put(
                &self.dir(&child),
                "cgroup.controllers",
                &format!("{}\n", words.join(" ")),
            );
        }
        self.settle();
        Ok(())
    }

    fn write_exclusive(&self, cg: &str, value: &str) -> io::Result<()> {
        let set: CpuSet = if value.trim().is_empty() {
            CpuSet::new()
        } else {
            value.trim().parse().map_err(|_| err(nix::libc::EINVAL))?
        };
        if let Some(p) = Self::parent(cg).filter(|p| !p.is_empty())
            && !set
                .difference(&self.list(&p, "cpuset.cpus.exclusive"))
                .is_empty()
        {
            return Err(err(nix::libc::EINVAL));
        }
        for child in self.children(cg) {
            if !self
                .list(&child, "cpuset.cpus.exclusive")
                .difference(&set)
                .is_empty()
            {
                return Err(err(nix::libc::EINVAL));
            }
        }
        if self.v6_8 {
            if !set.is_empty() && self.sibling_conflict_6_8(cg, &set, true) {
                return Err(err(nix::libc::EINVAL));
            }
        } else if let Some(p) = Self::parent(cg) {
            for sib in self.children(&p).into_iter().filter(|s| s != cg) {
                if !self
                    .list(&sib, "cpuset.cpus.exclusive")
                    .intersection(&set)
                    .is_empty()
                {
                    return Err(err(nix::libc::EINVAL));
                }
            }
        }
        put(&self.dir(cg), "cpuset.cpus.exclusive", &format!("{set}\n"));
        self.settle();
        Ok(())
    }
}

fn put(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

impl Host for CgroupKernel {
    fn read(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let Some((cg, name)) = self.split(path) else {
            // Not cgroupfs: a plain kernel file of the fixture (never created).
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)?;
            return io::Write::write_all(&mut f, value.as_bytes());
        };
        if !path.exists() {
            return Err(err(nix::libc::ENOENT));
        }
        match name.as_str() {
            "cgroup.subtree_control" => self.write_control(&cg, value),
            "cgroup.type" => {
                if value.trim() != "threaded" {
                    return Err(err(nix::libc::EINVAL));
                }
                put(&self.dir(&cg), "cgroup.type", "threaded\n");
                if let Some(p) = Self::parent(&cg) {
                    put(&self.dir(&p), "cgroup.type", "domain threaded\n");
                }
                Ok(())
            }
            "cgroup.threads" => {
                let tid = value
                    .trim()
                    .parse::<i32>()
                    .map_err(|_| err(nix::libc::EINVAL))?;
                self.attach(tid, &cg)
            }
            "cpuset.cpus.exclusive" => self.write_exclusive(&cg, value),
            "cpuset.cpus" => self.write_cpus(&cg, value),
            "cpuset.cpus.partition" => {
                match value.trim() {
                    "isolated" => {
                        self.partitions
                            .borrow_mut()
                            .insert(cg.clone(), "pending".into());
                    }
                    "member" => {
                        self.partitions.borrow_mut().remove(&cg);
                        put(&self.dir(&cg), "cpuset.cpus.partition", "member\n");
                    }
                    _ => return Err(err(nix::libc::EINVAL)),
                }
                self.settle();
                Ok(())
            }
            _ => {
                put(&self.dir(&cg), &name, value);
                Ok(())
            }
        }
    }

    fn get_affinity(&self, tid: i32) -> io::Result<CpuSet> {
        self.affinity
            .borrow()
            .get(&tid)
            .cloned()
            .ok_or_else(|| err(nix::libc::ESRCH))
    }

    fn set_affinity(&self, tid: i32, cpus: &CpuSet) -> io::Result<()> {
        let Some(cg) = self.cgroup_of(tid) else {
            return Err(err(nix::libc::ESRCH));
        };
        let eff = self.effective_now(&cg);
        let now = cpus.intersection(&eff);
        if now.is_empty() {
            return Err(err(nix::libc::EINVAL));
        }
        self.requested.borrow_mut().insert(tid, cpus.clone());
        self.affinity.borrow_mut().insert(tid, now);
        Ok(())
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        match self.cgroup_at(path) {
            Some((cg, _)) => self.make(&cg),
            None => fs::create_dir(path),
        }
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        let Some((cg, parent)) = self.cgroup_at(path) else {
            return fs::remove_dir(path);
        };
        if !self.dir(&cg).is_dir() {
            return Err(err(nix::libc::ENOENT));
        }
        if !self.read_file(&cg, "cgroup.threads").is_empty() || !self.children(&cg).is_empty() {
            return Err(err(nix::libc::EBUSY));
        }
        fs::remove_dir_all(self.dir(&cg))?;
        self.partitions.borrow_mut().remove(&cg);
        // A threaded domain is one only while it has threaded children.
        let threaded_left = self
            .children(&parent)
            .iter()
            .any(|c| self.read_file(c, "cgroup.type").trim() == "threaded");
        if !parent.is_empty()
            && !threaded_left
            && self.read_file(&parent, "cgroup.type").trim() == "domain threaded"
        {
            put(&self.dir(&parent), "cgroup.type", "domain\n");
        }
        self.settle();
        Ok(())
    }
}
