//! Reads the `LAB ...` lines the guest wrote to its results port (protocol in
//! `guest/run-scenarios.sh`) and turns a bad run into one message a developer can act on.

use std::fmt::Write;

use crate::boot::Outcome;
use crate::util::tail;

#[derive(Debug, Default)]
pub struct Scenario {
    pub name: String,
    pub checks: Vec<(bool, String)>,
    pub log: Vec<String>,
    /// The exit code; None when the guest never reported the end.
    pub exit: Option<i32>,
    /// How long it ran in the guest.
    pub seconds: Option<f64>,
    /// `(key, title, value)` of each `fact` it recorded (the facts scenario).
    pub facts: Vec<(String, String, String)>,
}

impl Scenario {
    pub fn passed(&self) -> bool {
        self.exit == Some(0) && self.checks.iter().all(|(ok, _)| *ok)
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub boot: Option<String>,
    pub scenarios: Vec<Scenario>,
    pub fatal: Option<String>,
    pub done: bool,
}

pub fn parse(results: &str) -> Report {
    let mut report = Report::default();
    for line in results.lines() {
        let Some(rest) = line.strip_prefix("LAB ") else {
            continue;
        };
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "boot" => report.boot = Some(rest.to_string()),
            "fatal" => report.fatal = Some(format!("{name} {rest}")),
            "done" => report.done = true,
            "begin" => report.scenarios.push(Scenario {
                name: name.to_string(),
                ..Scenario::default()
            }),
            "check" | "log" | "end" | "fact" => {
                let Some(s) = report.scenarios.iter_mut().rfind(|s| s.name == name) else {
                    continue;
                };
                match kind {
                    "check" => {
                        let (verdict, text) = rest.split_once(' ').unwrap_or((rest, ""));
                        s.checks.push((verdict == "ok", text.to_string()));
                    }
                    "log" => s.log.push(rest.to_string()),
                    "fact" => {
                        let mut parts = rest.splitn(3, '|');
                        let (key, title, value) = (parts.next(), parts.next(), parts.next());
                        if let (Some(k), Some(t), Some(v)) = (key, title, value) {
                            s.facts.push((k.to_string(), t.to_string(), v.to_string()));
                        }
                    }
                    _ => {
                        let mut fields = rest.split_whitespace();
                        s.exit = fields.next().and_then(|c| c.parse().ok());
                        s.seconds = fields.next().and_then(|t| t.parse().ok());
                    }
                }
            }
            _ => {}
        }
    }
    report
}

/// Why this run failed, or None when every scenario passed. `run` names it (`pve9.1/systemd`).
pub fn failure(run: &str, outcome: &Outcome, report: &Report) -> Option<String> {
    let failed: Vec<&Scenario> = report.scenarios.iter().filter(|s| !s.passed()).collect();
    let mut why = String::new();
    if outcome.timed_out {
        let last = report.scenarios.last().map_or("none", |s| s.name.as_str());
        let _ = writeln!(
            why,
            "the guest did not finish within {} s (last scenario started: {last})",
            outcome.elapsed.as_secs()
        );
    } else if let Some(fatal) = &report.fatal {
        let _ = writeln!(why, "the guest's init gave up: {fatal}");
    } else if report.boot.is_none() {
        let _ = writeln!(why, "the guest never reached the scenario runner");
    } else if !report.done {
        let _ = writeln!(why, "the guest stopped before running every scenario");
    } else if report.scenarios.is_empty() {
        let _ = writeln!(
            why,
            "no scenario ran (check lab.only / PVETUNE_LAB_SCENARIOS)"
        );
    }
    if why.is_empty() && failed.is_empty() {
        return None;
    }
    let mut msg = format!(
        "lab {run}: {} of {} scenarios failed",
        failed.len(),
        report.scenarios.len(),
    );
    if !why.is_empty() {
        let _ = write!(msg, "; {}", why.trim_end());
    }
    for s in failed {
        let exit = s.exit.map_or("no end reported".to_string(), |c| match c {
            124 => "killed by its time limit (exit 124)".to_string(),
            c => format!("exit {c}"),
        });
        let took = s
            .seconds
            .map(|t| format!(" after {t} s"))
            .unwrap_or_default();
        let _ = writeln!(msg, "\n--- scenario {}: {exit}{took}", s.name);
        for (_, text) in s.checks.iter().filter(|(ok, _)| !ok) {
            let _ = writeln!(msg, "  FAIL {text}");
        }
        let _ = writeln!(msg, "  its output (last 40 lines):");
        for line in &s.log[s.log.len().saturating_sub(40)..] {
            let _ = writeln!(msg, "    {line}");
        }
    }
    if !outcome.qemu_log.trim().is_empty() {
        let _ = writeln!(
            msg,
            "\n--- QEMU's own output:\n{}",
            tail(&outcome.qemu_log, 10)
        );
    }
    let _ = writeln!(
        msg,
        "\n--- guest console, last 30 lines (all of it: {}):\n{}",
        outcome.console_path.display(),
        tail(&outcome.console, 30)
    );
    Some(msg)
}
