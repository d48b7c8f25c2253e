//! outbox-producer-limit: K, the producer's ceiling for `make bench`. Reads back the records
//! the relay produced to TOPIC (all that the broker still holds: the dev broker keeps the newest
//! 100,000 or 5 MB per partition), then produces COUNT records cycling through them, each
//! unchanged (topic, partition, key, value, headers, timestamp), to the same broker with the relay's
//! producer settings (`outbox_core::kafka_settings::producer_config` with KAFKA_PROPERTIES as
//! `outbox.kafka_properties`, none by default, and the default `outbox.max_record_bytes`), timed from the first hand-over to the last
//! acknowledgement. The relay's own work (decoding, opening, routing, tracking) is absent: what
//! is left is librdkafka and the broker.
//!
//! Usage: outbox-producer-limit BOOTSTRAP TOPIC PARTITIONS COUNT [KAFKA_PROPERTIES]
//! Prints `events=N distinct=D seconds=S rate=R failed=F cpu_us_per_event=C` on one line: C is
//! the process's CPU time (all its threads, librdkafka's included) over the same span, per event.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The relay's own produce call (by topic handle, header names as bytes): K produces as the
/// relay's producing thread does.
#[path = "../../../src/ffi/kafka.rs"]
#[allow(dead_code)]
mod kafka;

struct Record {
    partition: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp_ms: Option<i64>,
}

#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Counts {}

impl ProducerContext for Counts {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, _: usize) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Every record the broker holds in `topic`'s `partitions`, partitions interleaved as they come.
fn read_records(bootstrap: &str, topic: &str, partitions: i32) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-producer-limit")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    let mut high = Vec::new();
    for p in 0..partitions {
        let (lo, hi) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks");
        high.push(hi);
        remaining += (hi > lo) as usize;
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while remaining > 0 {
        assert!(Instant::now() < deadline, "read only {} records from {topic}", records.len());
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = m.expect("consume");
        let headers = m
            .headers()
            .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
            .unwrap_or_default();
        if m.offset() + 1 == high[m.partition() as usize] {
            remaining -= 1;
        }
        records.push(Record {
            partition: m.partition(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: m.timestamp().to_millis(),
        });
    }
    assert!(!records.is_empty(), "{topic} holds no record");
    records
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if !(4..=5).contains(&a.len()) {
        eprintln!("usage: outbox-producer-limit BOOTSTRAP TOPIC PARTITIONS COUNT [KAFKA_PROPERTIES]");
        std::process::exit(2);
    }
    let (bootstrap, topic) = (&a[0], &a[1]);
    let partitions: i32 = a[2].parse().expect("PARTITIONS");
    let count: usize = a[3].parse().expect("COUNT");
    let records = read_records(bootstrap, topic, partitions);
    // As the relay's process does (src/ffi/kafka.rs).
    kafka::without_fastbins();

    // The relay's producer settings: defaults, KAFKA_PROPERTIES as outbox.kafka_properties
    // (none by default), the default outbox.max_record_bytes (1,000,000).
    let properties = a.get(4).map_or("", String::as_str);
    let config = outbox_core::kafka_settings::producer_config(bootstrap, properties, 1_000_000).expect("settings");
    let mut cc = ClientConfig::new();
    for (k, v) in &config {
        cc.set(k, v);
    }
    let producer: BaseProducer<Counts> = cc.create_with_context(Counts::default()).expect("producer");

    let started = Instant::now();
    let cpu_started = cpu_seconds();
    let handle = kafka::TopicHandle::new(&producer, topic).expect("topic");
    for r in records.iter().cycle().take(count) {
        loop {
            let record = kafka::Record {
                partition: Some(r.partition),
                key: r.key.as_deref().unwrap_or_default(),
                value: r.value.as_deref(),
                headers: r.headers.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())),
                timestamp_ms: r.timestamp_ms.unwrap_or(0),
                opaque: 0,
            };
            match kafka::produce(&producer, &handle, record) {
                Ok(()) => break,
                Err(RDKafkaErrorCode::QueueFull) => {
                    // Queue full (the relay's bound): serve delivery reports, then try again.
                    producer.poll(Duration::ZERO);
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => panic!("produce: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    let total = count as u64;
    while producer.context().acked.load(Ordering::Relaxed) + producer.context().failed.load(Ordering::Relaxed) < total {
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_micros(200));
        assert!(started.elapsed() < Duration::from_secs(600), "acknowledgements stopped");
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_started;
    println!(
        "events={total} distinct={} seconds={seconds:.3} rate={:.0} failed={} cpu_us_per_event={:.2}",
        records.len(),
        total as f64 / seconds,
        producer.context().failed.load(Ordering::Relaxed),
        cpu / total as f64 * 1e6
    );
}

/// CPU time of this process so far (user and system, all threads), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name (in parentheses, which may hold spaces): utime and
    // stime are the 14th and 15th fields of the line, the 12th and 13th after it.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    // In USER_HZ, which is 100 on Linux (`getconf CLK_TCK`).
    ticks / 100.0
}
