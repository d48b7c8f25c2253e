//! WAL message → event → Kafka record. Decoding calls [`EventRouter`] for every outbox message
//! of every committed transaction, in commit order; the router decodes the wire format, picks
//! the topic and hands the record to the producer, registering it with the delivery tracker.

use super::produce::{Failure, KafkaProducer, QueueFull, Report};
use super::worker;
use crate::ffi::{DecodeSink, TxnInfo};
use outbox_core::event;
use outbox_core::routing;
use outbox_core::tracker::{DeliveryTracker, Progress};
use std::collections::HashMap;
use std::time::{Duration, Instant};

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
    /// Messages under our prefix that were not made by outbox.emit().
    pub foreign_messages: u64,
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
            foreign_messages: 0,
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

impl DecodeSink for EventRouter {
    fn event(&mut self, txn: TxnInfo, body: &[u8]) {
        if self.halted {
            // The transaction stays unconfirmed (the tracker has failed); the rewind that
            // follows decodes it again.
            return;
        }
        let ev = match event::decode(body) {
            Ok(ev) => ev,
            Err(e) => {
                // Not written by outbox.emit() (it always writes a valid record), for example
                // pg_logical_emit_message(true, 'outbox_ext', ...) by hand. It is not an event.
                self.foreign_messages += 1;
                pgrx::warning!(
                    "outbox_ext: ignoring a message under the outbox_ext prefix that outbox.emit() did not write ({e}), in the transaction committed at {:X}/{:X}",
                    txn.end_lsn >> 32,
                    txn.end_lsn as u32
                );
                return;
            }
        };
        let id = routing::id_text(&ev);
        let headers = routing::record_headers(&ev, &id);
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
                    let stalled = self.last_ack.elapsed() > worker::ACK_STALL;
                    if self.halted
                        || stalled
                        || worker::reload_requested()
                        || !worker::sleep(Duration::from_millis(1))
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
