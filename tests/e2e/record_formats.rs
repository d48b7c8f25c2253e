//! What downstream receives beyond a JSON event: tombstones for compacted topics (a null
//! value, never an empty one), bytes passed through unchanged with their content type, the
//! emitting transaction's W3C trace context, and CloudEvents binary mode as the official
//! CloudEvents SDK reads it. Also what the new functions refuse (with which SQLSTATE), their
//! grants, and dead letters of every kind.

use outbox_tests::{wait_until, Collector, PgCluster, Record, DEADLINE};
use rdkafka::types::RDKafkaRespErr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const TRACEPARENT_A: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACEPARENT_B: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
/// A Schema Registry framed Avro value: magic byte 0, schema id 42 (big-endian), then the body,
/// with bytes that are not UTF-8.
const AVRO: &[u8] = &[0x00, 0x00, 0x00, 0x00, 0x2a, 0x02, 0xff, 0x00, 0xc3];

fn bytea(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("'\\x{hex}'::bytea")
}

/// The record of event `id` (exactly one).
fn one<'a>(c: &'a Collector, id: &str) -> &'a Record {
    let found = c.with_id(id);
    assert_eq!(found.len(), 1, "records of event {id}: {found:?}");
    found[0]
}

fn names(r: &Record) -> Vec<&str> {
    r.headers.iter().map(|(k, _)| k.as_str()).collect()
}

/// One transaction that emits an event of every kind on key o-1, with the transaction's trace
/// context set; returns their ids in emit order (JSON, bytes, tombstone, empty bytes).
fn emit_every_kind(pg: &PgCluster, aggregatetype: &str) -> Vec<String> {
    let ids = pg.sql(&format!(
        "BEGIN;
         SET LOCAL outbox.traceparent = '{TRACEPARENT_A}';
         SET LOCAL outbox.tracestate = '{TRACESTATE}';
         SELECT outbox.emit('{aggregatetype}', 'o-1', 'OrderCreated', '{{\"n\": 1}}', '{{\"tenant\": \"t1\"}}');
         SELECT outbox.emit_binary('{aggregatetype}', 'o-1', 'OrderAvro', {}, NULL, 'application/avro');
         SELECT outbox.emit_tombstone('{aggregatetype}', 'o-1', 'OrderDeleted');
         SELECT outbox.emit_binary('{aggregatetype}', 'o-2', 'Empty', ''::bytea);
         COMMIT;",
        bytea(AVRO)
    ));
    let ids: Vec<String> = ids.lines().map(String::from).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    ids
}

#[test]
fn tombstones_bytes_and_trace_context_arrive_as_emitted() {
    let topic = "outbox.event.order";
    let (kafka, pg) = outbox_tests::streaming_relay(&[topic], &[]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let ids = emit_every_kind(&pg, "order");
    // The event's own traceparent wins over the transaction's (and brings no tracestate of the
    // transaction's); the next transaction, without SET LOCAL, has none.
    let own = pg.sql(&format!(
        "BEGIN;
         SET LOCAL outbox.traceparent = '{TRACEPARENT_A}';
         SET LOCAL outbox.tracestate = '{TRACESTATE}';
         SELECT outbox.emit('order', 'o-3', 'Traced', '{{}}', '{{\"traceparent\": \"{TRACEPARENT_B}\"}}');
         COMMIT;"
    ));
    let untraced = pg.sql("SELECT outbox.emit('order', 'o-4', 'Untraced', '{}')");
    c.until("the six events", DEADLINE, |rs| rs.len() >= 6);

    let (json, avro, tombstone, empty) = (one(&c, &ids[0]), one(&c, &ids[1]), one(&c, &ids[2]), one(&c, &ids[3]));
    // JSON: the payload, the trace context of the transaction, no content-type (as before).
    assert_eq!(json.json(), serde_json::json!({"n": 1}));
    assert_eq!(json.header("traceparent"), Some(TRACEPARENT_A));
    assert_eq!(json.header("tracestate"), Some(TRACESTATE));
    assert_eq!(json.header("tenant"), Some("t1"));
    assert_eq!(json.header("content-type"), None);
    // Bytes: unchanged, typed.
    assert_eq!(avro.raw_value.as_deref(), Some(AVRO));
    assert_eq!(avro.header("content-type"), Some("application/avro"));
    assert_eq!(avro.header("traceparent"), Some(TRACEPARENT_A));
    // The tombstone: the key and a null value, with every header of an event.
    assert_eq!(tombstone.key.as_deref(), Some("o-1"));
    assert_eq!(tombstone.raw_value, None, "a tombstone's value is null");
    assert_eq!(
        names(tombstone),
        ["id", "type", "aggregatetype", "commit_lsn", "commit_index", "traceparent", "tracestate"]
    );
    assert_eq!(tombstone.header("type"), Some("OrderDeleted"));
    assert_eq!(tombstone.timestamp_ms, json.timestamp_ms, "the commit time, as for every event");
    // The contrast that shows the test tells null from empty: empty bytes are an empty value.
    assert_eq!(empty.raw_value.as_deref(), Some(&b""[..]), "empty bytes are not a tombstone");
    assert_eq!(empty.header("content-type"), Some("application/octet-stream"));
    // Key o-1's three records, in emit order in their partition.
    let o1: Vec<(i64, &str)> = [json, avro, tombstone].iter().map(|r| (r.offset, r.header("id").unwrap())).collect();
    assert!(json.partition == avro.partition && avro.partition == tombstone.partition);
    assert!(o1.windows(2).all(|w| w[0].0 < w[1].0), "{o1:?}");
    let own = one(&c, &own);
    assert_eq!((own.header("traceparent"), own.header("tracestate")), (Some(TRACEPARENT_B), None));
    let untraced = one(&c, &untraced);
    assert!(untraced.header("traceparent").is_none() && untraced.header("tracestate").is_none());

    // What is refused, with which SQLSTATE, in the caller's transaction.
    for (sql, code, says) in [
        ("SELECT outbox.emit('order', 'k', 'T', NULL)", "22004", "payload must not be NULL"),
        ("SELECT outbox.emit_tombstone('order', NULL, 'T')", "22004", "aggregateid must not be NULL"),
        ("SELECT outbox.emit_tombstone('order', '', 'T')", "22023", "aggregateid must not be empty"),
        ("SELECT outbox.emit_tombstone('or der', 'k', 'T')", "22023", "not a legal Kafka topic"),
        ("SELECT outbox.emit_binary('order', 'k', 'T', NULL)", "22004", "payload must not be NULL"),
        ("SELECT outbox.emit_binary('order', 'k', 'T', '\\x00', NULL, NULL)", "22004", "content_type must not be NULL"),
        ("SELECT outbox.emit_binary('order', 'k', 'T', '\\x00', NULL, 'avro')", "22023", "not a media type"),
        ("SELECT outbox.emit('order', 'k', 'T', '{}', '{\"ce_id\": \"x\"}')", "22023", "set by outbox_ext itself"),
        ("SELECT outbox.emit_tombstone('order', 'k', 'T', '{\"content-type\": \"x\"}')", "22023", "set by outbox_ext itself"),
        ("SET outbox.traceparent = '00-abc'; SELECT outbox.emit('order', 'k', 'T', '{}')", "22023", "00-<32 lower-case hex digits"),
        ("SET outbox.traceparent = '00-abc'; SELECT outbox.emit_tombstone('order', 'k', 'T')", "22023", "outbox.traceparent"),
        ("SET outbox.tracestate = 'k=v'; SELECT outbox.emit('order', 'k', 'T', '{}')", "22023", "without outbox.traceparent"),
        ("SELECT outbox.emit('order', 'k', 'T', '{}', '{\"traceparent\": \"nope\"}')", "22023", "the traceparent header"),
        ("SET outbox.max_payload_bytes = 8; SELECT outbox.emit_binary('order', 'k', 'T', '\\x000102030405060708')", "54000", "payload is 9 bytes"),
    ] {
        let err = pg.sql_error(sql);
        assert!(err.starts_with(code) && err.contains(says), "{sql}: {err}");
    }
    // Nothing of what was refused was published: the next event follows the six directly.
    let marker = pg.sql("SELECT outbox.emit('order', 'marker', 'Marker', '{}')");
    c.until("the marker", DEADLINE, |rs| rs.iter().any(|r| r.header("id") == Some(marker.as_str())));
    assert_eq!(c.records.len(), 7, "{:?}", c.records.iter().map(|r| r.header("type")).collect::<Vec<_>>());

    // Grants: like emit, nobody but the owner may call them until granted.
    pg.sql("CREATE ROLE app LOGIN");
    for f in ["emit(text,text,text,jsonb,jsonb)", "emit_binary(text,text,text,bytea,jsonb,text)", "emit_tombstone(text,text,text,jsonb)"] {
        assert_eq!(pg.sql(&format!("SELECT has_function_privilege('app', 'outbox.{f}', 'EXECUTE')")), "f", "{f}");
    }
    let err = pg.sql_error("SET ROLE app; SELECT outbox.emit_tombstone('order', 'k', 'T')");
    assert!(err.starts_with("42501"), "{err}");
    pg.sql("GRANT EXECUTE ON FUNCTION outbox.emit_tombstone(text,text,text,jsonb) TO app");
    assert_eq!(pg.sql("SET ROLE app; SELECT outbox.emit_tombstone('order', 'k', 'T') IS NOT NULL"), "t");
}

/// The records as the official CloudEvents SDK for Python (2.x, `cloudevents.core.bindings.kafka`,
/// binary mode) reads them: one JSON object per record (see tests/sdk/cloudevents_binary.py).
fn read_with_the_python_sdk(records: &[&Record]) -> Vec<serde_json::Value> {
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let input: String = records
        .iter()
        .map(|r| {
            let headers: Vec<(String, String)> = r.headers.iter().map(|(k, v)| (k.clone(), hex(v.as_bytes()))).collect();
            let line = serde_json::json!({
                "key": r.key.as_deref().map(|k| hex(k.as_bytes())),
                "value": r.raw_value.as_deref().map(hex),
                "headers": headers,
            });
            format!("{line}\n")
        })
        .collect();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/cloudevents_binary.py");
    let path = std::env::var("OUTBOX_PYTHONPATH")
        .unwrap_or_else(|_| format!("{}/.cache/outbox_ext/python", std::env::var("HOME").unwrap_or_default()));
    let mut child = Command::new("python3")
        .arg(&script)
        .env("PYTHONPATH", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK (PYTHONPATH {path}; scripts/install-deps.sh installs it) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn cloudevents_records_read_with_the_official_sdk() {
    let topic = "outbox.event.order";
    let (kafka, pg) = outbox_tests::streaming_relay(&[topic], &[("outbox.record_format", "cloudevents")]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let ids = emit_every_kind(&pg, "order");
    c.until("the four events", DEADLINE, |rs| rs.len() >= 4);
    let records: Vec<&Record> = ids.iter().map(|id| one(&c, id)).collect();
    let (json, avro, tombstone) = (records[0], records[1], records[2]);

    // The binding's headers, in order; the record's own headers and the trace context after.
    assert_eq!(
        names(json),
        [
            "ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_time", "content-type",
            "ce_aggregatetype", "ce_commitlsn", "ce_commitindex", "tenant", "traceparent", "tracestate",
            "ce_traceparent", "ce_tracestate"
        ]
    );
    assert_eq!(json.header("ce_specversion"), Some("1.0"));
    assert_eq!(json.header("ce_id"), Some(ids[0].as_str()));
    assert_eq!(json.header("ce_source"), Some("/outbox_ext/postgres"));
    assert_eq!((json.header("ce_type"), json.header("ce_subject")), (Some("OrderCreated"), Some("o-1")));
    assert_eq!(json.header("content-type"), Some("application/json"));
    // ce_time is the commit time with microseconds; the Kafka timestamp is it in milliseconds.
    let time = json.header("ce_time").unwrap();
    let ms = json.timestamp_ms.unwrap();
    assert_eq!(time.len(), 27, "{time}");
    assert_eq!(&time[..23], &outbox_core::time::rfc3339_utc_ms(ms)[..23], "ce_time {time} vs timestamp {ms}");
    assert_eq!(json.json(), serde_json::json!({"n": 1}), "the value is the payload, as in plain");
    assert_eq!(avro.raw_value.as_deref(), Some(AVRO));
    assert_eq!(avro.header("content-type"), Some("application/avro"));
    assert_eq!(tombstone.raw_value, None);
    assert_eq!(tombstone.header("content-type"), None, "no data, no datacontenttype");

    // The SDK reads each as a CloudEvent with these attributes.
    let read = read_with_the_python_sdk(&records);
    for (r, e) in records.iter().zip(&read) {
        assert_eq!(e["ok"], true, "the SDK refused {:?}: {e}", r.headers);
        let a = &e["attributes"];
        assert_eq!(a["specversion"], "1.0");
        assert_eq!(a["id"], r.header("ce_id").unwrap());
        assert_eq!(a["source"], "/outbox_ext/postgres");
        assert_eq!(a["subject"], r.key.as_deref().unwrap());
        assert_eq!(a["time"], time.replace('Z', "+00:00"), "the commit time, from ce_time");
        let x = &e["extensions"];
        assert_eq!(x["aggregatetype"], "order");
        assert_eq!(x["commitlsn"], r.header("ce_commitlsn").unwrap());
        assert_eq!(x["traceparent"], TRACEPARENT_A);
        assert_eq!(x["tracestate"], TRACESTATE);
    }
    assert_eq!(read[0]["attributes"]["type"], "OrderCreated");
    assert_eq!(read[0]["attributes"]["datacontenttype"], "application/json");
    assert_eq!(read[0]["data"], serde_json::json!({"n": 1}));
    assert_eq!(read[1]["attributes"]["datacontenttype"], "application/avro");
    assert_eq!(read[1]["data"]["hex"], "000000002a02ff00c3");
    assert_eq!(read[2]["attributes"]["type"], "OrderDeleted");
    assert!(read[2]["data"].is_null() && read[2]["attributes"].get("datacontenttype").is_none(), "{}", read[2]);

    // The source follows outbox.cloudevents_source; one that is no URI reference stops the
    // relay in config_error, saying why, and events wait for the fix.
    pg.set("outbox.cloudevents_source", "https://shop.example/{database}/outbox");
    wait_until("the new source", DEADLINE, || {
        let id = pg.sql("SELECT outbox.emit('order', 'probe', 'Probe', '{}')");
        c.try_until(std::time::Duration::from_secs(2), |rs| rs.iter().any(|r| r.event_id() == Some(id.as_str())));
        c.with_id(&id).first().and_then(|r| r.header("ce_source")) == Some("https://shop.example/postgres/outbox")
    });
    pg.set("outbox.cloudevents_source", "not a uri");
    pg.wait_for_state("config_error", DEADLINE);
    assert!(pg.status("last_error").contains("outbox.cloudevents_source"), "{}", pg.status("last_error"));
    let waiting = pg.sql("SELECT outbox.emit('order', 'waiting', 'Waiting', '{}')");
    // Back to plain: the waiting event arrives with plain headers.
    pg.set("outbox.record_format", "plain");
    pg.wait_for_state("streaming", DEADLINE);
    c.until("the waiting event", DEADLINE, |rs| rs.iter().any(|r| r.header("id") == Some(waiting.as_str())));
    assert!(one(&c, &waiting).headers.iter().all(|(k, _)| !k.starts_with("ce_")));
    // Nothing was produced twice across the rebuilds.
    for id in ids.iter().chain([&waiting]) {
        one(&c, id);
    }
}

/// Dead letters keep what makes each kind: the dead-letter topic gets the record unchanged
/// (null value, bytes, headers), the table keeps the bytes and their type apart from JSON, and
/// redelivery writes each event again as it was emitted.
#[test]
fn dead_letters_keep_tombstones_bytes_and_trace_context() {
    use RDKafkaRespErr::*;
    let props = "allow.auto.create.topics=false;topic.metadata.propagation.max.ms=1000";
    let settings = [("outbox.kafka_properties", props), ("outbox.on_permanent_error", "dead_letter")];
    let (kafka, pg) = outbox_tests::streaming_relay(&[], &settings);
    let mock = &kafka.cluster;
    let dead_letters = "outbox.dead_letter";
    kafka.create_topic(dead_letters, 1);
    kafka.create_topic("outbox.event.secret", 1);
    mock.topic_error("outbox.event.secret", RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).unwrap();
    mock.topic_error(dead_letters, RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).unwrap();
    let mut c = Collector::new(&kafka.bootstrap, &[(dead_letters, 1), ("outbox.event.secret", 1)]);

    // Both topics refuse: the table keeps each kind in its columns.
    let to_table = emit_every_kind(&pg, "secret");
    let stored = outbox_tests::eventually(DEADLINE, || pg.sql("SELECT count(*) FROM outbox.dead_letter") == "4");
    assert!(stored, "four rows in outbox.dead_letter; status {}", pg.sql("SELECT row_to_json(s) FROM outbox.status() s"));
    let row = |id: &str| {
        pg.sql(&format!(
            "SELECT concat_ws('|', coalesce(payload::text, 'null'), coalesce(encode(payload_binary, 'hex'), 'null'),
                    coalesce(content_type, 'null'), headers->>'traceparent', headers ? 'tracestate')
             FROM outbox.dead_letter WHERE id = '{id}'"
        ))
    };
    assert_eq!(row(&to_table[0]), format!("{{\"n\": 1}}|null|null|{TRACEPARENT_A}|t"));
    assert_eq!(row(&to_table[1]), format!("null|000000002a02ff00c3|application/avro|{TRACEPARENT_A}|t"));
    assert_eq!(row(&to_table[2]), format!("null|null|null|{TRACEPARENT_A}|t"));
    assert_eq!(row(&to_table[3]), format!("null||application/octet-stream|{TRACEPARENT_A}|t"));

    // The dead-letter topic takes them again (once the producer sees it, which a probe that
    // arrives there shows): the records unchanged, with the reasons appended.
    mock.topic_error(dead_letters, RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
    wait_until("the relay's producer to see the dead-letter topic fixed", DEADLINE, || {
        let probe = pg.sql("SELECT outbox.emit('secret', 'probe', 'Probe', '{}')");
        c.try_until(std::time::Duration::from_secs(2), |rs| rs.iter().any(|r| r.event_id() == Some(probe.as_str())))
    });
    let to_topic = emit_every_kind(&pg, "secret");
    for id in &to_topic {
        c.until(&format!("dead letter {id}"), DEADLINE, |rs| rs.iter().any(|r| r.event_id() == Some(id.as_str())));
    }
    let (json, avro, tombstone) = (one(&c, &to_topic[0]), one(&c, &to_topic[1]), one(&c, &to_topic[2]));
    assert_eq!(json.topic, dead_letters);
    assert_eq!(json.json(), serde_json::json!({"n": 1}));
    assert_eq!(avro.raw_value.as_deref(), Some(AVRO));
    assert_eq!(avro.header("content-type"), Some("application/avro"));
    assert_eq!(tombstone.raw_value, None);
    for r in [json, avro, tombstone] {
        assert_eq!(r.header("traceparent"), Some(TRACEPARENT_A));
        assert_eq!(r.header("outbox.dead_letter.topic"), Some("outbox.event.secret"));
    }

    // Fixed, and redelivered (in a transaction with a trace context of its own, which must not
    // replace the events'): each event arrives as it was emitted, with its id.
    mock.topic_error("outbox.event.secret", RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
    wait_until("the relay's producer to see the fix", DEADLINE, || {
        let probe = pg.sql("SELECT outbox.emit('secret', 'probe', 'Probe', '{}')");
        c.try_until(std::time::Duration::from_secs(2), |rs| rs.iter().any(|r| r.event_id() == Some(probe.as_str())));
        c.with_id(&probe).iter().any(|r| r.topic == "outbox.event.secret")
    });
    let redelivered = pg.sql(&format!(
        "BEGIN; SET LOCAL outbox.traceparent = '{TRACEPARENT_B}'; SELECT outbox.redeliver_all(); COMMIT;"
    ));
    assert!(redelivered.parse::<usize>().unwrap() >= 4, "{redelivered}");
    for id in &to_table {
        c.until(&format!("redelivered {id}"), DEADLINE, |rs| {
            rs.iter().any(|r| r.topic == "outbox.event.secret" && r.event_id() == Some(id.as_str()))
        });
    }
    let on_topic = |id: &str| c.with_id(id).into_iter().find(|r| r.topic == "outbox.event.secret").unwrap().clone();
    let (json, avro, tombstone, empty) = (on_topic(&to_table[0]), on_topic(&to_table[1]), on_topic(&to_table[2]), on_topic(&to_table[3]));
    assert_eq!(json.json(), serde_json::json!({"n": 1}));
    assert_eq!(json.header("tenant"), Some("t1"));
    assert_eq!((avro.raw_value.as_deref(), avro.header("content-type")), (Some(AVRO), Some("application/avro")));
    assert_eq!((tombstone.raw_value.as_deref(), tombstone.header("type")), (None, Some("OrderDeleted")));
    assert_eq!(empty.raw_value.as_deref(), Some(&b""[..]));
    for r in [&json, &avro, &tombstone, &empty] {
        assert_eq!((r.header("traceparent"), r.header("tracestate")), (Some(TRACEPARENT_A), Some(TRACESTATE)));
    }
}
