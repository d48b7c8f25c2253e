//! WAL message → event → Kafka record. Decoding hands every outbox message of every committed
//! transaction, in commit order, to [`Routing`]: the [`Opener`] checks that `outbox.emit()`
//! wrote it (its tag, see `outbox_core::auth`) and reads it, and the [`EventRouter`] picks the
//! topic and hands the record to the producer, registering it with the delivery tracker.

use super::produce::{Failure, KafkaProducer, QueueFull, Report, RoutedRecord};
use super::signals;
use super::tail::{Tails, Unavailable};
use crate::ffi::{DecodeSink, TxnInfo};
use outbox_core::auth::RecordKey;
use outbox_core::dead_letter::{self as dl, DeadLetter, OnPermanentError, Record, RecordValue, Refusal};
use outbox_core::event::{self, EventRef};
use outbox_core::routing::{self, Envelope, Position, PositionText};
use outbox_core::time::Rfc3339Micros;
use outbox_core::tracker::{DeliveryTracker, Progress};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// No acknowledgement for this long while events are in flight counts as Kafka unavailable.
pub const ACK_STALL: Duration = Duration::from_secs(5);

/// At most one warning of a kind (skipped messages, dead letters) in this long; the next one
/// counts those held back.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Opens the messages under the outbox prefix with the installation's key. A message that does
/// not open (forged, copied into another transaction, or of format 1) is skipped: counted for
/// `outbox.status()` and logged with its LSN, at most once per [`REJECT_LOG_INTERVAL`].
pub struct Opener {
    /// None: no key is known for the slot's installation, so no message opens.
    key: Option<RecordKey>,
    /// Skipped since the last `take_rejected`.
    rejected: u64,
    /// The highest message position counted: a rewind decodes messages again, and they count once.
    counted_upto: u64,
    warnings: Warnings,
}

/// Warnings of one kind, at most one per [`WARNING_INTERVAL`]; each says how many were held back.
#[derive(Default)]
pub struct Warnings {
    last: Option<Instant>,
    held_back: u64,
}

impl Warnings {
    pub fn warn(&mut self, message: impl FnOnce() -> String) {
        if self.last.is_some_and(|t| t.elapsed() < WARNING_INTERVAL) {
            self.held_back += 1;
            return;
        }
        let more = std::mem::take(&mut self.held_back);
        pgrx::warning!(
            "outbox_ext relay: {}{}",
            message(),
            if more > 0 { format!(" ({more} more since the last such warning)") } else { String::new() }
        );
        self.last = Some(Instant::now());
    }
}

impl Opener {
    pub fn new(key: Option<RecordKey>) -> Opener {
        Opener { key, rejected: 0, counted_upto: 0, warnings: Warnings::default() }
    }

    pub fn set_key(&mut self, key: Option<RecordKey>) {
        self.key = key;
    }

    /// The event in `body`, written at `lsn` in `txn`, if `outbox.emit()` wrote it.
    pub fn open<'a>(&mut self, txn: TxnInfo, lsn: u64, body: &'a [u8]) -> Option<EventRef<'a>> {
        let opened = match &self.key {
            Some(key) => event::open(key, txn.xid, body),
            None => Err(event::DecodeError::BadTag),
        };
        match opened {
            Ok(ev) => Some(ev),
            Err(e) => {
                self.reject(lsn, &e);
                None
            }
        }
    }

    fn reject(&mut self, lsn: u64, why: &event::DecodeError) {
        if lsn <= self.counted_upto {
            return;
        }
        self.counted_upto = lsn;
        self.rejected += 1;
        self.warnings.warn(|| {
            format!(
                "skipped a message under the outbox_ext prefix at {:X}/{:X} that outbox.emit() did not write ({why})",
                lsn >> 32,
                lsn as u32
            )
        });
    }

    /// Messages skipped since the last call.
    pub fn take_rejected(&mut self) -> u64 {
        std::mem::take(&mut self.rejected)
    }
}

/// The decoding sink of a streaming relay: opened messages go to the router.
pub struct Routing<'a> {
    pub router: &'a mut EventRouter,
    pub opener: &'a mut Opener,
}

impl DecodeSink for Routing<'_> {
    fn event(&mut self, txn: TxnInfo, lsn: u64, body: &[u8]) {
        if cfg!(feature = "bench_sinks") && self.router.drop_unopened {
            // The bench's decode floor D: counted as delivered, nothing else.
            self.router.delivered += 1;
            return;
        }
        if self.router.halted {
            // The transaction stays unconfirmed (the tracker has failed); the rewind that
            // follows decodes it again.
            return;
        }
        if let Some(ev) = self.opener.open(txn, lsn, body) {
            // Decoding replays only what committed, in emit order, and a rewind starts again
            // at a transaction's beginning: counting the opened events numbers them 0..n-1.
            let position = Position { commit_lsn: txn.commit_lsn, commit_index: self.router.next_index };
            self.router.next_index += 1;
            self.router.route(txn, position, &ev);
        }
    }

    fn commit(&mut self, txn: TxnInfo) {
        self.router.next_index = 0;
        self.router.commit(txn);
    }
}

/// Events Kafka refused for good, with why (and why the dead-letter topic refused them too, if
/// it did): remembered across a rewind, so that an event whose refusal made the producer fatal
/// (the gapless guarantee) goes where it was going when decoded again, instead of being
/// refused, and the producer rebuilt, forever. An event is known by its transaction's end LSN
/// and its id: a redelivered event (same id, new transaction) is tried afresh. Holds the newest
/// [`Refused::CAPACITY`].
#[derive(Default)]
pub struct Refused {
    by_event: HashMap<(u64, String), (Refusal, Option<String>)>,
    order: VecDeque<(u64, String)>,
}

impl Refused {
    const CAPACITY: usize = 100_000;

    fn insert(&mut self, end_lsn: u64, id: &str, refusal: Refusal, dead_letter_error: Option<String>) {
        let key = (end_lsn, id.to_string());
        if self.by_event.insert(key.clone(), (refusal, dead_letter_error)).is_none() {
            self.order.push_back(key);
            if self.order.len() > Self::CAPACITY {
                let oldest = self.order.pop_front().expect("not empty");
                self.by_event.remove(&oldest);
            }
        }
    }

    fn get(&self, end_lsn: u64, id: &str) -> Option<&(Refusal, Option<String>)> {
        if self.by_event.is_empty() {
            return None;
        }
        self.by_event.get(&(end_lsn, id.to_string()))
    }
}

/// Where refused records go (`outbox.on_permanent_error`, `outbox.dead_letter_topic`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPolicy {
    pub on_permanent_error: OnPermanentError,
    pub topic: String,
}

/// Everything between decoding and Kafka: the producer, the tracker of what is in flight, and
/// what happened since the worker last looked.
pub struct EventRouter {
    pub producer: KafkaProducer,
    pub tracker: DeliveryTracker,
    topic_template: String,
    topics: HashMap<String, Arc<str>>,
    pub policy: DeadLetterPolicy,
    pub refused: Refused,
    /// Refused records waiting to be produced to the dead-letter topic.
    to_topic: VecDeque<DeadLetter>,
    /// Refused records the dead-letter topic refused too: the worker writes them into the table
    /// `outbox.dead_letter` (outside decoding, in a transaction of its own) and then calls
    /// [`EventRouter::stored_in_table`].
    pub to_table: Vec<DeadLetter>,
    /// Events set aside (acknowledged by the dead-letter topic, or stored in the table) since
    /// the last `take_dead_lettered`.
    dead_lettered: u64,
    dead_letter_warnings: Warnings,
    /// Events acknowledged (in fully acknowledged transactions) since the last `take_progress`.
    delivered: u64,
    /// The newest error from Kafka, to show in outbox.status().
    pub last_error: Option<String>,
    /// A delivery failed or the worker must stop: produce nothing more until a rewind.
    pub halted: bool,
    /// The first failure that no retry can fix: the relay stops until an operator acts.
    pub permanent: Option<String>,
    /// When Kafka last acknowledged something (or the router was made).
    pub last_ack: Instant,
    /// Client-level errors (broker down) since the last acknowledgement.
    pub broker_trouble: bool,
    /// The `commit_index` of the next event of the transaction being decoded.
    next_index: u64,
    /// With `outbox.exactly_once`: each partition's tail, read before the first record to it.
    pub tails: Option<Tails>,
    /// `outbox.record_format = cloudevents`: the `ce_source` of this database's records.
    cloudevents_source: Option<Rc<str>>,
    /// `outbox.bench_sink = drop` (feature `bench_sinks` only): drop every message unopened.
    pub drop_unopened: bool,
}

impl EventRouter {
    /// `cloudevents_source`: Some in `outbox.record_format = cloudevents`.
    pub fn new(
        producer: KafkaProducer,
        topic_template: String,
        policy: DeadLetterPolicy,
        cloudevents_source: Option<String>,
    ) -> EventRouter {
        EventRouter {
            producer,
            tracker: DeliveryTracker::new(),
            topic_template,
            topics: HashMap::new(),
            policy,
            refused: Refused::default(),
            to_topic: VecDeque::new(),
            to_table: Vec::new(),
            dead_lettered: 0,
            dead_letter_warnings: Warnings::default(),
            delivered: 0,
            last_error: None,
            halted: false,
            permanent: None,
            last_ack: Instant::now(),
            broker_trouble: false,
            next_index: 0,
            tails: None,
            cloudevents_source: cloudevents_source.map(Rc::from),
            drop_unopened: false,
        }
    }

    fn topic(&mut self, aggregatetype: &str) -> Arc<str> {
        if let Some(topic) = self.topics.get(aggregatetype) {
            return Arc::clone(topic);
        }
        if self.topics.len() > 10_000 {
            self.topics.clear();
        }
        let topic: Arc<str> = routing::topic_for(&self.topic_template, aggregatetype).into();
        self.topics.insert(aggregatetype.to_string(), Arc::clone(&topic));
        topic
    }

    fn record(&mut self, progress: Progress) {
        self.delivered += progress.events_completed;
    }

    /// Hands the records routed so far to the producing thread and applies every report that
    /// arrived (the producing thread serves librdkafka's callbacks). Never waits.
    pub fn poll(&mut self) {
        self.producer.hand_over();
        while let Ok(report) = self.producer.reports().try_recv() {
            match report {
                Report::Acknowledged { seqs } => {
                    self.last_ack = Instant::now();
                    self.broker_trouble = false;
                    for &seq in &seqs {
                        let p = self.tracker.delivered(seq, true);
                        self.record(p);
                    }
                    self.producer.reuse(seqs);
                }
                Report::Delivery { seq, dead_letter, error: None } => {
                    self.last_ack = Instant::now();
                    self.broker_trouble = false;
                    let p = if dead_letter {
                        self.dead_lettered += 1;
                        self.tracker.set_aside(seq)
                    } else {
                        self.tracker.delivered(seq, true)
                    };
                    self.record(p);
                }
                Report::Delivery { seq, dead_letter: false, error: Some(failure) } => {
                    let failure = *failure;
                    match (self.set_aside_permanently(), failure.record) {
                        (true, Some(record)) if failure.permanent => {
                            self.warn_set_aside(&failure.message);
                            let dead = DeadLetter { seq, record, refusal: failure.refusal, dead_letter_error: None };
                            self.remember(&dead);
                            self.to_topic.push_back(dead);
                        }
                        (_, record) => {
                            self.tracker.delivered(seq, false);
                            self.fail(Failure { record, ..failure });
                        }
                    }
                }
                Report::Delivery { seq, dead_letter: true, error: Some(failure) } => {
                    let failure = *failure;
                    match failure.record {
                        Some(record) if failure.permanent => {
                            self.store_in_table(DeadLetter::refused_again(seq, record, failure.refusal.message), &failure.message)
                        }
                        record => {
                            // Not refused for good (a timeout, a disconnect): the rewind retries
                            // the event from its own topic.
                            self.tracker.delivered(seq, false);
                            self.fail(Failure { record, ..failure });
                        }
                    }
                }
                Report::Discarded { seq } => {
                    // Dropped by a purge, before librdkafka had it: the rewind sends it again.
                    self.tracker.delivered(seq, false);
                    self.halted = true;
                }
                Report::Client { message } => {
                    self.last_error = Some(message);
                    self.broker_trouble = true;
                }
            }
        }
        self.send_dead_letters();
        if !self.halted {
            if let Some(fatal) = self.producer.fatal_error() {
                // The idempotent producer cannot go on; the rewind rebuilds it.
                self.last_error = Some(fatal);
                self.halted = true;
            }
        }
    }

    /// Stops producing after a failed record; a permanent failure is kept (the first one).
    fn fail(&mut self, failure: Failure) {
        if failure.permanent && self.permanent.is_none() {
            self.permanent = Some(failure.message.clone());
        }
        self.last_error = Some(failure.message);
        self.halted = true;
    }

    /// Events newly acknowledged since the last call.
    pub fn take_delivered(&mut self) -> u64 {
        std::mem::take(&mut self.delivered)
    }

    /// Events newly set aside since the last call.
    pub fn take_dead_lettered(&mut self) -> u64 {
        std::mem::take(&mut self.dead_lettered)
    }

    fn set_aside_permanently(&self) -> bool {
        self.policy.on_permanent_error == OnPermanentError::DeadLetter
    }

    /// Produces the refused records to the dead-letter topic: the original record with the
    /// reasons appended as headers. One that cannot even be handed over for good (too large for
    /// `message.max.bytes` with the added headers) goes to the table instead.
    fn send_dead_letters(&mut self) {
        while !self.halted {
            let Some(dead) = self.to_topic.front() else { return };
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let headers = dl::dead_letter_headers(&dead.record.headers, &dead.refusal, now_ms);
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let r = &dead.record;
            let (value, binary) = (r.value.bytes(), r.value.is_binary());
            match self.producer.send_now(&self.policy.topic, None, &r.key, value, binary, &headers, r.timestamp_ms, dead.seq, true) {
                Ok(()) => {
                    self.to_topic.pop_front();
                }
                // Tried again at the next poll.
                Err(Ok(QueueFull)) => return,
                Err(Err(e)) => {
                    let dead = self.to_topic.pop_front().expect("front exists");
                    let failure = Failure::of(dead.event_id(), &self.policy.topic, &e);
                    if failure.permanent {
                        let dead = DeadLetter { dead_letter_error: Some(failure.refusal.message.clone()), ..dead };
                        self.store_in_table(dead, &failure.message);
                    } else {
                        self.tracker.delivered(dead.seq, false);
                        self.fail(failure);
                    }
                }
            }
        }
    }

    fn warn_set_aside(&mut self, failure: &str) {
        let topic = &self.policy.topic;
        self.dead_letter_warnings.warn(|| format!("{failure}; setting the event aside in dead-letter topic {topic}"));
    }

    /// The dead-letter topic refused `dead` too (`failure`): on to the table, which the worker
    /// writes. Remembered, so that a rewind before it is stored sends it there directly.
    fn store_in_table(&mut self, dead: DeadLetter, failure: &str) {
        self.dead_letter_warnings.warn(|| format!("{failure}; storing the event in table outbox.dead_letter"));
        self.remember(&dead);
        self.to_table.push(dead);
    }

    /// Remembers where `dead` is going, for the rewind that may come before it gets there.
    fn remember(&mut self, dead: &DeadLetter) {
        if let Some(end_lsn) = self.tracker.end_lsn_of(dead.seq) {
            self.refused.insert(end_lsn, dead.event_id(), dead.refusal.clone(), dead.dead_letter_error.clone());
        }
    }

    /// The dead letters `seqs` could not be stored anywhere: the relay stops at them.
    pub fn fail_permanently(&mut self, seqs: impl IntoIterator<Item = u64>, message: String) {
        for seq in seqs {
            self.tracker.delivered(seq, false);
        }
        self.permanent.get_or_insert_with(|| message.clone());
        self.last_error = Some(message);
        self.halted = true;
    }

    /// The worker stored these dead letters in the table, durably.
    pub fn stored_in_table(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            self.dead_lettered += 1;
            let p = self.tracker.set_aside(seq);
            self.record(p);
        }
    }
}

impl EventRouter {
    /// Hands one event of `txn`, at `position`, to the producer.
    fn route(&mut self, txn: TxnInfo, position: Position, ev: &EventRef<'_>) {
        let id = routing::id_text(ev);
        let position_text = PositionText::new(position);
        let source = self.cloudevents_source.clone();
        let envelope = match &source {
            None => Envelope::Plain,
            Some(source) => Envelope::CloudEvents {
                source,
                time: Rfc3339Micros::new(routing::pg_timestamp_to_unix_us(txn.commit_time)),
            },
        };
        let headers = routing::record_headers(ev, &id, &position_text, &envelope);
        let timestamp = routing::pg_timestamp_to_unix_ms(txn.commit_time);
        let seq = self.tracker.add_event(txn.end_lsn, txn.commit_time);
        let topic = self.topic(ev.aggregatetype);
        if self.set_aside_permanently() {
            if let Some((refusal, dead_letter_error)) = self.refused.get(txn.end_lsn, &id).cloned() {
                let record = record_of(topic.to_string(), ev, &headers, timestamp);
                match dead_letter_error {
                    None => self.set_aside(seq, record, refusal),
                    Some(_) => self.to_table.push(DeadLetter { seq, record, refusal, dead_letter_error }),
                }
                return;
            }
        }
        let mut partition = None;
        if let Some(tails) = self.tails.as_mut() {
            match tails.place(&topic, ev.aggregateid, position, &ev.id, timestamp) {
                Ok(placed) if placed.held => {
                    // Kafka holds it already (produced before a crash or a rewind).
                    let p = self.tracker.delivered(seq, true);
                    self.record(p);
                    return;
                }
                Ok(placed) => partition = placed.partition,
                Err(Unavailable(why)) => {
                    self.tracker.delivered(seq, false);
                    self.fail(Failure::passing(why, &topic));
                    return;
                }
            }
        }
        let record = RoutedRecord {
            topic: &topic,
            partition,
            key: ev.aggregateid,
            value: ev.value.bytes(),
            binary: ev.value.is_binary(),
            headers: &headers,
            timestamp_ms: timestamp,
        };
        while let Err(QueueFull) = self.producer.queue(seq, &record) {
            // Back-pressure: librdkafka holds as much as queue.buffering.max.kbytes allows, and
            // the producing thread waits for room. Serve delivery reports and wait for the
            // thread to take the batch. A reload, a stop, the postmaster's death or a long
            // stall hands control back to the main loop (which shows the state and rewinds),
            // instead of waiting here for as long as message.timeout.ms.
            self.poll();
            let stalled = self.last_ack.elapsed() > ACK_STALL;
            let producer = &mut self.producer;
            if self.halted
                || stalled
                || signals::reload_requested()
                || !signals::wait_off_latch(Duration::from_millis(1), |t| producer.wait_for_room(t))
            {
                if stalled && self.last_error.is_none() {
                    self.last_error = Some("Kafka accepts no more records and acknowledges none".into());
                }
                self.tracker.delivered(seq, false);
                self.halted = true;
                return;
            }
        }
    }

    fn commit(&mut self, txn: TxnInfo) {
        let p = self.tracker.close_txn(txn.end_lsn);
        self.record(p);
    }

    /// Sends event `seq`'s `record`, refused for good, to the dead-letter topic.
    fn set_aside(&mut self, seq: u64, record: Record, refusal: Refusal) {
        self.to_topic.push_back(DeadLetter { seq, record, refusal, dead_letter_error: None });
        self.send_dead_letters();
    }
}

/// The record the relay makes of `ev`, owned.
fn record_of(topic: String, ev: &EventRef<'_>, headers: &[(&str, &str)], timestamp_ms: i64) -> Record {
    Record {
        topic,
        key: ev.aggregateid.to_string(),
        value: RecordValue::of(&ev.value),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        timestamp_ms,
    }
}
