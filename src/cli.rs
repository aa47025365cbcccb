//! Command line: raw arguments -> resolved environment -> one command; errors mapped once.

use crate::error::{Error, exit};
use crate::hook::{self, Env};
use crate::host::RealHost;
use crate::plan::Phase;
use crate::root::Root;
use clap::{Parser, Subcommand};
use std::io::{self, Write};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Hookscript use (as Proxmox VE calls it):
  pvetune <vmid> <phase>        phase: pre-start | post-start | pre-stop | post-stop
  pvetune enable <vmid>         links the snippet, runs qm set <vmid> --hookscript ...

Profiles: /etc/pve/pvetune/<vmid>.yaml (cluster-wide), else /etc/pvetune/profiles/<vmid>.yaml.
A VM without a profile is left alone (exit 0).

Exit codes:
  0  done (or nothing to do)
  1  failed while applying; the phase's own changes were undone (in pre-start: the VM does not start)
  2  invalid input: command line, profile, VM config, or a profile that does not fit this host; nothing changed
  3  rollback incomplete; what is left is kept in /run/pvetune for the next run";

#[derive(Parser, Debug)]
#[command(
    name = "pvetune",
    version,
    about = "Tunes a Proxmox VE host for a latency-sensitive VM: CPUs placed by topology, pinning, an isolated cpuset partition, IRQs and irqbalance off its CPUs, governor, sysctls, hugepages, KSM, PCI reset, with full rollback",
    override_usage = "pvetune [OPTIONS] <VMID> <PHASE>\n       pvetune [OPTIONS] <COMMAND>",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Prefix for every host path read or written (/sys, /proc, /run, /etc/pve, ...)
    #[arg(long, global = true, env = "PVETUNE_ROOT", default_value = "/")]
    root: PathBuf,
    /// Use this profile instead of looking it up by VMID
    #[arg(long, global = true)]
    profile: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Dry run: print every change a phase would make (target: before -> after); writes nothing
    Plan {
        vmid: String,
        /// One phase only (default: pre-start and post-start)
        #[arg(long)]
        phase: Option<String>,
        /// Machine-readable output (docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// Undo everything pvetune holds for the VM now
    Rollback { vmid: String },
    /// Show what pvetune holds, per VM and node-wide, and what changed behind its back
    Status {
        vmid: Option<String>,
        /// Machine-readable output (docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// Validate the VM's profile against this host and the VM config; changes nothing
    Check {
        vmid: String,
        /// Machine-readable output (docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// Make pvetune the VM's hookscript (validates its profile, links the snippet, runs qm set)
    Enable(crate::enable::EnableArgs),
    /// Remove pvetune as the VM's hookscript (rolls back a stopped VM, restores a chained one)
    Disable(crate::enable::DisableArgs),
    /// What is wrong with a VM's setup (VM config, profile, host), each with what to do
    Doctor(crate::doctor::DoctorArgs),
    /// Writes the man pages and shell completions into a directory (the package build)
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
    /// The host's NUMA nodes, packages, L3 domains, cores and threads, and who holds each CPU
    Topology {
        /// JSON for scripts (docs/json.md)
        #[arg(long)]
        json: bool,
    },
    /// A portable profile and the VM config lines that match it on this host; changes nothing
    Suggest { vmid: String },
    /// Reserve, per NUMA node, the hugepages of every VM whose profile has `hugepages: { boot:
    /// true }`, kept for them (run at boot, before Proxmox starts guests)
    Reserve,
    /// `<vmid> <phase>`: the hookscript call (see below)
    #[command(external_subcommand)]
    Hook(Vec<String>),
}

/// Runs pvetune with the process arguments; returns the exit code.
pub fn main() -> i32 {
    let parsed = match hook_call(std::env::args_os().skip(1).collect()) {
        Some(cli) => Ok(cli),
        None => Cli::try_parse(),
    };
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::INVALID
            } else {
                exit::OK
            };
        }
    };
    init_logging(&cli);
    match run(cli).and_then(|lines| print(&lines)) {
        Ok(()) => exit::OK,
        Err(e) => {
            if !e.is_quiet() {
                // Nothing is left to tell when stderr is closed too.
                let _ = writeln!(io::stderr().lock(), "pvetune: error: {e}");
            }
            e.exit_code()
        }
    }
}

/// The only writer of stdout. Its errors are values: a reader that went away (`| head`, a
/// pager) ends the command quietly instead of the panic `println!` would raise.
fn print(lines: &[String]) -> Result<(), Error> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    for line in lines.iter().filter(|l| !l.is_empty()) {
        writeln!(out, "{line}").map_err(Error::Output)?;
    }
    out.flush().map_err(Error::Output)
}

/// The call qemu-server makes, `pvetune <vmid> <phase>` and nothing else, read without
/// building clap's whole command tree: it runs inside every `qm start` of every VM, most of
/// which have no profile (docs/performance.md, the fast path). The same `Cli` clap would give;
/// anything else (an option, an odd word, an empty `PVETUNE_ROOT`) goes to clap.
fn hook_call(args: Vec<std::ffi::OsString>) -> Option<Cli> {
    let [vmid, phase] = args.as_slice() else {
        return None;
    };
    let (vmid, phase) = (vmid.to_str()?, phase.to_str()?);
    let canonical = !vmid.is_empty() && vmid.bytes().all(|b| b.is_ascii_digit());
    if !canonical || phase.parse::<Phase>().is_err() {
        return None;
    }
    let root = match std::env::var_os("PVETUNE_ROOT") {
        None => PathBuf::from("/"),
        Some(root) if !root.is_empty() => PathBuf::from(root),
        Some(_) => return None,
    };
    Some(Cli {
        root,
        profile: None,
        verbose: 0,
        quiet: false,
        command: Some(Command::Hook(vec![vmid.to_string(), phase.to_string()])),
    })
}

fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .format_target(false)
        .init();
}

fn run(cli: Cli) -> Result<Vec<String>, Error> {
    let env = Env {
        root: Root::new(&cli.root),
        profile: cli.profile.clone(),
    };
    let host = RealHost;
    let quiet = cli.quiet;
    let lines = match cli.command {
        Some(Command::Plan { vmid, phase, json }) => {
            let vmid = parse_vmid(&vmid)?;
            let phases = match phase {
                Some(p) => vec![parse_phase(&p)?],
                None => vec![Phase::PreStart, Phase::PostStart],
            };
            if json {
                crate::json::plan(&env, &host, vmid, &phases)?
            } else {
                crate::report::render_plan(&env, &host, vmid, &phases)?
            }
        }
        Some(Command::Rollback { vmid }) => {
            vec![hook::rollback_command(&env, &host, parse_vmid(&vmid)?)?]
        }
        Some(Command::Status { vmid, json }) => {
            let only = vmid.as_deref().map(parse_vmid).transpose()?;
            if json {
                crate::json::status(&env, only)?
            } else {
                crate::report::status(&env, only)?
            }
        }
        Some(Command::Check { vmid, json: true }) => {
            crate::json::check(&env, parse_vmid(&vmid)?, &print)?
        }
        Some(Command::Check { vmid, .. }) => vec![hook::check(&env, parse_vmid(&vmid)?)?],
        Some(Command::Enable(args)) => crate::enable::enable(&env, &args)?,
        Some(Command::Disable(args)) => crate::enable::disable(&env, &host, &args)?,
        Some(Command::Doctor(args)) => crate::doctor::command(&env, &args, &print)?,
        Some(Command::GenerateAssets { dir }) => {
            use clap::CommandFactory;
            let files = crate::assets::generate(Cli::command(), &dir)
                .map_err(|e| Error::Admin(format!("{}: {e}", dir.display())))?;
            files.iter().map(|f| f.display().to_string()).collect()
        }
        Some(Command::Topology { json }) => crate::topoview::command(&env.root, json)?,
        Some(Command::Suggest { vmid }) => crate::suggest::command(&env, parse_vmid(&vmid)?)?,
        Some(Command::Reserve) => crate::reserve::reserve(&env, &host)?,
        Some(Command::Hook(args)) => match args.as_slice() {
            [vmid, phase] => {
                let (vmid, phase) = (parse_vmid(vmid)?, parse_phase(phase)?);
                let print = |lines: &[String]| if quiet { Ok(()) } else { print(lines) };
                let lines = crate::chain::hook(&env, &host, vmid, phase, &print)?;
                if quiet { vec![] } else { lines }
            }
            _ => return Err(usage()),
        },
        None => return Err(usage()),
    };
    Ok(lines)
}

fn usage() -> Error {
    Error::Usage("usage: pvetune <vmid> <phase>, or a command: see pvetune --help".into())
}

/// A VMID becomes part of paths: digits only, no leading zero (`0100` would name another
/// file than `100` in every path built from it), in Proxmox's range 100..=999999999.
pub fn parse_vmid(s: &str) -> Result<u32, Error> {
    let bad = || {
        Error::Usage(format!(
            "invalid VMID '{s}': expected a number from 100 to 999999999"
        ))
    };
    if s.is_empty() || s.len() > 9 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let id: u32 = s.parse().map_err(|_| bad())?;
    if id < 100 {
        return Err(bad());
    }
    Ok(id)
}

fn parse_phase(s: &str) -> Result<Phase, Error> {
    s.parse().map_err(Error::Usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmids() {
        assert_eq!(parse_vmid("100").unwrap(), 100);
        assert_eq!(parse_vmid("999999999").unwrap(), 999_999_999);
        for bad in [
            "99",
            "+100",
            "1e3",
            "../100",
            "",
            "1000000000",
            "0100x",
            "0100",
            "00100",
            " 100",
        ] {
            assert!(parse_vmid(bad).is_err(), "{bad}");
        }
    }

    /// The hook call read without clap is exactly what clap reads, and nothing else is taken.
    #[test]
    fn the_hook_call_reads_as_clap_reads_it() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        for phase in ["pre-start", "post-start", "pre-stop", "post-stop"] {
            let direct = hook_call(args(&["100", phase])).expect("a hook call");
            let clap = Cli::try_parse_from(args(&["pvetune", "100", phase])).unwrap();
            assert_eq!(format!("{direct:?}"), format!("{clap:?}"));
        }
        for other in [
            &["100", "started"][..],
            &["plan", "100"],
            &["--quiet", "100"],
            &["100"],
            &["100", "pre-start", "x"],
            &["1 00", "pre-start"],
            &["", "pre-start"],
        ] {
            assert!(hook_call(args(other)).is_none(), "{other:?}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
