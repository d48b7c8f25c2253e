//! Broker faults under a live write load, injected into librdkafka's mock cluster. Each
//! scenario ends with the checker: 0 lost, 0 phantom, 0 order violations, and duplicates
//! within the stated bound.
//!
//! Duplicate bounds: a clean scenario allows none. Where the relay rewinds (a delivery failed,
//! the producer was rebuilt), events acknowledged after the confirmed position are sent again,
//! at most once per rewind; the bound allows one resend of every committed event.

use outbox_tests::{check, streaming_relay, wait_until, Collector, Load, LoadShape, DEADLINE};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::time::{Duration, Instant};

const BROKERS: [i32; 3] = [1, 2, 3];

/// Runs `check` over `duration` and fails if it ever returns false: for invariants that must
/// hold throughout a fault, not for synchronisation.
fn holds_for(what: &str, duration: Duration, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        assert!(check(), "{what} stopped holding");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn all_brokers_down_for_ten_seconds() {
    let topic = "outbox.event.down";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let load = Load::start(&pg, "down", LoadShape::default());
    load.wait_for_committed(2000);
    for b in BROKERS {
        kafka.cluster.broker_down(b).unwrap();
    }
    pg.wait_for_state("kafka_unavailable", DEADLINE);
    let confirmed = pg.status("confirmed_lsn");
    holds_for("the slot standing still during the outage", Duration::from_secs(10), || {
        pg.sql(&format!("SELECT confirmed_lsn = '{confirmed}'::pg_lsn FROM outbox.status()")) == "t"
    });
    for b in BROKERS {
        kafka.cluster.broker_up(b).unwrap();
    }
    let before = load.committed();
    load.wait_for_committed(before + 2000);
    let emitted = load.stop();
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("brokers down 10 s", emitted.committed.len());
}

#[test]
fn outage_longer_than_message_timeout_keeps_key_order() {
    let topic = "outbox.event.timeout";
    let (kafka, pg) = streaming_relay(&[topic], &[("outbox.kafka_properties", "message.timeout.ms=2000")]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let load = Load::start(&pg, "timeout", LoadShape::default());
    load.wait_for_committed(2000);
    for b in BROKERS {
        kafka.cluster.broker_down(b).unwrap();
    }
    // Long enough for queued records to time out and the relay to rewind at least once.
    wait_until("a delivery to time out", DEADLINE, || pg.status("last_error").contains("timed out"));
    let before = load.committed();
    load.wait_for_committed(before + 1000);
    for b in BROKERS {
        kafka.cluster.broker_up(b).unwrap();
    }
    let before = load.committed();
    load.wait_for_committed(before + 2000);
    let emitted = load.stop();
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("outage past message.timeout.ms", emitted.committed.len());
}

#[test]
fn retriable_produce_errors_and_disconnects() {
    let topic = "outbox.event.retry";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let load = Load::start(&pg, "retry", LoadShape::default());
    load.wait_for_committed(1000);
    use RDKafkaRespErr::*;
    let errors = [
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR__TRANSPORT,
    ];
    for round in 0..3 {
        kafka.cluster.request_errors(RDKafkaApiKey::Produce, &errors.repeat(3));
        let before = load.committed();
        load.wait_for_committed(before + 1000);
        eprintln!("round {round}: pushed {} produce errors", errors.len() * 3);
    }
    let emitted = load.stop();
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("retriable produce errors", emitted.committed.len());
}

#[test]
fn round_trip_longer_than_request_timeout() {
    let topic = "outbox.event.slow";
    let (kafka, pg) = streaming_relay(&[topic], &[("outbox.kafka_properties", "request.timeout.ms=1000")]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let load = Load::start(&pg, "slow", LoadShape::default());
    load.wait_for_committed(1000);
    for b in BROKERS {
        kafka.cluster.broker_round_trip_time(b, Duration::from_millis(1500)).unwrap();
    }
    let before = load.committed();
    load.wait_for_committed(before + 1000);
    for b in BROKERS {
        kafka.cluster.broker_round_trip_time(b, Duration::ZERO).unwrap();
    }
    let before = load.committed();
    load.wait_for_committed(before + 1000);
    let emitted = load.stop();
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("round trip > request.timeout.ms", emitted.committed.len());
}

#[test]
fn partition_leaders_move_and_one_partition_has_none_for_twenty_seconds() {
    let topic = "outbox.event.leader";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let load = Load::start(&pg, "leader", LoadShape::default());
    load.wait_for_committed(1000);
    // Leaders move mid-stream.
    kafka.cluster.partition_leader(topic, 0, Some(2)).unwrap();
    kafka.cluster.partition_leader(topic, 1, Some(1)).unwrap();
    kafka.cluster.partition_leader(topic, 2, Some(3)).unwrap();
    let before = load.committed();
    load.wait_for_committed(before + 1000);
    // Partition 2 has no reachable leader for 20 s: its leader's broker is down. (The mock
    // cluster crashes on a leader of -1, so "no leader" is a leader that does not answer.)
    kafka.cluster.broker_down(3).unwrap();
    let leaderless_until = Instant::now() + Duration::from_secs(20);
    wait_until("20 s without a leader", Duration::from_secs(30), || Instant::now() >= leaderless_until);
    kafka.cluster.partition_leader(topic, 2, Some(1)).unwrap();
    kafka.cluster.broker_up(3).unwrap();
    let before = load.committed();
    load.wait_for_committed(before + 1000);
    let emitted = load.stop();
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("leader moves, 20 s leaderless", emitted.committed.len());
}

#[test]
fn fatal_idempotence_error_rebuilds_the_producer() {
    let topic = "outbox.event.fatal";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let load = Load::start(&pg, "fatal", LoadShape::default());
    load.wait_for_committed(1000);
    kafka.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    wait_until("the relay to report the fatal error", DEADLINE, || !pg.status("last_error").is_empty());
    let before = load.committed();
    load.wait_for_committed(before + 2000);
    let emitted = load.stop();
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("fatal producer error", emitted.committed.len());
}

#[test]
fn sixteen_writers_with_rollbacks_and_savepoint_rollbacks() {
    let topic = "outbox.event.many";
    let (kafka, pg) = streaming_relay(&[topic], &[("max_connections", "50")]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let shape = LoadShape { writers: 16, batch: 10, keys: 5, rollback_every: 4, savepoint_every: 3 };
    let load = Load::start(&pg, "many", shape);
    load.wait_for_committed(5000);
    let emitted = load.stop();
    assert!(!emitted.rolled_back.is_empty());
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("16 writers with rollbacks", 0);
}

#[test]
fn sighup_with_new_bootstrap_servers_while_streaming() {
    let topic = "outbox.event.hup";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let load = Load::start(&pg, "hup", LoadShape::default());
    load.wait_for_committed(2000);
    // The same brokers listed the other way round: a new producer, nothing else changes.
    let reversed: Vec<&str> = kafka.bootstrap.split(',').rev().collect();
    pg.set("outbox.bootstrap_servers", &reversed.join(","));
    let before = load.committed();
    load.wait_for_committed(before + 2000);
    let emitted = load.stop();
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("SIGHUP new bootstrap_servers", emitted.committed.len());
}
