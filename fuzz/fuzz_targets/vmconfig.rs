//! `VmConfig::parse`: the qemu-server config parser and every value grammar behind it
//! (`numaN`, `affinity`, `hostpciN`, `memory`, `-smp` in `args`, ...). `VmConfig::read` hands
//! it the file's bytes through `from_utf8_lossy`, so any bytes can reach it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pvetune::vmconfig::VmConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match VmConfig::parse(&text) {
        Ok(config) => {
            let _ = config.vcpu_count();
            let _ = config.threads_per_core();
            let _ = format!("{config:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
