//! The relay process and the server fail around it: SIGKILL, immediate stop, transactions
//! and prepared transactions open across restarts, and other clients reaching for its slot.

use outbox_tests::{check, streaming_relay, wait_until, Collector, Emitted, PgCluster, DEADLINE};

/// Emits `batches` transactions of `size` events on keys `{prefix}0..9`, all committed.
fn emit_committed(pg: &PgCluster, emitted: &mut Emitted, aggregatetype: &str, batches: i64, size: i64) {
    let start = emitted.committed.len() as i64;
    for b in 0..batches {
        for (id, key) in pg.emit_batch(aggregatetype, "k", 10, start + b * size, size, true) {
            emitted.commit(id, key);
        }
    }
}

fn wait_for_new_worker(pg: &PgCluster, old: i32) {
    wait_until("the server to accept connections", DEADLINE, || pg.try_sql("SELECT 1").is_ok());
    wait_until("a new relay worker", DEADLINE, || {
        pg.try_sql("SELECT worker_pid FROM outbox.status() WHERE state = 'streaming'")
            .is_ok_and(|p| !p.is_empty() && p != old.to_string())
    });
}

/// Kills the relay three times while it streams a backlog, with `settings`, and returns what
/// arrived against what committed.
fn worker_sigkilled_three_times(name: &str, settings: &[(&str, &str)]) -> (outbox_tests::Report, PgCluster) {
    let topic = format!("outbox.event.{name}");
    let (kafka, pg) = streaming_relay(&[&topic], settings);
    let mut c = Collector::new(&kafka.bootstrap, &[(&topic, 3)]);
    let mut emitted = Emitted::default();
    for round in 0..3 {
        // A backlog written while the relay is frozen, so that it is mid-stream when killed.
        // (Kept to 20,000 events a round: the mock broker's fetch slows down on long logs.)
        let pid = pg.worker_pid().expect("worker");
        let before = c.records.len();
        pg.signal(pid, "STOP");
        emit_committed(&pg, &mut emitted, name, 2, 10_000);
        pg.signal(pid, "CONT");
        // Kill it as soon as the first records of the backlog arrive.
        c.until("the backlog to start arriving", DEADLINE, |r| r.len() > before);
        pg.signal(pid, "KILL");
        eprintln!(
            "round {round}: killed {pid} with {} of {} events consumed",
            c.records.len(),
            emitted.committed.len()
        );
        wait_for_new_worker(&pg, pid);
        // Let this round's events arrive and be confirmed before the next round.
        c.until_all(&emitted, DEADLINE);
        wait_until("the slot to be confirmed through the backlog", DEADLINE, || {
            pg.sql("SELECT pending_bytes < 8192 FROM outbox.status()") == "t"
        });
    }
    (check(&emitted, &c.records), pg)
}

/// Each restarted relay reads its partitions' tails and does not produce again what Kafka
/// acknowledged but the slot did not record. The rule finds each event's own record (id and
/// position), so it does not depend on the broker checking producer sequence numbers, which
/// the mock does only for transactional producers.
#[test]
fn worker_sigkilled_three_times_while_streaming() {
    let (report, pg) = worker_sigkilled_three_times("kill", &[]);
    report.assert_ok("worker SIGKILLed 3 times", 0);
    assert_eq!(pg.status("delivery_guarantee"), "exactly once");
}

/// In the cloudevents record format the relay finds its records by `ce_id`, `ce_commitlsn`
/// and `ce_commitindex`: the same kills, no duplicate.
#[test]
fn worker_sigkilled_three_times_in_the_cloudevents_format() {
    let (report, pg) = worker_sigkilled_three_times("cekill", &[("outbox.record_format", "cloudevents")]);
    report.assert_ok("worker SIGKILLed 3 times, cloudevents records", 0);
    assert_eq!(pg.status("delivery_guarantee"), "exactly once");
}

/// Its control: at least once, the same kills leave duplicates that the checker finds by `ce_id`.
#[test]
fn worker_sigkilled_three_times_in_the_cloudevents_format_at_least_once() {
    let settings = [("outbox.record_format", "cloudevents"), ("outbox.exactly_once", "off")];
    let (report, _pg) = worker_sigkilled_three_times("cekill_alo", &settings);
    report.assert_ok("worker SIGKILLed 3 times, cloudevents records, at least once", usize::MAX);
    assert!(report.duplicates > 0, "at least once, kills leave duplicates: {report}");
}

/// The control: the same kills at least once resend what the slot did not record, which shows
/// that the checker sees duplicates.
#[test]
fn worker_sigkilled_three_times_at_least_once() {
    let (report, pg) = worker_sigkilled_three_times("kill_alo", &[("outbox.exactly_once", "off")]);
    // Each kill can resend everything committed before it: no bound but "some".
    report.assert_ok("worker SIGKILLed 3 times, outbox.exactly_once = off", usize::MAX);
    assert!(report.duplicates > 0, "at least once, kills leave duplicates: {report}");
    assert_eq!(pg.status("delivery_guarantee"), "at least once: outbox.exactly_once is off");
}

#[test]
fn immediate_stop_mid_stream_then_restart() {
    let topic = "outbox.event.immediate";
    let (kafka, mut pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let mut emitted = Emitted::default();
    emit_committed(&pg, &mut emitted, "immediate", 10, 2000);
    c.until("part of the backlog", DEADLINE, |r| r.len() >= 2000);
    pg.pg_ctl_stop("immediate");
    pg.pg_ctl_start();
    pg.wait_for_state("streaming", DEADLINE);
    emit_committed(&pg, &mut emitted, "immediate", 2, 1000);
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("pg_ctl stop -m immediate", 0);
}

#[test]
fn transaction_open_across_a_worker_restart_arrives_once_in_commit_order() {
    let topic = "outbox.event.open";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let mut open = pg.session();
    open.send("BEGIN; SELECT outbox.emit('open', 'k', 'FirstEmitted', '{}');");
    let pid = pg.worker_pid().unwrap();
    pg.sql(&format!("SELECT pg_terminate_backend({pid})"));
    wait_for_new_worker(&pg, pid);
    pg.sql("SELECT outbox.emit('open', 'k', 'CommittedFirst', '{}')");
    open.send("COMMIT;");
    let out = open.finish();
    let id = out.lines().next().unwrap().trim().to_string();
    c.until("both events", DEADLINE, |r| r.len() >= 2);
    let types: Vec<_> = c.records.iter().map(|r| r.header("type").unwrap().to_string()).collect();
    assert_eq!(types, ["CommittedFirst", "FirstEmitted"], "commit order");
    assert_eq!(c.with_id(&id).len(), 1);
}

#[test]
fn prepared_transactions_across_a_worker_restart() {
    let topic = "outbox.event.prep";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    pg.sql(
        "BEGIN; SELECT outbox.emit('prep', 'k', 'Committed', '{}'); PREPARE TRANSACTION 'a';
         BEGIN; SELECT outbox.emit('prep', 'k', 'RolledBack', '{}'); PREPARE TRANSACTION 'b';",
    );
    let pid = pg.worker_pid().unwrap();
    pg.sql(&format!("SELECT pg_terminate_backend({pid})"));
    wait_for_new_worker(&pg, pid);
    pg.sql("COMMIT PREPARED 'a'; ROLLBACK PREPARED 'b';");
    pg.sql("SELECT outbox.emit('prep', 'k', 'Marker', '{}')");
    c.until("the marker", DEADLINE, |r| r.iter().any(|r| r.header("type") == Some("Marker")));
    let types: Vec<_> = c.records.iter().map(|r| r.header("type").unwrap().to_string()).collect();
    assert_eq!(types, ["Committed", "Marker"]);
}

#[test]
fn another_client_cannot_take_the_slot() {
    let topic = "outbox.event.slot";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let err = pg.sql_error("SELECT * FROM pg_logical_slot_get_changes((SELECT slot_name FROM outbox.status()), NULL, NULL)");
    assert!(err.starts_with("55006"), "{err}");
    let err = pg.sql_error("SELECT pg_drop_replication_slot((SELECT slot_name FROM outbox.status()))");
    assert!(err.starts_with("55006"), "{err}");
    // A second slot with the extension's plugin cannot be used to read events either: servers
    // with output_plugin_libraries (15.20, 18.6) refuse to create it; the others (16.2, 17.9)
    // refuse to decode with it, as text (the plugin's output is binary) or as binary (the
    // plugin serves only the relay).
    match pg.try_sql("SELECT pg_create_logical_replication_slot('intruder', 'outbox_ext')") {
        Err(e) => assert!(e.contains("may not be used as an output plugin"), "{e}"),
        Ok(_) => {
            pg.sql("SELECT outbox.emit('slot', 'k', 'E', '{}')");
            let err = pg.sql_error("SELECT * FROM pg_logical_slot_get_changes('intruder', NULL, NULL)");
            assert!(err.starts_with("0A000") && err.contains("produces binary output"), "{err}");
            let err = pg.sql_error("SELECT * FROM pg_logical_slot_get_binary_changes('intruder', NULL, NULL)");
            assert!(err.contains("only be used by the outbox_ext relay"), "{err}");
            pg.sql("SELECT pg_drop_replication_slot('intruder')");
        }
    }
    pg.sql("SELECT outbox.emit('slot', 'k', 'E', '{}')");
    // The owner keeps working.
    c.until_count(1, DEADLINE);
    assert_eq!(pg.status("state"), "streaming");
}

/// A relay that may not read its topic (the mock refuses the offset requests of the new
/// relay's tail reads, as a broker without Describe or Read permission does) says so, delivers
/// at least once, and loses nothing.
#[test]
fn a_relay_that_may_not_read_its_topic_delivers_at_least_once_and_says_so() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let topic = "outbox.event.noread";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let mut emitted = Emitted::default();
    emit_committed(&pg, &mut emitted, "noread", 1, 100);
    c.until_all(&emitted, DEADLINE);
    assert_eq!(pg.status("delivery_guarantee"), "exactly once");
    // The collector has its offsets; from now on only the relay asks for some.
    let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3];
    kafka.cluster.request_errors(RDKafkaApiKey::ListOffsets, &refused);
    let pid = pg.worker_pid().expect("worker");
    pg.sql(&format!("SELECT pg_terminate_backend({pid})"));
    wait_for_new_worker(&pg, pid);
    emit_committed(&pg, &mut emitted, "noread", 2, 1000);
    c.until_all(&emitted, DEADLINE);
    wait_until("the relay to say it delivers at least once", DEADLINE, || {
        pg.status("delivery_guarantee") == "at least once: a topic could not be read (see last_error)"
    });
    let error = pg.status("last_error");
    assert!(error.contains("topic outbox.event.noread") && error.contains("at least once"), "{error}");
    assert_eq!(pg.status("state"), "streaming");
    check(&emitted, &c.records).assert_ok("no permission to read the topic", emitted.committed.len());
}

/// The window the rule cannot close: a produce request that a relay sent before it was killed
/// and that the broker reads only after the next relay read the partition's tail. The next
/// relay produces those events again, and then the late request lands too: a duplicate, never
/// a loss. (Proxies hold the request: the mock broker appends whatever it reads at once.)
#[test]
fn a_produce_request_landing_after_its_process_died_is_a_duplicate_never_a_loss() {
    let topic = "outbox.event.late";
    let kafka = outbox_tests::ProxiedKafka::start(3);
    kafka.create_topic(topic, 3);
    let pg = PgCluster::start(&[("outbox.bootstrap_servers", kafka.bootstrap.as_str())]);
    pg.wait_for_state("streaming", DEADLINE);
    let mut emitted = Emitted::default();
    emit_committed(&pg, &mut emitted, "late", 1, 100);
    wait_until("the first events to be acknowledged", DEADLINE, || pg.status("events_delivered") == "100");
    kafka.hold();
    emit_committed(&pg, &mut emitted, "late", 1, 500);
    // librdkafka sends at most max.in.flight requests per broker without an answer.
    wait_until("produce requests to be held", DEADLINE, || kafka.held_produce_requests() > 0);
    eprintln!("holding {} produce requests, {} bytes, that the relay sent", kafka.held_produce_requests(), kafka.held_bytes());
    let pid = pg.worker_pid().expect("worker");
    pg.signal(pid, "KILL");
    // The next relay comes after the server's crash restart, through new connections.
    kafka.hold_no_new();
    wait_for_new_worker(&pg, pid);
    emit_committed(&pg, &mut emitted, "late", 1, 100);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("before the dead relay's requests land", 0);
    kafka.release();
    c.until("the dead relay's records to land", DEADLINE, |r| r.len() > emitted.committed.len());
    c.until_end(&[(topic, 3)], DEADLINE);
    let report = check(&emitted, &c.records);
    eprintln!("[a produce request landing after its process died] {report}");
    report.assert_ok("a produce request landing after its process died", 500);
    assert!(report.duplicates > 0, "{report}");
}

/// A bootstrap list that names an address where no broker listens: the producer does without
/// it, and so does the tail reader, whose consumer reports the refused connections through the
/// queue it reads records from. A kill mid-stream still leaves no duplicate.
#[test]
fn an_address_without_a_broker_in_the_bootstrap_list_changes_nothing() {
    let topic = "outbox.event.deadaddr";
    let kafka = outbox_tests::MockKafka::start(3);
    kafka.create_topic(topic, 3);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let bootstrap = format!("{dead},{}", kafka.bootstrap);
    let pg = PgCluster::start(&[("outbox.bootstrap_servers", bootstrap.as_str())]);
    pg.wait_for_state("streaming", DEADLINE);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let mut emitted = Emitted::default();
    let pid = pg.worker_pid().expect("worker");
    pg.signal(pid, "STOP");
    emit_committed(&pg, &mut emitted, "deadaddr", 2, 5_000);
    pg.signal(pid, "CONT");
    c.until("the backlog to start arriving", DEADLINE, |r| !r.is_empty());
    pg.signal(pid, "KILL");
    wait_for_new_worker(&pg, pid);
    emit_committed(&pg, &mut emitted, "deadaddr", 1, 100);
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("a dead address in the bootstrap list, a kill", 0);
    assert_eq!(pg.status("delivery_guarantee"), "exactly once");
}
