//! Small helpers shared by the lab modules: an error type that is just a message (the lab
//! only ever reports errors, it never matches on them) and running host commands.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::Command;

pub type LabResult<T> = Result<T, String>;

/// Adds what was being done to an error, as `<what>: <error>`.
pub trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> LabResult<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> LabResult<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

/// Runs a command to completion; on failure the error names the command and quotes its stderr.
/// Its temp files go to `target/tmp/lab-tmp`, never to the test run's TMPDIR (which CI checks
/// for leftovers: .ci/leftovers).
pub fn run_cmd(cmd: &mut Command) -> LabResult<String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lab-tmp");
    std::fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    cmd.env("TMPDIR", &tmp);
    let shown = format!("{cmd:?}");
    let out = cmd.output().ctx(|| format!("starting {shown}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The shared libraries `ldd` says `binary` loads, the dynamic loader included, as absolute
/// paths on this host. A static binary has none.
pub fn shared_libraries(binary: &Path) -> LabResult<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .ctx(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(format!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`;
        // `linux-vdso.so.1 (0x...)` lives in the kernel and has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            return Err(format!("ldd {}: {}", binary.display(), line.trim()));
        }
    }
    Ok(libs)
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
