//! WAL message → event → Kafka record. Decoding hands every outbox message of every committed
//! transaction, in commit order, to [`Routing`]: the [`Opener`] checks that `outbox.emit()`
//! wrote it (its tag, see `outbox_core::auth`) and reads it, and the [`EventRouter`] picks the
//! topic and hands the record to the producer, registering it with the delivery tracker.

use super::produce::{Failure, KafkaProducer, QueueFull, Report};
use super::signals;
use crate::ffi::{DecodeSink, TxnInfo};
use outbox_core::auth::RecordKey;
use outbox_core::event::{self, EventRef};
use outbox_core::routing;
use outbox_core::tracker::{DeliveryTracker, Progress};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// No acknowledgement for this long while events are in flight counts as Kafka unavailable.
pub const ACK_STALL: Duration = Duration::from_secs(5);

/// At most one warning about skipped messages in this long (the rest are counted in it).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
    last_warning: Option<Instant>,
    /// Skipped since the last warning.
    unwarned: u64,
}

impl Opener {
    pub fn new(key: Option<RecordKey>) -> Opener {
        Opener { key, rejected: 0, counted_upto: 0, last_warning: None, unwarned: 0 }
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
        self.unwarned += 1;
        if self.last_warning.is_some_and(|t| t.elapsed() < REJECT_LOG_INTERVAL) {
            return;
        }
        let more = self.unwarned - 1;
        pgrx::warning!(
            "outbox_ext relay: skipped a message under the outbox_ext prefix at {:X}/{:X} that outbox.emit() did not write ({why}){}",
            lsn >> 32,
            lsn as u32,
            if more > 0 { format!("; {more} more since the last such warning") } else { String::new() }
        );
        self.last_warning = Some(Instant::now());
        self.unwarned = 0;
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
        if self.router.halted {
            // The transaction stays unconfirmed (the tracker has failed); the rewind that
            // follows decodes it again.
            return;
        }
        if let Some(ev) = self.opener.open(txn, lsn, body) {
            self.router.route(txn, &ev);
        }
    }

    fn commit(&mut self, txn: TxnInfo) {
        self.router.commit(txn);
    }
}

/// Everything between decoding and Kafka: the producer, the tracker of what is in flight, and
/// what happened since the worker last looked.
pub struct EventRouter {
    pub producer: KafkaProducer,
    pub tracker: DeliveryTracker,
    topic_template: String,
    topics: HashMap<String, String>,
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
}

impl EventRouter {
    pub fn new(producer: KafkaProducer, topic_template: String) -> EventRouter {
        EventRouter {
            producer,
            tracker: DeliveryTracker::new(),
            topic_template,
            topics: HashMap::new(),
            delivered: 0,
            last_error: None,
            halted: false,
            permanent: None,
            last_ack: Instant::now(),
            broker_trouble: false,
        }
    }

    fn topic(&mut self, aggregatetype: &str) -> &str {
        if !self.topics.contains_key(aggregatetype) {
            if self.topics.len() > 10_000 {
                self.topics.clear();
            }
            let topic = routing::topic_for(&self.topic_template, aggregatetype);
            self.topics.insert(aggregatetype.to_string(), topic);
        }
        &self.topics[aggregatetype]
    }

    fn record(&mut self, progress: Progress) {
        self.delivered += progress.events_completed;
    }

    /// Serves librdkafka's callbacks that are ready (without waiting) and applies every report
    /// that arrived. Callers wait on the worker's latch between polls: rdkafka's own poll with
    /// a timeout spins on the clock for its last millisecond, which cost most of a core.
    pub fn poll(&mut self) {
        self.producer.poll();
        while let Ok(report) = self.producer.reports().try_recv() {
            match report {
                Report::Delivery { seq, error: None } => {
                    self.last_ack = Instant::now();
                    self.broker_trouble = false;
                    let p = self.tracker.delivered(seq, true);
                    self.record(p);
                }
                Report::Delivery { seq, error: Some(failure) } => {
                    self.tracker.delivered(seq, false);
                    self.fail(failure);
                }
                Report::Client { message } => {
                    self.last_error = Some(message);
                    self.broker_trouble = true;
                }
            }
        }
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
}

impl EventRouter {
    /// Hands one event of `txn` to the producer.
    fn route(&mut self, txn: TxnInfo, ev: &EventRef<'_>) {
        let id = routing::id_text(ev);
        let headers = routing::record_headers(ev, &id);
        let timestamp = routing::pg_timestamp_to_unix_ms(txn.commit_time);
        let seq = self.tracker.add_event(txn.end_lsn, txn.commit_time);
        let topic = self.topic(ev.aggregatetype).to_string();
        loop {
            match self.producer.send(&topic, ev.aggregateid, ev.payload, &headers, timestamp, seq) {
                Ok(()) => return,
                Err(Ok(QueueFull)) => {
                    // Back-pressure: librdkafka holds as much as queue.buffering.max.kbytes
                    // allows. Serve delivery reports until there is room. A reload, a stop,
                    // the postmaster's death or a long stall hands control back to the main
                    // loop (which shows the state and rewinds), instead of waiting here for
                    // as long as message.timeout.ms.
                    self.poll();
                    let stalled = self.last_ack.elapsed() > ACK_STALL;
                    if self.halted
                        || stalled
                        || signals::reload_requested()
                        || !signals::sleep(Duration::from_millis(1))
                    {
                        if stalled && self.last_error.is_none() {
                            self.last_error = Some("Kafka accepts no more records and acknowledges none".into());
                        }
                        self.tracker.delivered(seq, false);
                        self.halted = true;
                        return;
                    }
                }
                Err(Err(e)) => {
                    // Refused before it left: too large for message.max.bytes, a topic known
                    // not to exist, or a producer in a fatal state.
                    self.tracker.delivered(seq, false);
                    self.fail(Failure::of(&id, &topic, &e));
                    return;
                }
            }
        }
    }

    fn commit(&mut self, txn: TxnInfo) {
        let p = self.tracker.close_txn(txn.end_lsn);
        self.record(p);
    }
}
