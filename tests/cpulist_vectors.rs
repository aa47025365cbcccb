//! Checks `CpuSet::parse_list` / `parse_mask` against the kernel's own `lib/test_bitmap.c`
//! vectors, read from the shared peer-data tables (not copied here: they stay where CI puts them).

use std::path::PathBuf;

use pvetune::cpuset::{CpuListError, CpuSet};

/// One table row: the input as the kernel sees it, the width, and the expected outcome.
struct Vector {
    line: usize,
    input: String,
    nbits: u32,
    expected: Result<String, &'static str>,
}

fn vectors_file() -> Option<PathBuf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peer-data/cpulist-vectors.md");
    path.exists().then_some(path)
}

/// The text inside the first pair of backticks of a cell, if any.
fn backticked(cell: &str) -> Option<&str> {
    let start = cell.find('`')? + 1;
    let len = cell[start..].find('`')?;
    Some(&cell[start..start + len])
}

/// Rows of the table under the heading that starts with `heading`, up to the next heading.
/// `expected_col` and `error_col` are cell indexes after splitting on `|`.
fn table(text: &str, heading: &str, expected_col: usize, error_col: usize) -> Vec<Vector> {
    let mut inside = false;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("## ") {
            inside = line.starts_with(heading);
            continue;
        }
        let cells: Vec<&str> = line.split('|').collect();
        if !inside || cells.len() <= error_col || cells[1].trim().parse::<u32>().is_err() {
            continue;
        }
        // Inputs keep their leading and trailing spaces; `\n` stands for a newline.
        let input = backticked(cells[2])
            .expect("input in backticks")
            .replace("\\n", "\n");
        let nbits = cells[3].trim().parse().expect("nbits");
        let expected = match backticked(cells[error_col]) {
            Some("-EINVAL") => Err("Invalid"),
            Some("-ERANGE") => Err("Range"),
            Some("-EOVERFLOW") => Err("Overflow"),
            Some(other) => panic!("line {}: unknown errno {other}", n + 1),
            None => Ok(backticked(cells[expected_col]).unwrap_or("").to_string()),
        };
        rows.push(Vector {
            line: n + 1,
            input,
            nbits,
            expected,
        });
    }
    rows
}

fn kind(e: &CpuListError) -> &'static str {
    match e {
        CpuListError::Invalid { .. } => "Invalid",
        CpuListError::Range { .. } => "Range",
        CpuListError::Overflow { .. } => "Overflow",
    }
}

fn check(rows: &[Vector], parse: fn(&str, u32) -> Result<CpuSet, CpuListError>) -> Vec<String> {
    rows.iter()
        .filter_map(|v| {
            let got = parse(&v.input, v.nbits)
                .map(|s| s.to_string())
                .map_err(|e| kind(&e));
            (got != v.expected).then(|| {
                format!(
                    "line {}: {:?} (nbits {}): expected {:?}, got {:?}",
                    v.line, v.input, v.nbits, v.expected, got
                )
            })
        })
        .collect()
}

#[test]
fn kernel_parselist_and_parse_vectors() {
    let Some(path) = vectors_file() else {
        println!("skipped: ../shared/peer-data not present");
        return;
    };
    let text = std::fs::read_to_string(path).expect("read cpulist-vectors.md");
    let lists = table(&text, "## 1.", 4, 6);
    let masks = table(&text, "## 2.", 4, 5);
    assert_eq!(lists.len(), 69, "bitmap_parselist rows");
    assert_eq!(masks.len(), 20, "bitmap_parse rows");
    let mut failures = check(&lists, CpuSet::parse_list);
    failures.extend(check(&masks, CpuSet::parse_mask));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
