//! Test harness for outbox_ext: a scratch PostgreSQL 15 cluster with the extension preloaded,
//! an in-process librdkafka mock Kafka cluster, and a consumer that reads back what the relay
//! produced. Every wait has a deadline; nothing sleeps to synchronise.

pub mod cluster;
pub mod kafka;

pub use cluster::PgCluster;
pub use kafka::{Collector, MockKafka, Record};

use std::time::{Duration, Instant};

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
