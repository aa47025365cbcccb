//! The package's generated files (`pvetune generate-assets`, run by packaging/build-deb): a
//! man page that lists every subcommand of `--help`, one page per subcommand, and bash, zsh
//! and fish completions that know them, at the paths the package installs them to.

mod fixture;

use fixture::{stdout, temp_dir};
use std::process::Command;

fn pvetune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pvetune"))
        .args(args)
        .output()
        .expect("run pvetune")
}

/// The subcommands `--help` lists (the hidden generate-assets not among them).
fn subcommands() -> Vec<String> {
    let help = stdout(&pvetune(&["--help"]));
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

#[test]
fn man_pages_and_completions_cover_every_subcommand() {
    let subs = subcommands();
    for wanted in [
        "plan", "status", "check", "rollback", "enable", "disable", "doctor",
    ] {
        assert!(subs.iter().any(|s| s == wanted), "{wanted} not in {subs:?}");
    }
    assert!(!subs.iter().any(|s| s == "generate-assets"), "hidden");
    let dir = temp_dir("assets");
    let out = pvetune(&["generate-assets", dir.path.to_str().unwrap()]);
    assert!(out.status.success());
    let read = |rel: &str| {
        std::fs::read_to_string(dir.path.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    };
    let man = read("usr/share/man/man1/pvetune.1");
    assert!(
        man.starts_with(".ie \\n(.g .ds Aq") || man.contains(".TH pvetune 1"),
        "{man}"
    );
    let section = &man[man.find(".SH SUBCOMMANDS").expect("SUBCOMMANDS section")..];
    for sub in &subs {
        assert!(
            section.contains(&format!("pvetune\\-{sub}(1)")),
            "{sub} in pvetune.1"
        );
        let page = read(&format!("usr/share/man/man1/pvetune-{sub}.1"));
        assert!(page.contains(&format!(".TH pvetune-{sub} 1")), "{page}");
    }
    assert!(read("usr/share/man/man1/pvetune-enable.1").contains("\\-\\-chain"));
    let bash = read("usr/share/bash-completion/completions/pvetune");
    let zsh = read("usr/share/zsh/vendor-completions/_pvetune");
    let fish = read("usr/share/fish/vendor_completions.d/pvetune.fish");
    assert!(zsh.starts_with("#compdef pvetune"));
    for sub in &subs {
        assert!(
            bash.contains(sub) && zsh.contains(sub) && fish.contains(sub),
            "{sub}"
        );
    }
    assert!(fish.contains("-l dry-run") && bash.contains("--dry-run"));
}
