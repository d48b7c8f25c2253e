//! Only `outbox.emit()` publishes. A role writes messages under the outbox prefix itself with
//! `pg_logical_emit_message` (granted to PUBLIC): of format 1, with a made-up tag, with the
//! fields of a genuine record as a consumer saw them, and with a tag that is genuine but for
//! another transaction. None arrives; the genuine events around them do; `outbox.status()`
//! counts them and the server log names their LSN. The key survives restarts and crashes, and
//! the events of a dropped installation still open after a restart.

use outbox_core::auth::{RecordKey, KEY_LEN};
use outbox_core::event::{self, EmitArgs, EmitLimits, PayloadArg};
use outbox_tests::{check, streaming_relay, wait_until, Collector, Emitted, MockKafka, PgCluster, DEADLINE};

/// The record of an event as emit lays it out (before its version byte and tag).
fn record(id: [u8; 16], aggregatetype: &str, aggregateid: &str, event_type: &str, payload: &str) -> Vec<u8> {
    let args = EmitArgs {
        aggregatetype: Some(aggregatetype),
        aggregateid: Some(aggregateid),
        event_type: Some(event_type),
        payload: PayloadArg::Json(Some(payload)),
        headers: None,
        trace: Default::default(),
    };
    let limits = EmitLimits {
        max_payload_bytes: usize::MAX,
        max_record_bytes: usize::MAX,
        topic_template: "outbox.event.{aggregatetype}",
        record_format: outbox_core::routing::RecordFormat::Plain,
        cloudevents_source: "/outbox_ext/postgres",
    };
    event::encode(&id, &event::validate(args, limits).unwrap())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn uuid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

/// Writes `message` under the outbox prefix as role `forger`, in a transaction of its own.
fn forge(pg: &PgCluster, message: &[u8]) {
    pg.sql(&format!(
        "SET ROLE forger; SELECT pg_logical_emit_message(true, 'outbox_ext', decode('{}', 'hex'));",
        hex(message)
    ));
}

#[test]
fn records_that_emit_did_not_write_never_reach_kafka() {
    let topic = "outbox.event.payment";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    pg.sql("CREATE ROLE forger LOGIN");
    assert_eq!(
        // (17 added a `flush` argument: every version's overloads.)
        pg.sql("SELECT bool_and(has_function_privilege('forger', oid, 'EXECUTE')) FROM pg_proc WHERE proname = 'pg_logical_emit_message'"),
        "t",
        "PostgreSQL lets every role write logical messages"
    );
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let mut emitted = Emitted::default();
    for (id, key) in pg.emit_batch("payment", "acct-", 3, 0, 10, true) {
        emitted.commit(id, key);
    }
    c.until_all(&emitted, DEADLINE);
    // A genuine record, as a consumer sees it.
    let seen = c.records[0].clone();
    let seen_id = uuid_bytes(seen.header("id").unwrap());
    let seen_record = record(
        seen_id,
        seen.header("aggregatetype").unwrap(),
        seen.key.as_deref().unwrap(),
        seen.header("type").unwrap(),
        seen.value.as_deref().unwrap(),
    );
    // The installation's key, which the superuser harness may read, and a transaction that is
    // not the forger's: a tag made for it is what a genuine message copied out of WAL carries.
    let key_hex = pg.sql("SELECT encode(key, 'hex') FROM outbox.relay_key");
    let mut key = [0u8; KEY_LEN];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let other_xid: u32 = pg.sql("SELECT txid_current()").parse::<u64>().unwrap() as u32;

    let forged_id = [0x0f; 16];
    let payment = record(forged_id, "payment", "acct-0", "PaymentReceived", r#"{"amount": 1000000}"#);
    let mut format1 = vec![1u8];
    format1.extend_from_slice(&payment);
    let mut zero_tag = vec![2u8];
    zero_tag.extend_from_slice(&[0; 16]);
    zero_tag.extend_from_slice(&payment);
    let mut copied = vec![2u8];
    copied.extend_from_slice(&[0x5a; 16]);
    copied.extend_from_slice(&seen_record);
    let mut replayed = vec![2u8];
    replayed.extend_from_slice(&RecordKey::new(&key).tag(other_xid, &payment));
    replayed.extend_from_slice(&payment);
    let forgeries = [format1, zero_tag, copied, replayed];
    for message in &forgeries {
        forge(&pg, message);
    }

    // Genuine events after them arrive; the forged ones never do.
    for (id, key) in pg.emit_batch("payment", "acct-", 3, 10, 10, true) {
        emitted.commit(id, key);
    }
    c.until_all(&emitted, DEADLINE);
    wait_until("the relay to count the forgeries", DEADLINE, || pg.status("rejected_records") == "4");
    let report = check(&emitted, &c.records);
    report.assert_ok("forged records among genuine ones", 0);
    assert_eq!(report.consumed, 20, "nothing but the genuine events arrived: {report}");
    assert!(!c.records.iter().any(|r| r.value.as_deref() == Some(r#"{"amount": 1000000}"#)));
    assert_eq!(pg.status("state"), "streaming");
    let log = pg.log();
    assert!(
        log.contains("skipped a message under the outbox_ext prefix at ") && log.contains("outbox.emit() did not write"),
        "the server log names the skipped message"
    );
    eprintln!("[forgery] 4 forged messages skipped and counted; 20 genuine events delivered");
}

/// Events sealed before a clean restart and before a crash open after it: the key is the
/// table's, not the process's.
#[test]
fn events_sealed_before_a_restart_or_a_crash_arrive_after_it() {
    let topic = "outbox.event.durable";
    let kafka = MockKafka::start(3);
    kafka.create_topic(topic, 3);
    let mut pg = PgCluster::start(&[]);
    pg.wait_for_state("unconfigured", DEADLINE);
    let mut emitted = Emitted::default();
    for (id, key) in pg.emit_batch("durable", "k", 5, 0, 100, true) {
        emitted.commit(id, key);
    }
    pg.pg_ctl_stop("fast");
    pg.pg_ctl_start();
    pg.wait_for_state("unconfigured", DEADLINE);
    for (id, key) in pg.emit_batch("durable", "k", 5, 100, 100, true) {
        emitted.commit(id, key);
    }
    pg.pg_ctl_stop("immediate");
    pg.pg_ctl_start();
    pg.set("outbox.bootstrap_servers", &kafka.bootstrap);
    pg.wait_for_state("streaming", DEADLINE);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("sealed before a restart and a crash", 0);
    assert_eq!(pg.status("rejected_records"), "0");
}

/// DROP EXTENSION takes the table, and with it the key, while events sealed with it still wait
/// in WAL; CREATE EXTENSION makes a new key. The relay opens the old events with its copy of
/// the old key, across a restart, and the new installation's emit waits until they are
/// delivered.
#[test]
fn a_dropped_installations_events_open_across_a_restart_and_a_new_one_gets_its_own_key() {
    let topic = "outbox.event.reinstall";
    let kafka = MockKafka::start(3);
    kafka.create_topic(topic, 3);
    let mut pg = PgCluster::start(&[]);
    pg.wait_for_state("unconfigured", DEADLINE);
    let mut emitted = Emitted::default();
    for (id, key) in pg.emit_batch("reinstall", "k", 5, 0, 50, true) {
        emitted.commit(id, key);
    }
    let old_key = pg.sql("SELECT key FROM outbox.relay_key");
    pg.sql("DROP EXTENSION outbox_ext");
    pg.sql("CREATE EXTENSION outbox_ext");
    assert_ne!(pg.sql("SELECT key FROM outbox.relay_key"), old_key, "a new installation, a new key");
    // Until the old installation's events are delivered, the new one's emit waits.
    let err = pg.sql_error("SELECT outbox.emit('reinstall', 'k', 'E', '{}')");
    assert!(err.starts_with("55000"), "{err}");
    pg.pg_ctl_stop("fast");
    pg.pg_ctl_start();
    pg.set("outbox.bootstrap_servers", &kafka.bootstrap);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_all(&emitted, DEADLINE);
    wait_until("the new installation's emit to work", DEADLINE, || {
        pg.try_sql("SELECT outbox.emit('reinstall', 'probe', 'Probe', '{\"seq\": -1}')").is_ok()
    });
    for (id, key) in pg.emit_batch("reinstall", "k", 5, 50, 50, true) {
        emitted.commit(id, key);
    }
    c.until_all(&emitted, DEADLINE);
    c.records.retain(|r| r.key.as_deref() != Some("probe"));
    check(&emitted, &c.records).assert_ok("events of two installations in one slot", 0);
    assert_eq!(pg.status("rejected_records"), "0");
}
