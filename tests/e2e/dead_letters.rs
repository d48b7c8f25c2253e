//! `outbox.on_permanent_error = dead_letter`: under a live write load, each permanent error of
//! the fault suite sets the refused events aside and the relay carries on. The checker counts
//! an event as arrived if it was delivered or dead-lettered (topic or table): 0 lost,
//! 0 phantom, per-key order of what was delivered, and the relay never in `delivery_error`.
//! When the dead-letter topic refuses too, the event lands in `outbox.dead_letter`, and a
//! redelivery after the fix brings it to its topic with its id.

use outbox_tests::{check, streaming_relay, wait_until, Collector, Emitted, Load, LoadShape, MockKafka, PgCluster, Record, DEADLINE};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEAD_LETTER_TOPIC: &str = "outbox.dead_letter";

/// Emits one event of `aggregatetype` (also its key, with a header) with a payload of about
/// `size` bytes, in a transaction of its own; returns its id.
fn emit_one(pg: &PgCluster, aggregatetype: &str, size: usize) -> String {
    pg.sql(&format!(
        "SELECT outbox.emit('{aggregatetype}', '{aggregatetype}-key', 'Probe', jsonb_build_object('pad', repeat('x', {size})), '{{\"trace\": \"t-{aggregatetype}\"}}')"
    ))
}

/// Watches `outbox.status()` in the background: whether the relay was ever seen stopped.
struct StopWatch {
    stopped: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopWatch {
    fn start(pg: &PgCluster) -> StopWatch {
        let stopped = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let pg = PgCluster::attach(pg, "postgres");
        let (s, d) = (stopped.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                if pg.try_sql("SELECT state FROM outbox.status()").is_ok_and(|state| state == "delivery_error") {
                    s.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        StopWatch { stopped, done, thread: Some(thread) }
    }

    fn assert_never_stopped(mut self) {
        self.done.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        assert!(!self.stopped.load(Ordering::Relaxed), "the relay stopped in delivery_error");
    }
}

/// The dead-letter record of event `id`, once it arrived.
fn dead_letter_of(c: &mut Collector, id: &str) -> Record {
    c.until(&format!("event {id} in the dead-letter topic"), DEADLINE, |rs| {
        rs.iter().any(|r| r.topic == DEAD_LETTER_TOPIC && r.header("id") == Some(id))
    });
    c.with_id(id).into_iter().find(|r| r.topic == DEAD_LETTER_TOPIC).unwrap().clone()
}

/// The dead-letter record keeps the original key, value and headers, and says why.
fn assert_set_aside(r: &Record, aggregatetype: &str, code: i32, why: &str) {
    assert_eq!(r.key.as_deref(), Some(format!("{aggregatetype}-key").as_str()));
    assert_eq!(r.header("type"), Some("Probe"));
    assert_eq!(r.header("aggregatetype"), Some(aggregatetype));
    assert_eq!(r.header("trace"), Some(format!("t-{aggregatetype}").as_str()));
    assert!(r.json()["pad"].is_string());
    assert_eq!(r.header("outbox.dead_letter.error_code"), Some(code.to_string().as_str()));
    let message = r.header("outbox.dead_letter.error_message").unwrap_or_default();
    assert!(message.contains(why), "error message {message:?} should say {why:?}");
    assert_eq!(r.header("outbox.dead_letter.topic"), Some(format!("outbox.event.{aggregatetype}").as_str()));
    let time = r.header("outbox.dead_letter.time").unwrap_or_default();
    assert!(time.len() == 24 && time.ends_with('Z') && time.starts_with("20"), "time {time:?}");
}

/// Delivered or dead-lettered, nothing else: the checker over what was delivered, with the
/// events found only in the dead-letter topic or table taken out of what must arrive.
fn assert_all_accounted(name: &str, emitted: &Emitted, delivered: &[Record], dead_ids: &HashSet<String>, max_dup: usize) {
    let delivered_ids: HashSet<&str> = delivered.iter().filter_map(|r| r.header("id")).collect();
    let committed: HashSet<&str> = emitted.committed.iter().map(|(id, _)| id.as_str()).collect();
    for id in dead_ids {
        assert!(committed.contains(id.as_str()), "[{name}] dead letter {id} was never committed (phantom)");
    }
    let mut rest = emitted.clone();
    rest.committed.retain(|(id, _)| !dead_ids.contains(id) || delivered_ids.contains(id.as_str()));
    eprintln!("[{name}] dead-lettered only: {}", emitted.committed.len() - rest.committed.len());
    check(&rest, delivered).assert_ok(name, max_dup);
}

fn table_ids(pg: &PgCluster) -> HashSet<String> {
    pg.sql("SELECT string_agg(id::text, ' ') FROM outbox.dead_letter").split_whitespace().map(String::from).collect()
}

/// Consumes until every one of `ids` is in Kafka (its topic or the dead-letter topic) or in
/// `outbox.dead_letter` (looked at every half second).
fn until_accounted<'a>(c: &mut Collector, pg: &PgCluster, ids: impl IntoIterator<Item = &'a str>) {
    let mut remaining: HashSet<String> = ids.into_iter().map(String::from).collect();
    let mut scanned = 0;
    let deadline = Instant::now() + DEADLINE;
    loop {
        for id in table_ids(pg) {
            remaining.remove(&id);
        }
        let done = c.try_until(Duration::from_millis(500), |rs| {
            for r in &rs[scanned..] {
                if let Some(id) = r.header("id") {
                    remaining.remove(id);
                }
            }
            scanned = rs.len();
            remaining.is_empty()
        });
        if done {
            return;
        }
        if Instant::now() > deadline {
            let some: Vec<&String> = remaining.iter().take(5).collect();
            panic!(
                "{} events neither delivered nor dead-lettered, for example {some:?}; consumed (partition, records, last offset, high watermark): {:?}; status: {}",
                remaining.len(),
                c.progress("outbox.event.dl", 3),
                pg.sql("SELECT row_to_json(s) FROM outbox.status() s")
            );
        }
    }
}

#[test]
fn permanent_errors_are_set_aside_under_load_and_the_relay_carries_on() {
    use RDKafkaRespErr::*;
    let props = "allow.auto.create.topics=false;topic.metadata.propagation.max.ms=1000";
    let settings = [("outbox.kafka_properties", props), ("outbox.on_permanent_error", "dead_letter")];
    let (kafka, pg): (MockKafka, PgCluster) = streaming_relay(&["outbox.event.dl", "outbox.event.big"], &settings);
    kafka.create_topic(DEAD_LETTER_TOPIC, 1);
    let mock = &kafka.cluster;
    let mut c = Collector::new(&kafka.bootstrap, &[("outbox.event.dl", 3), (DEAD_LETTER_TOPIC, 1)]);
    let watch = StopWatch::start(&pg);
    let load = Load::start(&pg, "dl", LoadShape::default());
    load.wait_for_committed(1000);
    let mut probes = Emitted::default();

    // Not authorized to write one aggregatetype's topic.
    kafka.create_topic("outbox.event.secret", 1);
    mock.topic_error("outbox.event.secret", RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).unwrap();
    let id = emit_one(&pg, "secret", 10);
    assert_set_aside(&dead_letter_of(&mut c, &id), "secret", 29, "Topic authorization failed");
    probes.commit(&id, "secret-key");
    load.wait_for_committed(load.committed() + 500);

    // A topic that does not exist and may not be auto-created.
    let id = emit_one(&pg, "missing", 10);
    assert_set_aside(&dead_letter_of(&mut c, &id), "missing", 3, "Unknown topic or partition");
    probes.commit(&id, "missing-key");
    load.wait_for_committed(load.committed() + 500);

    // The broker refuses a batch of the load as too large: those events are set aside.
    let before = c.records.len();
    mock.request_errors(RDKafkaApiKey::Produce, &[RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
    c.until("a batch refused as too large in the dead-letter topic", DEADLINE, |rs| {
        rs[before..].iter().any(|r| r.topic == DEAD_LETTER_TOPIC && r.header("outbox.dead_letter.error_code") == Some("10"))
    });
    load.wait_for_committed(load.committed() + 500);

    // Larger than the producer's message.max.bytes (outbox.max_record_bytes, lowered while the
    // event waited in WAL): its dead-letter copy is too large as well, so it goes to the table.
    pg.set("outbox.bootstrap_servers", "");
    pg.wait_for_state("unconfigured", DEADLINE);
    let big = emit_one(&pg, "big", 5000);
    pg.sql("ALTER SYSTEM SET outbox.max_record_bytes = 4000");
    pg.set("outbox.bootstrap_servers", &kafka.bootstrap);
    wait_until("the oversized event in outbox.dead_letter", DEADLINE, || table_ids(&pg).contains(&big));
    assert_eq!(
        pg.sql(&format!(
            "SELECT concat_ws('|', topic, error_code, error, dead_letter_error, aggregateid, headers->>'trace', length(payload->>'pad')) FROM outbox.dead_letter WHERE id = '{big}'"
        )),
        "outbox.event.big|10|MessageSizeTooLarge (Broker: Message size too large)|MessageSizeTooLarge (Broker: Message size too large)|big-key|t-big|5000"
    );
    probes.commit(&big, "big-key");
    pg.set("outbox.max_record_bytes", "1000000");
    load.wait_for_committed(load.committed() + 500);

    let mut emitted = load.stop();
    emitted.committed.extend(probes.committed.iter().cloned());
    until_accounted(&mut c, &pg, emitted.committed.iter().map(|(id, _)| id.as_str()));
    let (dead, delivered): (Vec<Record>, Vec<Record>) = c.records.iter().cloned().partition(|r| r.topic == DEAD_LETTER_TOPIC);
    let mut dead_ids = table_ids(&pg);
    dead_ids.extend(dead.iter().filter_map(|r| r.header("id").map(String::from)));
    // Exactly once for what was delivered; the dead-letter topic may hold an event twice.
    assert_all_accounted("dead letters: all permanent errors", &emitted, &delivered, &dead_ids, 0);

    let counted: usize = pg.status("dead_lettered").parse().unwrap();
    assert!(counted >= 4, "outbox.status() counts the dead letters: {counted}");
    assert_eq!(pg.status("state"), "streaming");
    assert!(!pg.log().contains("the relay stopped at this event"), "the relay never stopped");
    watch.assert_never_stopped();
}

#[test]
fn refused_by_the_dead_letter_topic_too_goes_to_the_table_and_is_redelivered_after_the_fix() {
    use RDKafkaRespErr::*;
    let props = "allow.auto.create.topics=false;topic.metadata.propagation.max.ms=1000";
    let settings = [("outbox.kafka_properties", props), ("outbox.on_permanent_error", "dead_letter")];
    let (kafka, pg) = streaming_relay(&["outbox.event.dl"], &settings);
    let mock = &kafka.cluster;
    kafka.create_topic(DEAD_LETTER_TOPIC, 1);
    kafka.create_topic("outbox.event.secret", 1);
    mock.topic_error(DEAD_LETTER_TOPIC, RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).unwrap();
    mock.topic_error("outbox.event.secret", RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).unwrap();
    let mut c = Collector::new(&kafka.bootstrap, &[("outbox.event.dl", 3), ("outbox.event.secret", 1)]);
    let watch = StopWatch::start(&pg);
    let load = Load::start(&pg, "dl", LoadShape::default());
    load.wait_for_committed(500);

    let ids: Vec<String> = (0..3).map(|_| emit_one(&pg, "secret", 10)).collect();
    wait_until("the refused events in outbox.dead_letter", DEADLINE, || table_ids(&pg).len() == 3);
    assert_eq!(table_ids(&pg), ids.iter().cloned().collect::<HashSet<_>>());
    let row = pg.sql(&format!(
        "SELECT topic || '|' || error_code || '|' || error || '|' || dead_letter_error || '|' || aggregateid || '|' || type || '|' || headers::text FROM outbox.dead_letter WHERE id = '{}'",
        ids[0]
    ));
    assert_eq!(
        row,
        "outbox.event.secret|29|TopicAuthorizationFailed (Broker: Topic authorization failed)|TopicAuthorizationFailed (Broker: Topic authorization failed)|secret-key|Probe|{\"trace\": \"t-secret\"}"
    );
    load.wait_for_committed(load.committed() + 500);

    // The operator fixes the cause, and waits until the relay's producer sees it (librdkafka
    // learns a topic's new state from its next metadata refresh): until a new event to the
    // topic arrives there instead of in the table.
    mock.topic_error("outbox.event.secret", RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
    let mut probes = Emitted::default();
    loop {
        let probe = emit_one(&pg, "secret", 10);
        probes.commit(&probe, "secret-key");
        until_accounted(&mut c, &pg, [probe.as_str()]);
        if !c.with_id(&probe).is_empty() {
            break;
        }
    }
    // Then redelivers: one event, then all the others.
    assert_eq!(pg.sql(&format!("SELECT outbox.redeliver('{}')", ids[0])), "t");
    let rest: usize = pg.sql("SELECT outbox.redeliver_all()").parse().unwrap();
    assert!(rest >= 2, "the other two, and probes sent before the fix took effect: {rest}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM outbox.dead_letter"),
        "0",
        "{} / ids {ids:?} / probes {:?} / {}",
        pg.sql("SELECT string_agg(concat_ws(' ', id, aggregateid, error, dead_letter_error, dead_lettered_at, committed_at), '; ') FROM outbox.dead_letter"),
        probes.committed,
        pg.sql("SELECT row_to_json(s) FROM outbox.status() s")
    );
    let emitted = load.stop();
    for id in &ids {
        probes.commit(id, "secret-key");
    }
    c.until_all(&emitted, DEADLINE);
    c.until_all(&probes, DEADLINE);
    // Every redelivered event arrives on its topic with its id, key and headers; it left its
    // key's order (it comes after events of its key committed later), which the checker
    // therefore judges on the load alone.
    for (id, _) in &probes.committed {
        let r = &c.with_id(id)[0];
        assert_eq!((r.topic.as_str(), r.key.as_deref(), r.header("trace")), ("outbox.event.secret", Some("secret-key"), Some("t-secret")));
    }
    let load_records: Vec<Record> = c.records.iter().filter(|r| r.topic == "outbox.event.dl").cloned().collect();
    check(&emitted, &load_records).assert_ok("dead letters: table, then redelivered", 0);
    let counted: usize = pg.status("dead_lettered").parse().unwrap();
    assert_eq!(counted, 3 + probes.committed.len() - ids.len() - 1, "the three, and every probe but the last");
    watch.assert_never_stopped();
}
