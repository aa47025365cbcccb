//! Parsers are linear: inputs of 10 MB (a VM config value, a whole config file, a cpulist)
//! are parsed or refused, and an error quotes a bounded excerpt of the input, never
//! megabytes. No wall-clock limit is asserted (a shared machine makes any limit flaky, and
//! speed is the benchmark's business, docs/performance.md): quadratic work on 10 MB would not
//! end within CI's time, which fails the run just as surely.

mod common;

use common::TempDir;
use pvetune::cpuset::{CpuSet, MAX_CPUS};
use pvetune::vmconfig::{VmConfig, VmConfigError};

const TEN_MB: usize = 10 << 20;
/// An error message quotes at most ~80 characters of input plus its own words.
const SHORT_MESSAGE: usize = 400;

fn repeat_to(unit: &str, bytes: usize) -> String {
    unit.repeat(bytes / unit.len())
}

fn config_error(text: &str) -> String {
    let result = VmConfig::parse(text);
    let err = result.expect_err("a 10 MB invalid value is refused");
    let message = err.to_string();
    assert!(message.len() < SHORT_MESSAGE, "{} bytes", message.len());
    assert!(message.contains("..."), "{message}");
    message
}

#[test]
fn a_10_mb_args_line_is_parsed_or_refused_with_a_short_message() {
    // Valid: the -smp is found, the rest is QEMU's business.
    let valid = format!(
        "args: -smp 4,threads=2 {}\n",
        repeat_to("-foo bar ", TEN_MB)
    );
    let config = VmConfig::parse(&valid).unwrap();
    assert_eq!((config.smp_cpus, config.smp_threads), (Some(4), Some(2)));

    // Invalid: a 10 MB -smp value.
    let message = config_error(&format!("args: -smp 4,threads={}\n", "9".repeat(TEN_MB)));
    assert!(message.contains("line 1: invalid args"), "{message}");
}

#[test]
fn a_10_mb_affinity_or_numa_list_is_refused_with_a_short_message() {
    let message = config_error(&format!("affinity: {}\n", repeat_to("0-8191,", TEN_MB)));
    assert!(message.contains("invalid affinity"), "{message}");
    let message = config_error(&format!("numa0: cpus={}\n", repeat_to("0-8191;", TEN_MB)));
    assert!(message.contains("invalid numa0"), "{message}");
    // Short lists of full ranges still parse.
    let config = VmConfig::parse("affinity: 0-8191,0-8191\nnuma0: cpus=0-8191;0-3\n").unwrap();
    assert_eq!(config.affinity.unwrap().len(), 8192);
    assert_eq!(config.numa_nodes[&0].cpus.len(), 8192);
}

#[test]
fn a_10_mb_config_file_is_read_and_a_larger_one_refused() {
    let root = TempDir::new("bounded-config");
    let dir = root.path().join("etc/pve/qemu-server");
    std::fs::create_dir_all(&dir).unwrap();
    let body = format!(
        "cores: 4\n{}#end\nsockets: 2\n",
        repeat_to("description: x\nunknown-key: y\n", TEN_MB)
    );
    std::fs::write(dir.join("100.conf"), &body).unwrap();
    let config = VmConfig::read(root.path(), 100).unwrap();
    assert_eq!((config.cores, config.sockets), (4, 2));

    // An invalid value at the end of a 10 MB file: a short message with the line number.
    std::fs::write(
        dir.join("101.conf"),
        format!("{body}cores: {}\n", "9".repeat(1 << 20)),
    )
    .unwrap();
    let err = VmConfig::read(root.path(), 101).unwrap_err();
    let message = err.to_string();
    assert!(message.len() < SHORT_MESSAGE, "{} bytes", message.len());
    assert!(message.contains("invalid cores"), "{message}");

    // Larger than any config: refused without reading it whole.
    std::fs::write(dir.join("102.conf"), repeat_to("cores: 4\n", 17 << 20)).unwrap();
    let err = VmConfig::read(root.path(), 102).unwrap_err();
    assert!(matches!(err, VmConfigError::TooLarge { .. }), "{err}");
}

#[test]
fn huge_cpulists_are_refused_in_bounded_time_with_a_short_message() {
    let cases: [(String, u32); 5] = [
        ("0-4294967295".into(), MAX_CPUS),
        ("0-4294967294".into(), u32::MAX),
        ("0-8191:1/8191".into(), u32::MAX),
        (repeat_to("0-8191,", TEN_MB), MAX_CPUS),
        (format!("0-3,{}", "7".repeat(TEN_MB)), MAX_CPUS),
    ];
    for (input, nbits) in &cases {
        let result = CpuSet::parse_list(input, *nbits);
        let shown = &input[..input.len().min(20)];
        match result {
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.len() < SHORT_MESSAGE,
                    "{shown}: {} bytes",
                    message.len()
                );
            }
            // A bounded set is fine too (the kernel accepts this stride on a wide bitmap).
            Ok(set) => assert!(set.len() <= 16384 && input.len() < 100, "{shown}"),
        }
    }
    // Strides and plain ranges still give the kernel's answer.
    assert_eq!(
        CpuSet::parse_list("0-8191:1/8191", MAX_CPUS)
            .unwrap()
            .to_string(),
        "0,8191"
    );
    assert_eq!(
        CpuSet::parse_list("3-130", MAX_CPUS).unwrap(),
        CpuSet::range(3, 130)
    );
}

#[test]
fn a_10_mb_profile_is_refused_with_a_short_message() {
    let dir = TempDir::new("bounded-profile");
    let path = dir.path().join("100.yaml");
    std::fs::write(
        &path,
        format!("cpus: 4-7\n{}", repeat_to("# comment\n", TEN_MB)),
    )
    .unwrap();
    let err = pvetune::profile::load(&path).unwrap_err();
    let message = err.to_string();
    assert!(message.len() < SHORT_MESSAGE, "{} bytes", message.len());
    assert!(message.contains("larger than 1 MiB"), "{message}");
}
