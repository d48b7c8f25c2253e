//! The relay across its life: stopped, terminated, crashed, unconfigured, reconfigured, and
//! with Kafka down. Every committed event arrives, once.

use outbox_tests::{holds_for, streaming_relay, wait_until, Collector, MockKafka, PgCluster, DEADLINE};
use std::collections::HashSet;
use std::time::Duration;

fn emit_batch(pg: &PgCluster, aggregatetype: &str, from: i64, count: i64) {
    pg.sql(&format!(
        "SELECT count(outbox.emit('{aggregatetype}', 'k' || (i % 10), 'E', jsonb_build_object('seq', i))) \
         FROM generate_series({from}, {}) AS i",
        from + count - 1
    ));
}

/// Every seq in 0..n arrived, each key in order of first delivery. Returns the duplicates.
fn assert_complete(c: &Collector, n: i64) -> usize {
    let mut first_seen = HashSet::new();
    for (key, records) in c.by_key() {
        let mut last = -1;
        for r in records {
            let seq = r.json()["seq"].as_i64().unwrap();
            if first_seen.insert(seq) {
                assert!(seq > last, "key {key}: {seq} delivered after {last}");
                last = seq;
            }
        }
    }
    assert_eq!(first_seen.len() as i64, n, "lost events");
    c.records.len() - first_seen.len()
}

fn setup(topic: &str, extra: &[(&str, &str)]) -> (MockKafka, PgCluster, Collector) {
    let (kafka, pg) = streaming_relay(&[topic], extra);
    let c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    (kafka, pg, c)
}

#[test]
fn events_emitted_while_the_worker_is_stopped_arrive_when_it_runs_again() {
    let (_kafka, pg, mut c) = setup("outbox.event.stop", &[]);
    emit_batch(&pg, "stop", 0, 500);
    c.until_count(500, DEADLINE);

    // Frozen worker: events wait in WAL and are counted as pending.
    let pid = pg.worker_pid().expect("worker runs");
    pg.signal(pid, "STOP");
    emit_batch(&pg, "stop", 500, 500);
    let pending: i64 = pg.status("pending_bytes").parse().unwrap();
    assert!(pending > 0, "pending_bytes {pending}");
    pg.signal(pid, "CONT");
    c.until_count(1000, DEADLINE);

    // Terminated worker: the postmaster starts it again and it resumes from the slot.
    pg.sql(&format!("SELECT pg_terminate_backend({pid})"));
    wait_until("the worker to exit", DEADLINE, || pg.status("state") == "stopped");
    assert_eq!(pg.status("worker_pid"), "");
    emit_batch(&pg, "stop", 1000, 500);
    wait_until("a new worker", DEADLINE, || pg.worker_pid().is_some_and(|p| p != pid));
    c.until_count(1500, DEADLINE);
    let dups = assert_complete(&c, 1500);
    assert_eq!(dups, 0, "a clean stop confirms what it delivered");
}

#[test]
fn a_crashed_worker_is_restarted_and_resumes_from_the_slot() {
    let (_kafka, pg, mut c) = setup("outbox.event.crash", &[]);
    emit_batch(&pg, "crash", 0, 3000);
    let pid = pg.worker_pid().expect("worker runs");
    pg.signal(pid, "KILL");
    // SIGKILL makes the postmaster reinitialise; wait for it to accept connections again.
    wait_until("the server to recover", DEADLINE, || pg.try_sql("SELECT 1").is_ok());
    wait_until("a new worker", DEADLINE, || pg.try_sql("SELECT worker_pid FROM outbox.status()").is_ok_and(|p| !p.is_empty() && p != pid.to_string()));
    wait_until("the slot to be usable", DEADLINE, || pg.try_sql("SELECT outbox.emit('crash', 'probe', 'Probe', '{\"seq\": -1}')").is_ok());
    emit_batch(&pg, "crash", 3000, 1000);
    c.until("every event", DEADLINE, |r| {
        r.iter().filter_map(|r| r.json()["seq"].as_i64()).filter(|s| *s >= 0).collect::<HashSet<_>>().len() == 4000
    });
    c.records.retain(|r| r.key.as_deref() != Some("probe"));
    let dups = assert_complete(&c, 4000);
    eprintln!("crash: 4000 events, {dups} duplicates");
    assert_eq!(dups, 0, "crash: events Kafka holds are not produced again");
}

#[test]
fn unconfigured_relay_waits_then_delivers_after_reload() {
    let kafka = MockKafka::start(3);
    kafka.create_topic("outbox.event.later", 3);
    let pg = PgCluster::start(&[]);
    pg.wait_for_state("unconfigured", DEADLINE);
    // With no events, an unconfigured relay still moves its slot past unrelated writes.
    pg.sql("CREATE TABLE noise AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g");
    wait_until("the slot to pass unrelated WAL", DEADLINE, || {
        pg.status("pending_bytes").parse::<i64>().is_ok_and(|b| b < 64 * 1024)
    });
    emit_batch(&pg, "later", 0, 200);
    pg.sql("INSERT INTO noise SELECT g, repeat('y', 100) FROM generate_series(1, 20000) g");
    // Once an event is waiting, the slot holds WAL from there on.
    let pending: i64 = pg.status("pending_bytes").parse().unwrap();
    assert!(pending > 1_000_000, "pending_bytes {pending}");
    pg.set("outbox.bootstrap_servers", &kafka.bootstrap);
    pg.wait_for_state("streaming", DEADLINE);
    let mut c = Collector::new(&kafka.bootstrap, &[("outbox.event.later", 3)]);
    c.until_count(200, DEADLINE);
    assert_eq!(assert_complete(&c, 200), 0);
}

#[test]
fn kafka_outage_is_reported_and_nothing_is_confirmed_until_it_ends() {
    let (kafka, pg, mut c) = setup("outbox.event.outage", &[]);
    emit_batch(&pg, "outage", 0, 100);
    c.until_count(100, DEADLINE);
    wait_until("the slot to catch up", DEADLINE, || pg.status("pending_bytes") == "0");
    for b in 1..=3 {
        kafka.broker_down(b);
    }
    let confirmed_before = pg.status("confirmed_lsn");
    emit_batch(&pg, "outage", 100, 400);
    pg.wait_for_state("kafka_unavailable", DEADLINE);
    assert_ne!(pg.status("last_error"), "");
    // The slot must not move past undelivered events.
    let held = pg.sql(&format!(
        "SELECT confirmed_lsn <= '{confirmed_before}'::pg_lsn + 0 OR pending_bytes > 0 FROM outbox.status()"
    ));
    assert_eq!(held, "t");
    let pending: i64 = pg.status("pending_bytes").parse().unwrap();
    assert!(pending > 0);
    for b in 1..=3 {
        kafka.broker_up(b);
    }
    c.until_count(500, DEADLINE);
    pg.wait_for_state("streaming", DEADLINE);
    let dups = assert_complete(&c, 500);
    eprintln!("outage: 500 events, {dups} duplicates");
    assert_eq!(dups, 0, "outage: events Kafka holds are not produced again");
}

#[test]
fn sighup_with_new_kafka_settings_rebuilds_the_producer_without_loss() {
    let (_kafka, pg, mut c) = setup("outbox.event.reload", &[]);
    emit_batch(&pg, "reload", 0, 2000);
    pg.set("outbox.kafka_properties", "linger.ms=0;compression.type=lz4");
    emit_batch(&pg, "reload", 2000, 2000);
    c.until_count(4000, DEADLINE);
    let dups = assert_complete(&c, 4000);
    eprintln!("reload: 4000 events, {dups} duplicates");
    assert_eq!(dups, 0, "reload: events Kafka holds are not produced again");

    // An invalid setting stops the relay with a clear error that shows no value; fixing it
    // resumes delivery.
    pg.set("outbox.kafka_properties", "sasl.password=hunter2-secret;enable.idempotence=false");
    pg.wait_for_state("config_error", DEADLINE);
    let error = pg.status("last_error");
    assert!(error.contains("enable.idempotence"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
    emit_batch(&pg, "reload", 4000, 100);
    pg.set("outbox.kafka_properties", "");
    pg.wait_for_state("streaming", DEADLINE);
    c.until("the events held during the bad setting", DEADLINE, |r| {
        r.iter().filter_map(|r| r.json()["seq"].as_i64()).collect::<HashSet<_>>().len() == 4100
    });
    assert!(!pg.log().contains("hunter2"), "the server log shows the secret");
}

#[test]
fn a_clean_restart_resends_nothing() {
    let (_kafka, mut pg, mut c) = setup("outbox.event.restart", &[]);
    emit_batch(&pg, "restart", 0, 2000);
    c.until_count(2000, DEADLINE);
    // The relay confirms and saves its slot when it stops; the restart resumes after it.
    pg.pg_ctl_stop("fast");
    pg.pg_ctl_start();
    pg.wait_for_state("streaming", DEADLINE);
    emit_batch(&pg, "restart", 2000, 100);
    c.until("the events after the restart", DEADLINE, |r| {
        r.iter().any(|r| r.json()["seq"].as_i64() == Some(2099))
    });
    // Wait for anything still on its way: every key's last event has arrived.
    c.until("every event", DEADLINE, |r| {
        r.iter().filter_map(|r| r.json()["seq"].as_i64()).collect::<HashSet<_>>().len() == 2100
    });
    assert_eq!(assert_complete(&c, 2100), 0, "duplicates after a clean restart");
}

/// The relay never waits inside the WAL reader. An open transaction's records are flushed
/// page by page by the WAL writer, so the flush position can end inside one of them, and
/// nothing flushes the rest until a commit or the background writer's next snapshot (every
/// 15 s; never during a shutdown). A relay that waited there for the record's tail would fall
/// behind the flushed WAL and ignore SIGTERM, SIGHUP and Kafka for as long, and a fast
/// shutdown would wait for it for ever once the WAL writer has stopped.
#[test]
fn the_relay_keeps_up_and_obeys_sigterm_while_the_flushed_wal_ends_inside_a_record() {
    // No autovacuum: its commits (an ANALYZE of the catalogs CREATE EXTENSION filled) would
    // flush the tail this test needs unflushed.
    let (_kafka, mut pg, mut c) = setup("outbox.event.tail", &[("autovacuum", "off")]);
    pg.sql("CREATE TABLE filler (g int, pad text)");
    emit_batch(&pg, "tail", 0, 10);
    c.until_count(10, DEADLINE);
    let mut open = pg.session();
    open.send("BEGIN; INSERT INTO filler SELECT g, repeat('x', 300) FROM generate_series(1, 20000) g;");
    wait_until("the open transaction's insert to finish", DEADLINE, || {
        pg.sql("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE '%filler%'") == "1"
    });
    // While the tail is unflushed, the relay decodes and confirms everything before it.
    wait_until("the relay to decode the flushed part while the rest is not flushed", Duration::from_secs(10), || {
        pg.sql(
            "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0') % 8192 = 0
                AND pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()
                AND pending_bytes < 8192
             FROM outbox.status()",
        ) == "t"
    });
    let pid = pg.worker_pid().expect("worker runs");
    pg.sql(&format!("SELECT pg_terminate_backend({pid})"));
    wait_until("the relay to exit on SIGTERM", Duration::from_secs(10), || pg.status("worker_pid") != pid.to_string());
    assert_eq!(pg.sql("SELECT pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()"), "t", "the tail stayed unflushed");
    open.send("ROLLBACK;");
    open.finish();
    pg.pg_ctl_stop("fast");
}

#[test]
fn max_pending_bytes_pushes_back_on_writers_until_the_relay_catches_up() {
    let kafka = MockKafka::start(3);
    kafka.create_topic("outbox.event.pressure", 3);
    // No Kafka yet: events wait in WAL.
    let pg = PgCluster::start(&[("outbox.max_pending_bytes", "1MB")]);
    pg.wait_for_state("unconfigured", DEADLINE);
    let mut emitted = outbox_tests::Emitted::default();
    let mut refused = None;
    for batch in 0..100 {
        let sql = outbox_tests::load::select_ids("pressure", "k", 10, batch * 1000, batch * 1000 + 999);
        match pg.try_sql(&sql) {
            Ok(out) => {
                for (id, key) in outbox_tests::load::parse_ids(&out) {
                    emitted.commit(id, key);
                }
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("emit refused once more than 1 MB is pending");
    assert!(err.contains("max_pending_bytes"), "{err}");
    assert!(pg.sql_error(&outbox_tests::load::select_ids("pressure", "k", 10, 0, 0)).starts_with("53400"));
    let pending: i64 = pg.status("pending_bytes").parse().unwrap();
    assert!(pending > 1024 * 1024, "pending_bytes {pending}");
    // Kafka comes back: the relay drains, and writers can emit again.
    pg.set("outbox.bootstrap_servers", &kafka.bootstrap);
    wait_until("emit to be accepted again", DEADLINE, || {
        pg.try_sql("SELECT outbox.emit('pressure', 'after', 'E', '{\"seq\": -1}')").is_ok()
    });
    let mut c = Collector::new(&kafka.bootstrap, &[("outbox.event.pressure", 3)]);
    c.until_all(&emitted, DEADLINE);
    c.records.retain(|r| r.key.as_deref() != Some("after"));
    outbox_tests::check(&emitted, &c.records).assert_ok("max_pending_bytes", 0);
}

/// An idle relay only reads: its once-a-second check that the extension still exists takes no
/// transaction id, so it neither uses up transaction ids nor writes and flushes a commit record
/// every second.
#[test]
fn an_idle_relay_takes_no_transaction_ids() {
    let (_kafka, pg) = streaming_relay(&[], &[("autovacuum", "off")]);
    let next_xid = || pg.sql("SELECT txid_snapshot_xmax(txid_current_snapshot())");
    let first = next_xid();
    holds_for("the next transaction id to stay put while the relay idles", Duration::from_secs(4), || {
        next_xid() == first
    });
}
