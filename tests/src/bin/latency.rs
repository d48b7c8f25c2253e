//! outbox-latency: measures end-to-end latency of events whose payload carries the emit time.
//!
//! Usage: outbox-latency BOOTSTRAP TOPIC PARTITIONS COUNT TIMEOUT_SECS
//!
//! Each payload must have a field `t`: the emit time in Unix microseconds (the benchmark sets
//! it with clock_timestamp() right before COMMIT). For every record it records
//! receive time − t (emit → consumer receipt) and receive time − record timestamp (commit →
//! consumer receipt, with the commit time in milliseconds). Prints one line of percentiles in
//! milliseconds as `key=value` pairs.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 5 {
        eprintln!("usage: outbox-latency BOOTSTRAP TOPIC PARTITIONS COUNT TIMEOUT_SECS");
        std::process::exit(2);
    }
    let (bootstrap, topic) = (&a[0], &a[1]);
    let partitions: i32 = a[2].parse().unwrap();
    let count: usize = a[3].parse().unwrap();
    let timeout = Duration::from_secs(a[4].parse().unwrap());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-latency")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "1")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::End).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    // Ready once assigned: tell the caller on stdout so it can start the load.
    println!("ready");
    let mut emit_lat = Vec::with_capacity(count);
    let mut commit_lat = Vec::with_capacity(count);
    let deadline = Instant::now() + timeout;
    while emit_lat.len() < count && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            let received = now_us();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or(b"{}")).unwrap_or_default();
            if let Some(t) = v["t"].as_i64() {
                emit_lat.push(received - t);
            }
            if let Some(ts) = m.timestamp().to_millis() {
                commit_lat.push(received - ts * 1000);
            }
        }
    }
    emit_lat.sort_unstable();
    commit_lat.sort_unstable();
    println!(
        "received={} emit_p50_ms={:.2} emit_p99_ms={:.2} emit_p999_ms={:.2} emit_max_ms={:.2} commit_p50_ms={:.2} commit_p99_ms={:.2} commit_p999_ms={:.2}",
        emit_lat.len(),
        percentile(&emit_lat, 0.5),
        percentile(&emit_lat, 0.99),
        percentile(&emit_lat, 0.999),
        percentile(&emit_lat, 1.0),
        percentile(&commit_lat, 0.5),
        percentile(&commit_lat, 0.99),
        percentile(&commit_lat, 0.999),
    );
}
