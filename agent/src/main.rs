//! `labvisor-agent`: see the library docs.
use clap::Parser;

/// The labvisor agent: the entrypoint of a SUT's container.
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _ = Args::parse();
}
