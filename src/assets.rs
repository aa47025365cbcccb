//! The package's generated files: the man pages and the shell completions, from the very clap
//! definition the binary parses its arguments with, so a subcommand added to `cli.rs` is in
//! them without a second copy of the definition (a build script would need one: it cannot link
//! the crate it builds). Written by the hidden command `pvetune generate-assets <dir>` as the
//! tree they are installed in; `packaging/build-deb` runs it between `cargo build --release`
//! and `cargo deb --no-build`, whose `assets` take `target/assets/tree/**/*` as it is.

use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// Where each generated file goes, relative to `/`.
pub const MAN_DIR: &str = "usr/share/man/man1";
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "usr/share/bash-completion/completions/pvetune"),
    (Shell::Zsh, "usr/share/zsh/vendor-completions/_pvetune"),
    (
        Shell::Fish,
        "usr/share/fish/vendor_completions.d/pvetune.fish",
    ),
];

/// Writes under `dir`: `usr/share/man/man1/pvetune.1` (every subcommand in its SUBCOMMANDS
/// section) and `pvetune-<command>.1` per visible subcommand, and the bash, zsh and fish
/// completions. Returns the files written, sorted.
pub fn generate(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man = dir.join(MAN_DIR);
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&man)? {
        files.push(entry?.path());
    }
    for (shell, path) in COMPLETIONS {
        let path = dir.join(path);
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "pvetune", &mut text);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
        files.push(path);
    }
    files.sort();
    Ok(files)
}
