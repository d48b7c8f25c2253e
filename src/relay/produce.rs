//! The librdkafka producer, and the thread that feeds it.
//!
//! Decoding and routing happen on the worker's main thread; handing a record to librdkafka
//! (copying it, its headers, queueing it to its partition) happens on the *producing thread*,
//! so that the two overlap instead of adding up. The main thread writes each routed record into
//! a [`Batch`] (one buffer for all its bytes) and passes full batches over a bounded channel;
//! the producing thread turns them into librdkafka records. Only the producing thread polls
//! librdkafka: delivery reports come back through `BaseProducer::poll` there and are passed on
//! over a crossbeam channel to the main thread, the only one that touches the tracker or
//! Postgres: the acknowledgements of one poll together, in a vector that the main thread gives
//! back for reuse, so that no memory goes from one thread to the other with each report. The
//! producing thread runs no Postgres code and reads no setting.

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use outbox_core::dead_letter::{Record, RecordValue, Refusal};
use outbox_core::tracker::TxnSeq;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig};
use rdkafka::{ClientContext, Message};
use crate::ffi::kafka::{self, TopicHandle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What librdkafka tells the relay.
#[derive(Debug)]
pub enum Report {
    /// The records registered under `seqs` were acknowledged, in the order librdkafka reported
    /// them. Give the vector back with [`KafkaProducer::reuse`].
    Acknowledged { seqs: Vec<TxnSeq> },
    /// The record registered under `seq` was acknowledged (`error` is None) or failed.
    /// `dead_letter`: it was the dead-letter copy of a refused record (see [`KafkaProducer::send`]).
    /// Acknowledgements of events' records come as [`Report::Acknowledged`] instead.
    /// Boxed: a poll can queue thousands of reports.
    Delivery { seq: TxnSeq, dead_letter: bool, error: Option<Box<Failure>> },
    /// A client-level error (all brokers down, authentication, fatal idempotence error).
    Client { message: String },
    /// The record registered under `seq` was dropped before librdkafka had it: the producer
    /// was purged (a rewind) or is being dropped.
    Discarded { seq: TxnSeq },
}

struct RelayContext {
    reports: Sender<Report>,
    /// Events' records acknowledged since the producing thread last passed them on
    /// ([`Feeder::pass_on_acknowledgements`]). Only the producing thread locks it.
    acknowledged: Mutex<Vec<TxnSeq>>,
    /// Callbacks served so far: how [`serve`] tells whether a poll served any.
    served: AtomicU64,
    /// Values of secret-looking properties, cut out of every message before it is reported.
    secrets: Vec<String>,
}

impl RelayContext {
    fn redact(&self, text: &str) -> String {
        redact(text, &self.secrets)
    }
}

pub(super) fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.as_str(), "<hidden>");
        }
    }
    out
}

/// Property names whose values must never appear in a message: every SASL and TLS setting,
/// and anything that looks like a credential.
pub(super) fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.starts_with("sasl.")
        || k.starts_with("ssl.")
        || k.starts_with("ssl_")
        || ["password", "secret", "key", "token", "jaas", "pem", "credential"]
            .iter()
            .any(|s| k.contains(s))
}

impl ClientContext for RelayContext {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _message: &str) {
        // librdkafka's own log lines are not forwarded: they can name configuration values,
        // and errors reach the relay through `error` and delivery reports.
    }

    fn error(&self, _error: KafkaError, reason: &str) {
        self.served.fetch_add(1, Ordering::Relaxed);
        // A fatal error arrives here with its underlying code; `KafkaProducer::fatal_error`
        // is how the relay tells it apart.
        let _ = self.reports.send(Report::Client { message: self.redact(reason) });
    }
}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        self.served.fetch_add(1, Ordering::Relaxed);
        let (seq, dead_letter, binary) = unpack_opaque(opaque);
        let error = match result {
            Ok(_) if !dead_letter => {
                self.acknowledged.lock().unwrap_or_else(|e| e.into_inner()).push(seq);
                return;
            }
            Ok(_) => None,
            Err((e, m)) => {
                let mut failure = Failure::of(&event_id(m).unwrap_or_else(|| "?".into()), m.topic(), e);
                failure.message = self.redact(&failure.message);
                if failure.permanent {
                    // Kept only for records no retry can deliver: the dead-letter path needs them.
                    failure.record = Some(record_of(m, binary));
                }
                Some(Box::new(failure))
            }
        };
        let _ = self.reports.send(Report::Delivery { seq, dead_letter, error });
    }
}

/// Why Kafka did not take a record.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What happened, naming the event and topic, with secret values cut out.
    pub message: String,
    /// No retry can succeed (see [`is_permanent`]): the relay stops until an operator acts, or
    /// sets the record aside (`outbox.on_permanent_error`).
    pub permanent: bool,
    /// Kafka's reason: librdkafka's error code and its description.
    pub refusal: Refusal,
    /// The refused record, for a permanent failure reported by librdkafka.
    pub record: Option<Record>,
}

impl Failure {
    /// A failure that a rewind may get past (Kafka did not answer), described by `message`.
    pub fn passing(message: String, topic: &str) -> Failure {
        Failure {
            refusal: Refusal { code: -1, message: message.clone(), topic: topic.to_string() },
            message,
            permanent: false,
            record: None,
        }
    }

    /// Kafka refused event `id` for `topic` with `error`.
    pub fn of(id: &str, topic: &str, error: &KafkaError) -> Failure {
        let code = error.rdkafka_error_code();
        let reason = code.map(|c| c.to_string()).unwrap_or_else(|| error.to_string());
        Failure {
            message: format!("event {id} to topic {topic}: {reason}"),
            permanent: code.is_some_and(is_permanent),
            refusal: Refusal { code: code.map_or(-1, |c| c as i32), message: reason, topic: topic.to_string() },
            record: None,
        }
    }
}

/// The record librdkafka reports on, copied out of it; `binary` as it was sent.
fn record_of<M: Message>(m: &M, binary: bool) -> Record {
    use rdkafka::message::Headers;
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let headers =
        m.headers().map(|hs| hs.iter().map(|h| (h.key.to_string(), text(h.value))).collect()).unwrap_or_default();
    Record {
        topic: m.topic().to_string(),
        key: text(m.key()),
        value: RecordValue::from_kafka(m.payload(), binary),
        headers,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
    }
}

/// The opaque of a dead-letter copy has this bit set on top of its event's sequence number.
const DEAD_LETTER_BIT: usize = 1 << 63;
/// The value holds bytes from `emit_binary`, not JSON text (for the dead-letter table).
const BINARY_BIT: usize = 1 << 62;

fn pack_opaque(seq: TxnSeq, dead_letter: bool, binary: bool) -> usize {
    seq as usize | if dead_letter { DEAD_LETTER_BIT } else { 0 } | if binary { BINARY_BIT } else { 0 }
}

fn unpack_opaque(opaque: usize) -> (TxnSeq, bool, bool) {
    ((opaque & !(DEAD_LETTER_BIT | BINARY_BIT)) as TxnSeq, opaque & DEAD_LETTER_BIT != 0, opaque & BINARY_BIT != 0)
}

/// Errors for one record that resending the same bytes to the same cluster cannot fix: the
/// topic does not exist or may not be written, the record is too large or malformed, or the
/// broker's policy refuses it. Everything else (timeouts, leader changes, disconnects, a
/// fatal idempotence error) is retried by rewinding.
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        UnknownTopicOrPartition
            | UnknownTopic
            | UnknownPartition
            | InvalidTopic
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | MessageSizeTooLarge
            | MessageBatchTooLarge
            | InvalidRecord
            | InvalidTimestamp
            | InvalidRequiredAcks
            | PolicyViolation
            | UnsupportedForMessageFormat
            | InvalidArgument
    )
}

/// The event id a record carries in its `id` (or, in the cloudevents format, `ce_id`) header.
fn event_id<M: Message>(message: &M) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    let id = headers.iter().find(|h| outbox_core::routing::is_id_header(h.key))?;
    id.value.map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Why a producer could not be made.
#[derive(Debug)]
pub enum ProducerError {
    /// librdkafka refused this property (unknown, or an invalid value).
    InvalidProperty { key: String },
    /// Anything else, with secret values cut out.
    Other(String),
}

/// A batch is handed to the producing thread once it holds this many records or bytes (a
/// single larger record makes a batch of its own).
const BATCH_RECORDS: usize = 256;
const BATCH_BYTES: usize = 1 << 20;
/// Batches on their way to the producing thread at most: with librdkafka's own bounded queue
/// behind them, what the relay holds stays bounded (about 1,000 records or 4 MB more).
const BATCHES_IN_FLIGHT: usize = 4;
/// How often the producing thread serves librdkafka's callbacks while records are in flight,
/// and when nothing is (client errors such as all brokers down; as often as an idle relay's
/// main loop looks at them, so that idle relays cost next to nothing).
const SERVE_IN_FLIGHT: Duration = Duration::from_millis(1);
const SERVE_IDLE: Duration = Duration::from_secs(1);
/// The producing thread's nap while librdkafka's queue is full.
const QUEUE_FULL_NAP: Duration = Duration::from_micros(200);
/// Vectors of acknowledgements given back for reuse, at most (more are freed).
const ACK_VECTORS_KEPT: usize = 8;

/// Routed records on their way to the producing thread: every byte of them (keys, values,
/// header names and values) in one buffer, so that a batch costs a few allocations, not a few
/// per record.
#[derive(Default)]
pub struct Batch {
    records: Vec<BatchRecord>,
    bytes: Vec<u8>,
    /// The end offset in `bytes` of each piece: per record its key, its value, then each
    /// header's name and value.
    ends: Vec<usize>,
}

struct BatchRecord {
    seq: TxnSeq,
    topic: Arc<str>,
    partition: Option<i32>,
    timestamp_ms: i64,
    binary: bool,
    tombstone: bool,
    /// Index in `ends` of its key's end; the key starts where the piece before it ended.
    first: usize,
    headers: usize,
}

/// A routed record, borrowed: what [`KafkaProducer::queue`] copies into a batch.
pub struct RoutedRecord<'a> {
    pub topic: &'a Arc<str>,
    /// None: the one librdkafka's partitioner picks.
    pub partition: Option<i32>,
    pub key: &'a str,
    /// None: a tombstone (a null value).
    pub value: Option<&'a [u8]>,
    /// The value holds bytes (`emit_binary`) rather than JSON text.
    pub binary: bool,
    pub headers: &'a [(&'a str, &'a str)],
    pub timestamp_ms: i64,
}

impl Batch {
    fn push(&mut self, seq: TxnSeq, r: &RoutedRecord<'_>) {
        let first = self.ends.len();
        self.piece(r.key.as_bytes());
        self.piece(r.value.unwrap_or_default());
        for (k, v) in r.headers {
            self.piece(k.as_bytes());
            self.piece(v.as_bytes());
        }
        self.records.push(BatchRecord {
            seq,
            topic: Arc::clone(r.topic),
            partition: r.partition,
            timestamp_ms: r.timestamp_ms,
            binary: r.binary,
            tombstone: r.value.is_none(),
            first,
            headers: r.headers.len(),
        });
    }

    fn piece(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        self.ends.push(self.bytes.len());
    }

    /// Piece `i` of the batch.
    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    #[cfg(test)]
    fn text(&self, i: usize) -> &str {
        // Written from &str by `push`.
        std::str::from_utf8(self.get(i)).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    /// Holds as much as a batch should: hand it over before adding to it.
    fn full(&self) -> bool {
        self.records.len() >= BATCH_RECORDS || self.bytes.len() >= BATCH_BYTES
    }

    /// Empties the batch for reuse; a buffer that grew for one large record is let go.
    fn clear(&mut self) {
        self.records.clear();
        self.ends.clear();
        if self.bytes.capacity() > 2 * BATCH_BYTES {
            self.bytes = Vec::new();
        } else {
            self.bytes.clear();
        }
    }
}

pub struct KafkaProducer {
    producer: Arc<BaseProducer<RelayContext>>,
    reports: Receiver<Report>,
    /// Emptied vectors of [`Report::Acknowledged`], back to the producing thread.
    reused: Sender<Vec<TxnSeq>>,
    /// The main thread's own way into `reports` (for records it drops before handing them over).
    own_reports: Sender<Report>,
    /// The batch being filled on the main thread.
    batch: Batch,
    /// To the producing thread (None once it is told to stop), and the emptied batches back.
    to_thread: Option<Sender<Batch>>,
    emptied: Receiver<Batch>,
    /// Set by `purge`: the producing thread drops what it has not handed over yet.
    purged: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A record the producer could not take because its queue is full.
pub struct QueueFull;

impl KafkaProducer {
    /// Builds a producer and its producing thread. The error never contains a property value.
    /// `instant_ack` (`outbox.bench_sink = instant`, feature `bench_sinks` only): every record
    /// is acknowledged at once instead of handed to librdkafka.
    pub fn new(config: &[(String, String)], instant_ack: bool) -> Result<KafkaProducer, ProducerError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let secrets =
            config.iter().filter(|(k, _)| is_secret_key(k)).map(|(_, v)| v.clone()).collect::<Vec<_>>();
        let mut cc = ClientConfig::new();
        for (k, v) in config {
            cc.set(k, v);
        }
        let context = RelayContext {
            reports: tx.clone(),
            acknowledged: Mutex::new(Vec::new()),
            served: AtomicU64::new(0),
            secrets: secrets.clone(),
        };
        let producer = cc.create_with_context(context).map_err(|e| match e {
            KafkaError::ClientConfig(_, _, key, _) => ProducerError::InvalidProperty { key },
            other => ProducerError::Other(redact(
                &format!("could not create the Kafka producer: {other}"),
                &secrets,
            )),
        })?;
        let producer = Arc::new(producer);
        let (to_thread, batches) = crossbeam_channel::bounded(BATCHES_IN_FLIGHT);
        let (give_back, emptied) = crossbeam_channel::bounded(BATCHES_IN_FLIGHT + 1);
        let purged = Arc::new(AtomicBool::new(false));
        let (reused, to_reuse) = crossbeam_channel::bounded(ACK_VECTORS_KEPT);
        let feeder = Feeder {
            producer: Arc::clone(&producer),
            purged: Arc::clone(&purged),
            instant_ack: cfg!(feature = "bench_sinks") && instant_ack,
            to_reuse,
        };
        let thread = std::thread::Builder::new()
            .name("outbox producing".into())
            .spawn(move || feeder.run(batches, give_back))
            .map_err(|e| ProducerError::Other(format!("could not start the producing thread: {e}")))?;
        Ok(KafkaProducer {
            producer,
            reports: rx,
            reused,
            own_reports: tx,
            batch: Batch::default(),
            to_thread: Some(to_thread),
            emptied,
            purged,
            thread: Some(thread),
        })
    }

    /// Queues record `r` of event `seq` for the producing thread. `QueueFull` when the thread
    /// is that far behind: the caller should poll and try again. Records go out in the order
    /// queued; a partly filled batch leaves at the next [`KafkaProducer::hand_over`] (every poll).
    pub fn queue(&mut self, seq: TxnSeq, r: &RoutedRecord<'_>) -> Result<(), QueueFull> {
        if self.batch.full() && !self.hand_over() {
            return Err(QueueFull);
        }
        self.batch.push(seq, r);
        Ok(())
    }

    /// After `QueueFull`: waits up to `timeout` for the producing thread to take the full
    /// batch, handing it over the moment there is room.
    pub fn wait_for_room(&mut self, timeout: Duration) {
        if !self.batch.full() {
            return;
        }
        let Some(to_thread) = &self.to_thread else { return };
        let next = self.emptied.try_recv().unwrap_or_default();
        let full = std::mem::replace(&mut self.batch, next);
        if let Err(e) = to_thread.send_timeout(full, timeout) {
            self.batch = e.into_inner();
        }
    }

    /// Passes the batch being filled to the producing thread; false if the thread's channel is
    /// full (the batch stays, and is passed on later).
    pub fn hand_over(&mut self) -> bool {
        if self.batch.len() == 0 {
            return true;
        }
        let Some(to_thread) = &self.to_thread else { return false };
        let next = self.emptied.try_recv().unwrap_or_default();
        let full = std::mem::replace(&mut self.batch, next);
        match to_thread.try_send(full) {
            Ok(()) => true,
            Err(TrySendError::Full(full) | TrySendError::Disconnected(full)) => {
                self.batch = full;
                false
            }
        }
    }

    /// Hands one record to librdkafka (which copies it) at once, on this thread, to `partition`
    /// or, if None, to the one librdkafka's partitioner picks; `value` None is a tombstone, and
    /// `binary` says it holds bytes rather than JSON text. On a full queue the caller should
    /// poll and try again. Only for dead-letter copies of refused records (`dead_letter`: the
    /// report says so), which need no order with the events' records.
    #[allow(clippy::too_many_arguments)]
    pub fn send_now(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        value: Option<&[u8]>,
        binary: bool,
        headers: &[(&str, &str)],
        timestamp_ms: i64,
        seq: TxnSeq,
        dead_letter: bool,
    ) -> Result<(), Result<QueueFull, KafkaError>> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let mut record: BaseRecord<'_, str, [u8], usize> =
            BaseRecord::with_opaque_to(topic, pack_opaque(seq, dead_letter, binary));
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        let record = record.key(key).timestamp(timestamp_ms).headers(h);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(Ok(QueueFull)),
            Err((e, _)) => Err(Err(e)),
        }
    }


    /// The fatal error this producer hit, if any: it cannot produce again and must be rebuilt.
    pub fn fatal_error(&self) -> Option<String> {
        let (code, reason) = self.producer.client().fatal_error()?;
        Some(format!("fatal producer error ({code}): {}", self.producer.context().redact(&reason)))
    }

    pub fn reports(&self) -> &Receiver<Report> {
        &self.reports
    }

    /// Gives the vector of a [`Report::Acknowledged`] back to the producing thread, which fills
    /// it again: its memory stays with the thread that allocated it.
    pub fn reuse(&self, mut seqs: Vec<TxnSeq>) {
        seqs.clear();
        let _ = self.reused.try_send(seqs);
    }

    /// Fails everything queued or in flight; the reports arrive with the next polls. Records
    /// not yet handed to librdkafka are dropped and reported as such.
    pub fn purge(&mut self) {
        self.purged.store(true, Ordering::SeqCst);
        for r in self.batch.records.drain(..) {
            let _ = self.own_reports.send(Report::Discarded { seq: r.seq });
        }
        self.batch.clear();
        self.producer.purge(PurgeConfig::default().queue().inflight());
    }
}

impl Drop for KafkaProducer {
    fn drop(&mut self) {
        // Whatever the thread still holds is dropped, not produced: the slot was never
        // confirmed past it, so decoding again delivers it.
        self.purged.store(true, Ordering::SeqCst);
        self.to_thread = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves every librdkafka callback that is ready, without waiting. rdkafka's poll serves one
/// event per call when given no time (and spins on the clock during its last millisecond when
/// given some), so call it until it serves nothing.
fn serve(producer: &BaseProducer<RelayContext>) {
    for _ in 0..100_000 {
        let before = producer.context().served.load(Ordering::Relaxed);
        producer.poll(Duration::ZERO);
        if producer.context().served.load(Ordering::Relaxed) == before {
            break;
        }
    }
}

/// The librdkafka handle of each topic the producing thread has produced to.
#[derive(Default)]
struct TopicHandles<'p> {
    /// None: a name librdkafka cannot take (it holds a NUL).
    handles: Vec<(Arc<str>, Option<TopicHandle<'p>>)>,
    index: HashMap<Arc<str>, usize>,
    /// The one used last: consecutive records mostly share a topic, and the router hands out
    /// one `Arc` per topic, so a pointer comparison finds it without hashing the name.
    last: usize,
}

impl<'p> TopicHandles<'p> {
    fn of(&mut self, producer: &'p BaseProducer<RelayContext>, topic: &Arc<str>) -> Option<&TopicHandle<'p>> {
        if !self.handles.get(self.last).is_some_and(|(t, _)| Arc::ptr_eq(t, topic)) {
            self.last = match self.index.get(topic) {
                Some(&at) => at,
                None => {
                    self.handles.push((Arc::clone(topic), TopicHandle::new(producer, topic)));
                    self.index.insert(Arc::clone(topic), self.handles.len() - 1);
                    self.handles.len() - 1
                }
            };
        }
        self.handles[self.last].1.as_ref()
    }
}

/// The producing thread: turns batches into librdkafka records, in order.
struct Feeder {
    producer: Arc<BaseProducer<RelayContext>>,
    purged: Arc<AtomicBool>,
    instant_ack: bool,
    /// Vectors the main thread gave back ([`KafkaProducer::reuse`]).
    to_reuse: Receiver<Vec<TxnSeq>>,
}

impl Feeder {
    /// Produces the batches as they come and serves librdkafka's callbacks (delivery reports,
    /// errors) between them: at least every [`SERVE_IN_FLIGHT`] while records are in flight,
    /// every [`SERVE_IDLE`] otherwise. Only this thread polls librdkafka: the memory of its
    /// reports is freed where it was allocated, without the main thread waiting for
    /// librdkafka's threads on malloc's locks (which left it idle 40% of a drain).
    fn run(self, batches: Receiver<Batch>, give_back: Sender<Batch>) {
        let producer = Arc::clone(&self.producer);
        // Each topic's librdkafka handle, made at its first record (dropped before the producer).
        let mut topics = TopicHandles::default();
        loop {
            let wait = if self.producer.in_flight_count() > 0 { SERVE_IN_FLIGHT } else { SERVE_IDLE };
            match batches.recv_timeout(wait) {
                Ok(mut batch) => {
                    for i in 0..batch.records.len() {
                        let topic = topics.of(&producer, &batch.records[i].topic);
                        self.produce(&batch, i, topic);
                    }
                    batch.clear();
                    let _ = give_back.try_send(batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.serve();
        }
    }

    /// Serves librdkafka's callbacks, then passes the acknowledgements on.
    fn serve(&self) {
        serve(&self.producer);
        self.pass_on_acknowledgements();
    }

    /// Sends the acknowledgements gathered so far to the main thread in one report.
    fn pass_on_acknowledgements(&self) {
        let mut acknowledged = self.producer.context().acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        if acknowledged.is_empty() {
            return;
        }
        let next = self.to_reuse.try_recv().unwrap_or_else(|_| Vec::with_capacity(acknowledged.capacity()));
        let seqs = std::mem::replace(&mut *acknowledged, next);
        drop(acknowledged);
        self.report(Report::Acknowledged { seqs });
    }

    fn report(&self, report: Report) {
        let _ = self.producer.context().reports.send(report);
    }

    /// Hands record `i` of `batch` to librdkafka (`topic`: its topic's handle, None if the
    /// name cannot be one), waiting while librdkafka's queue is full.
    fn produce(&self, batch: &Batch, i: usize, topic: Option<&TopicHandle<'_>>) {
        let r = &batch.records[i];
        let header = |h: usize| (batch.get(r.first + 2 + 2 * h), batch.get(r.first + 3 + 2 * h));
        if self.instant_ack {
            // The bench's ceiling N: everything up to here, and an acknowledgement at once.
            self.producer.context().acknowledged.lock().unwrap_or_else(|e| e.into_inner()).push(r.seq);
            return;
        }
        let error = loop {
            if self.purged.load(Ordering::Relaxed) {
                self.report(Report::Discarded { seq: r.seq });
                return;
            }
            let Some(topic) = topic else { break RDKafkaErrorCode::InvalidTopic };
            let record = kafka::Record {
                partition: r.partition,
                key: batch.get(r.first),
                value: (!r.tombstone).then(|| batch.get(r.first + 1)),
                headers: (0..r.headers).map(header),
                timestamp_ms: r.timestamp_ms,
                opaque: pack_opaque(r.seq, false, r.binary),
            };
            match kafka::produce(&self.producer, topic, record) {
                Ok(()) => return,
                Err(RDKafkaErrorCode::QueueFull) => {
                    // librdkafka's queue is full: serve reports (they free room) and try again.
                    self.serve();
                    std::thread::sleep(QUEUE_FULL_NAP);
                }
                Err(e) => break e,
            }
        };
        // Refused before it left: too large for message.max.bytes, a topic known not to exist,
        // or a producer in a fatal state. Reported like a failed delivery.
        let text = |piece: &[u8]| String::from_utf8_lossy(piece).into_owned();
        let headers: Vec<(String, String)> = (0..r.headers).map(header).map(|(k, v)| (text(k), text(v))).collect();
        let id = headers.iter().find(|(k, _)| outbox_core::routing::is_id_header(k)).map_or("?", |(_, v)| v.as_str());
        let mut failure = Failure::of(id, &r.topic, &KafkaError::MessageProduction(error));
        failure.message = self.producer.context().redact(&failure.message);
        if failure.permanent {
            failure.record = Some(Record {
                topic: r.topic.to_string(),
                key: text(batch.get(r.first)),
                value: RecordValue::from_kafka((!r.tombstone).then(|| batch.get(r.first + 1)), r.binary),
                headers,
                timestamp_ms: r.timestamp_ms,
            });
        }
        self.report(Report::Delivery { seq: r.seq, dead_letter: false, error: Some(Box::new(failure)) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_cut_out_of_messages() {
        let secrets = vec!["hunter2".to_string()];
        assert_eq!(redact("auth failed for hunter2", &secrets), "auth failed for <hidden>");
        assert!(is_secret_key("sasl.password"));
        assert!(is_secret_key("ssl.key.pem"));
        assert!(is_secret_key("sasl.oauthbearer.config"));
        assert!(!is_secret_key("linger.ms"));
    }

    #[test]
    fn a_batch_gives_back_each_record_as_pushed() {
        let topic: Arc<str> = "t".into();
        let mut b = Batch::default();
        let headers = [("id", "1"), ("type", "Tick"), ("", "")];
        b.push(7, &RoutedRecord { topic: &topic, partition: Some(2), key: "k1", value: Some(b"{}"), binary: false, headers: &headers, timestamp_ms: 5 });
        b.push(8, &RoutedRecord { topic: &topic, partition: None, key: "", value: None, binary: false, headers: &[], timestamp_ms: 6 });
        b.push(9, &RoutedRecord { topic: &topic, partition: None, key: "k3", value: Some(&[0, 255]), binary: true, headers: &headers[..1], timestamp_ms: 7 });
        let r = &b.records;
        assert_eq!((r[0].seq, r[0].partition, r[0].headers, r[0].tombstone), (7, Some(2), 3, false));
        assert_eq!((b.text(r[0].first), b.get(r[0].first + 1)), ("k1", &b"{}"[..]));
        assert_eq!((b.text(r[0].first + 4), b.text(r[0].first + 5)), ("type", "Tick"));
        assert_eq!((b.text(r[0].first + 6), b.text(r[0].first + 7)), ("", ""));
        assert_eq!((r[1].tombstone, b.text(r[1].first), b.get(r[1].first + 1)), (true, "", &b""[..]));
        assert_eq!((r[2].binary, b.get(r[2].first + 1), b.text(r[2].first + 3)), (true, &[0u8, 255][..], "1"));
        assert!(!b.full());
        b.clear();
        assert_eq!((b.len(), b.bytes.len(), b.ends.len()), (0, 0, 0));
    }

    #[test]
    fn a_batch_is_full_at_its_record_or_byte_limit() {
        let topic: Arc<str> = "t".into();
        let mut b = Batch::default();
        for i in 0..BATCH_RECORDS as u64 {
            assert!(!b.full());
            b.push(i, &RoutedRecord { topic: &topic, partition: None, key: "k", value: Some(b"v"), binary: false, headers: &[], timestamp_ms: 0 });
        }
        assert!(b.full());
        let mut big = Batch::default();
        let value = vec![b'x'; BATCH_BYTES * 3];
        big.push(0, &RoutedRecord { topic: &topic, partition: None, key: "k", value: Some(&value), binary: false, headers: &[], timestamp_ms: 0 });
        assert!(big.full());
        big.clear();
        assert_eq!(big.bytes.capacity(), 0, "a buffer grown for one large record is let go");
    }

    #[test]
    fn each_topic_gets_one_handle_found_by_pointer_or_name() {
        let producer: BaseProducer<RelayContext> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .create_with_context(RelayContext {
                reports: crossbeam_channel::unbounded().0,
                acknowledged: Mutex::new(Vec::new()),
                served: AtomicU64::new(0),
                secrets: Vec::new(),
            })
            .expect("producer");
        let (a, b): (Arc<str>, Arc<str>) = ("outbox.event.a".into(), "outbox.event.b".into());
        let mut topics = TopicHandles::default();
        for topic in [&a, &b, &a, &a, &b] {
            assert!(topics.of(&producer, topic).is_some());
            assert!(Arc::ptr_eq(&topics.handles[topics.last].0, topic));
        }
        // The same name under another Arc (the router's map was cleared): the same handle.
        let a_again: Arc<str> = "outbox.event.a".into();
        assert!(topics.of(&producer, &a_again).is_some());
        assert_eq!((topics.handles.len(), &*topics.handles[topics.last].0), (2, "outbox.event.a"));
        // A name librdkafka cannot take: no handle, and the record is refused as an invalid topic.
        assert!(topics.of(&producer, &"bad\0name".into()).is_none());
        assert_eq!(topics.handles.len(), 3);
    }

    #[test]
    fn reports_stay_small() {
        assert!(std::mem::size_of::<Report>() <= 32, "{}", std::mem::size_of::<Report>());
    }

    #[test]
    fn the_dead_letter_bit_round_trips() {
        for seq in [0, 1, 12345, (1 << 61) + 7] {
            for (dead_letter, binary) in [(false, false), (true, false), (false, true), (true, true)] {
                assert_eq!(unpack_opaque(pack_opaque(seq, dead_letter, binary)), (seq, dead_letter, binary));
            }
        }
    }
}
