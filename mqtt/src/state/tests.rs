//! The link's state machine against a fake rumqttc channel, without a broker.

use std::cell::{Cell, RefCell};

use super::*;

/// rumqttc's request channel, with `room` free slots; records what it was given.
#[derive(Default)]
struct FakeSink {
    room: Cell<usize>,
    log: RefCell<Vec<String>>,
}

impl FakeSink {
    fn with_room(room: usize) -> Self {
        FakeSink {
            room: Cell::new(room),
            log: RefCell::default(),
        }
    }

    fn take(&self, what: String) -> bool {
        if self.room.get() == 0 {
            return false;
        }
        self.room.set(self.room.get() - 1);
        self.log.borrow_mut().push(what);
        true
    }

    fn log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.borrow_mut())
    }
}

impl Sink for FakeSink {
    fn ack(&self, p: &Publish) -> bool {
        self.take(format!("ack {}", p.pkid))
    }
    fn subscribe(&self, sub: &Subscription) -> bool {
        self.take(format!("sub {}", sub.filter))
    }
    fn unsubscribe(&self, filter: &str) -> bool {
        self.take(format!("unsub {filter}"))
    }
    fn publish(&self, m: &Message) -> bool {
        self.take(format!("pub {}", String::from_utf8_lossy(&m.payload)))
    }
    fn disconnect(&self) -> bool {
        self.take("disconnect".into())
    }
}

fn sub(filter: &str) -> Subscription {
    Subscription {
        filter: filter.into(),
        qos: QoS::AtLeastOnce,
        as_published: false,
    }
}

fn received(core: &LinkCore, pkid: u16) -> Received {
    let mut p = Publish::new(
        "s/submit",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        "job",
        None,
    );
    p.pkid = pkid;
    Received::new(p, core.epoch()).unwrap()
}

#[test]
fn nothing_goes_out_before_the_connack_then_subscriptions_and_sticky_state_go_first() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.subscribe(sub("s/submit"), &sink).unwrap();
    core.publish(Message::event("s/ack", "early"), Keep::No, &sink)
        .unwrap();
    core.set_sticky(Message::state("s/status", "ready"), &sink)
        .unwrap();
    assert!(sink.log().is_empty(), "disconnected: everything waits");
    core.connected(None, None);
    core.pump(&sink);
    assert_eq!(sink.log(), ["sub s/submit", "pub ready", "pub early"]);
    assert!(core.snapshot().connected);
}

#[test]
fn a_full_channel_stops_the_pump_and_the_next_pump_resumes_in_order() {
    let sink = FakeSink::with_room(2);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.connected(None, None);
    for i in 0..4 {
        core.publish(Message::stream("s/hb", format!("{i}")), Keep::No, &sink)
            .unwrap();
    }
    assert_eq!(sink.log(), ["pub 0", "pub 1"]);
    assert_eq!((core.snapshot().queued, core.snapshot().in_flight), (2, 2));
    sink.room.set(10);
    core.pump(&sink);
    assert_eq!(sink.log(), ["pub 2", "pub 3"]);
}

#[test]
fn acks_are_sent_only_on_the_connection_the_message_came_on() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.connected(None, None);
    let r = received(&core, 7);
    assert_eq!(core.ack(&r, false, &sink), Ok(()), "automatic acks: no-op");
    assert!(sink.log().is_empty());
    core.ack(&r, true, &sink).unwrap();
    assert_eq!(sink.log(), ["ack 7"]);
    core.failed("broker gone".into());
    assert_eq!(core.ack(&r, true, &sink), Err(AckError::Stale));
    core.connected(None, None);
    assert_eq!(
        core.ack(&r, true, &sink),
        Err(AckError::Stale),
        "a new epoch"
    );
    assert_eq!(core.snapshot().last_error.as_deref(), Some("broker gone"));
}

#[test]
fn the_broker_limit_lowers_the_cap_and_refuses_oversize_messages() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1000, None);
    core.connected(Some(200), None);
    assert_eq!(core.max_payload("s/a"), 200 - 3 - PUBLISH_OVERHEAD);
    let err = core.publish(Message::event("s/a", vec![0u8; 300]), Keep::No, &sink);
    assert!(matches!(err, Err(PublishError::Oversize { max: 200, .. })));
    assert_eq!(core.snapshot().refused_oversize, 1);
    assert!(matches!(
        core.publish(Message::event("s/+", "x"), Keep::No, &sink),
        Err(PublishError::InvalidTopic(_))
    ));
    assert!(matches!(
        core.subscribe(sub("s/#/x"), &sink),
        Err(PublishError::InvalidTopic(_))
    ));
    core.connected(Some(5000), None);
    assert_eq!(
        core.max_payload("s/a"),
        1000 - 3 - PUBLISH_OVERHEAD,
        "ours is the cap"
    );
}

#[test]
fn a_queued_message_over_a_lowered_limit_is_discarded_not_sent() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1000, None);
    core.publish(Message::event("s/a", vec![b'x'; 500]), Keep::No, &sink)
        .unwrap();
    core.publish(Message::event("s/a", "small"), Keep::No, &sink)
        .unwrap();
    core.connected(Some(300), None);
    core.pump(&sink);
    assert_eq!(sink.log(), ["pub small"]);
    assert_eq!(core.snapshot().refused_oversize, 1);
}

#[test]
fn shutdown_sends_finals_then_disconnect_once_everything_is_acknowledged() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.connected(None, None);
    core.set_sticky(Message::state("s/status", "ready"), &sink)
        .unwrap();
    core.outbox.written(1);
    let until = Instant::now();
    core.begin_shutdown(vec![Message::stream("s/status", "offline")], until, &sink)
        .unwrap();
    assert_eq!(sink.log(), ["pub ready", "pub offline"]);
    assert_eq!(core.closing(), Some(until));
    assert!(matches!(
        core.publish(Message::event("s/a", "late"), Keep::No, &sink),
        Err(PublishError::Closed)
    ));
    core.outbox.written(2);
    core.outbox.acked(1);
    core.pump(&sink);
    assert!(
        sink.log().is_empty(),
        "the final message is not acknowledged yet"
    );
    core.outbox.acked(2);
    core.pump(&sink);
    assert_eq!(sink.log(), ["disconnect"]);
    core.pump(&sink);
    assert!(sink.log().is_empty(), "DISCONNECT once");
    core.task_ended();
    assert!(core.begin_shutdown(Vec::new(), until, &sink).is_err());
}

#[test]
fn an_idle_shutdown_while_disconnected_has_nothing_to_wait_for() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.begin_shutdown(Vec::new(), Instant::now(), &sink)
        .unwrap();
    assert!(core.idle_shutdown());
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.begin_shutdown(vec![Message::event("s/a", "x")], Instant::now(), &sink)
        .unwrap();
    assert!(
        !core.idle_shutdown(),
        "a final message waits for a connection"
    );
}

#[test]
fn after_an_error_the_dead_connections_acks_and_subscriptions_are_dropped() {
    let sink = FakeSink::with_room(0);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.subscribe(sub("s/submit"), &sink).unwrap();
    core.connected(None, None);
    let r = received(&core, 3);
    core.ack(&r, true, &sink).unwrap();
    core.publish(Message::event("s/a", "1"), Keep::No, &sink)
        .unwrap();
    core.failed("reset".into());
    let requeued = core.recover(Vec::new());
    assert_eq!(requeued.requeued, 0, "nothing was handed over");
    sink.room.set(100);
    core.connected(None, None);
    core.pump(&sink);
    assert_eq!(sink.log(), ["sub s/submit", "pub 1"], "no stale ack");
}

#[test]
fn the_intake_stays_open_while_the_task_waits_for_the_application() {
    let sink = FakeSink::with_room(0);
    let mut core = LinkCore::new(1, 1 << 20, None);
    core.publish(Message::event("s/a", "1"), Keep::No, &sink)
        .unwrap();
    assert!(!core.has_room());
    core.set_delivery_blocked(true);
    assert!(core.has_room(), "waiting for room here would deadlock");
    core.set_delivery_blocked(false);
    assert!(!core.has_room());
}

#[test]
fn subacks_count_on_the_current_connection_only() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.subscribe(sub("a/+"), &sink).unwrap();
    core.subscribe(sub("b/+"), &sink).unwrap();
    core.connected(None, None);
    core.pump(&sink);
    core.subscribed();
    core.subscribed();
    assert_eq!(core.snapshot().subacks, 2);
    core.failed("gone".into());
    core.connected(None, None);
    assert_eq!(core.snapshot().subacks, 0, "re-issued: answered again");
    core.subscribed();
    assert_eq!(core.snapshot().subacks, 1);
}

#[test]
fn an_unsubscribed_filter_is_unsubscribed_in_order_and_not_reissued() {
    let sink = FakeSink::with_room(100);
    let mut core = LinkCore::new(8, 1 << 20, None);
    core.subscribe(sub("a/output"), &sink).unwrap();
    core.subscribe(sub("b/output"), &sink).unwrap();
    core.connected(None, None);
    core.pump(&sink);
    assert_eq!(sink.log(), ["sub a/output", "sub b/output"]);

    // Unsubscribe, subscribe again and unsubscribe, while the sink is full: they go out in
    // the order asked, so the broker ends unsubscribed.
    sink.room.set(0);
    core.unsubscribe("a/output".into(), &sink).unwrap();
    core.subscribe(sub("a/output"), &sink).unwrap();
    core.unsubscribe("a/output".into(), &sink).unwrap();
    sink.room.set(100);
    core.pump(&sink);
    assert_eq!(
        sink.log(),
        ["unsub a/output", "sub a/output", "unsub a/output"]
    );

    // A new connection re-issues only what is still subscribed.
    core.connected(None, None);
    core.pump(&sink);
    assert_eq!(sink.log(), ["sub b/output"]);

    // An unsubscription asked while disconnected survives the error and goes first on the
    // next connection (a persistent session still holds the subscription).
    core.failed("gone".into());
    core.unsubscribe("b/output".into(), &sink).unwrap();
    core.recover(Vec::new());
    assert!(sink.log().is_empty());
    core.connected(None, None);
    core.pump(&sink);
    assert_eq!(sink.log(), ["unsub b/output"]);

    assert!(matches!(
        core.unsubscribe("bad/#/filter".into(), &sink),
        Err(PublishError::InvalidTopic(_))
    ));
}
