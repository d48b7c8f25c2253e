//! What Kafka already holds: the relay's half of the exactly-once rule (the rule itself, and
//! why it is sound, is `outbox_core::tail`).
//!
//! With `outbox.exactly_once` on, the relay picks each record's partition itself (Kafka's
//! murmur2 partitioner, under the partition count it read once per topic for this producer),
//! and before it produces to a partition for the first time it reads that partition backwards
//! from its end with a consumer of its own. Events found there are acknowledged without being
//! produced again. The read runs on the worker's main thread, at most [`READ_DEADLINE`] per
//! partition; in steady state nothing is read.

use super::signals;
use outbox_core::partition;
use outbox_core::routing::Position;
use outbox_core::tail::{Delivered, Scan, Tail};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest one partition's read may take; what was read by then is used (a shorter read
/// costs duplicates, never a loss).
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Offsets read per step back.
const CHUNK: i64 = 20_000;

/// Consumer properties that differ from the producer's: the relay only assigns partitions and
/// reads them, never joins a group or commits, and keeps its prefetch small.
const CONSUMER: &[(&str, &str)] = &[
    ("group.id", "outbox_ext_tail_reader"),
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "true"),
    ("auto.offset.reset", "earliest"),
    ("fetch.wait.max.ms", "20"),
    ("queued.max.messages.kbytes", "8192"),
];

/// Producer-only properties of the relay's configuration, left out of the consumer's.
const PRODUCER_ONLY: &[&str] = &[
    "enable.idempotence",
    "enable.gapless.guarantee",
    "partitioner",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "linger.ms",
    "acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "compression.type",
    "compression.codec",
    "batch.size",
    "batch.num.messages",
    "retries",
    "message.send.max.retries",
    "max.in.flight",
    "max.in.flight.requests.per.connection",
    "transactional.id",
];

/// Where an event goes, and whether it is there already.
pub struct Placement {
    /// None: librdkafka's partitioner picks (the topic's partition count is unknown).
    pub partition: Option<i32>,
    /// The partition holds this event: acknowledge it without producing.
    pub held: bool,
}

/// Why a read could not be made; the relay rewinds on a passing error and produces the
/// partition's events anyway (at least once) when it may not read.
pub enum ReadError {
    /// The relay may not read (or describe) the topic.
    NotAuthorized(String),
    /// Kafka did not answer (brokers down): the relay rewinds and tries again.
    Unavailable(String),
}

/// The partitions of one topic, for the producer's session.
struct Topic {
    /// The partition count this session routes under, None if the topic is unknown.
    partitions: Option<u32>,
    tails: Vec<Tail>,
}

/// The tails of every partition this producer session wrote to.
pub struct Tails {
    consumer: BaseConsumer,
    topics: HashMap<String, Topic>,
    /// Partitions that could not be read, with why (the newest).
    pub unreadable: Option<String>,
}

impl Tails {
    /// A reader with the producer's connection settings (`producer_config`, which may hold
    /// secrets: the error never shows a value).
    pub fn new(producer_config: &[(String, String)]) -> Result<Tails, String> {
        let mut cc = ClientConfig::new();
        for (k, v) in producer_config {
            if !PRODUCER_ONLY.contains(&k.as_str()) {
                cc.set(k, v);
            }
        }
        for (k, v) in CONSUMER {
            cc.set(*k, *v);
        }
        if !producer_config.iter().any(|(k, _)| k == "allow.auto.create.topics") {
            // As the producer would: its metadata requests may create a topic (librdkafka's
            // producer default), a consumer's may not.
            cc.set("allow.auto.create.topics", "true");
        }
        let consumer: BaseConsumer = cc.create().map_err(|e| match e {
            KafkaError::ClientConfig(_, _, key, _) => format!("could not make the consumer that reads partition tails: property \"{key}\""),
            _ => "could not make the consumer that reads partition tails".to_string(),
        })?;
        Ok(Tails { consumer, topics: HashMap::new(), unreadable: None })
    }

    /// Where the event with `key`, `id` and `position`, committed at `commit_ms`, goes in
    /// `topic`, and whether that partition already holds it (read first if not yet).
    pub fn place(&mut self, topic: &str, key: &str, position: Position, id: &[u8; 16], commit_ms: i64) -> Result<Placement, ReadError> {
        if !self.topics.contains_key(topic) {
            let partitions = self.partition_count(topic)?;
            let tails = vec![Tail::Unknown; partitions.unwrap_or(0) as usize];
            self.topics.insert(topic.to_string(), Topic { partitions, tails });
        }
        let t = self.topics.get_mut(topic).expect("inserted above");
        let Some(count) = t.partitions else {
            return Ok(Placement { partition: None, held: false });
        };
        let p = partition::for_key(key.as_bytes(), count) as usize;
        if matches!(t.tails[p], Tail::Unknown) {
            let tail = match read(&self.consumer, topic, p as i32, position, commit_ms) {
                Ok(delivered) => Tail::Read(delivered),
                Err(ReadError::NotAuthorized(why)) => {
                    self.unreadable = Some(why);
                    Tail::Unreadable
                }
                Err(e) => return Err(e),
            };
            self.topics.get_mut(topic).expect("inserted above").tails[p] = tail;
        }
        let tail = &mut self.topics.get_mut(topic).expect("inserted above").tails[p];
        let held = tail.holds(position, id);
        if let Tail::Read(delivered) = tail {
            if !held && !delivered.is_empty() && delivered.passed_by(position) {
                // Every later event of the partition is above what was found: free it.
                *delivered = Delivered::default();
            }
        }
        Ok(Placement { partition: Some(p as i32), held })
    }

    /// The topic's partition count; None if Kafka says it does not exist (producing to it then
    /// fails as it always did).
    fn partition_count(&self, topic: &str) -> Result<Option<u32>, ReadError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| classify(topic, "read the metadata of", &e))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(None) };
        // An error (the topic does not exist, or may not be described, which a producer that
        // may write it can): librdkafka's partitioner picks, and its delivery report says why
        // the topic cannot take the record.
        match t.error() {
            None if !t.partitions().is_empty() => Ok(Some(t.partitions().len() as u32)),
            _ => Ok(None),
        }
    }
}

/// Words a consumer error: authorization errors make the partition at-least-once, others
/// make the relay rewind.
fn classify(topic: &str, what: &str, e: &KafkaError) -> ReadError {
    let message = format!("could not {what} topic {topic}: {e}");
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed) => {
            ReadError::NotAuthorized(message)
        }
        _ => ReadError::Unavailable(message),
    }
}

fn is_about_the_group(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
        )
    )
}

/// Reads partition `p` of `topic` backwards from its end (see `outbox_core::tail::Scan`) for
/// the records of events from `first` on, the first committed at `since_ms`.
fn read(consumer: &BaseConsumer, topic: &str, p: i32, first: Position, since_ms: i64) -> Result<Delivered, ReadError> {
    let started = Instant::now();
    let deadline = started + READ_DEADLINE;
    let (low, high) =
        consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT).map_err(|e| classify(topic, "read the offsets of", &e))?;
    let mut scan = Scan::new(first, since_ms);
    let mut end = high;
    let mut complete = true;
    while end > low {
        let begin = (end - CHUNK).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(begin))
            .and_then(|()| consumer.assign(&tpl))
            .map_err(|e| classify(topic, "read", &e))?;
        let chunk = read_chunk(consumer, topic, &mut scan, end, deadline);
        let _ = consumer.unassign();
        match chunk {
            Ok(true) => {}
            Ok(false) => {
                complete = false;
                break;
            }
            Err(e) => return Err(e),
        }
        if !scan.go_back(begin == low) {
            break;
        }
        end = begin;
    }
    let read = scan.records_read();
    let delivered = scan.finish();
    let message = format!(
        "outbox_ext relay: read {read} records of {topic} [{p}] in {} ms{}: {} of them are events this relay may decode again, which it will not produce twice",
        started.elapsed().as_millis(),
        if complete { "" } else { " (stopped at its deadline)" },
        delivered.len()
    );
    if !delivered.is_empty() || !complete {
        pgrx::log!("{message}");
    } else {
        pgrx::debug1!("{message}");
    }
    Ok(delivered)
}

/// Feeds `scan` the records before offset `end` from where the consumer is assigned. False if
/// the deadline (or a stop) came first.
fn read_chunk(consumer: &BaseConsumer, topic: &str, scan: &mut Scan, end: i64, deadline: Instant) -> Result<bool, ReadError> {
    loop {
        if Instant::now() >= deadline || signals::shutdown_requested() {
            return Ok(false);
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(m)) => {
                if m.offset() >= end {
                    return Ok(true);
                }
                let (mut id, mut lsn, mut index) = (None, None, None);
                if let Some(headers) = m.headers() {
                    for h in headers.iter() {
                        match h.key {
                            "id" => id = h.value,
                            outbox_core::routing::COMMIT_LSN_HEADER => lsn = h.value,
                            outbox_core::routing::COMMIT_INDEX_HEADER => index = h.value,
                            _ => {}
                        }
                    }
                }
                scan.record(m.timestamp().to_millis().unwrap_or(0), id, lsn, index);
                if m.offset() >= end - 1 {
                    return Ok(true);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(true),
            // The group's coordinator, which librdkafka looks up for any consumer with a
            // group.id: the reader never joins or commits, so it needs no rights on the group.
            Some(Err(e)) if is_about_the_group(&e) => continue,
            Some(Err(e)) => return Err(classify(topic, "read", &e)),
        }
    }
}
