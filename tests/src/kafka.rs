//! The Kafka side of the tests: librdkafka's mock cluster (real Kafka protocol on 127.0.0.1
//! ports, reachable from the Postgres worker) and a consumer that collects records.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct MockKafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub bootstrap: String,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// One mock cluster per test process at a time. `broker_up` listens again on the port the
/// broker had; a mock cluster started meanwhile by a parallel test can take that port, and
/// librdkafka then aborts the process. Test binaries already run one after another.
static ONE_MOCK_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits for this process's previous mock cluster to be gone.
pub(crate) fn one_mock_cluster() -> std::sync::MutexGuard<'static, ()> {
    ONE_MOCK_CLUSTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MockKafka {
    /// A mock cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> MockKafka {
        let guard = one_mock_cluster();
        let cluster = MockCluster::new(brokers).expect("mock cluster starts");
        let bootstrap = cluster.bootstrap_servers();
        MockKafka { cluster, bootstrap, _one_at_a_time: guard }
    }

    /// Takes broker `id` down: its connections close and it refuses new ones.
    pub fn broker_down(&self, id: i32) {
        crate::no_spawning(|| self.cluster.broker_down(id)).expect("broker down");
    }

    pub fn broker_up(&self, id: i32) {
        crate::no_spawning(|| self.cluster.broker_up(id)).expect("broker up");
    }

    /// Creates `topic` with `partitions` partitions, replicated on every broker.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.cluster.create_topic(topic, partitions, 1).expect("topic created");
    }
}

/// One consumed record, with everything a test asserts on.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    /// The value's bytes as they are (None: a null value, a tombstone).
    pub raw_value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The event id, in either record format (`id`, or CloudEvents' `ce_id`).
    pub fn event_id(&self) -> Option<&str> {
        self.header("id").or(self.header("ce_id"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.value.as_deref().unwrap_or("null")).expect("value is JSON")
    }
}

/// Reads every partition of some topics from the beginning and keeps what it read.
pub struct Collector {
    consumer: BaseConsumer,
    pub records: Vec<Record>,
}

impl Collector {
    /// `topics` maps each topic to its partition count.
    pub fn new(bootstrap: &str, topics: &[(&str, i32)]) -> Collector {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "outbox-tests")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in topics {
            for p in 0..*partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
            }
        }
        consumer.assign(&tpl).expect("assign");
        Collector { consumer, records: Vec::new() }
    }

    fn poll_once(&mut self, timeout: Duration) {
        if let Some(result) = self.consumer.poll(timeout) {
            let m = match result {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("consumer: {e}");
                    return;
                }
            };
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.records.push(Record {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
                raw_value: m.payload().map(<[u8]>::to_vec),
                headers,
                timestamp_ms: m.timestamp().to_millis(),
            });
        }
    }

    /// Consumes until `done(records)` holds; panics after `timeout` with what was seen.
    pub fn until(&mut self, what: &str, timeout: Duration, done: impl FnMut(&[Record]) -> bool) {
        if !self.try_until(timeout, done) {
            panic!("timed out after {timeout:?} waiting for {what}; consumed {} records", self.records.len());
        }
    }

    /// Consumes until `done(records)` holds (true) or `timeout` passed (false).
    pub fn try_until(&mut self, timeout: Duration, mut done: impl FnMut(&[Record]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.records) {
            if Instant::now() >= deadline {
                return false;
            }
            self.poll_once(Duration::from_millis(100));
        }
        true
    }

    /// Consumes until `n` records with header `type == event_type` (or any, for None) arrived.
    pub fn until_count(&mut self, n: usize, timeout: Duration) {
        self.until(&format!("{n} records"), timeout, |r| r.len() >= n);
    }

    /// Records grouped by key, in partition order.
    pub fn by_key(&self) -> HashMap<String, Vec<&Record>> {
        let mut map: HashMap<String, Vec<&Record>> = HashMap::new();
        for r in &self.records {
            map.entry(r.key.clone().unwrap_or_default()).or_default().push(r);
        }
        map
    }

    /// Consumes until every committed id of `emitted` has arrived.
    pub fn until_all(&mut self, emitted: &crate::Emitted, timeout: Duration) {
        let want: std::collections::HashSet<&str> = emitted.committed.iter().map(|(id, _)| id.as_str()).collect();
        let mut seen = std::collections::HashSet::new();
        let mut scanned = 0;
        self.until(&format!("{} committed events", want.len()), timeout, |records| {
            for r in &records[scanned..] {
                if let Some(id) = r.event_id() {
                    if want.contains(id) {
                        seen.insert(id.to_string());
                    }
                }
            }
            scanned = records.len();
            seen.len() == want.len()
        });
    }

    /// Per partition of `topic` (`partitions` of them): records consumed, the highest offset
    /// consumed, and the broker's high watermark. For failure messages.
    pub fn progress(&self, topic: &str, partitions: i32) -> Vec<(i32, usize, i64, i64)> {
        (0..partitions)
            .map(|p| {
                let mine: Vec<&Record> = self.records.iter().filter(|r| r.topic == topic && r.partition == p).collect();
                let high = self.consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).map_or(-1, |(_, h)| h);
                (p, mine.len(), mine.iter().map(|r| r.offset).max().unwrap_or(-1), high)
            })
            .collect()
    }

    /// Consumes until every partition of `topics` (topic, partition count) has been read up to
    /// the broker's high watermark as it stands now: everything produced so far is in
    /// `records`. For asserting that something never arrived, once nothing can produce it.
    pub fn until_end(&mut self, topics: &[(&str, i32)], timeout: Duration) {
        let mut ends = Vec::new();
        for (topic, partitions) in topics {
            for p in 0..*partitions {
                let (_, high) = self.consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks");
                ends.push((topic.to_string(), p, high));
            }
        }
        self.until("the end of every partition", timeout, |records| {
            ends.iter().all(|(topic, p, high)| {
                *high == 0 || records.iter().any(|r| r.topic == *topic && r.partition == *p && r.offset + 1 >= *high)
            })
        });
    }

    /// Records whose `id` header equals `id`.
    pub fn with_id(&self, id: &str) -> Vec<&Record> {
        self.records.iter().filter(|r| r.event_id() == Some(id)).collect()
    }
}
