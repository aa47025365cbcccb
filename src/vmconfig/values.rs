//! The value grammars of a VM config, as qemu-server's schema defines them: key lines,
//! property strings, booleans, Proxmox cpusets, numaN, hostpciN, memory, and `-smp` in `args`.
//! Each returns the "expected ..." text for the user on failure.

use super::{HostPci, MIN_MEMORY_MIB, NumaPolicy, NumaSpec, PciId, PciSource};
use crate::cpuset::{CpuSet, MAX_CPUS, MAX_LIST_BYTES};
use crate::excerpt::excerpt;
use crate::pci::PCI_CONFIG_FORM;
use std::collections::BTreeMap;
use std::str::FromStr;

/// `key: value` with qemu-server's key pattern `[a-z][a-z_-]*\d*`; the value runs to the last
/// non-blank character and must not be empty.
pub(super) fn split_key_value(raw: &str) -> Option<(&str, &str)> {
    let (key, rest) = raw.split_once(':')?;
    let name = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-');
    let value = rest.trim();
    (valid && !value.is_empty()).then_some((key, value))
}

/// `numa3` -> 3 when below `max`; leading zeros are not part of Proxmox's key names.
pub(super) fn indexed(key: &str, prefix: &str, max: u8) -> Option<u8> {
    let digits = key.strip_prefix(prefix)?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse::<u8>().ok().filter(|n| *n < max)
}

/// A plain `\d+` (no sign, no spaces), as in qemu-server's integer type.
pub(super) fn uint<T: FromStr>(value: &str, expected: &str) -> Result<T, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected.to_string());
    }
    value
        .parse()
        .map_err(|_| format!("{expected} (this one is too large)"))
}

pub(super) fn positive(value: &str) -> Result<u32, String> {
    match uint::<u32>(value, "an integer of at least 1")? {
        0 => Err("an integer of at least 1".into()),
        n => Ok(n),
    }
}

pub(super) fn boolean(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Ok(true),
        "0" | "off" | "no" | "false" => Ok(false),
        _ => Err("a boolean: 1|0, on|off, yes|no or true|false".into()),
    }
}

/// A Proxmox property string `a=b,c=d`: empty parts skipped, a bare part is the default key.
/// Keys pvetune does not know are kept out of the way rather than refused (see module doc).
pub(super) fn property_string<'a>(
    value: &'a str,
    default_key: Option<&'a str>,
) -> Result<BTreeMap<&'a str, &'a str>, String> {
    let mut props = BTreeMap::new();
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = match (part.split_once('='), default_key) {
            (Some((k, v)), _) => (k, v),
            (None, Some(default)) => (default, part),
            (None, None) => {
                return Err(format!(
                    "key=value pairs, but '{}' has no '='",
                    excerpt(part)
                ));
            }
        };
        if props.insert(k, v).is_some() {
            return Err(format!(
                "each property once, but '{}' appears twice",
                excerpt(k)
            ));
        }
    }
    Ok(props)
}

/// `memory: [current=]<MiB>`.
pub(super) fn memory(value: &str) -> Result<u64, String> {
    const EXPECTED: &str = "[current=]<MiB>, an integer of at least 16";
    let props = property_string(value, Some("current"))?;
    let current = props.get("current").ok_or(EXPECTED)?;
    match uint::<u64>(current, EXPECTED)? {
        mib if mib >= MIN_MEMORY_MIB => Ok(mib),
        _ => Err(EXPECTED.into()),
    }
}

/// `affinity:` in PVE's cpuset grammar (`PVE::CpuSet::parse_cpuset`): comma-separated `N` or
/// `A-B` with blanks allowed around each part; Perl's `split` drops trailing empty parts, so a
/// trailing comma passes, while an empty leading or inner part is refused. No kernel extras
/// (`N`, `all`, strides): qemu-server would refuse them, so the VM never ran with them.
pub(super) fn pve_cpuset(value: &str) -> Result<CpuSet, String> {
    let expected = || {
        format!(
            "a CPU list such as 0-3,8-11 (numbers or ascending ranges below {MAX_CPUS}, comma-separated)"
        )
    };
    // Longer than any list of MAX_CPUS CPUs: refused before any work (bounded time).
    if value.len() > MAX_LIST_BYTES {
        return Err(expected());
    }
    let mut set = CpuSet::new();
    for part in value.trim_end_matches(',').split(',') {
        let (first, last) = id_range(part.trim(), MAX_CPUS).ok_or_else(expected)?;
        set.insert_range(first, last + 1);
    }
    Ok(set)
}

/// `N` or `A-B` with `A <= B < limit`, plain decimal digits.
pub(super) fn id_range(part: &str, limit: u32) -> Option<(u32, u32)> {
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().filter(|n| *n < limit)
    };
    let (first, last) = match part.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => (number(part)?, number(part)?),
    };
    (first <= last).then_some((first, last))
}

/// `numaN:` `cpus=<ranges>[,hostnodes=<ranges>][,memory=<MiB>][,policy=...]`.
pub(super) fn numa_spec(value: &str) -> Result<NumaSpec, String> {
    let props = property_string(value, None)?;
    let cpus = props
        .get("cpus")
        .ok_or("cpus=<id[-id][;...]> (the guest vCPUs of this node)")?;
    let hostnodes = props.get("hostnodes");
    Ok(NumaSpec {
        cpus: id_ranges(
            cpus,
            "cpus=<id[-id][;...]>, ascending ranges of guest vCPU ids",
        )?,
        hostnodes: hostnodes
            .map(|h| {
                id_ranges(
                    h,
                    "hostnodes=<id[-id][;...]>, ascending ranges of host nodes",
                )
            })
            .transpose()?,
        memory_mib: props
            .get("memory")
            .map(|m| uint(m, "memory=<MiB>, an integer"))
            .transpose()?,
        policy: match props.get("policy").copied() {
            None => None,
            Some("preferred") => Some(NumaPolicy::Preferred),
            Some("bind") => Some(NumaPolicy::Bind),
            Some("interleave") => Some(NumaPolicy::Interleave),
            Some(_) => return Err("policy=preferred|bind|interleave".into()),
        },
    })
}

/// qemu-server's number sets: `0-3;8;10-11`, no blanks, each range ascending.
/// A bitmap, not a tree: each range costs its length / 64, and a value longer than any list of
/// [`MAX_CPUS`] ids is refused before any work.
pub(super) fn id_ranges(value: &str, expected: &str) -> Result<Vec<u32>, String> {
    if value.len() > MAX_LIST_BYTES {
        return Err(expected.to_string());
    }
    let mut ids = CpuSet::new();
    for part in value.split(';') {
        let (first, last) = id_range(part, MAX_CPUS).ok_or(expected)?;
        ids.insert_range(first, last + 1);
    }
    Ok(ids.iter().collect())
}

/// `hostpciN:` `[host=]<id>[;<id>...]` or `mapping=<id>`, plus options.
pub(super) fn host_pci(value: &str) -> Result<HostPci, String> {
    let props = property_string(value, Some("host"))?;
    let source = match (props.get("host"), props.get("mapping")) {
        (Some(host), None) => PciSource::Host(
            host.split(';')
                .map(|id| id.parse::<PciId>().map_err(|_| PCI_CONFIG_FORM.to_string()))
                .collect::<Result<_, _>>()?,
        ),
        (None, Some(mapping)) => PciSource::Mapping(mapping.to_string()),
        _ => return Err("either host=<[dddd:]bb:dd[.f];...> or mapping=<id>, not both".into()),
    };
    let flag = |key| props.get(key).map(|v| boolean(v)).transpose();
    Ok(HostPci {
        source,
        pcie: flag("pcie")?.unwrap_or(false),
        x_vga: flag("x-vga")?.unwrap_or(false),
    })
}

/// `(cpus, threads)` of the last `-smp` in `args`. QEMU merges repeated `-smp` options, later
/// ones winning, and qemu-server appends `args` after its own `-smp`, so this is what QEMU uses.
pub(super) fn smp_option(args: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let words = shell_words(args);
    let (mut cpus, mut threads) = (None, None);
    let bad = |what: &str| {
        format!("in -smp, {what}=<integer of at least 1> (QEMU would refuse this too)")
    };
    for pair in words.windows(2) {
        if pair[0] != "-smp" && pair[0] != "--smp" {
            continue;
        }
        for (i, opt) in pair[1].split(',').enumerate() {
            if let Some(t) = opt.strip_prefix("threads=") {
                threads = Some(positive(t).map_err(|_| bad("threads"))?);
            } else if let Some(c) = opt.strip_prefix("cpus=") {
                cpus = Some(positive(c).map_err(|_| bad("cpus"))?);
            } else if i == 0 && !opt.contains('=') {
                cpus = Some(positive(opt).map_err(|_| bad("cpus"))?);
            }
        }
    }
    Ok((cpus, threads))
}

/// Splits like a POSIX shell, which is how qemu-server splits `args` (`split_args`): blanks
/// separate words, quotes group, a backslash escapes outside single quotes.
pub(super) fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                w.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => w.extend(chars.next()),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_group_quotes() {
        assert_eq!(
            shell_words(r#"-smp '4,threads=2' -x "a b\"c" d\ e"#),
            ["-smp", "4,threads=2", "-x", "a b\"c", "d e"]
        );
    }

    #[test]
    fn pve_cpuset_follows_perl_split() {
        assert_eq!(pve_cpuset("0-3,").unwrap(), CpuSet::range(0, 3));
        assert_eq!(pve_cpuset(" 1 , 3-4 ").unwrap().to_string(), "1,3-4");
        for bad in [
            ",0-3", "1,,2", "1 3", "1- 3", "3-1", "0--3", "+1", "0x1", "all", "N",
        ] {
            assert!(pve_cpuset(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(pve_cpuset("01-03").unwrap(), CpuSet::range(1, 3));
    }

    #[test]
    fn key_pattern_matches_qemu_server() {
        assert_eq!(split_key_value("allow-ksm: 1"), Some(("allow-ksm", "1")));
        assert_eq!(
            split_key_value("hostpci12:0b:00"),
            Some(("hostpci12", "0b:00"))
        );
        assert_eq!(split_key_value("name:   "), None);
        assert_eq!(split_key_value("Name: x"), None);
        assert_eq!(split_key_value(" cores: 2"), None);
    }
}
