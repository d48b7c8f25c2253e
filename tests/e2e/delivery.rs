//! Events reach Kafka with the right topic, key, value, headers and timestamp, complete and in
//! per-key order, and outbox.status() reports the delivery.

use outbox_tests::{streaming_relay, Collector, DEADLINE};
use std::collections::{HashMap, HashSet};

#[test]
fn record_has_topic_key_value_headers_and_commit_timestamp() {
    let (kafka, pg) = streaming_relay(&["outbox.event.order"], &[]);
    let before_ms: i64 = pg.sql("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").parse().unwrap();
    let id = pg.sql(
        "SELECT outbox.emit('order', 'o-42', 'OrderCreated', \
         '{\"amount\": 42.5, \"lines\": [{\"sku\": \"A-1\"}], \"note\": \"é ü\"}', \
         '{\"traceparent\": \"00-abc-01\", \"tenant\": \"acme\"}')",
    );
    let after_ms: i64 = pg.sql("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").parse().unwrap();

    let mut c = Collector::new(&kafka.bootstrap, &[("outbox.event.order", 3)]);
    c.until_count(1, DEADLINE);
    let r = &c.records[0];
    assert_eq!(r.topic, "outbox.event.order");
    assert_eq!(r.key.as_deref(), Some("o-42"));
    assert_eq!(r.value.as_deref(), Some(r#"{"note": "é ü", "lines": [{"sku": "A-1"}], "amount": 42.5}"#));
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["id", "type", "aggregatetype", "tenant", "traceparent"]);
    assert_eq!(r.header("id"), Some(id.as_str()));
    assert_eq!(r.header("type"), Some("OrderCreated"));
    assert_eq!(r.header("aggregatetype"), Some("order"));
    assert_eq!(r.header("traceparent"), Some("00-abc-01"));
    assert_eq!(r.header("tenant"), Some("acme"));
    // The id is a UUIDv7.
    assert_eq!(&id[14..15], "7", "{id}");
    // The timestamp is the commit time.
    let ts = r.timestamp_ms.expect("timestamp set");
    assert!(before_ms <= ts && ts <= after_ms, "{before_ms} <= {ts} <= {after_ms}");

    // outbox.status() reports the delivery and the slot catches up.
    outbox_tests::wait_until("status to count the delivery", DEADLINE, || {
        pg.status("events_delivered") == "1"
    });
    assert_eq!(pg.status("state"), "streaming");
    assert_eq!(pg.status("slot_name"), "outbox_ext");
    assert_ne!(pg.status("last_delivery_at"), "");
    assert_eq!(pg.status("last_error"), "");
    assert!(pg.worker_pid().is_some());
    outbox_tests::wait_until("pending_bytes to drop to zero", DEADLINE, || pg.status("pending_bytes") == "0");

    // An idle outbox does not pin WAL: the slot follows unrelated writes.
    let before = pg.status("confirmed_lsn");
    pg.sql("CREATE TABLE noise AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g");
    outbox_tests::wait_until("the slot to pass unrelated WAL", DEADLINE, || {
        pg.status("pending_bytes").parse::<i64>().is_ok_and(|b| b < 64 * 1024)
    });
    let moved = pg.sql(&format!("SELECT confirmed_lsn - '{before}'::pg_lsn > 1000000 FROM outbox.status()"));
    assert_eq!(moved, "t");
}

#[test]
fn ten_thousand_events_over_fifty_keys_arrive_complete_and_in_key_order() {
    let topic = "outbox.event.bulk";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    const EVENTS: i64 = 10_000;
    const KEYS: i64 = 50;
    // Twenty transactions of 500 events, each key's seq rising in emit order.
    for batch in 0..20 {
        pg.sql(&format!(
            "SELECT count(outbox.emit('bulk', 'agg-' || (i % {KEYS}), 'Tick', jsonb_build_object('seq', i))) \
             FROM generate_series({} , {}) AS i",
            batch * 500,
            batch * 500 + 499
        ));
    }
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_count(EVENTS as usize, DEADLINE);

    let mut seen = HashSet::new();
    let mut partitions_of_key: HashMap<String, HashSet<i32>> = HashMap::new();
    for (key, records) in c.by_key() {
        let seqs: Vec<i64> = records.iter().map(|r| r.json()["seq"].as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "key {key} out of order: {seqs:?}");
        for r in &records {
            partitions_of_key.entry(key.clone()).or_default().insert(r.partition);
            seen.insert(r.json()["seq"].as_i64().unwrap());
        }
    }
    assert_eq!(seen.len() as i64, EVENTS, "every event arrives");
    assert_eq!(c.records.len() as i64, EVENTS, "no duplicates in a clean run");
    assert_eq!(partitions_of_key.len() as i64, KEYS);
    assert!(partitions_of_key.values().all(|p| p.len() == 1), "a key stays on one partition");
    let used: HashSet<i32> = c.records.iter().map(|r| r.partition).collect();
    assert_eq!(used.len(), 3, "keys spread over all 3 partitions");
    outbox_tests::wait_until("status to count every delivery", DEADLINE, || {
        pg.status("events_delivered") == EVENTS.to_string()
    });
}
