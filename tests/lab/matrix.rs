//! The lab matrix: the cells of `tests/lab/versions` (one per Proxmox VE release, each a kernel
//! and a userland pinned to exact Debian versions) times the two guest flavours, and the
//! `PVETUNE_LAB_MATRIX` filter that narrows a local run.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::util::{Ctx, LabResult};

/// A Debian package at an exact version.
#[derive(Clone, Debug, PartialEq)]
pub struct Pin {
    pub name: String,
    pub version: String,
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.version)
    }
}

/// Where a cell's kernel package comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Origin {
    Debian,
    /// archive.ubuntu.com, checked against Debian's `ubuntu-keyring` package (Proxmox's 6.8
    /// kernel is Ubuntu's 6.8; Debian never shipped 6.8 in a suite that is still mirrored).
    Ubuntu,
}

/// How the systemd flavour's root image is attached: to a driver the kernel has built in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Disk {
    /// Debian's cloud kernels: NVMe built in, virtio_blk a module.
    Nvme,
    /// Ubuntu's generic kernel: virtio_blk built in, NVMe a module.
    Virtio,
}

/// One Proxmox VE release as the lab stands it in.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// `pve8`, `pve9.1`, ...
    pub name: String,
    pub kernel: Pin,
    pub origin: Origin,
    pub disk: Disk,
    /// The suite the systemd flavour's root filesystem is debootstrapped from.
    pub suite: String,
    /// The systemd major version that suite must bring (checked after debootstrap).
    pub systemd: u32,
}

/// Everything `tests/lab/versions` says.
#[derive(Debug, Default, PartialEq)]
pub struct Versions {
    pub suites: Vec<String>,
    /// Ubuntu suites (`ubuntu <suite>` lines), read only for cells with `kernel-from=ubuntu`.
    pub ubuntu_suites: Vec<String>,
    pub cells: Vec<Cell>,
    pub tools: Vec<Pin>,
}

impl Versions {
    pub fn load() -> LabResult<Versions> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/versions");
        let text = fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        Versions::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> LabResult<Versions> {
        let mut v = Versions::default();
        for (n, line) in text.lines().enumerate() {
            let words: Vec<&str> = line
                .split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let bad = |what: &str| format!("line {}: {what}: '{line}'", n + 1);
            match words.as_slice() {
                [] => {}
                ["suite", name] => v.suites.push(name.to_string()),
                ["ubuntu", name] => v.ubuntu_suites.push(name.to_string()),
                ["cell", name, pkg, version, suite, systemd, options @ ..] => {
                    let mut cell = Cell {
                        name: name.to_string(),
                        kernel: Pin {
                            name: pkg.to_string(),
                            version: version.to_string(),
                        },
                        origin: Origin::Debian,
                        disk: Disk::Nvme,
                        suite: suite.to_string(),
                        systemd: systemd
                            .parse()
                            .map_err(|_| bad("the systemd major is not a number"))?,
                    };
                    for option in options {
                        match *option {
                            "kernel-from=ubuntu" => cell.origin = Origin::Ubuntu,
                            "disk=virtio" => cell.disk = Disk::Virtio,
                            _ => {
                                return Err(bad(&format!(
                                    "unknown cell option '{option}'; expected kernel-from=ubuntu or disk=virtio"
                                )));
                            }
                        }
                    }
                    v.cells.push(cell);
                }
                ["tool", pkg, version] => v.tools.push(Pin {
                    name: pkg.to_string(),
                    version: version.to_string(),
                }),
                _ => {
                    return Err(bad(
                        "expected `suite <name>`, `ubuntu <suite>`, `cell <name> <kernel package> <version> <suite> <systemd> [options]` or `tool <package> <version>`",
                    ));
                }
            }
        }
        if v.cells.is_empty() {
            return Err("no `cell` line".into());
        }
        for cell in &v.cells {
            if cell.origin == Origin::Ubuntu && v.ubuntu_suites.is_empty() {
                return Err(format!(
                    "cell {}: its kernel comes from Ubuntu, and there is no `ubuntu <suite>` line",
                    cell.name
                ));
            }
            if !v.suites.contains(&cell.suite) {
                return Err(format!(
                    "cell {}: its suite {} has no `suite` line",
                    cell.name, cell.suite
                ));
            }
        }
        Ok(v)
    }

    pub fn tool(&self, name: &str) -> LabResult<&Pin> {
        self.tools
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format!("tests/lab/versions has no `tool {name} <version>` line"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flavour {
    /// busybox is PID 1, the cgroup tree is built by hand: fast. The userland is the build
    /// host's (busybox, QEMU), so this flavour tests the kernel only.
    Busybox,
    /// Debian with systemd as PID 1: slices and scopes are systemd's own.
    Systemd,
}

impl Flavour {
    pub const ALL: [Flavour; 2] = [Flavour::Busybox, Flavour::Systemd];

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Busybox => "busybox",
            Flavour::Systemd => "systemd",
        }
    }
}

/// One boot of the matrix: a cell in a flavour.
#[derive(Clone, Debug)]
pub struct Run {
    pub cell: Cell,
    pub flavour: Flavour,
}

impl Run {
    /// `pve9.1/systemd`: how the run is named in output, work dirs and filters.
    pub fn id(&self) -> String {
        format!("{}/{}", self.cell.name, self.flavour.name())
    }
}

/// Every cell in both flavours, narrowed by `filter` (`PVETUNE_LAB_MATRIX`): a comma- or
/// space-separated list of terms, each a cell (`pve9.1`), a flavour (`systemd`) or one run
/// (`pve9.1/systemd`). A run is kept when any term names it. Empty keeps all.
pub fn runs(versions: &Versions, filter: &str) -> LabResult<Vec<Run>> {
    let terms: Vec<&str> = filter
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect();
    let all: Vec<Run> = versions
        .cells
        .iter()
        .flat_map(|cell| {
            Flavour::ALL.into_iter().map(|flavour| Run {
                cell: cell.clone(),
                flavour,
            })
        })
        .collect();
    let named = |run: &Run, term: &str| {
        term == run.cell.name || term == run.flavour.name() || term == run.id()
    };
    for term in &terms {
        if !all.iter().any(|r| named(r, term)) {
            let cells: Vec<&str> = versions.cells.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "PVETUNE_LAB_MATRIX: '{term}' names no run; expected a cell ({}), a flavour \
                 (busybox, systemd) or <cell>/<flavour>",
                cells.join(", ")
            ));
        }
    }
    Ok(all
        .into_iter()
        .filter(|r| terms.is_empty() || terms.iter().any(|t| named(r, t)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "suite bookworm\nsuite trixie # comment\n\
        cell pve8 linux-image-6.12.1 6.12.1-1 bookworm 252\n\
        cell pve9.1 linux-image-6.17.1 6.17.1-1 trixie 257\n\
        tool busybox-static 1:1.35\n";

    #[test]
    fn versions_file_parses_into_cells_and_tools() {
        let v = Versions::parse(TEXT).unwrap();
        assert_eq!(v.suites, ["bookworm", "trixie"]);
        assert_eq!(
            v.cells[1],
            Cell {
                name: "pve9.1".into(),
                kernel: Pin {
                    name: "linux-image-6.17.1".into(),
                    version: "6.17.1-1".into()
                },
                origin: Origin::Debian,
                disk: Disk::Nvme,
                suite: "trixie".into(),
                systemd: 257,
            }
        );
        assert_eq!(v.tool("busybox-static").unwrap().version, "1:1.35");
    }

    #[test]
    fn versions_file_errors_name_the_line() {
        let err = Versions::parse("suite a\ncell x y\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = Versions::parse("cell x k 1 sid 257\n").unwrap_err();
        assert!(err.contains("sid has no `suite` line"), "{err}");
        let err = Versions::parse("suite a\ncell x k 1 a 252 disk=scsi\n").unwrap_err();
        assert!(err.contains("unknown cell option 'disk=scsi'"), "{err}");
        let err = Versions::parse("suite a\ncell x k 1 a 252 kernel-from=ubuntu\n").unwrap_err();
        assert!(err.contains("no `ubuntu <suite>` line"), "{err}");
    }

    #[test]
    fn an_ubuntu_cell_takes_its_kernel_from_ubuntu_on_a_virtio_disk() {
        let v = Versions::parse(
            "suite bookworm\nubuntu noble-updates\n\
             cell k68 linux-image-6.8.0-1-generic 6.8.0-1.1 bookworm 252 kernel-from=ubuntu disk=virtio\n",
        )
        .unwrap();
        assert_eq!(v.ubuntu_suites, ["noble-updates"]);
        assert_eq!(
            (v.cells[0].origin, v.cells[0].disk),
            (Origin::Ubuntu, Disk::Virtio)
        );
    }

    #[test]
    fn the_filter_names_cells_flavours_or_runs() {
        let v = Versions::parse(TEXT).unwrap();
        let ids = |f: &str| -> Vec<String> { runs(&v, f).unwrap().iter().map(Run::id).collect() };
        assert_eq!(ids("").len(), 4);
        assert_eq!(ids("pve9.1"), ["pve9.1/busybox", "pve9.1/systemd"]);
        assert_eq!(ids("busybox"), ["pve8/busybox", "pve9.1/busybox"]);
        assert_eq!(
            ids("pve8/systemd, pve9.1/busybox"),
            ["pve8/systemd", "pve9.1/busybox"]
        );
        assert!(
            runs(&v, "pve7")
                .unwrap_err()
                .contains("'pve7' names no run")
        );
    }
}
