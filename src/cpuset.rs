//! `CpuSet`: a set of CPU numbers that reads and writes the kernel's cpulist and cpumask syntax.
//!
//! Parsing follows `lib/bitmap-str.c` exactly (`bitmap_parselist()` and `bitmap_parse()`), so a
//! value accepted here is one the kernel accepts in `cpuset.cpus` or `smp_affinity_list`, and a
//! value printed here is byte-identical to what sysfs prints (`%*pbl`): ascending, ranges
//! collapsed, no spaces, no newline.

use std::fmt;
use std::sync::Arc;

mod files;
pub use files::{CpuFormat, exclude_text, include_text};

use crate::excerpt::excerpt;

/// The widest bitmap pvetune parses when nothing narrower is known (the kernel's
/// `CONFIG_NR_CPUS` maximum on x86_64).
pub const MAX_CPUS: u32 = 8192;

/// The widest bitmap pvetune ever parses, whatever width a caller asks for (a fixture's
/// `kernel_max`): twice the largest `CONFIG_NR_CPUS` (8192) of any kernel Proxmox runs. It
/// bounds the memory of a set (2 KiB) and the work of one region.
pub const NBITS_LIMIT: u32 = 2 * MAX_CPUS;

/// The longest cpulist pvetune parses. The kernel prints at most about 40 KB for 8192 CPUs
/// (`0,2,4,...,8190`) and accepts at most a page per write, so anything longer is refused
/// before parsing: work and memory stay bounded for any input (a 10 MB value is refused at
/// once).
pub const MAX_LIST_BYTES: usize = 64 * 1024;

/// A set of CPU numbers, stored as a bitmap with no trailing zero words (so `==` is set equality).
///
/// The words are shared and exactly as long as the set needs (None: the empty set): a plan
/// and a ledger hold the same sets once per IRQ (the VM's CPUs, the housekeeping fallback),
/// so a clone is a reference count, and a change copies the words first if they are shared.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet {
    words: Option<Arc<[u64]>>,
}

/// Why a cpulist or cpumask was refused; the variants mirror the kernel's errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// `-EINVAL`: not the cpulist grammar.
    #[error("invalid cpulist '{input}': {reason}")]
    Invalid { input: String, reason: &'static str },
    /// `-ERANGE`: a CPU number at or above the bitmap width.
    #[error("cpulist '{input}' names CPU {cpu}, but the limit is {limit}")]
    Range { input: String, cpu: u32, limit: u32 },
    /// `-EOVERFLOW`: a number that does not fit, or a mask wider than the bitmap.
    #[error("cpulist '{input}' overflows: {reason}")]
    Overflow { input: String, reason: &'static str },
}

impl CpuSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// `first..=last`.
    pub fn range(first: u32, last: u32) -> Self {
        (first..=last).collect()
    }

    /// Parses a cpulist as `bitmap_parselist()` does for a bitmap of `nbits` bits: `0-5,12-17`,
    /// `0-31:1/4` (used/group), `N` (the last CPU), `all`; regions split by commas or whitespace.
    ///
    /// `nbits` is capped at [`NBITS_LIMIT`] and the text (up to its first newline) at
    /// [`MAX_LIST_BYTES`], so time and memory are bounded whatever the input; errors quote at
    /// most [`excerpt`]'s share of it.
    pub fn parse_list(input: &str, nbits: u32) -> Result<Self, CpuListError> {
        let nbits = nbits.min(NBITS_LIMIT);
        let invalid = |reason| CpuListError::Invalid {
            input: excerpt(input),
            reason,
        };
        let mut set = CpuSet::new();
        // The kernel stops at the first newline.
        let text = input.split('\n').next().unwrap_or("");
        if text.len() > MAX_LIST_BYTES {
            return Err(invalid("longer than 64 KiB, more than any list of CPUs"));
        }
        for region in text
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|r| !r.is_empty())
        {
            let (span, group) = match region.split_once(':') {
                Some((span, group)) => (span, Some(group)),
                None => (region, None),
            };
            let last = nbits.checked_sub(1);
            let (start, end) = if span.eq_ignore_ascii_case("all") {
                let last = last.ok_or_else(|| invalid("'all' in an empty bitmap"))?;
                (0, last)
            } else {
                let (a, b) = match span.split_once('-') {
                    Some((a, b)) => (a, Some(b)),
                    None => (span, None),
                };
                let start = parse_num(a, last, input)?;
                let end = match b {
                    Some(b) => parse_num(b, last, input)?,
                    None if group.is_some() => return Err(invalid("a group needs a range A-B")),
                    None => start,
                };
                (start, end)
            };
            if start > end {
                return Err(invalid("range start is after its end"));
            }
            let (used, size) = match group {
                None => (1, 1),
                Some(g) => {
                    let (u, s) = g
                        .split_once('/')
                        .ok_or_else(|| invalid("a group is written used/size"))?;
                    (parse_num(u, last, input)?, parse_num(s, last, input)?)
                }
            };
            if size == 0 || used > size {
                return Err(invalid("group size is 0 or smaller than its used count"));
            }
            if end >= nbits {
                return Err(CpuListError::Range {
                    input: excerpt(input),
                    cpu: end,
                    limit: nbits,
                });
            }
            // A plain range (no group, or a group that uses every CPU of its size) is one
            // word-wise insert, not one per CPU.
            if used == size {
                set.insert_range(start, end.saturating_add(1));
                continue;
            }
            let mut base = start;
            while base <= end {
                let top = base.saturating_add(used).min(end.saturating_add(1));
                set.insert_range(base, top);
                match base.checked_add(size) {
                    Some(next) => base = next,
                    None => break,
                }
            }
        }
        Ok(set)
    }

    /// Parses a hex cpumask as `bitmap_parse()` does: 32-bit words, most significant first,
    /// separated by commas (`ffffffff,00000001`), as in sysfs `cpumap` and `thread_siblings`.
    pub fn parse_mask(input: &str, nbits: u32) -> Result<Self, CpuListError> {
        let text = input.split('\n').next().unwrap_or("");
        let overflow = |reason| CpuListError::Overflow {
            input: excerpt(input),
            reason,
        };
        let words: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect();
        if words.len() > nbits.div_ceil(32) as usize {
            return Err(overflow("more words than the bitmap holds"));
        }
        let mut set = CpuSet::new();
        for (index, word) in words.iter().rev().enumerate() {
            if word.len() > 8 {
                return Err(overflow("a word longer than 8 hex digits"));
            }
            let value = u32::from_str_radix(word, 16).map_err(|_| CpuListError::Invalid {
                input: excerpt(input),
                reason: "not a hex digit",
            })?;
            for bit in 0..32 {
                if value & (1 << bit) != 0 {
                    let cpu = index as u32 * 32 + bit;
                    if cpu >= nbits {
                        return Err(overflow("a bit set beyond the bitmap"));
                    }
                    set.insert(cpu);
                }
            }
        }
        Ok(set)
    }

    /// The hex cpumask of this set in the layout of `like`, a mask the kernel printed (same
    /// number of 32-bit words and the same width of the first word, as `%*pb` prints for
    /// `nr_cpu_ids` bits): `ff`, or `00000000,000000ff` on a 64-CPU host. CPUs beyond that
    /// width are dropped (they cannot exist on the host that printed `like`).
    pub fn to_mask_like(&self, like: &str) -> String {
        let text = like.split('\n').next().unwrap_or("").trim();
        let widths: Vec<usize> = text.split(',').map(|w| w.len().clamp(1, 8)).collect();
        let n = widths.len();
        let mut words = Vec::with_capacity(n);
        for (i, width) in widths.iter().enumerate() {
            // Word i from the left holds CPUs (n-1-i)*32 .. +32.
            let base = (n - 1 - i) as u32 * 32;
            let mut value: u32 = 0;
            for bit in 0..32 {
                if self.contains(base + bit) {
                    value |= 1 << bit;
                }
            }
            if *width < 8 {
                value &= (1u32 << (width * 4)) - 1;
            }
            words.push(format!("{value:0width$x}", width = width));
        }
        words.join(",")
    }

    pub fn insert(&mut self, cpu: u32) {
        let (word, bit) = ((cpu / 64) as usize, cpu % 64);
        self.words_mut(word + 1)[word] |= 1 << bit;
    }

    /// The words, none for the empty set.
    fn words(&self) -> &[u64] {
        self.words.as_deref().unwrap_or(&[])
    }

    /// The words to change, at least `len` of them: copied first when they are shared or
    /// shorter (the new ones zero).
    fn words_mut(&mut self, len: usize) -> &mut [u64] {
        let in_place = match &mut self.words {
            Some(w) => w.len() >= len && Arc::get_mut(w).is_some(),
            None => false,
        };
        if !in_place {
            let mut words = self.words().to_vec();
            if words.len() < len {
                words.resize(len, 0);
            }
            self.words = Some(words.into());
        }
        match &mut self.words {
            Some(words) => Arc::get_mut(words).map_or(&mut [], |w| &mut w[..]),
            None => &mut [],
        }
    }

    /// A set of these words (trailing zero words dropped).
    fn from_words(mut words: Vec<u64>) -> Self {
        while words.last() == Some(&0) {
            words.pop();
        }
        CpuSet {
            words: (!words.is_empty()).then(|| words.into()),
        }
    }

    /// Inserts `first..end` (end excluded) a word at a time: a range costs its length / 64.
    pub fn insert_range(&mut self, first: u32, end: u32) {
        if first >= end {
            return;
        }
        let last = end - 1;
        let (lo, hi) = ((first / 64) as usize, (last / 64) as usize);
        for (index, word) in self.words_mut(hi + 1)[lo..=hi].iter_mut().enumerate() {
            let index = lo + index;
            let from = if index == lo { first % 64 } else { 0 };
            let to = if index == hi { last % 64 } else { 63 };
            // Bits from..=to set.
            let mask = (u64::MAX >> (63 - to)) & (u64::MAX << from);
            *word |= mask;
        }
    }

    pub fn remove(&mut self, cpu: u32) {
        let (word, bit) = ((cpu / 64) as usize, cpu % 64);
        if self.contains(cpu) {
            self.words_mut(word + 1)[word] &= !(1 << bit);
            self.trim();
        }
    }

    pub fn contains(&self, cpu: u32) -> bool {
        let (word, bit) = ((cpu / 64) as usize, cpu % 64);
        self.words().get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    pub fn len(&self) -> usize {
        self.words().iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words().is_empty()
    }

    /// The lowest CPU, if any.
    pub fn first(&self) -> Option<u32> {
        self.iter().next()
    }

    /// The highest CPU, if any.
    pub fn last(&self) -> Option<u32> {
        let (index, word) = self.words().iter().enumerate().next_back()?;
        Some(index as u32 * 64 + 63 - word.leading_zeros())
    }

    /// CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words().iter().enumerate().flat_map(|(index, &word)| {
            // One step per set bit (the lowest one, then cleared), not one per bit.
            std::iter::successors((word != 0).then_some(word), |w| {
                let rest = w & (w - 1);
                (rest != 0).then_some(rest)
            })
            .map(move |w| index as u32 * 64 + w.trailing_zeros())
        })
    }

    /// The runs of consecutive CPUs, `(first, last)` in ascending order: a word at a time,
    /// whatever the runs' lengths (what the cpulist text and its parsing cost per set).
    pub fn ranges(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let mut from = 0u32;
        std::iter::from_fn(move || {
            let first = self.next_from(from, false)?;
            let end = self
                .next_from(first, true)
                .unwrap_or(self.words().len() as u32 * 64);
            from = end;
            Some((first, end - 1))
        })
    }

    /// The first CPU at or after `from` that is in the set (`clear`: that is not in it; None
    /// past the last word).
    fn next_from(&self, from: u32, clear: bool) -> Option<u32> {
        let mut index = (from / 64) as usize;
        let mut word = *self.words().get(index)?;
        if clear {
            word = !word;
        }
        word &= u64::MAX << (from % 64);
        loop {
            if word != 0 {
                return Some(index as u32 * 64 + word.trailing_zeros());
            }
            index += 1;
            word = *self.words().get(index)?;
            if clear {
                word = !word;
            }
        }
    }

    pub fn union(&self, other: &CpuSet) -> CpuSet {
        self.zip(other, |a, b| a | b)
    }

    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        self.zip(other, |a, b| a & b)
    }

    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        self.zip(other, |a, b| a & !b)
    }

    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.difference(other).is_empty()
    }

    pub fn is_disjoint(&self, other: &CpuSet) -> bool {
        self.intersection(other).is_empty()
    }

    fn zip(&self, other: &CpuSet, op: impl Fn(u64, u64) -> u64) -> CpuSet {
        let (a, b) = (self.words(), other.words());
        let len = a.len().max(b.len());
        let get = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        CpuSet::from_words((0..len).map(|i| op(get(a, i), get(b, i))).collect())
    }

    fn trim(&mut self) {
        let used = self
            .words()
            .iter()
            .rposition(|&w| w != 0)
            .map_or(0, |i| i + 1);
        if used < self.words().len() {
            *self = CpuSet::from_words(self.words()[..used].to_vec());
        }
    }
}

/// Reads one number of a region: decimal digits, or `N` for the last bit.
fn parse_num(text: &str, last: Option<u32>, input: &str) -> Result<u32, CpuListError> {
    if text == "N" {
        return last.ok_or_else(|| CpuListError::Invalid {
            input: excerpt(input),
            reason: "'N' in an empty bitmap",
        });
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CpuListError::Invalid {
            input: excerpt(input),
            reason: "expected a CPU number",
        });
    }
    text.parse::<u32>().map_err(|_| CpuListError::Overflow {
        input: excerpt(input),
        reason: "a number that does not fit in 32 bits",
    })
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut set = CpuSet::new();
        for cpu in iter {
            set.insert(cpu);
        }
        set
    }
}

impl std::str::FromStr for CpuSet {
    type Err = CpuListError;

    /// A cpulist as a user writes it in a profile: the kernel grammar, up to [`MAX_CPUS`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuSet::parse_list(s, MAX_CPUS)
    }
}

impl fmt::Display for CpuSet {
    /// The kernel's `%*pbl` form: `0-5,12-17`; the empty set prints as an empty string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (start, end) in self.ranges() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

/// Serialized as its cpulist text, so the journal reads like sysfs.
impl serde::Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-wise `iter`, `ranges` and cpulist text against one bit at a time, on sets
    /// with runs that start, end and cross word boundaries (pseudo-random, reproducible).
    #[test]
    fn word_wise_runs_match_bit_by_bit() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let nbits = 1 + (round % 300) as u32;
            let mut set = CpuSet::new();
            let mut bits = Vec::new();
            for cpu in 0..nbits {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Long runs as often as lone CPUs.
                if (seed % 8) < (round % 9) as u64 {
                    set.insert(cpu);
                    bits.push(cpu);
                }
            }
            assert_eq!(set.iter().collect::<Vec<_>>(), bits);
            let mut naive = Vec::new();
            for &cpu in &bits {
                match naive.last_mut() {
                    Some((_, last)) if *last + 1 == cpu => *last = cpu,
                    _ => naive.push((cpu, cpu)),
                }
            }
            assert_eq!(set.ranges().collect::<Vec<_>>(), naive);
            let text = set.to_string();
            assert_eq!(text.parse::<CpuSet>().unwrap(), set, "{text}");
        }
        let full = CpuSet::range(0, 127);
        assert_eq!(full.ranges().collect::<Vec<_>>(), [(0, 127)]);
        assert_eq!(full.to_string(), "0-127");
        assert_eq!(CpuSet::range(63, 64).to_string(), "63-64");
        assert_eq!(CpuSet::new().to_string(), "");
    }

    #[test]
    fn exclude_takes_cpus_out_and_never_leaves_none() {
        let cpus = |s: &str| s.parse::<CpuSet>().unwrap();
        let list = CpuFormat::List;
        assert_eq!(
            exclude_text("0-7\n", list, &cpus("4-5"), &cpus("0-3")),
            "0-3,6-7"
        );
        // Nothing left: the fallback (housekeeping) minus the removed CPUs.
        assert_eq!(exclude_text("4-5", list, &cpus("4-5"), &cpus("0-3")), "0-3");
        // Unchanged and unparseable files keep their bytes.
        assert_eq!(
            exclude_text("0-3\n", list, &cpus("4-5"), &cpus("0-3")),
            "0-3\n"
        );
        assert_eq!(
            exclude_text("junk", list, &cpus("4-5"), &cpus("0-3")),
            "junk"
        );
        assert_eq!(exclude_text("4", list, &cpus("4"), &cpus("4")), "4");
        let mask = CpuFormat::Mask;
        assert_eq!(exclude_text("ff\n", mask, &cpus("4-7"), &cpus("0-3")), "0f");
        assert_eq!(
            exclude_text("00000000,000000ff", mask, &cpus("0-1"), &cpus("2-3")),
            "00000000,000000fc"
        );
    }

    #[test]
    fn include_adds_cpus_and_keeps_bytes_when_nothing_changes() {
        let cpus = |s: &str| s.parse::<CpuSet>().unwrap();
        let list = CpuFormat::List;
        assert_eq!(include_text("\n", list, &cpus("4-7")), "4-7");
        assert_eq!(include_text("4-7\n", list, &cpus("8-9")), "4-9");
        assert_eq!(include_text("4-7\n", list, &cpus("5")), "4-7\n");
        assert_eq!(include_text("junk", list, &cpus("5")), "junk");
    }

    #[test]
    fn mask_is_written_in_the_layout_the_kernel_printed() {
        let set: CpuSet = "0-3".parse().unwrap();
        assert_eq!(set.to_mask_like("ff\n"), "0f");
        assert_eq!(set.to_mask_like("fff"), "00f");
        assert_eq!(
            "0-3,32,63"
                .parse::<CpuSet>()
                .unwrap()
                .to_mask_like("ffffffff,ffffffff"),
            "80000001,0000000f"
        );
        let wide = "0-39".parse::<CpuSet>().unwrap();
        assert_eq!(wide.to_mask_like("ff,ffffffff"), "ff,ffffffff");
        for like in ["ff", "00000000,000000ff", "fff,ffffffff"] {
            let nbits = like.split(',').map(|w| w.len() as u32 * 4).sum();
            let back = CpuSet::parse_mask(&set.to_mask_like(like), nbits).unwrap();
            assert_eq!(back, set, "{like}");
        }
    }

    fn list(s: &str, nbits: u32) -> Result<String, CpuListError> {
        CpuSet::parse_list(s, nbits).map(|c| c.to_string())
    }

    #[test]
    fn prints_like_sysfs() {
        let set: CpuSet = [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17, 20]
            .into_iter()
            .collect();
        assert_eq!(set.to_string(), "0-5,12-17,20");
        assert_eq!(CpuSet::new().to_string(), "");
    }

    #[test]
    fn set_algebra() {
        let a = CpuSet::range(0, 7);
        let b: CpuSet = "4-11".parse().unwrap();
        assert_eq!(a.intersection(&b).to_string(), "4-7");
        assert_eq!(a.difference(&b).to_string(), "0-3");
        assert_eq!(a.union(&b).to_string(), "0-11");
        assert!(CpuSet::range(2, 3).is_subset(&a));
        assert_eq!(b.first(), Some(4));
        assert_eq!(b.last(), Some(11));
        assert_eq!(a.difference(&a), CpuSet::new());
        assert_eq!(CpuSet::range(64, 130).last(), Some(130));
    }

    #[test]
    fn kernel_corner_cases() {
        assert_eq!(list("0-31:1/4", 32).unwrap(), "0,4,8,12,16,20,24,28");
        assert_eq!(
            list("  ,,  0-31:3/4  ,, 32-63:4/4  ,,  ", 64).unwrap(),
            "0-2,4-6,8-10,12-14,16-18,20-22,24-26,28-30,32-63"
        );
        assert_eq!(list("N-N", 32).unwrap(), "31");
        assert_eq!(list("ALL:1/2", 8).unwrap(), "0,2,4,6");
        assert!(matches!(list("8-8", 8), Err(CpuListError::Range { .. })));
        assert!(matches!(
            list("0-98765432123456789:10/1", 8),
            Err(CpuListError::Overflow { .. })
        ));
        assert!(matches!(list("0-\n", 8), Err(CpuListError::Invalid { .. })));
    }

    #[test]
    fn masks() {
        let set = CpuSet::parse_mask("deadbeef,1,0", 96).unwrap();
        assert!(set.contains(32) && set.contains(64) && !set.contains(0));
        assert!(CpuSet::parse_mask("3,0", 33).is_err());
        assert!(CpuSet::parse_mask("goodfood", 32).is_err());
    }
}
