//! Fills a broker with the retained topics of a lab of N SUTs, as `labvisor status` reads them
//! (no containers, no agents): per SUT an agent status and a supervisor view, plus one
//! supervisor status, published retained with QoS 1. It returns once the broker acknowledged
//! every message, and prints the summary line `labvisor status` should then print. The
//! benchmark runs it before timing `labvisor status` (the `status at 500` figure); the test
//! `tests/status_scale.rs` publishes the same lab.
//!
//! `retained_lab --broker mqtt://127.0.0.1:PORT --suts 500 [--topic-prefix P] [--supervisor ID]`
//!
//! The mix is `Mix::typical`: 1 in 40 SUTs busy, 1 in 100 offline, per 100 SUTs one each of
//! unhealthy, crash-loop, invalid file, failing pending action and missing agent status; the
//! rest idle and healthy. Names are `sut-0001` … `sut-N`. Publish to a fresh broker (or one
//! without other SUTs) so that the summary line matches.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use labvisor_protocol::topics::Topics;

// Shared with tests/status_scale.rs, which also uses what this binary does not.
#[allow(dead_code)]
#[path = "../tests/support/retained_lab.rs"]
mod retained_lab;

use retained_lab::Mix;

/// Publishes the retained topics of a lab of N SUTs.
#[derive(Parser)]
struct Args {
    /// MQTT broker URL (`mqtt://[user:password@]host:port`).
    #[arg(long)]
    broker: String,
    /// How many SUTs.
    #[arg(long, default_value_t = 500)]
    suts: usize,
    /// Global topic prefix of the lab.
    #[arg(long)]
    topic_prefix: Option<String>,
    /// The supervisor that owns them.
    #[arg(long, default_value = "lab")]
    supervisor: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let topics = match Topics::with_prefix(args.topic_prefix.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("retained_lab: --topic-prefix: {e}");
            return ExitCode::from(2);
        }
    };
    let mix = Mix::typical(args.suts);
    let suts = mix.suts(args.suts);
    let msgs = retained_lab::messages(&topics, &args.supervisor, &suts);
    let published = msgs.len();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = rt.block_on(retained_lab::publish(
        &args.broker,
        msgs,
        Duration::from_secs(60),
    )) {
        eprintln!("retained_lab: {e}");
        return ExitCode::from(1);
    }
    println!(
        "published {published} retained messages; labvisor status should say: {}",
        retained_lab::summary_line(&suts)
    );
    ExitCode::SUCCESS
}
