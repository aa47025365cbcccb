//! cpulists and cpumasks: `CpuSet::parse_list`, `CpuSet::parse_mask`, `FromStr`,
//! `CpuFormat::parse`/`render`, `to_mask_like`, `exclude_text` and `include_text`.
//!
//! Input: 2 bytes little-endian `nbits` (the bitmap width asked for; the parser caps it at
//! `NBITS_LIMIT`), then the text (UTF-8, as `attr::read` and the profile and config parsers hand
//! it over). A NUL in the text splits it into `current \0 other`: `current` is what the parsers
//! get and the file text for `exclude_text`/`include_text`, `other` the CPUs to take out or add.
//!
//! Checked beyond "no panic": a list that parses names no CPU at or above the width, and its
//! printed form (`%*pbl`) parses back to the same set.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pvetune::cpuset::{CpuFormat, CpuSet, MAX_CPUS, NBITS_LIMIT, exclude_text, include_text};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let nbits = u16::from_le_bytes([data[0], data[1]]) as u32;
    let Ok(text) = std::str::from_utf8(&data[2..]) else {
        return;
    };
    let (current, other) = text.split_once('\0').unwrap_or((text, ""));

    if let Ok(set) = CpuSet::parse_list(current, nbits) {
        if let Some(last) = set.last() {
            assert!(last < nbits.min(NBITS_LIMIT), "{set:?} beyond {nbits} bits");
        }
        let printed = set.to_string();
        assert_eq!(
            CpuSet::parse_list(&printed, NBITS_LIMIT).as_ref(),
            Ok(&set),
            "printed form {printed:?} does not parse back"
        );
        let _ = set.to_mask_like(other);
    }
    if let Ok(set) = CpuSet::parse_mask(current, nbits) {
        if let Some(last) = set.last() {
            assert!(last < nbits, "{set:?} beyond {nbits} bits");
        }
        let _ = set.to_mask_like(current);
    }
    let _ = current.parse::<CpuSet>();

    let change = CpuSet::parse_list(other, MAX_CPUS).unwrap_or_default();
    let fallback = CpuSet::range(0, nbits % 64);
    for format in [CpuFormat::List, CpuFormat::Mask] {
        if let Some(set) = format.parse(current) {
            let _ = format.render(&set, current);
        }
        let _ = exclude_text(current, format, &change, &fallback);
        let _ = include_text(current, format, &change);
    }
});
