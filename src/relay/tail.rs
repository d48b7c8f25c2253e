//! What Kafka already holds: the relay's half of the exactly-once rule (the rule itself, and
//! why it is sound, is `outbox_core::tail`).
//!
//! With `outbox.exactly_once` on, the relay picks each record's partition itself (Kafka's
//! murmur2 partitioner, under the partition count it read once per topic for this producer),
//! and before it produces to a topic for the first time it reads the topic's partitions
//! backwards from their ends, together, with a consumer of its own. Events found there are
//! acknowledged without being produced again. The read runs on the worker's main thread, at
//! most [`READ_DEADLINE`] per topic; in steady state nothing is read and no consumer is open.

use super::produce::{is_secret_key, redact};
use super::signals;
use outbox_core::partition;
use outbox_core::routing::Position;
use outbox_core::tail::{Delivered, Scan, Tail};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::metadata::MetadataTopic;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest one topic's read may take; what was read by then is used (a shorter read costs
/// duplicates, never a loss).
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The most records of possible matches a topic's read keeps in memory (about 20 MB); a read
/// that finds more stops there (duplicates, never a loss).
const MAX_TOPIC_MARKS: usize = 400_000;
/// Offsets read in the first step back; each further step reads four times as many, up to
/// [`MAX_CHUNK`]. Most reads after a crash need only the last few hundred records.
const FIRST_CHUNK: i64 = 1_000;
const MAX_CHUNK: i64 = 64_000;
/// A reader that has not read for this long lets its consumer go (its connections and
/// threads); the next read makes a new one.
const IDLE_DROP: Duration = Duration::from_secs(30);

/// Consumer properties that differ from the producer's: the relay only assigns partitions and
/// reads them, never joins a group or commits, and keeps its prefetch small.
const CONSUMER: &[(&str, &str)] = &[
    ("group.id", "outbox_ext_tail_reader"),
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "true"),
    ("auto.offset.reset", "earliest"),
    ("fetch.wait.max.ms", "20"),
    // Every record up to the high watermark: the relay's own are not transactional, and an
    // open transaction of another producer must not hide them.
    ("isolation.level", "read_uncommitted"),
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

/// Kafka did not answer a read (brokers down): the relay rewinds and tries again.
pub struct Unavailable(pub String);

/// Why a read could not be made: the relay rewinds on a passing error, and produces the
/// topic's events anyway (at least once) when it cannot read.
enum ReadError {
    /// The relay may not read the topic (or cannot make its consumer): at least once.
    CannotRead(String),
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
    config: ClientConfig,
    /// Made for the reads after a start or a rewind, dropped when idle.
    consumer: Option<BaseConsumer>,
    last_read: Instant,
    /// Values of secret-looking properties, cut out of every error.
    secrets: Vec<String>,
    topics: HashMap<String, Topic>,
    /// Every topic's partition count, as the session's first metadata request gave it.
    known_counts: Option<HashMap<String, u32>>,
    /// Why a topic could not be read (the newest), for `last_error`.
    pub unreadable: Option<String>,
}

impl Tails {
    /// A reader with the producer's connection settings (`producer_config`, which may hold
    /// secrets). Its consumer is made at the first read.
    pub fn new(producer_config: &[(String, String)]) -> Tails {
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
        let secrets = producer_config.iter().filter(|(k, _)| is_secret_key(k)).map(|(_, v)| v.clone()).collect();
        Tails {
            config: cc,
            consumer: None,
            last_read: Instant::now(),
            secrets,
            topics: HashMap::new(),
            known_counts: None,
            unreadable: None,
        }
    }

    /// Lets the consumer go after [`IDLE_DROP`] without a read, so that a streaming relay holds
    /// no connections but its producer's.
    pub fn idle(&mut self) {
        if self.consumer.is_some() && self.last_read.elapsed() > IDLE_DROP {
            self.consumer = None;
        }
    }

    fn consumer(&mut self) -> Result<&BaseConsumer, ReadError> {
        self.last_read = Instant::now();
        if self.consumer.is_none() {
            self.consumer = Some(make_consumer(&self.config).map_err(ReadError::CannotRead)?);
        }
        Ok(self.consumer.as_ref().expect("made above"))
    }

    /// Where the event with `key`, `id` and `position`, committed at `commit_ms`, goes in
    /// `topic`, and whether that partition already holds it (read first if not yet). A topic
    /// that cannot be read is produced to as if nothing were there (`unreadable` says why).
    pub fn place(&mut self, topic: &str, key: &str, position: Position, id: &[u8; 16], commit_ms: i64) -> Result<Placement, Unavailable> {
        if !self.topics.contains_key(topic) {
            let partitions = match self.partition_count(topic).map_err(|e| self.redacted(e)) {
                Ok(partitions) => partitions,
                Err(ReadError::CannotRead(why)) => {
                    self.unreadable = Some(why);
                    None
                }
                Err(ReadError::Unavailable(why)) => return Err(Unavailable(why)),
            };
            let tails = vec![Tail::Unknown; partitions.unwrap_or(0) as usize];
            self.topics.insert(topic.to_string(), Topic { partitions, tails });
        }
        let t = self.topics.get_mut(topic).expect("inserted above");
        let Some(count) = t.partitions else {
            return Ok(Placement { partition: None, held: false });
        };
        let p = partition::for_key(key.as_bytes(), count) as usize;
        if matches!(t.tails[p], Tail::Unknown) {
            // The topic's first event in this session: every partition's tail is read now,
            // together (this event's position and time bound what any of them needs).
            let read = self.consumer().and_then(|c| read_topic(c, topic, count, position, commit_ms));
            let tails = match read.map_err(|e| self.redacted(e)) {
                Ok(delivered) => delivered.into_iter().map(Tail::Read).collect(),
                Err(ReadError::CannotRead(why)) => {
                    self.unreadable = Some(why);
                    vec![Tail::Unreadable; count as usize]
                }
                Err(ReadError::Unavailable(why)) => return Err(Unavailable(why)),
            };
            self.topics.get_mut(topic).expect("inserted above").tails = tails;
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
    /// fails as it always did). The first call of a session asks for every topic's at once, so
    /// that a restart with many topics costs one metadata request, not one per topic.
    fn partition_count(&mut self, topic: &str) -> Result<Option<u32>, ReadError> {
        if self.known_counts.is_none() {
            let all = self.consumer()?.fetch_metadata(None, REQUEST_TIMEOUT).map_err(|e| classify(topic, "read the metadata of", &e))?;
            self.known_counts = Some(all.topics().iter().filter_map(|t| Some((t.name().to_string(), count_of(t)?))).collect());
        }
        if let Some(&count) = self.known_counts.as_ref().and_then(|known| known.get(topic)) {
            return Ok(Some(count));
        }
        let metadata = self
            .consumer()?
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| classify(topic, "read the metadata of", &e))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(None) };
        match (count_of(t), t.error().map(RDKafkaErrorCode::from)) {
            (Some(count), _) => Ok(Some(count)),
            // It does not exist (and may not be made), or may not be described: the producer
            // says what becomes of its records.
            (None, Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::TopicAuthorizationFailed)) => Ok(None),
            // Passing (a leader being elected, a topic being made): rewind and look again.
            (None, error) => Err(ReadError::Unavailable(format!(
                "topic {topic} has no partitions to read yet{}",
                error.map(|e| format!(" ({e})")).unwrap_or_default()
            ))),
        }
    }
}

impl Tails {
    fn redacted(&self, e: ReadError) -> ReadError {
        match e {
            ReadError::CannotRead(m) => ReadError::CannotRead(redact(&m, &self.secrets)),
            ReadError::Unavailable(m) => ReadError::Unavailable(redact(&m, &self.secrets)),
        }
    }
}

/// A topic's partition count. None on an error (the topic does not exist, or may not be
/// described, which a producer that may write it can): librdkafka's partitioner picks, and its
/// delivery report says why the topic cannot take the record.
fn count_of(t: &MetadataTopic) -> Option<u32> {
    (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len() as u32)
}

/// The consumer that reads tails. The error never shows a property's value.
fn make_consumer(config: &ClientConfig) -> Result<BaseConsumer, String> {
    config.create().map_err(|e| match e {
        KafkaError::ClientConfig(_, _, key, _) => {
            format!("could not make the consumer that reads partition tails: property \"{key}\"")
        }
        _ => "could not make the consumer that reads partition tails".to_string(),
    })
}

/// Words a consumer error: authorization errors make the topic at-least-once, others make
/// the relay rewind.
fn classify(topic: &str, what: &str, e: &KafkaError) -> ReadError {
    let message = format!("could not {what} topic {topic}: {e}");
    if is_forbidden(e) {
        ReadError::CannotRead(message)
    } else {
        ReadError::Unavailable(message)
    }
}

fn is_forbidden(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed)
    )
}

/// One partition's backward scan (see `outbox_core::tail::Scan`).
struct PartitionScan {
    p: i32,
    low: i64,
    /// The offset the next chunk ends before.
    end: i64,
    chunk: i64,
    scan: Scan,
    /// Still going back.
    active: bool,
    /// Stopped by the deadline (or a stop) rather than by the scan.
    cut_short: bool,
}

/// Reads every partition of `topic` (`partitions`) backwards from its end, all at once, for
/// the records of events from `first` on, the first committed at `since_ms`.
fn read_topic(consumer: &BaseConsumer, topic: &str, partitions: u32, first: Position, since_ms: i64) -> Result<Vec<Delivered>, ReadError> {
    let started = Instant::now();
    let deadline = started + READ_DEADLINE;
    // Our records' positions are in WAL this server has written: anything above is another
    // cluster's (or another branch's) and need not be kept.
    let upper = crate::ffi::flush_lsn();
    let max_marks = (MAX_TOPIC_MARKS / partitions.max(1) as usize).max(10_000);
    let mut scans = Vec::with_capacity(partitions as usize);
    for p in 0..partitions as i32 {
        let scan = Scan::new(first, since_ms, upper, max_marks);
        match consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT) {
            Ok((low, high)) => {
                scans.push(PartitionScan { p, low, end: high, chunk: FIRST_CHUNK, scan, active: high > low, cut_short: false })
            }
            Err(e) if is_forbidden(&e) => return Err(classify(topic, "read the offsets of", &e)),
            // This partition (its leader away): produced to without a read, at least once;
            // the others go on.
            Err(_) => scans.push(PartitionScan { p, low: 0, end: 0, chunk: 0, scan, active: false, cut_short: true }),
        }
    }
    while scans.iter().any(|s| s.active) {
        let mut tpl = TopicPartitionList::new();
        let mut begins = HashMap::new();
        for s in scans.iter_mut().filter(|s| s.active) {
            let begin = (s.end - s.chunk).max(s.low);
            s.chunk = (s.chunk * 4).min(MAX_CHUNK);
            tpl.add_partition_offset(topic, s.p, Offset::Offset(begin)).map_err(|e| classify(topic, "read", &e))?;
            begins.insert(s.p, begin);
        }
        consumer.assign(&tpl).map_err(|e| classify(topic, "read", &e))?;
        let chunk = read_chunks(consumer, topic, &mut scans, deadline);
        let _ = consumer.unassign();
        chunk?;
        for s in scans.iter_mut().filter(|s| s.active) {
            let begin = begins[&s.p];
            s.active = !s.cut_short && s.scan.go_back(begin == s.low);
            s.end = begin;
        }
    }
    let elapsed = started.elapsed().as_millis();
    Ok(scans
        .into_iter()
        .map(|s| {
            let read = s.scan.records_read();
            let delivered = s.scan.finish();
            let message = format!(
                "outbox_ext relay: read {read} records of {topic} [{}] in {elapsed} ms{}: {} of them are events this relay may decode again, which it will not produce twice",
                s.p,
                if s.cut_short { " (cut short: its deadline came, or its offsets could not be read)" } else { "" },
                delivered.len()
            );
            if !delivered.is_empty() || s.cut_short {
                pgrx::log!("{message}");
            } else {
                pgrx::debug1!("{message}");
            }
            delivered
        })
        .collect())
}

/// Feeds each active scan the records of its chunk (from where the consumer is assigned up to
/// its `end`). A scan the deadline (or a stop) cuts short is marked so.
fn read_chunks(consumer: &BaseConsumer, topic: &str, scans: &mut [PartitionScan], deadline: Instant) -> Result<(), ReadError> {
    let mut pending: Vec<i32> = scans.iter().filter(|s| s.active).map(|s| s.p).collect();
    while !pending.is_empty() {
        if signals::shutdown_requested() {
            // Nothing more is produced: the worker stops.
            return Err(ReadError::Unavailable("the relay is stopping".into()));
        }
        if Instant::now() >= deadline {
            for s in scans.iter_mut().filter(|s| pending.contains(&s.p)) {
                s.cut_short = true;
            }
            return Ok(());
        }
        let done = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(m)) => {
                let Some(s) = scans.iter_mut().find(|s| s.p == m.partition() && pending.contains(&s.p)) else { continue };
                if m.offset() < s.end {
                    let (mut id, mut lsn, mut index) = (None, None, None);
                    if let Some(headers) = m.headers() {
                        // Either record format: a partition can hold both.
                        use outbox_core::routing::{is_commit_index_header, is_commit_lsn_header, is_id_header};
                        for h in headers.iter() {
                            if is_id_header(h.key) {
                                id = h.value;
                            } else if is_commit_lsn_header(h.key) {
                                lsn = h.value;
                            } else if is_commit_index_header(h.key) {
                                index = h.value;
                            }
                        }
                    }
                    s.scan.record(m.timestamp().to_millis().unwrap_or(0), id, lsn, index);
                }
                (m.offset() >= s.end - 1).then_some(s.p)
            }
            Some(Err(KafkaError::PartitionEOF(p))) => Some(p),
            Some(Err(e)) if is_forbidden(&e) => return Err(classify(topic, "read", &e)),
            // Anything else comes through the consumer's queue too: a broker of the bootstrap
            // list that is down, the group coordinator (the reader never joins or commits, so
            // it needs no rights on the group). The deadline bounds the wait.
            Some(Err(_)) => continue,
        };
        if let Some(p) = done {
            pending.retain(|q| *q != p);
        }
    }
    Ok(())
}
