//! WAL safety: the relay's slot must not pin WAL while idle, must never be silently remade
//! when it was invalidated or dropped (events would be missing), and must not outlive the
//! extension.

use outbox_tests::{holds_for, pg_major, streaming_relay, wait_until, Collector, Emitted, PgCluster, DEADLINE};
use std::time::{Duration, Instant};

const MB: i64 = 1024 * 1024;

/// Bytes of WAL between the end of WAL and the slot's restart_lsn ('' if there is no slot).
fn restart_lag(pg: &PgCluster) -> String {
    pg.sql(
        "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint::text, '')
         FROM pg_replication_slots WHERE plugin = 'outbox_ext' AND database = current_database()
         UNION ALL SELECT '' LIMIT 1",
    )
}

fn slot_exists(pg: &PgCluster) -> bool {
    pg.sql("SELECT count(*) FROM pg_replication_slots WHERE plugin = 'outbox_ext' AND database = current_database()") == "1"
}

/// Emits `n` events of `aggregatetype` in one transaction; returns what was committed.
fn emit_committed(pg: &PgCluster, aggregatetype: &str, n: i64) -> Emitted {
    let mut emitted = Emitted::default();
    for (id, key) in pg.emit_batch(aggregatetype, "k", 5, 0, n, true) {
        emitted.commit(id, key);
    }
    emitted
}

#[test]
fn an_idle_slot_keeps_up_with_unrelated_writes_in_every_database() {
    let (kafka, pg) = streaming_relay(&[], &[]);
    pg.sql("CREATE DATABASE other");
    let other = PgCluster::attach(&pg, "other");
    for db in [&pg, &other] {
        db.sql("CREATE TABLE filler (id bigint, note text)");
    }
    // About 150 MB of WAL without a single event: bulk inserts and updates in both databases,
    // while the test samples how far the slot's confirmed position trails the end of WAL.
    let start_lsn = pg.sql("SELECT pg_current_wal_lsn()");
    let writers: Vec<_> = [PgCluster::attach(&pg, "postgres"), PgCluster::attach(&pg, "other")]
        .into_iter()
        .map(|db| {
            std::thread::spawn(move || {
                for _ in 0..6 {
                    db.sql("INSERT INTO filler SELECT g, repeat('x', 40) FROM generate_series(1, 100000) g");
                    db.sql("UPDATE filler SET note = note || 'y' WHERE id % 2 = 0");
                }
            })
        })
        .collect();
    let mut max_pending = 0i64;
    while writers.iter().any(|w| !w.is_finished()) {
        let pending: i64 = pg.status("pending_bytes").parse().unwrap_or(0);
        max_pending = max_pending.max(pending);
        std::thread::sleep(Duration::from_millis(250));
    }
    for w in writers {
        w.join().unwrap();
    }
    let written = pg.sql(&format!("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start_lsn}')::bigint / 1048576"));
    // A checkpoint logs the running transactions, where decoding may move restart_lsn.
    pg.sql("CHECKPOINT");
    let caught_up = Instant::now();
    wait_until("restart_lsn within 1 MB of the end of WAL", Duration::from_secs(30), || {
        restart_lag(&pg).parse::<i64>().is_ok_and(|lag| lag < MB)
    });
    eprintln!(
        "[idle slot] {written} MB of unrelated WAL in 2 databases: pending_bytes peaked at {:.1} MB; \
         restart_lsn within 1 MB of the WAL end {:?} after a checkpoint",
        max_pending as f64 / MB as f64,
        caught_up.elapsed()
    );
    // The relay holds at most outbox.decoding_work_mem (32 MB) of a transaction before writing
    // it to disk, so the large unrelated transactions here are spilled and read back, and its
    // slot trails further while they are (25–32 MB at 64 MB, 37–73 MB at 32 MB, measured). A
    // relay that does not move an idle slot trails by all of the 493 MB.
    assert!(max_pending < 128 * MB, "the idle slot fell {max_pending} bytes behind");
    drop(kafka);
}

#[test]
fn an_invalidated_slot_stops_the_relay_and_is_never_remade() {
    let (kafka, pg) = streaming_relay(&["outbox.event.lost"], &[("max_slot_wal_keep_size", "1MB")]);
    // Kafka is down, so the slot stands still on undelivered events while WAL grows past
    // max_slot_wal_keep_size, and a checkpoint invalidates it.
    for b in 1..=3 {
        kafka.broker_down(b);
    }
    emit_committed(&pg, "lost", 10);
    pg.wait_for_state("kafka_unavailable", DEADLINE);
    pg.sql("CREATE TABLE filler (id bigint, note text)");
    wait_until("the slot to be invalidated", DEADLINE, || {
        pg.sql("INSERT INTO filler SELECT g, repeat('x', 40) FROM generate_series(1, 20000) g");
        pg.sql("SELECT pg_switch_wal()");
        pg.sql("CHECKPOINT");
        pg.sql("SELECT wal_status FROM pg_replication_slots WHERE plugin = 'outbox_ext' AND database = current_database()") == "lost"
    });
    for b in 1..=3 {
        kafka.broker_up(b);
    }
    pg.wait_for_state("slot_error", DEADLINE);
    let error = pg.status("last_error");
    assert!(error.contains("invalidated") && error.contains("outbox.reset_slot()"), "{error}");
    let refused = pg.sql_error("SELECT outbox.emit('lost', 'k', 'T', '{}')");
    assert!(refused.starts_with("55000"), "{refused}");
    // Nothing is remade behind the operator's back.
    holds_for("slot_error with the lost slot kept", Duration::from_secs(3), || {
        pg.status("state") == "slot_error"
            && pg.sql("SELECT wal_status FROM pg_replication_slots WHERE plugin = 'outbox_ext' AND database = current_database()") == "lost"
    });
    // The operator accepts the loss: a new slot, and events flow again.
    pg.sql("SELECT outbox.reset_slot()");
    pg.wait_for_state("streaming", DEADLINE);
    let mut consumer = Collector::new(&kafka.bootstrap, &[("outbox.event.lost", 3)]);
    let after = emit_committed(&pg, "lost", 10);
    consumer.until_all(&after, DEADLINE);
}

#[test]
fn a_slot_dropped_behind_the_relays_back_is_never_remade() {
    let pg = PgCluster::start(&[]);
    pg.wait_for_state("unconfigured", DEADLINE);
    let old = pg.worker_pid().expect("the relay runs");
    pg.sql(&format!("SELECT pg_terminate_backend({old})"));
    // Between the worker's exit and its restart, the slot is free to drop.
    wait_until("the slot to be dropped", DEADLINE, || {
        pg.try_sql("SELECT pg_drop_replication_slot((SELECT slot_name FROM outbox.status()))").is_ok()
    });
    pg.wait_for_state("slot_error", DEADLINE);
    let error = pg.status("last_error");
    assert!(error.contains("dropped") && error.contains("outbox.reset_slot()"), "{error}");
    let refused = pg.sql_error("SELECT outbox.emit('a', 'k', 'T', '{}')");
    assert!(refused.starts_with("55000"), "{refused}");
    holds_for("no new slot made on the relay's own", Duration::from_secs(3), || !slot_exists(&pg));
    pg.sql("SELECT outbox.reset_slot()");
    wait_until("a new slot after reset_slot()", DEADLINE, || slot_exists(&pg));
    pg.wait_for_state("unconfigured", DEADLINE);
    let reset_again = pg.sql_error("SELECT outbox.reset_slot()");
    assert!(reset_again.starts_with("55000"), "reset_slot() outside slot_error: {reset_again}");
}

#[test]
fn drop_extension_delivers_what_was_committed_then_drops_the_slot() {
    let (kafka, pg) = streaming_relay(&["outbox.event.bye"], &[]);
    let mut consumer = Collector::new(&kafka.bootstrap, &[("outbox.event.bye", 3)]);
    for b in 1..=3 {
        kafka.broker_down(b);
    }
    let emitted = emit_committed(&pg, "bye", 500);
    pg.sql("DROP EXTENSION outbox_ext");
    // Undelivered events keep the slot.
    holds_for("the slot staying while its events are undelivered", Duration::from_secs(2), || slot_exists(&pg));
    for b in 1..=3 {
        kafka.broker_up(b);
    }
    consumer.until_all(&emitted, DEADLINE);
    wait_until("the slot to be dropped", DEADLINE, || !slot_exists(&pg));
    // The relay logs the drop after it made it.
    wait_until("the relay to log the drop", DEADLINE, || {
        pg.log().contains("dropped replication slot \"outbox_postgres_5\"")
    });
    // Installed again: a new slot, and events flow.
    pg.create_extension();
    pg.wait_for_state("streaming", DEADLINE);
    let again = emit_committed(&pg, "bye", 10);
    consumer.until_all(&again, DEADLINE);
}

#[test]
fn drop_extension_without_kafka_settings_drops_an_empty_slot() {
    let pg = PgCluster::start(&[]);
    pg.wait_for_state("unconfigured", DEADLINE);
    pg.sql("DROP EXTENSION outbox_ext");
    wait_until("the slot to be dropped", DEADLINE, || !slot_exists(&pg));
}

/// PostgreSQL 18's `idle_replication_slot_timeout` invalidates, at a checkpoint, a slot that no
/// process has held for longer than the timeout. A relay that runs holds its slot in every
/// state, `delivery_error` included, so the timeout only strikes while no relay runs (here: the
/// library left out of shared_preload_libraries). The relay then reports it in slot_error.
#[test]
fn idle_replication_slot_timeout_spares_a_running_relay_and_is_reported_after_a_stop() {
    if pg_major() < 18 {
        return;
    }
    let props = "allow.auto.create.topics=false;topic.metadata.propagation.max.ms=1000";
    let (kafka, mut pg) =
        streaming_relay(&[], &[("idle_replication_slot_timeout", "1s"), ("outbox.kafka_properties", props)]);
    let reason = |pg: &PgCluster| {
        pg.sql("SELECT coalesce(invalidation_reason, 'valid') FROM pg_replication_slots WHERE plugin = 'outbox_ext' AND database = current_database()")
    };
    // Stopped at an event for a topic that does not exist.
    pg.sql("SELECT outbox.emit('nowhere', 'k', 'T', '{}')");
    pg.wait_for_state("delivery_error", DEADLINE);
    holds_for("the slot of a relay in delivery_error to stay valid past the timeout", Duration::from_secs(3), || {
        pg.sql("CHECKPOINT");
        reason(&pg) == "valid"
    });

    pg.pg_ctl_stop("fast");
    pg.configure("shared_preload_libraries = ''");
    pg.pg_ctl_start();
    wait_until("the unheld slot to be invalidated for being idle", DEADLINE, || {
        pg.sql("CHECKPOINT");
        reason(&pg) == "idle_timeout"
    });
    pg.pg_ctl_stop("fast");
    pg.configure("shared_preload_libraries = 'outbox_ext'");
    pg.pg_ctl_start();
    pg.wait_for_state("slot_error", DEADLINE);
    let error = pg.status("last_error");
    assert!(error.contains("idle_replication_slot_timeout") && error.contains("outbox.reset_slot()"), "{error}");
    let refused = pg.sql_error("SELECT outbox.emit('after', 'k', 'T', '{}')");
    assert!(refused.starts_with("55000"), "{refused}");

    pg.sql("SELECT outbox.reset_slot()");
    pg.wait_for_state("streaming", DEADLINE);
    kafka.create_topic("outbox.event.after", 3);
    let mut consumer = Collector::new(&kafka.bootstrap, &[("outbox.event.after", 3)]);
    let after = emit_committed(&pg, "after", 10);
    consumer.until_all(&after, DEADLINE);
}
