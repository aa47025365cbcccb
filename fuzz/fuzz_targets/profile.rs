//! `profile::parse`: the YAML profile parser and its validation. `profile::load` reads the file
//! with `read_to_string` (so only UTF-8 reaches `parse`) and caps it at `MAX_PROFILE_BYTES`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() as u64 > pvetune::profile::MAX_PROFILE_BYTES {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match pvetune::profile::parse(Path::new("/etc/pvetune/profiles/100.yaml"), text) {
        Ok(profile) => {
            let _ = format!("{profile:?}");
        }
        Err(e) => {
            // Messages quote a bounded excerpt of the input, never the whole of it.
            let _ = e.to_string();
        }
    }
});
