//! The outbox policy, without a broker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

fn payloads(o: &Outbox) -> Vec<String> {
    o.queue
        .iter()
        .map(|e| String::from_utf8_lossy(&e.msg.payload).into_owned())
        .collect()
}

/// Hands every sendable message to a rumqttc that accepts all, and reports them written with
/// packet ids from `first_pkid`.
fn send_all(o: &mut Outbox, first_pkid: u16) -> Vec<String> {
    let mut sent = Vec::new();
    let mut pkid = first_pkid;
    while let Some(m) = o.sendable() {
        sent.push(String::from_utf8_lossy(&m.payload).into_owned());
        o.mark_handed();
        assert!(o.written(pkid));
        pkid += 1;
    }
    sent
}

#[test]
fn a_burst_of_acks_past_capacity_drops_only_output_and_closes_the_intake() {
    let count = Arc::new(AtomicU64::new(0));
    let c2 = count.clone();
    let hook = DropHook::new(move |m: &Message| {
        assert_eq!(m.topic, "s/output", "only output is dropped");
        c2.fetch_add(1, Ordering::Relaxed);
    });
    let mut o = Outbox::new(8, Some(hook));
    assert!(o.has_room());
    // 1000 submissions answered while nothing drains: an ack each, and output in between.
    for i in 0..1000 {
        o.push(
            Message::event("s/submit_status", format!("ack {i}")),
            Keep::No,
        );
        // Output is QoS 1 as well: marked as output, it is dropped and never counted.
        o.push(
            Message::event("s/output", format!("line {i}")),
            Keep::Output,
        );
        if i == 6 {
            assert!(o.has_room(), "7 acks wait, capacity 8");
        }
        if i == 7 {
            assert!(!o.has_room(), "8 acks wait: take no more submissions");
        }
    }
    let want: Vec<String> = (0..1000).map(|i| format!("ack {i}")).collect();
    assert_eq!(
        payloads(&o),
        want,
        "every ack kept, in order; no output left"
    );
    assert_eq!(o.dropped(), 1000);
    assert_eq!(count.load(Ordering::Relaxed), 1000, "on_drop saw each drop");
    assert_eq!((o.reliable_queued(), o.queued()), (1000, 1000));
    assert!(!o.has_room());
    // The backlog draining below the capacity opens the intake.
    o.queue.drain(..993);
    assert!(o.has_room());
}

#[test]
fn output_under_capacity_is_kept_and_the_oldest_goes_first() {
    let mut o = Outbox::new(3, None);
    for i in 0..5 {
        o.push(Message::stream("s/output", format!("{i}")), Keep::Output);
    }
    assert_eq!(payloads(&o), ["2", "3", "4"]);
    assert_eq!(o.dropped(), 2);
    assert!(o.has_room(), "output never closes the intake");
    // A QoS 0 message that is not output (a heartbeat) is never dropped: output goes.
    for i in 0..3 {
        o.push(Message::stream("s/heartbeat", format!("h{i}")), Keep::No);
    }
    assert_eq!(payloads(&o), ["h0", "h1", "h2"]);
    o.push(Message::stream("s/heartbeat", "h3"), Keep::No);
    assert_eq!(o.queued(), 4, "no output left to drop: the outbox grows");
    assert_eq!(o.dropped(), 5);
}

#[test]
fn sticky_states_do_not_count_against_the_intake_but_each_values_do() {
    let mut o = Outbox::new(2, None);
    for t in ["s/agent", "s/a2", "s/a3"] {
        o.set_sticky(Message::state(t, "x"), true);
    }
    assert!(o.has_room());
    for _ in 0..2 {
        o.push_each(Message::state("s/last_job", "y"));
    }
    assert!(!o.has_room());
    o.push(Message::event("s/x", "z"), Keep::No);
    assert_eq!(o.queued(), 6, "nothing but output is dropped");
}

#[test]
fn a_queued_sticky_value_is_replaced_and_nothing_is_queued_while_disconnected() {
    let mut o = Outbox::new(8, None);
    o.set_sticky(Message::state("s/agent", "a"), false);
    assert_eq!(o.queued(), 0, "disconnected: the ConnAck sends it");
    o.connected(None);
    assert_eq!(payloads(&o), ["a"]);
    o.set_sticky(Message::state("s/agent", "b"), true);
    assert_eq!(payloads(&o), ["b"], "coalesced into the queued value");
    assert_eq!(o.coalesced(), 1);
}

#[test]
fn connack_puts_sticky_values_first_except_behind_a_queued_each_value() {
    let mut o = Outbox::new(8, None);
    o.set_sticky(Message::state("s/agent", "ready"), false);
    o.push_each(Message::state("s/last_job", "job 1"));
    o.push(Message::event("s/ack", "ack"), Keep::No);
    o.connected(Some(10));
    assert_eq!(payloads(&o), ["ready", "job 1", "ack"]);
    assert_eq!(o.window, 9, "receive maximum minus one");
    // Every ConnAck replaces the queued sticky value rather than adding one.
    o.set_sticky(Message::state("s/agent", "busy"), true);
    o.connected(None);
    assert_eq!(payloads(&o), ["busy", "job 1", "ack"]);
    assert_eq!(o.window, INFLIGHT_UPPER_LIMIT as usize - 1);
    // Once sent, the latest Each value is republished on the next ConnAck.
    send_all(&mut o, 1);
    o.connected(None);
    assert_eq!(payloads(&o), ["busy", "job 1"]);
}

#[test]
fn the_window_holds_back_qos1_but_not_qos0() {
    let mut o = Outbox::new(8, None);
    o.connected(Some(2)); // window 1
    o.push(Message::event("s/a", "1"), Keep::No);
    o.push(Message::event("s/a", "2"), Keep::No);
    o.push(Message::stream("s/hb", "h"), Keep::No);
    assert_eq!(send_all(&mut o, 1), ["1"], "one QoS 1 in flight at most");
    assert!(
        o.sendable().is_none(),
        "QoS 0 behind QoS 1 waits its turn (FIFO)"
    );
    assert!(o.acked(1));
    assert!(!o.acked(1), "an unknown PUBACK is reported");
    assert_eq!(send_all(&mut o, 2), ["2", "h"], "QoS 0 needs no window");
    assert!(o.acked(2));
    assert!(o.drained());
    assert!(!o.written(9), "a write the link did not hand over");
}

#[test]
fn an_oversize_message_at_the_front_is_discarded() {
    let mut o = Outbox::new(8, None);
    o.push(Message::event("s/a", vec![0u8; 500]), Keep::No);
    o.push(Message::event("s/a", "small"), Keep::No);
    assert!(o.pop_oversize(1000).is_none());
    let big = o.pop_oversize(200).expect("over the lowered limit");
    assert_eq!(big.payload.len(), 500);
    assert!(o.pop_oversize(200).is_none());
    assert_eq!(payloads(&o), ["small"]);
}

#[test]
fn a_connection_error_requeues_unfinished_messages_in_order() {
    let mut o = Outbox::new(8, None);
    o.connected(None);
    o.set_sticky(Message::state("s/agent", "ready"), true);
    for i in 1..=4 {
        o.push(Message::event("s/a", format!("{i}")), Keep::No);
    }
    // "ready" and 1 to 4 written, 1 acknowledged; "h" still queued.
    send_all(&mut o, 10);
    assert!(o.acked(11));
    o.push(Message::stream("s/hb", "h"), Keep::No);
    let r = o.requeue(vec![
        Message::event("s/a", "2"),           // tracked: not duplicated
        Message::event("s/other", "unknown"), // not tracked: requeued first
        Message::state("s/agent", "stale"),   // a sticky value: the ConnAck sends the latest
    ]);
    assert_eq!(
        r,
        Requeued {
            requeued: 4,
            unknown: 2
        }
    );
    assert_eq!(payloads(&o), ["unknown", "2", "3", "4", "h"]);
    assert_eq!(o.in_flight(), 0);
    o.connected(None);
    assert_eq!(payloads(&o), ["ready", "unknown", "2", "3", "4", "h"]);
}

#[test]
fn a_collided_publish_is_the_next_written() {
    let mut o = Outbox::new(8, None);
    o.connected(None);
    o.push(Message::event("s/a", "1"), Keep::No);
    o.push(Message::event("s/a", "2"), Keep::No);
    o.mark_handed();
    o.mark_handed();
    o.collided();
    assert_eq!(o.in_flight(), 2);
    assert!(o.written(5)); // the collided one, "1"
    assert!(o.written(6));
    assert!(o.acked(5) && o.acked(6));
    assert!(o.drained());
}

#[test]
fn a_final_message_replaces_the_sticky_value_for_good() {
    let mut o = Outbox::new(8, None);
    o.set_sticky(Message::state("s/agent", "ready"), false);
    o.connected(None);
    o.push_final(Message::state("s/agent", "offline"));
    assert_eq!(payloads(&o), ["offline"]);
    send_all(&mut o, 1);
    o.requeue(Vec::new());
    o.connected(None);
    assert_eq!(
        payloads(&o),
        ["offline"],
        "requeued; the old value is not republished"
    );
}

#[test]
fn requeued_output_is_still_dropped_first_on_overflow() {
    let mut o = Outbox::new(2, None);
    o.connected(None);
    o.push(Message::event("s/output", "o1"), Keep::Output);
    o.push(Message::event("s/ack", "a1"), Keep::No);
    send_all(&mut o, 1);
    o.push(Message::event("s/ack", "a2"), Keep::No);
    o.requeue(Vec::new());
    assert_eq!(payloads(&o), ["a1", "a2"], "the output went, the acks stay");
    assert_eq!(o.dropped(), 1);
}
