//! `MqttLink` against a real mosquitto: each test starts its own broker on a free port.
//!
//! Synchronisation is always a condition with a deadline (link state, a received message, a
//! line from `mosquitto_sub`), never a bare sleep.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use labvisor_mqtt::{
    Incoming, LinkError, LinkOptions, LinkState, Message, MqttLink, PublishError, QoS, Received,
};
use labvisor_tests::{unique_id, wait_until, Mosquitto};

const LIMIT: Duration = Duration::from_secs(20);

fn options(m: &Mosquitto) -> LinkOptions {
    let mut o = LinkOptions::from_url(&m.url(), unique_id("link")).expect("test URL parses");
    o.backoff_min = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(500);
    o
}

/// Waits until the link's state satisfies `pred`, and returns that state.
async fn wait_state(link: &MqttLink, what: &str, pred: impl Fn(&LinkState) -> bool) -> LinkState {
    let mut rx = link.watch_state();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let s = rx.borrow_and_update().clone();
        if pred(&s) {
            return s;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!("timed out waiting for link state: {what}; last state {s:?}"),
        }
    }
}

async fn recv(incoming: &mut Incoming, what: &str) -> Received {
    tokio::time::timeout(LIMIT, incoming.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for an incoming message: {what}"))
        .expect("incoming channel open")
}

fn text(r: &Received) -> String {
    String::from_utf8_lossy(&r.payload).into_owned()
}

/// Publishes probes on `topic` through the link until one comes back on `incoming`
/// (the link is subscribed to `topic`), proving the subscription is active.
async fn wait_self_subscribed(link: &MqttLink, incoming: &mut Incoming, topic: &str) {
    let deadline = Instant::now() + LIMIT;
    loop {
        link.publish(Message::event(topic, "probe")).unwrap();
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(300), incoming.recv()).await
        {
            assert_eq!(text(&r), "probe");
            // Drain probes still on their way.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), incoming.recv()).await
            {
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "link never received its own probe on {topic}"
        );
    }
}

/// Receives messages until one has payload `want` (skipping leftover probes).
async fn recv_payload(incoming: &mut Incoming, want: &str) -> Received {
    loop {
        let r = recv(incoming, want).await;
        if text(&r) == want {
            return r;
        }
        assert_eq!(
            text(&r),
            "probe",
            "unexpected message while waiting for {want}"
        );
    }
}

/// The pid of the mosquitto process using this broker's config file.
fn broker_pid(m: &Mosquitto) -> u32 {
    let conf = m.dir().join("mosquitto.conf");
    let conf = conf.to_string_lossy();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("mosquitto") && cmdline.contains(conf.as_ref()) {
            return pid;
        }
    }
    panic!("no mosquitto process found for {conf}");
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn round_trip_with_external_clients() {
    let m = Mosquitto::start();
    let (link, mut incoming) = MqttLink::start(options(&m)).unwrap();
    link.subscribe("rt/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;

    // mosquitto_pub (MQTT 5, with response topic and correlation data) -> link.
    let deadline = Instant::now() + LIMIT;
    let got = loop {
        let out = m.publish(
            "rt/in",
            "hello",
            &[
                "-q",
                "1",
                "-V",
                "mqttv5",
                "-D",
                "publish",
                "response-topic",
                "rt/reply",
                "-D",
                "publish",
                "correlation-data",
                "c42",
            ],
        );
        assert!(out.status.success(), "mosquitto_pub: {out:?}");
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(300), incoming.recv()).await
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto_pub never reached the link"
        );
    };
    assert_eq!(got.topic, "rt/in");
    assert_eq!(text(&got), "hello");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert!(!got.retain);
    assert_eq!(got.response_topic.as_deref(), Some("rt/reply"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"c42"[..]));

    // link -> mosquitto_sub.
    let sub = m.subscribe("rt/out", &[]);
    wait_until("mosquitto_sub to see a link probe", LIMIT, || {
        link.publish(Message::stream("rt/out", "probe")).unwrap();
        (!sub.lines().is_empty()).then_some(())
    });
    link.publish(Message::event("rt/out", "from-link")).unwrap();
    sub.wait_for("the link's event", LIMIT, |l| l == "rt/out from-link");
    assert_eq!(link.state().connects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn broker_restart_reconnects_with_backoff_resubscribes_and_republishes() {
    let mut m = Mosquitto::start();
    let mut o = options(&m);
    o.backoff_min = Duration::from_millis(100);
    o.backoff_max = Duration::from_secs(2);
    let (link, mut incoming) = MqttLink::start(o).unwrap();
    link.subscribe("k/in", QoS::AtLeastOnce).unwrap();
    link.set_sticky("k/status", "ready").unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "k/in").await;
    m.subscribe("k/status", &["-C", "1"])
        .wait_for("retained birth", LIMIT, |l| l == "k/status ready");

    m.stop();
    let down = Instant::now();
    let s = wait_state(&link, "disconnected", |s| !s.connected).await;
    let errors_at_loss = s.errors;
    for i in 0..50 {
        link.publish(Message::event("k/in", format!("q{i:02}")))
            .unwrap();
    }
    // Three failed reconnect attempts after the loss take at least 80 + 160 + 320 ms with a
    // 100 ms minimum backoff and ±20 % jitter; a hot loop would make them in microseconds.
    wait_state(&link, "three failed reconnects", |s| {
        s.errors >= errors_at_loss + 3
    })
    .await;
    let elapsed = down.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500),
        "reconnect attempts not spaced: {elapsed:?}"
    );
    let s = link.state();
    assert!(s.last_error.is_some(), "{s:?}");
    assert_eq!(s.queued, 50, "{s:?}");

    m.restart();
    wait_state(&link, "reconnected", |s| s.connected && s.connects == 2).await;
    // The re-issued subscription precedes the queued messages: all 50 come back, in order.
    for i in 0..50 {
        let r = recv_payload(&mut incoming, &format!("q{i:02}")).await;
        assert_eq!(r.topic, "k/in");
    }
    // An external publisher reaches the re-issued subscription.
    let out = m.publish("k/in", "external", &["-q", "1"]);
    assert!(out.status.success());
    assert_eq!(text(&recv(&mut incoming, "external").await), "external");
    // The broker lost its retained store with the restart: the birth is back only because the
    // link republished it.
    m.subscribe("k/status", &["-C", "1"])
        .wait_for("republished retained birth", LIMIT, |l| {
            l == "k/status ready"
        });
    let s = link.state();
    assert_eq!((s.dropped, s.queued), (0, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn outage_overflow_keeps_the_newest_output() {
    let mut m = Mosquitto::start();
    let mut o = options(&m);
    o.queue_capacity = 10;
    let hooked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = hooked.clone();
    o.on_drop = Some(labvisor_mqtt::DropHook::new(move |m: &Message| {
        h2.lock().unwrap().push(text_of(&m.payload))
    }));
    let (link, mut incoming) = MqttLink::start(o).unwrap();
    link.subscribe("c/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "c/in").await;

    m.stop();
    wait_state(&link, "disconnected", |s| !s.connected).await;
    for i in 0..50 {
        link.publish_output(Message::stream("c/in", format!("q{i:02}")))
            .unwrap();
    }
    let s = link.state();
    assert_eq!((s.queued, s.dropped), (10, 40), "{s:?}");
    let want: Vec<String> = (0..40).map(|i| format!("q{i:02}")).collect();
    assert_eq!(
        *hooked.lock().unwrap(),
        want,
        "on_drop saw each dropped message"
    );

    m.restart();
    wait_state(&link, "reconnected", |s| s.connects == 2).await;
    for i in 40..50 {
        assert_eq!(
            text(&recv(&mut incoming, "queued message").await),
            format!("q{i:02}")
        );
    }
    link.publish(Message::event("c/in", "marker")).unwrap();
    assert_eq!(
        text(&recv(&mut incoming, "marker").await),
        "marker",
        "more than 10 arrived"
    );
    assert_eq!(link.state().dropped, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn an_output_flood_never_evicts_qos1_messages() {
    let mut m = Mosquitto::start();
    let mut o = options(&m);
    o.queue_capacity = 4;
    let (link, mut incoming) = MqttLink::start(o).unwrap();
    link.subscribe("p/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "p/in").await;

    m.stop();
    wait_state(&link, "disconnected", |s| !s.connected).await;
    link.publish(Message::event("p/in", "ack-1")).unwrap();
    // Output is QoS 1 too (as the agent publishes it), yet it is what gets dropped, and it never
    // closes the intake.
    for i in 0..20 {
        link.publish_output(Message::event("p/in", format!("out{i}")))
            .unwrap();
    }
    link.publish(Message::event("p/in", "ack-2")).unwrap();
    let s = link.state();
    assert_eq!(
        (s.queued, s.reliable_queued, s.dropped),
        (4, 2, 18),
        "{s:?}"
    );
    assert!(link.has_room());

    m.restart();
    wait_state(&link, "reconnected", |s| s.connects == 2).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(text(&recv(&mut incoming, "queued messages").await));
    }
    // Both QoS 1 messages survive; the newest output fills the rest, in order.
    assert_eq!(got, ["ack-1", "out18", "out19", "ack-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn a_qos1_backlog_past_capacity_is_kept_whole_and_closes_the_intake() {
    let mut m = Mosquitto::start();
    let mut o = options(&m);
    o.queue_capacity = 4;
    let (link, mut incoming) = MqttLink::start(o).unwrap();
    link.subscribe("b/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "b/in").await;
    let mut room = link.watch_room();
    assert!(*room.borrow_and_update());

    m.stop();
    wait_state(&link, "disconnected", |s| !s.connected).await;
    for i in 0..30 {
        link.publish(Message::event("b/in", format!("ack{i:02}")))
            .unwrap();
    }
    let s = link.state();
    assert_eq!(
        (s.queued, s.reliable_queued, s.dropped),
        (30, 30, 0),
        "{s:?}"
    );
    assert!(!link.has_room());
    assert!(room.has_changed().unwrap(), "the room watch saw it close");

    m.restart();
    let mut got = Vec::new();
    while got.len() < 30 {
        got.push(text(&recv(&mut incoming, "the backlog").await));
    }
    let want: Vec<String> = (0..30).map(|i| format!("ack{i:02}")).collect();
    assert_eq!(got, want, "every QoS 1 message, in order");
    tokio::time::timeout(LIMIT, async {
        while !*room.borrow_and_update() {
            room.changed().await.unwrap();
        }
    })
    .await
    .expect("the room opens again once the backlog is sent");
    assert_eq!(link.state().dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn in_flight_messages_survive_broker_death() {
    let mut m = Mosquitto::start();
    let (link, mut incoming) = MqttLink::start(options(&m)).unwrap();
    link.subscribe("f/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "f/in").await;

    // Freeze the broker so nothing is acknowledged: the burst is written to the socket and
    // held by rumqttc as unacknowledged, then the broker dies.
    let pid = broker_pid(&m);
    signal(pid, "-STOP");
    const N: usize = 200;
    for i in 0..N {
        link.publish(Message::event("f/in", format!("{i}")))
            .unwrap();
    }
    let s = wait_state(&link, "messages in flight", |s| s.in_flight >= 10).await;
    assert!(s.queued > 0, "{s:?}");
    m.stop(); // SIGKILL, also for a stopped process
    wait_state(&link, "disconnected", |s| !s.connected).await;
    m.restart();
    wait_state(&link, "reconnected", |s| s.connects == 2).await;

    let mut seen = BTreeSet::new();
    while seen.len() < N {
        let r = recv(
            &mut incoming,
            &format!("{} of {N} sequence numbers", seen.len()),
        )
        .await;
        if let Ok(n) = text(&r).parse::<usize>() {
            seen.insert(n);
        }
    }
    assert_eq!(seen, (0..N).collect::<BTreeSet<_>>());
    assert_eq!(link.state().dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn oversize_is_refused_and_the_connection_survives() {
    let m = Mosquitto::start();
    let mut o = options(&m);
    o.max_packet_size = 1024;
    let (link, mut incoming) = MqttLink::start(o).unwrap();
    link.subscribe("o/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "o/in").await;

    let max = link.max_payload("o/in");
    assert_eq!(max, 1024 - 4 - 64);
    let err = link
        .publish(Message::event("o/in", vec![b'x'; max + 1]))
        .unwrap_err();
    assert!(
        matches!(err, PublishError::Oversize { max: 1024, .. }),
        "{err}"
    );
    assert_eq!(link.state().refused_oversize, 1);

    link.publish(Message::event("o/in", vec![b'y'; max]))
        .unwrap();
    assert_eq!(
        recv(&mut incoming, "largest message").await.payload.len(),
        max
    );
    link.publish(Message::event("o/in", "after")).unwrap();
    assert_eq!(text(&recv(&mut incoming, "normal message").await), "after");
    let s = link.state();
    assert_eq!(
        (s.connects, s.errors, s.refused_oversize),
        (1, 0, 1),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn broker_packet_limit_lowers_the_cap() {
    let m =
        Mosquitto::start_with("allow_anonymous true\npersistence false\nmax_packet_size 2000\n");
    let (link, mut incoming) = MqttLink::start(options(&m)).unwrap();
    link.subscribe("b/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "b/in").await;

    assert_eq!(link.max_payload("b/in"), 2000 - 4 - 64);
    let err = link
        .publish(Message::event("b/in", vec![b'x'; 5000]))
        .unwrap_err();
    assert!(
        matches!(err, PublishError::Oversize { max: 2000, .. }),
        "{err}"
    );
    link.publish(Message::event("b/in", "after")).unwrap();
    assert_eq!(text(&recv(&mut incoming, "normal message").await), "after");
    assert_eq!(link.state().connects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn last_will_is_published_when_the_link_dies() {
    let m = Mosquitto::start();
    let mut o = options(&m);
    o.will = Some(Message::state("w/status", "lost"));
    let (link, incoming) = MqttLink::start(o).unwrap();
    link.set_sticky("w/status", "ready").unwrap();
    let sub = m.subscribe("w/status", &[]);
    sub.wait_for("birth", LIMIT, |l| l == "w/status ready");

    // Dropping every handle ends the task and drops the socket without DISCONNECT.
    drop(link);
    drop(incoming);
    sub.wait_for("will", LIMIT, |l| l == "w/status lost");
    m.subscribe("w/status", &["-C", "1"])
        .wait_for("retained will", LIMIT, |l| l == "w/status lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn shutdown_leaves_the_final_state_not_the_will() {
    let m = Mosquitto::start();
    let mut o = options(&m);
    o.will = Some(Message::state("s/status", "lost"));
    let (link, _incoming) = MqttLink::start(o).unwrap();
    link.set_sticky("s/status", "ready").unwrap();
    let sub = m.subscribe("s/#", &[]);
    sub.wait_for("birth", LIMIT, |l| l == "s/status ready");
    for i in 0..20 {
        link.publish(Message::event("s/events", format!("e{i}")))
            .unwrap();
    }

    let started = Instant::now();
    link.shutdown(
        vec![Message::state("s/status", "offline")],
        Duration::from_secs(10),
    )
    .await
    .expect("clean shutdown");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        link.publish(Message::event("s/events", "late")),
        Err(PublishError::Closed)
    );
    assert!(!link.state().connected);
    assert!(matches!(
        link.shutdown(vec![], Duration::from_secs(1)).await,
        Err(LinkError::Closed)
    ));

    // Everything queued before shutdown went out, then "offline"; a sentinel published after
    // the link is gone shows the broker published no will in between.
    let out = m.publish("s/sentinel", "x", &[]);
    assert!(out.status.success());
    let lines = {
        sub.wait_for("sentinel", LIMIT, |l| l == "s/sentinel x");
        sub.lines()
    };
    assert!(lines.contains(&"s/events e19".to_owned()), "{lines:?}");
    let offline = lines
        .iter()
        .position(|l| l == "s/status offline")
        .expect("offline seen");
    assert!(
        lines.iter().all(|l| l != "s/status lost"),
        "will published: {lines:?}"
    );
    assert!(offline > lines.iter().position(|l| l == "s/events e19").unwrap());
    m.subscribe("s/status", &["-C", "1"])
        .wait_for("retained offline", LIMIT, |l| l == "s/status offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn shutdown_with_the_broker_down_returns_by_its_deadline() {
    let mut m = Mosquitto::start();
    let (link, _incoming) = MqttLink::start(options(&m)).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    m.stop();
    wait_state(&link, "disconnected", |s| !s.connected).await;

    let started = Instant::now();
    let res = link
        .shutdown(
            vec![Message::state("d/status", "offline")],
            Duration::from_millis(800),
        )
        .await;
    let took = started.elapsed();
    assert!(matches!(res, Err(LinkError::ShutdownDeadline)), "{res:?}");
    assert!(
        took >= Duration::from_millis(700),
        "returned before its deadline: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "shutdown hung: {took:?}");
    assert!(!link.state().connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn shutdown_with_the_broker_down_and_nothing_to_send_returns_at_once() {
    let mut m = Mosquitto::start();
    let mut o = options(&m);
    o.backoff_min = Duration::from_secs(5);
    o.backoff_max = Duration::from_secs(5);
    let (link, _incoming) = MqttLink::start(o).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    m.stop();
    wait_state(&link, "disconnected", |s| !s.connected).await;

    let started = Instant::now();
    let res = link.shutdown(vec![], Duration::from_secs(10)).await;
    assert!(res.is_ok(), "{res:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn invalid_options_and_topics_are_refused() {
    let m = Mosquitto::start();
    let mut o = options(&m);
    o.client_id.clear();
    assert!(matches!(MqttLink::start(o), Err(LinkError::Options(_))));
    let mut o = options(&m);
    o.keep_alive = Duration::from_secs(1);
    assert!(matches!(MqttLink::start(o), Err(LinkError::Options(_))));
    let mut o = options(&m);
    o.tls = true;
    o.ca_file = Some(m.dir().join("missing-ca.pem"));
    assert!(matches!(MqttLink::start(o), Err(LinkError::CaFile { .. })));
    let mut o = options(&m);
    o.tls = true;
    o.ca_pem = Some("no certificate in here\n".into());
    assert!(matches!(MqttLink::start(o), Err(LinkError::CaPem(_))));

    let (link, _incoming) = MqttLink::start(options(&m)).unwrap();
    assert!(matches!(
        link.publish(Message::event("a/+", "x")),
        Err(PublishError::InvalidTopic(_))
    ));
    assert!(matches!(
        link.subscribe("a/#/b", QoS::AtMostOnce),
        Err(PublishError::InvalidTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn manual_acks_belong_to_their_connection() {
    let mut m = Mosquitto::start();
    let mut o = options(&m);
    o.manual_acks = true;
    let (link, mut incoming) = MqttLink::start(o).unwrap();
    link.subscribe("a/in", QoS::AtLeastOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "a/in").await;
    link.publish(Message::event("a/in", "job")).unwrap();
    let job = recv_payload(&mut incoming, "job").await;
    assert_eq!(job.qos, QoS::AtLeastOnce);
    assert_eq!(link.ack(&job), Ok(()));

    m.restart();
    wait_state(&link, "reconnected", |s| s.connects == 2).await;
    assert_eq!(link.ack(&job), Err(labvisor_mqtt::AckError::Stale));
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `LinkState::subacks` as an end marker: a QoS 0 subscriber has every retained message of its
/// earlier subscriptions once the SUBACK of its last one is in. 1500 retained messages are more
/// than mosquitto's default queue holds for one QoS 1 subscriber (1000 beyond the 20 in flight),
/// and none is lost at QoS 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn a_qos0_subscriber_has_every_retained_message_at_its_last_suback() {
    let m = Mosquitto::start();
    let (publisher, _in) = MqttLink::start(options(&m)).unwrap();
    wait_state(&publisher, "publisher connected", |s| s.connected).await;
    for i in 0..1500 {
        publisher
            .publish(Message::state(format!("r/{i:04}"), format!("v{i}")))
            .unwrap();
    }
    publisher.shutdown(Vec::new(), LIMIT).await.unwrap();

    let (link, mut incoming) = MqttLink::start(options(&m)).unwrap();
    link.subscribe("r/+", QoS::AtMostOnce).unwrap();
    link.subscribe("marker/none", QoS::AtMostOnce).unwrap();
    // Read while waiting: the link waits for room in `incoming` (256 messages).
    let mut state = link.watch_state();
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while state.borrow_and_update().subacks < 2 {
        tokio::select! {
            r = incoming.recv() => {
                let r = r.expect("incoming channel open");
                assert!(r.retain, "{}", r.topic);
                got.insert(r.topic);
            }
            _ = state.changed() => {}
            _ = tokio::time::sleep_until(deadline) => panic!("no second SUBACK within {LIMIT:?}"),
        }
    }
    assert_eq!(link.state().subacks, 2);
    while let Ok(r) = incoming.try_recv() {
        got.insert(r.topic);
    }
    assert_eq!(
        got.len(),
        1500,
        "retained messages in before the last SUBACK"
    );
    assert!(got.contains("r/0000") && got.contains("r/1499"));
}

/// An unsubscribed filter delivers nothing more: the UNSUBSCRIBE goes out before what the link
/// publishes after it, and mosquitto handles one connection's packets in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
async fn an_unsubscribed_filter_delivers_nothing_more() {
    let m = Mosquitto::start();
    let (link, mut incoming) = MqttLink::start(options(&m)).unwrap();
    link.subscribe("un/a", QoS::AtMostOnce).unwrap();
    link.subscribe("un/marker", QoS::AtMostOnce).unwrap();
    wait_state(&link, "connected", |s| s.connected).await;
    wait_self_subscribed(&link, &mut incoming, "un/a").await;

    link.unsubscribe("un/a").unwrap();
    link.publish(Message::event("un/a", "after")).unwrap();
    link.publish(Message::event("un/marker", "marker")).unwrap();
    let r = recv(&mut incoming, "the marker").await;
    assert_eq!(
        (r.topic.as_str(), text(&r).as_str()),
        ("un/marker", "marker"),
        "nothing on un/a after the unsubscription"
    );
    // Subscribed again, it delivers again.
    link.subscribe("un/a", QoS::AtMostOnce).unwrap();
    wait_self_subscribed(&link, &mut incoming, "un/a").await;
}
