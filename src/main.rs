//! The `pvetune` binary: all logic lives in the library.

fn main() {
    std::process::exit(pvetune::cli::main());
}
