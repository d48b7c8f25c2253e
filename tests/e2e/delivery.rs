//! Events reach Kafka with the right topic, key, value, headers and timestamp, complete and in
//! per-key order, and outbox.status() reports the delivery.

use outbox_tests::{check, streaming_relay, Collector, Emitted, DEADLINE};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, PurgeConfig};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn record_has_topic_key_value_headers_and_commit_timestamp() {
    let (kafka, pg) = streaming_relay(&["outbox.event.order"], &[]);
    let started = Instant::now();
    let before_ms: i64 = pg.sql("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").parse().unwrap();
    let id = pg.sql(
        "SELECT outbox.emit('order', 'o-42', 'OrderCreated', \
         '{\"amount\": 42.5, \"lines\": [{\"sku\": \"A-1\"}], \"note\": \"é ü\"}', \
         '{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\", \"tenant\": \"acme\"}')",
    );
    let after_ms: i64 = pg.sql("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").parse().unwrap();

    let mut c = Collector::new(&kafka.bootstrap, &[("outbox.event.order", 3)]);
    c.until_count(1, DEADLINE);
    let r = &c.records[0];
    assert_eq!(r.topic, "outbox.event.order");
    assert_eq!(r.key.as_deref(), Some("o-42"));
    assert_eq!(r.value.as_deref(), Some(r#"{"note": "é ü", "lines": [{"sku": "A-1"}], "amount": 42.5}"#));
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["id", "type", "aggregatetype", "commit_lsn", "commit_index", "tenant", "traceparent"]);
    // The position: the commit record's LSN, in decimal, and the event's index in its transaction.
    let commit_lsn: u64 = r.header("commit_lsn").unwrap().parse().expect("decimal");
    let lsn_of = |decimal: u64| pg.sql(&format!("SELECT '0/0'::pg_lsn + {decimal}"));
    assert!(pg.sql(&format!("SELECT '{}'::pg_lsn < pg_current_wal_lsn()", lsn_of(commit_lsn))) == "t");
    assert_eq!(r.header("commit_index"), Some("0"));
    assert_eq!(r.header("id"), Some(id.as_str()));
    assert_eq!(r.header("type"), Some("OrderCreated"));
    assert_eq!(r.header("aggregatetype"), Some("order"));
    assert_eq!(r.header("traceparent"), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
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
    let observed_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(pg.status("state"), "streaming");
    // outbox.ack_latency() counts the transaction once, within the time this test saw it take
    // (plus the histogram's 10% bucket width).
    assert_eq!(pg.sql("SELECT transactions FROM outbox.ack_latency() WHERE le_ms = 'Infinity'"), "1");
    let le_ms: f64 = pg.sql("SELECT min(le_ms) FROM outbox.ack_latency() WHERE transactions = 1").parse().unwrap();
    assert!(le_ms <= observed_ms * 1.1 + 0.1, "ack latency bucket {le_ms} ms, observed {observed_ms:.1} ms");
    assert_eq!(pg.status("slot_name"), "outbox_postgres_5", "outbox_<database>_<oid>");
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

/// `(commit_lsn, commit_index)` orders every event of a database: it strictly increases in
/// every partition, and each transaction's events are numbered 0..n-1 in emit order, those
/// rolled back to a savepoint taking no number. Concurrent writers interleave their
/// transactions, so commit order differs from the order in which the events were written.
#[test]
fn positions_rise_in_every_partition_and_number_each_transactions_events() {
    let topic = "outbox.event.pos";
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let load = outbox_tests::Load::start(
        &pg,
        "pos",
        outbox_tests::LoadShape { writers: 2, batch: 7, rollback_every: 4, savepoint_every: 3, ..Default::default() },
    );
    const TXNS: i64 = 30;
    for t in 0..TXNS {
        // Events n = 0..4, a rolled-back one, then n = 5..9: the committed ones take 0..9.
        pg.sql(&format!(
            "BEGIN;
             SELECT count(outbox.emit('pos', 'k' || n, 'E', jsonb_build_object('txn', {t}, 'n', n))) FROM generate_series(0, 4) n;
             SAVEPOINT s;
             SELECT outbox.emit('pos', 'k0', 'E', jsonb_build_object('txn', {t}, 'n', -1));
             ROLLBACK TO s;
             SELECT count(outbox.emit('pos', 'k' || n, 'E', jsonb_build_object('txn', {t}, 'n', n))) FROM generate_series(5, 9) n;
             COMMIT;"
        ));
    }
    let emitted = load.stop();
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_all(&emitted, DEADLINE);
    c.until_count(emitted.committed.len() + (TXNS * 10) as usize, DEADLINE);
    c.until_end(&[(topic, 3)], DEADLINE);
    let position = |r: &outbox_tests::Record| -> (u64, u64) {
        (r.header("commit_lsn").unwrap().parse().unwrap(), r.header("commit_index").unwrap().parse().unwrap())
    };
    for p in 0..3 {
        let positions: Vec<(u64, u64)> = c.records.iter().filter(|r| r.partition == p).map(position).collect();
        assert!(positions.len() > 10, "partition {p} has {} records", positions.len());
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "partition {p} not strictly increasing: {positions:?}");
    }
    let mut by_txn: HashMap<u64, Vec<(u64, i64)>> = HashMap::new();
    for r in &c.records {
        let (lsn, index) = position(r);
        by_txn.entry(lsn).or_default().push((index, r.json()["n"].as_i64().unwrap_or(i64::MIN)));
    }
    let mut numbered = 0;
    for (lsn, mut events) in by_txn {
        events.sort();
        let indexes: Vec<u64> = events.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, (0..events.len() as u64).collect::<Vec<_>>(), "transaction at {lsn}");
        if events.iter().any(|(_, n)| *n >= 0) && events.len() == 10 {
            // One of ours: index i is the i-th committed emit, n = i.
            assert!(events.iter().all(|(i, n)| *i as i64 == *n), "transaction at {lsn}: {events:?}");
            numbered += 1;
        }
    }
    assert_eq!(numbered, TXNS, "every 10-event transaction numbered in emit order");
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
    // The partition is Kafka's default partitioner's, which the relay can compute itself.
    for (key, partitions) in &partitions_of_key {
        let expected = outbox_core::partition::for_key(key.as_bytes(), 3) as i32;
        assert_eq!(partitions.iter().copied().collect::<Vec<_>>(), [expected], "key {key}");
    }
    let used: HashSet<i32> = c.records.iter().map(|r| r.partition).collect();
    assert_eq!(used.len(), 3, "keys spread over all 3 partitions");
    outbox_tests::wait_until("status to count every delivery", DEADLINE, || {
        pg.status("events_delivered") == EVENTS.to_string()
    });
    // One latency per transaction, not per event.
    outbox_tests::wait_until("ack_latency to count the 20 transactions", DEADLINE, || {
        pg.sql("SELECT transactions FROM outbox.ack_latency() WHERE le_ms = 'Infinity'") == "20"
    });
}

/// A process's resident anonymous memory in MB, from /proc.
fn rss_anon_mb(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[test]
fn one_transaction_of_100k_events_spills_to_disk_and_worker_memory_stays_bounded() {
    let topic = "outbox.event.huge";
    // 100,000 events of about 200 bytes: some 20 MB of changes, five times the relay's work
    // memory. logical_decoding_work_mem (every other decoder's) does not apply to the relay.
    let (kafka, pg) =
        streaming_relay(&[topic], &[("outbox.decoding_work_mem", "4MB"), ("logical_decoding_work_mem", "1GB")]);
    let pid = pg.worker_pid().expect("the relay runs");
    let idle_mb = rss_anon_mb(pid);
    let peak = Arc::new(std::sync::Mutex::new(idle_mb));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let now = rss_anon_mb(pid);
                let mut p = peak.lock().unwrap();
                *p = p.max(now);
                drop(p);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut emitted = Emitted::default();
    let started = Instant::now();
    for (id, key) in pg.emit_batch("huge", "agg-", 100, 0, 100_000, true) {
        emitted.commit(id, key);
    }
    let committed_in = started.elapsed();
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_all(&emitted, DEADLINE);
    let delivered_in = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_mb = *peak.lock().unwrap();
    let spilled = pg.sql(
        "SELECT spill_txns || ' ' || pg_size_pretty(spill_bytes) FROM pg_stat_replication_slots WHERE slot_name = (SELECT slot_name FROM outbox.status())",
    );
    eprintln!(
        "[100k-event transaction] committed in {committed_in:?}, all consumed after {delivered_in:?}; \
         spilled (txns, bytes): {spilled}; worker RssAnon idle {idle_mb:.1} MB, peak {peak_mb:.1} MB"
    );
    check(&emitted, &c.records).assert_ok("100k-event transaction", 0);
    assert_eq!(pg.worker_pid(), Some(pid), "the worker ran throughout");
    assert!(spilled.split(' ').next().and_then(|n| n.parse::<i64>().ok()).unwrap_or(0) > 0, "decoding spilled: {spilled}");
    assert!(peak_mb < 64.0, "worker memory peaked at {peak_mb:.1} MB");
}

/// The record's size as librdkafka measures it against `message.max.bytes`, written out here
/// from librdkafka's rule (not from outbox_core): 36 bytes of varint headroom, key, value, and
/// for each header the zig-zag varint lengths of its name and value and the bytes themselves.
fn librdkafka_record_size(key: &str, value: &str, headers: &[(&str, &str)]) -> usize {
    let varint = |n: usize| match n * 2 {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        _ => 4,
    };
    36 + key.len() + value.len() + headers.iter().map(|(k, v)| varint(k.len()) + k.len() + varint(v.len()) + v.len()).sum::<usize>()
}

/// `outbox.max_record_bytes` limits the whole record, and is the producer's `message.max.bytes`:
/// whichever part of the event makes the record large (key, value, type, a header), a record of
/// the limit (with the position headers at their longest) reaches Kafka, and one byte more is
/// refused by emit with 54000 and never written.
#[test]
fn records_up_to_max_record_bytes_arrive_and_one_byte_more_is_refused_by_emit() {
    const MAX: usize = 5000;
    let topic = "outbox.event.edge";
    let (kafka, pg) = streaming_relay(&[topic], &[("outbox.max_record_bytes", "5000")]);
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    let id = "01234567-89ab-7cde-8f01-23456789abcd";
    // (part, the record's size with n filler bytes in that part, emit's arguments for n)
    type Part = (&'static str, Box<dyn Fn(usize) -> usize>, Box<dyn Fn(usize) -> String>);
    // emit counts the position headers at their longest: the commit is not known yet.
    const LONGEST: &str = "18446744073709551615";
    let fixed = move |type_: &str| -> Vec<(String, String)> {
        [("id", id), ("type", type_), ("aggregatetype", "edge"), ("commit_lsn", LONGEST), ("commit_index", LONGEST)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let sized = move |key: &str, value: &str, headers: Vec<(String, String)>| {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        librdkafka_record_size(key, value, &headers)
    };
    let parts: Vec<Part> = vec![
        (
            "key",
            Box::new(move |n| sized(&"k".repeat(n), "{}", fixed("T"))),
            Box::new(|n| format!("'edge', repeat('k', {n}), 'T', '{{}}'")),
        ),
        (
            "value",
            Box::new(move |n| sized("k", &format!("\"{}\"", "v".repeat(n)), fixed("T"))),
            Box::new(|n| format!("'edge', 'k', 'T', to_jsonb(repeat('v', {n}))")),
        ),
        (
            "type",
            Box::new(move |n| sized("k", "{}", fixed(&"t".repeat(n)))),
            Box::new(|n| format!("'edge', 'k', repeat('t', {n}), '{{}}'")),
        ),
        (
            "header",
            Box::new(move |n| {
                let mut headers = fixed("T");
                headers.push(("h".into(), "h".repeat(n)));
                sized("k", "{}", headers)
            }),
            Box::new(|n| format!("'edge', 'k', 'T', '{{}}', jsonb_build_object('h', repeat('h', {n}))")),
        ),
    ];
    // librdkafka itself, with message.max.bytes = MAX, takes a record of MAX bytes by this
    // test's measure and refuses one of MAX + 1.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("message.max.bytes", MAX.to_string())
        .create()
        .unwrap();
    let probe = |n: usize| {
        let value = "v".repeat(n - librdkafka_record_size("", "", &[]));
        // Sized at send time; purged before it leaves, and never to the topic under test.
        producer.send(BaseRecord::<(), str>::to("edge-probe").payload(&value)).map_err(|(e, _)| e)
    };
    assert!(probe(MAX).is_ok());
    assert!(matches!(
        probe(MAX + 1),
        Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge))
    ));
    producer.purge(PurgeConfig::default().queue());

    let mut delivered = Vec::new();
    for (part, size, args) in &parts {
        // The most filler that fits (a varint that grows can skip the exact limit by one byte).
        let n = (1..MAX).take_while(|&n| size(n) <= MAX).last().unwrap();
        assert!(MAX - size(n) <= 1, "{part}: {} bytes", size(n));
        delivered.push((*part, pg.sql(&format!("SELECT outbox.emit({})", args(n))), size(n)));
        let err = pg.sql_error(&format!("SELECT outbox.emit({})", args(n + 1)));
        assert!(err.starts_with("54000") && err.contains("outbox.max_record_bytes"), "{part}: {err}");
    }
    let marker = pg.sql("SELECT outbox.emit('edge', 'marker', 'Marker', '{}')");
    let expected: HashSet<String> = delivered.iter().map(|(_, id, _)| id.clone()).chain([marker]).collect();
    c.until("the events within the limit and the marker", DEADLINE, |r| {
        r.iter().filter_map(|r| r.header("id")).filter(|id| expected.contains(*id)).count() == expected.len()
    });
    assert_eq!(pg.status("state"), "streaming", "{}", pg.status("last_error"));
    assert_eq!(c.records.len(), expected.len(), "only the events within the limit and the marker arrive");
    for (part, id, size) in delivered {
        let r = c.with_id(&id);
        assert_eq!(r.len(), 1, "{part}");
        let headers: Vec<(&str, &str)> = r[0].headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let measured = librdkafka_record_size(r[0].key.as_deref().unwrap(), r[0].value.as_deref().unwrap(), &headers);
        // Shorter than sized by what the real position's digits leave of the longest ones.
        let unused = 2 * LONGEST.len() - r[0].header("commit_lsn").unwrap().len() - r[0].header("commit_index").unwrap().len();
        assert_eq!(measured, size - unused, "{part}: the record that arrived is the one sized");
        eprintln!("[max_record_bytes {MAX}] {part}: a {size}-byte record (at the longest position) was taken and arrived; one byte more was refused");
    }
}

/// `outbox_core::partition::for_key` is librdkafka's `murmur2_random` for keyed records (the
/// Java client's partitioner), for keys of every length and partition counts up to 1000.
#[test]
fn the_core_partitioner_is_librdkafkas() {
    let mut keys: Vec<Vec<u8>> = vec![b"".to_vec(), "é ü 😀".as_bytes().to_vec(), vec![0xff; 1000]];
    keys.extend((0..2000).map(|i| format!("order-{i}-{}", "x".repeat(i % 11)).into_bytes()));
    for key in &keys {
        for partitions in [1, 2, 3, 7, 12, 64, 1000] {
            // SAFETY: for a non-empty key librdkafka's partitioner only hashes `key`; the topic
            // and opaques are not read. An empty key is hashed too (only a NULL one is not).
            let theirs = unsafe {
                rdkafka::bindings::rd_kafka_msg_partitioner_murmur2_random(
                    std::ptr::null(),
                    key.as_ptr().cast(),
                    key.len(),
                    partitions,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(outbox_core::partition::for_key(key, partitions as u32) as i32, theirs, "{key:?} over {partitions}");
        }
    }
}
