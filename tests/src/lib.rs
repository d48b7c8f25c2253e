//! Test harness for outbox_ext: a scratch PostgreSQL 15 cluster with the extension preloaded,
//! an in-process librdkafka mock Kafka cluster, and a consumer that reads back what the relay
//! produced. Every wait has a deadline; nothing sleeps to synchronise.

pub mod checker;
pub mod cluster;
pub mod kafka;
pub mod load;

pub use checker::{check, Emitted, Report};
pub use cluster::PgCluster;
pub use kafka::{Collector, MockKafka, Record};
pub use load::{Load, LoadShape};

use std::time::{Duration, Instant};

/// How long a test waits for anything before it fails.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A mock Kafka cluster of 3 brokers with `topics` (3 partitions each), and a PostgreSQL
/// cluster whose relay produces to it, already streaming. `extra` are postgresql.conf lines.
pub fn streaming_relay(topics: &[&str], extra: &[(&str, &str)]) -> (MockKafka, PgCluster) {
    let kafka = MockKafka::start(3);
    for t in topics {
        kafka.create_topic(t, 3);
    }
    let mut settings = vec![("outbox.bootstrap_servers", kafka.bootstrap.as_str())];
    settings.extend_from_slice(extra);
    let pg = PgCluster::start(&settings);
    pg.wait_for_state("streaming", DEADLINE);
    (kafka, pg)
}

/// Polls `cond` until it returns true or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
