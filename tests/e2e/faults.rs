//! Broker faults under a live write load, injected into librdkafka's mock cluster. Each
//! scenario ends with the checker: 0 lost, 0 phantom, 0 order violations, 0 duplicates.
//!
//! Where the relay rewinds (a delivery failed, the producer was rebuilt), it decodes again from
//! the confirmed position, and the events Kafka acknowledged after it are found in their
//! partitions' tails instead of being sent again (`outbox.exactly_once`).

use outbox_tests::{
    check, holds_for, streaming_relay, wait_until, Collector, Emitted, Load, LoadShape, MockKafka, PgCluster, DEADLINE,
};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::time::{Duration, Instant};

const BROKERS: [i32; 3] = [1, 2, 3];

/// A streaming relay, a consumer of its topic, and a write load that is already running.
struct Scenario {
    kafka: MockKafka,
    pg: PgCluster,
    consumer: Collector,
    load: Load,
    topic: String,
}

impl Scenario {
    /// Starts everything for events of `aggregatetype` and lets `warmup` events commit.
    fn start(aggregatetype: &str, settings: &[(&str, &str)], shape: LoadShape, warmup: usize) -> Scenario {
        let topic = format!("outbox.event.{aggregatetype}");
        let (kafka, pg) = streaming_relay(&[&topic], settings);
        let consumer = Collector::new(&kafka.bootstrap, &[(&topic, 3)]);
        let load = Load::start(&pg, aggregatetype, shape);
        load.wait_for_committed(warmup);
        Scenario { kafka, pg, consumer, load, topic }
    }

    /// Lets `n` more events commit.
    fn more(&self, n: usize) {
        let before = self.load.committed();
        self.load.wait_for_committed(before + n);
    }

    /// Stops the load, consumes every committed event, and asserts the checker's verdict.
    fn finish(mut self, name: &str) -> Emitted {
        let emitted = self.load.stop();
        self.consumer.until_all(&emitted, DEADLINE);
        let report = check(&emitted, &self.consumer.records);
        eprintln!("[{name}] {report}");
        report.assert_ok(name, 0);
        emitted
    }

    fn all_brokers(&self, up: bool) {
        for b in BROKERS {
            if up {
                self.kafka.broker_up(b);
            } else {
                self.kafka.broker_down(b);
            }
        }
    }
}

#[test]
fn all_brokers_down_for_ten_seconds() {
    let s = Scenario::start("down", &[], LoadShape::default(), 2000);
    s.all_brokers(false);
    s.pg.wait_for_state("kafka_unavailable", DEADLINE);
    let confirmed = s.pg.status("confirmed_lsn");
    holds_for("the slot standing still during the outage", Duration::from_secs(10), || {
        s.pg.sql(&format!("SELECT confirmed_lsn = '{confirmed}'::pg_lsn FROM outbox.status()")) == "t"
    });
    s.all_brokers(true);
    s.more(2000);
    s.finish("brokers down 10 s");
}

#[test]
fn outage_longer_than_message_timeout_keeps_key_order() {
    let s = Scenario::start("timeout", &[("outbox.kafka_properties", "message.timeout.ms=2000")], LoadShape::default(), 2000);
    s.all_brokers(false);
    // Long enough for queued records to time out and the relay to rewind at least once.
    wait_until("a delivery to time out", DEADLINE, || s.pg.status("last_error").contains("timed out"));
    s.more(1000);
    s.all_brokers(true);
    s.more(2000);
    s.finish("outage past message.timeout.ms");
}

#[test]
fn retriable_produce_errors_and_disconnects() {
    let s = Scenario::start("retry", &[], LoadShape::default(), 1000);
    use RDKafkaRespErr::*;
    let errors = [
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR__TRANSPORT,
    ];
    for _ in 0..3 {
        s.kafka.cluster.request_errors(RDKafkaApiKey::Produce, &errors.repeat(3));
        s.more(1000);
    }
    s.finish("retriable produce errors");
}

#[test]
fn round_trip_longer_than_request_timeout() {
    let s = Scenario::start("slow", &[("outbox.kafka_properties", "request.timeout.ms=1000")], LoadShape::default(), 1000);
    for b in BROKERS {
        s.kafka.cluster.broker_round_trip_time(b, Duration::from_millis(1500)).unwrap();
    }
    s.more(1000);
    for b in BROKERS {
        s.kafka.cluster.broker_round_trip_time(b, Duration::ZERO).unwrap();
    }
    s.more(1000);
    s.finish("round trip > request.timeout.ms");
}

#[test]
fn partition_leaders_move_and_one_partition_has_none_for_twenty_seconds() {
    let s = Scenario::start("leader", &[], LoadShape::default(), 1000);
    let mock = &s.kafka.cluster;
    // Leaders move mid-stream.
    mock.partition_leader(&s.topic, 0, Some(2)).unwrap();
    mock.partition_leader(&s.topic, 1, Some(1)).unwrap();
    mock.partition_leader(&s.topic, 2, Some(3)).unwrap();
    s.more(1000);
    // Partition 2 has no reachable leader for 20 s: its leader's broker is down. (The mock
    // cluster crashes on a leader of -1, so "no leader" is a leader that does not answer.)
    s.kafka.broker_down(3);
    let leaderless_until = Instant::now() + Duration::from_secs(20);
    wait_until("20 s without a leader", Duration::from_secs(30), || Instant::now() >= leaderless_until);
    mock.partition_leader(&s.topic, 2, Some(1)).unwrap();
    s.kafka.broker_up(3);
    s.more(1000);
    s.finish("leader moves, 20 s leaderless");
}

#[test]
fn fatal_idempotence_error_rebuilds_the_producer() {
    // One request in flight per broker: the mock checks producer sequence numbers only for
    // transactional producers (rd_kafka_mock_validate_records), so it would append a batch that
    // was in flight behind the refused one, out of order, where a real broker refuses it with
    // the same error. The relay's rebuild and resend are what this test is about.
    let props = "max.in.flight.requests.per.connection=1";
    let s = Scenario::start("fatal", &[("outbox.kafka_properties", props)], LoadShape::default(), 1000);
    s.kafka.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    wait_until("the relay to report the fatal error", DEADLINE, || !s.pg.status("last_error").is_empty());
    s.more(2000);
    s.finish("fatal producer error");
}

#[test]
fn sixteen_writers_with_rollbacks_and_savepoint_rollbacks() {
    let shape = LoadShape { writers: 16, batch: 10, keys: 5, rollback_every: 4, savepoint_every: 3 };
    let s = Scenario::start("many", &[("max_connections", "50")], shape, 5000);
    let emitted = s.finish("16 writers with rollbacks");
    assert!(!emitted.rolled_back.is_empty());
}

#[test]
fn sighup_with_new_bootstrap_servers_while_streaming() {
    let s = Scenario::start("hup", &[], LoadShape::default(), 2000);
    // The same brokers listed the other way round: a new producer, nothing else changes.
    let reversed: Vec<&str> = s.kafka.bootstrap.split(',').rev().collect();
    s.pg.set("outbox.bootstrap_servers", &reversed.join(","));
    s.more(2000);
    s.finish("SIGHUP new bootstrap_servers");
}

/// Emits one event of `aggregatetype` (also its key) with a payload of about `size` bytes, in a transaction of
/// its own; returns its id.
fn emit_one(pg: &PgCluster, aggregatetype: &str, size: usize) -> String {
    pg.sql(&format!(
        "SELECT outbox.emit('{aggregatetype}', '{aggregatetype}', 'Probe', jsonb_build_object('pad', repeat('x', {size})))"
    ))
}

/// Waits until the relay stops on a permanent error that names `id` (when given) and says
/// `why`, then checks that it stays stopped: no delivery, no slot movement, no retry.
fn stopped_on(s: &Scenario, id: Option<&str>, why: &str) {
    s.pg.wait_for_state("delivery_error", DEADLINE);
    let error = s.pg.status("last_error");
    assert!(error.contains(why), "last_error should say {why:?}: {error}");
    if let Some(id) = id {
        assert!(error.contains(id), "last_error should name event {id}: {error}");
    }
    assert!(error.contains("outbox.resume()"), "last_error should say what to do: {error}");
    let before = s.pg.sql("SELECT events_delivered || ' ' || confirmed_lsn FROM outbox.status()");
    holds_for("the relay staying stopped at the event", Duration::from_secs(3), || {
        s.pg.sql("SELECT state || ' ' || events_delivered || ' ' || confirmed_lsn FROM outbox.status()")
            == format!("delivery_error {before}")
    });
}

fn resume(s: &Scenario) {
    assert_eq!(s.pg.sql("SELECT outbox.resume()"), "t");
    s.pg.wait_for_state("streaming", DEADLINE);
}

#[test]
fn permanent_errors_stop_the_relay_until_an_operator_acts() {
    use RDKafkaRespErr::*;
    let props = "allow.auto.create.topics=false;topic.metadata.propagation.max.ms=1000";
    let s = Scenario::start("perm", &[("outbox.kafka_properties", props)], LoadShape::default(), 1000);
    let mock = &s.kafka.cluster;
    let mut probes = Emitted::default();
    s.kafka.create_topic("outbox.event.big", 3);

    // Not authorized to write one aggregatetype's topic; the operator grants it.
    s.kafka.create_topic("outbox.event.secret", 1);
    mock.topic_error("outbox.event.secret", RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).unwrap();
    let id = emit_one(&s.pg, "secret", 10);
    stopped_on(&s, Some(&id), "Topic authorization failed");
    probes.commit(id, "secret");
    mock.topic_error("outbox.event.secret", RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
    resume(&s);
    s.more(500);

    // A topic that does not exist and may not be auto-created; the operator creates it.
    let id = emit_one(&s.pg, "missing", 10);
    stopped_on(&s, Some(&id), "Unknown topic or partition");
    probes.commit(id, "missing");
    s.kafka.create_topic("outbox.event.missing", 1);
    resume(&s);
    s.more(500);

    // The broker refuses a batch as too large; the operator raises the broker's limit.
    mock.request_errors(RDKafkaApiKey::Produce, &[RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
    stopped_on(&s, None, "Message size too large");
    resume(&s);
    s.more(500);

    // An event larger than the producer's message.max.bytes (outbox.max_record_bytes), which
    // emit cannot refuse: the limit was lowered while the event waited in WAL. The operator
    // raises it again, and the reload resumes the relay.
    s.pg.set("outbox.bootstrap_servers", "");
    s.pg.wait_for_state("unconfigured", DEADLINE);
    let id = emit_one(&s.pg, "big", 5000);
    s.pg.sql("ALTER SYSTEM SET outbox.max_record_bytes = 4000");
    s.pg.set("outbox.bootstrap_servers", &s.kafka.bootstrap);
    stopped_on(&s, Some(&id), "Message size too large");
    probes.commit(id, "big");
    s.pg.set("outbox.max_record_bytes", "1000000");
    s.pg.wait_for_state("streaming", DEADLINE);
    s.more(500);

    let mut probe_consumer = Collector::new(
        &s.kafka.bootstrap,
        &[("outbox.event.secret", 1), ("outbox.event.missing", 1), ("outbox.event.big", 3)],
    );
    probe_consumer.until_all(&probes, DEADLINE);
    check(&probes, &probe_consumer.records).assert_ok("permanent errors: refused events", probes.committed.len());
    s.finish("permanent errors: the load around them");
}
