//! Writes the benchmark's synthetic host (bench/run): `cargo run --release --example
//! bench-host -- <dir> <irqs>` makes `<dir>/sys` and `<dir>/proc` of a 256-CPU, 4-node,
//! 8-L3 host with `<irqs>` IRQs under `proc/irq`, from the generator the tests use.

#[allow(dead_code)]
#[path = "../tests/common/hostgen.rs"]
mod hostgen;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(irqs)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
        eprintln!("usage: bench-host <dir> <irqs>");
        std::process::exit(2);
    };
    let root = std::path::Path::new(dir);
    let spec = hostgen::bench_host();
    hostgen::write_host(root, &spec);
    hostgen::add_msi_irqs(root, &spec, irqs);
}
