//! `procstat::Stat::parse` and every accessor: `Stat::read` reads at most `MAX_STAT_BYTES`
//! into a `String`, so only UTF-8 up to that length reaches it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pvetune::procstat::{MAX_STAT_BYTES, Stat};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_STAT_BYTES {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(stat) = Stat::parse(text.to_string()) {
        let _ = stat.pid();
        let _ = stat.comm();
        let _ = stat.flags();
        let _ = stat.start_time();
        for n in 0..60 {
            let _ = stat.field(n);
        }
    }
});
