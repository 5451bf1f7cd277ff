//! `broker_load --consume`: the consumers in a process of their own, so that whether they keep
//! up is theirs to say, not the load generator's. The load tool starts it (the same binary),
//! and talks to it over its stdin and stdout, one line each:
//!
//! - it prints `ready` once both clients are subscribed;
//! - stdin `measure`: the window starts (status latencies are kept, counters noted);
//! - stdin `end`: the window ends;
//! - stdin `finish <statuses> <last_jobs> <output>`: what the agents' links had acknowledged;
//!   it waits until it has that many unique live deliveries of each (or nothing new came for
//!   5 s), prints one JSON object and exits.
//!
//! Clients: a supervisor-like one (`+/agent` and `+/last_job`, QoS 1, the supervisor's
//! login) and a follower of `+/output` (QoS 1, the local login), each with its own MQTT
//! connection, counted by [`Tally`]. Logins come in `LABVISOR_BENCH_SUPERVISOR_PASSWORD` and
//! `LABVISOR_BENCH_LOCAL_PASSWORD`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use labvisor_mqtt::{LinkOptions, MqttLink, QoS};
use labvisor_protocol::payloads::now_ms;
use labvisor_protocol::topics::{SutTopic, Topics};
use labvisor_protocol::MAX_PACKET_SIZE;
use labvisor_supervisor::broker::{LOCAL_USER, SUPERVISOR_USER};
use serde_json::json;

use crate::tally::Tally;

pub const SUPERVISOR_PASSWORD_ENV: &str = "LABVISOR_BENCH_SUPERVISOR_PASSWORD";
pub const LOCAL_PASSWORD_ENV: &str = "LABVISOR_BENCH_LOCAL_PASSWORD";

#[derive(Default)]
struct State {
    tally: Mutex<Tally>,
    latencies: Mutex<Vec<u64>>,
    measuring: AtomicBool,
}

/// The consumer's options for a client on loopback.
pub fn options(port: u16, no_acl: bool, client_id: &str, login: (&str, &str)) -> LinkOptions {
    let mut o = LinkOptions::new(client_id, "127.0.0.1", port);
    if !no_acl {
        o.username = Some(login.0.to_owned());
        o.password = Some(login.1.to_owned());
    }
    o.max_packet_size = MAX_PACKET_SIZE;
    o
}

pub async fn run(port: u16, no_acl: bool) -> Result<()> {
    let sup_password = std::env::var(SUPERVISOR_PASSWORD_ENV).unwrap_or_default();
    let local_password = std::env::var(LOCAL_PASSWORD_ENV).unwrap_or_default();
    let topics = Topics::new();
    let state = Arc::new(State::default());
    let sup = subscriber(
        &state,
        &topics,
        options(
            port,
            no_acl,
            "labvisor-supervisor-bench",
            (SUPERVISOR_USER, &sup_password),
        ),
        &[topics.agents_filter(), topics.last_jobs_filter()],
    )
    .await?;
    let follow = subscriber(
        &state,
        &topics,
        options(
            port,
            no_acl,
            "labvisor-logs-bench",
            (LOCAL_USER, &local_password),
        ),
        &[topics.outputs_filter()],
    )
    .await?;
    println!("ready");

    let tck = crate::clock_ticks()?;
    // Commands from stdin, read on a thread of their own (blocking reads).
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut w0, mut w1) = (None, None);
    let want: [u64; 3] = loop {
        let Some(line) = lines.recv().await else {
            bail!("stdin closed before `finish`");
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["measure"] => {
                state.measuring.store(true, Ordering::Relaxed);
                w0 = Some(snapshot(&state)?);
            }
            ["end"] => {
                state.measuring.store(false, Ordering::Relaxed);
                w1 = Some(snapshot(&state)?);
            }
            ["finish", s, l, o] => break [s.parse()?, l.parse()?, o.parse()?],
            _ => bail!("unknown command {line:?}"),
        }
    };

    // Until every acknowledged message came once, live, or nothing new for 5 s.
    let delivered = |st: &State| {
        let t = st.tally.lock().expect("tally");
        [t.status.delivered, t.last_job.delivered, t.output.delivered]
    };
    let mut quiet = (Instant::now(), delivered(&state));
    loop {
        let now = delivered(&state);
        if now.iter().zip(want).all(|(got, want)| *got >= want) {
            break;
        }
        if now != quiet.1 {
            quiet = (Instant::now(), now);
        } else if quiet.0.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut lat = std::mem::take(&mut *state.latencies.lock().expect("latencies"));
    lat.sort_unstable();
    let q = |p: f64| -> u64 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    let (window_msgs, window_secs, cpu_share) = match (w0, w1) {
        (Some(a), Some(b)) => {
            let secs = (b.at - a.at).as_secs_f64();
            (
                b.received - a.received,
                secs,
                (b.cpu - a.cpu) as f64 / tck / secs,
            )
        }
        _ => (0, 0.0, 0.0),
    };
    let kind = |k: &crate::tally::Kind, want: u64| {
        json!({"acked": want, "received": k.delivered, "duplicates": k.duplicates,
               "retained_redeliveries": k.retained, "unreadable": k.unreadable})
    };
    let subs: Vec<serde_json::Value> = [("supervisor", &sup), ("output_follower", &follow)]
        .iter()
        .map(|(n, l)| {
            let st = l.state();
            json!({"name": n, "connects": st.connects,
                   "reconnects": st.connects.saturating_sub(1), "errors": st.errors,
                   "last_error": st.last_error})
        })
        .collect();
    let out = {
        let t = state.tally.lock().expect("tally");
        json!({
        "status": kind(&t.status, want[0]),
        "last_job": kind(&t.last_job, want[1]),
        "output": kind(&t.output, want[2]),
        "output_lines_received": t.output_lines,
        "window_msgs": window_msgs,
        "window_s": window_secs,
        "cpu_share_of_one_core": cpu_share,
        "status_latency_ms": {"p50": q(0.5), "p99": q(0.99), "max": lat.last().copied().unwrap_or(0),
                              "samples": lat.len()},
        "subscribers": subs,
        })
    };
    println!("{out}");
    let _ = sup.shutdown(Vec::new(), Duration::from_secs(2)).await;
    let _ = follow.shutdown(Vec::new(), Duration::from_secs(2)).await;
    Ok(())
}

struct Snapshot {
    at: Instant,
    received: u64,
    cpu: u64,
}

fn snapshot(state: &State) -> Result<Snapshot> {
    Ok(Snapshot {
        at: Instant::now(),
        received: state.tally.lock().expect("tally").received,
        cpu: crate::proc_cpu_ticks_self()?,
    })
}

/// A QoS 1 subscriber that counts what it gets, subscribed before it returns.
async fn subscriber(
    state: &Arc<State>,
    topics: &Topics,
    mut o: LinkOptions,
    filters: &[String],
) -> Result<MqttLink> {
    o.incoming_capacity = 65_536;
    o.queue_capacity = 65_536;
    let (link, mut incoming) = MqttLink::start(o)?;
    for f in filters {
        link.subscribe(f.clone(), QoS::AtLeastOnce)?;
    }
    let mut st = link.watch_state();
    tokio::time::timeout(Duration::from_secs(10), async {
        while st.borrow_and_update().subacks < filters.len() as u64 {
            st.changed().await?;
        }
        anyhow::Ok(())
    })
    .await
    .context("subscriber did not get its SUBACKs")??;
    let state = state.clone();
    let topics = topics.clone();
    tokio::spawn(async move {
        while let Some(m) = incoming.recv().await {
            let kind = topics.parse(&m.topic).map(|(_, k)| k);
            let mut t = state.tally.lock().expect("tally");
            match kind {
                Some(SutTopic::Agent) => {
                    if let Some(st) = t.status(&m.payload, m.retain) {
                        drop(t);
                        if state.measuring.load(Ordering::Relaxed) {
                            let lat = now_ms().saturating_sub(st.time_ms);
                            state.latencies.lock().expect("latencies").push(lat);
                        }
                    }
                }
                Some(SutTopic::LastJob) => {
                    t.last_job(&m.payload, m.retain);
                }
                Some(SutTopic::Output) => {
                    t.output(&m.topic, &m.user_properties(), &m.payload, m.retain);
                }
                _ => t.received += 1,
            }
        }
    });
    Ok(link)
}
