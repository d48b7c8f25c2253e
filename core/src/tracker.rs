//! How far the replication slot may be confirmed: the *confirm* step of the pipeline.
//!
//! The relay produces events in commit order and learns of their acknowledgements out of
//! order. The slot may only move past a transaction once Kafka has acknowledged **every**
//! event of it and of every transaction before it. [`DeliveryTracker`] keeps the transactions
//! that have events in flight, in commit order, and answers with the highest safe position.
//!
//! Positions are LSNs as `u64`. A transaction is identified by the end of its commit record
//! (`end_lsn`), which is what a logical-decoding client confirms: on restart, decoding skips
//! exactly the transactions whose commit record starts before the confirmed position.

use std::collections::VecDeque;

/// The opaque number librdkafka hands back with each delivery report.
pub type TxnSeq = u64;

#[derive(Debug, Clone)]
struct Txn {
    end_lsn: u64,
    /// Commit time (PostgreSQL µs), for the commit → acknowledgement latency.
    commit_time: i64,
    outstanding: u32,
    events: u32,
    /// All of the transaction's events have been handed to the producer.
    closed: bool,
}

#[derive(Debug, Default)]
pub struct DeliveryTracker {
    txns: VecDeque<Txn>,
    /// Sequence number of `txns[0]`.
    first_seq: TxnSeq,
    /// End LSN of the newest transaction whose events were all acknowledged, in order.
    safe_lsn: u64,
    /// A delivery failed since the last reset: nothing after the failure may be confirmed.
    failed: bool,
    in_flight: usize,
    /// Commit times of transactions completed since the last [`take_completed`] call.
    ///
    /// [`take_completed`]: DeliveryTracker::take_completed
    completed: Vec<i64>,
}

/// What a batch of delivery reports changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Events whose transactions became fully acknowledged.
    pub events_completed: u64,
    pub txns_completed: u64,
}

impl DeliveryTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers one more event of the transaction ending at `end_lsn` and committed at
    /// `commit_time`, about to be produced. Returns the number to attach to the record.
    pub fn add_event(&mut self, end_lsn: u64, commit_time: i64) -> TxnSeq {
        let open = matches!(self.txns.back(), Some(t) if t.end_lsn == end_lsn && !t.closed);
        if !open {
            debug_assert!(self.txns.back().is_none_or(|t| t.end_lsn < end_lsn));
            self.txns.push_back(Txn { end_lsn, commit_time, outstanding: 0, events: 0, closed: false });
        }
        let txn = self.txns.back_mut().expect("just pushed");
        txn.outstanding += 1;
        txn.events += 1;
        self.in_flight += 1;
        self.first_seq + self.txns.len() as u64 - 1
    }

    /// The commit record of the transaction ending at `end_lsn` was decoded: it has no more
    /// events to come.
    pub fn close_txn(&mut self, end_lsn: u64) -> Progress {
        if let Some(t) = self.txns.back_mut() {
            if t.end_lsn == end_lsn {
                t.closed = true;
            }
        }
        self.advance()
    }

    /// Records a delivery report for an event registered under `seq`.
    pub fn delivered(&mut self, seq: TxnSeq, ok: bool) -> Progress {
        let Some(idx) = seq.checked_sub(self.first_seq) else {
            // A report from before a reset: the rewind already accounted for it.
            return Progress::default();
        };
        let Some(txn) = self.txns.get_mut(idx as usize) else {
            return Progress::default();
        };
        txn.outstanding = txn.outstanding.saturating_sub(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        if !ok {
            self.failed = true;
        }
        self.advance()
    }

    /// The end LSN of the transaction of the event registered under `seq`, while it is tracked.
    pub fn end_lsn_of(&self, seq: TxnSeq) -> Option<u64> {
        seq.checked_sub(self.first_seq).and_then(|i| self.txns.get(i as usize)).map(|t| t.end_lsn)
    }

    /// The event registered under `seq` was refused for good and set aside (dead-lettered): it
    /// no longer holds its transaction back, and it does not count as delivered.
    pub fn set_aside(&mut self, seq: TxnSeq) -> Progress {
        let Some(txn) = seq.checked_sub(self.first_seq).and_then(|i| self.txns.get_mut(i as usize)) else {
            return Progress::default();
        };
        txn.outstanding = txn.outstanding.saturating_sub(1);
        txn.events = txn.events.saturating_sub(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        self.advance()
    }

    fn advance(&mut self) -> Progress {
        let mut progress = Progress::default();
        if self.failed {
            return progress;
        }
        while let Some(t) = self.txns.front() {
            if !(t.closed && t.outstanding == 0) {
                break;
            }
            self.safe_lsn = self.safe_lsn.max(t.end_lsn);
            progress.events_completed += t.events as u64;
            progress.txns_completed += 1;
            self.completed.push(t.commit_time);
            self.txns.pop_front();
            self.first_seq += 1;
        }
        progress
    }

    /// The highest position the slot may be confirmed to, given that decoding has read every
    /// record before `decoded_upto`. When nothing is in flight, that is `decoded_upto` itself,
    /// so that an idle outbox never holds WAL back.
    pub fn confirmable(&self, decoded_upto: u64) -> u64 {
        if self.txns.is_empty() && !self.failed {
            self.safe_lsn.max(decoded_upto)
        } else {
            self.safe_lsn
        }
    }

    /// Hands over the commit times of the transactions completed (every event acknowledged,
    /// in commit order) since the last call.
    pub fn take_completed(&mut self, mut each: impl FnMut(i64)) {
        self.completed.drain(..).for_each(&mut each);
    }

    /// Events produced but not yet acknowledged (or failed).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Forgets everything in flight after a rewind. Late reports for the old sequence numbers
    /// are ignored. `safe_lsn` is kept: it is the position decoding restarts from.
    pub fn reset(&mut self) {
        self.first_seq += self.txns.len() as u64 + 1;
        self.txns.clear();
        self.failed = false;
        self.in_flight = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_through_fully_acknowledged_prefix() {
        let mut t = DeliveryTracker::new();
        let a1 = t.add_event(100, 100);
        let a2 = t.add_event(100, 100);
        t.close_txn(100);
        let b1 = t.add_event(200, 200);
        t.close_txn(200);
        assert_eq!(t.confirmable(300), 0);
        // B acknowledged first: still nothing, A is outstanding.
        t.delivered(b1, true);
        assert_eq!(t.confirmable(300), 0);
        t.delivered(a1, true);
        assert_eq!(t.confirmable(300), 0);
        let p = t.delivered(a2, true);
        assert_eq!(p, Progress { events_completed: 3, txns_completed: 2 });
        // Everything acknowledged and nothing in flight: the decoded position is safe.
        assert_eq!(t.confirmable(300), 300);
        assert_eq!(t.in_flight(), 0);
        // Both transactions completed, in commit order, once A's last event was acknowledged.
        let mut completed = Vec::new();
        t.take_completed(|c| completed.push(c));
        assert_eq!(completed, [100, 200]);
        t.take_completed(|_| panic!("handed over twice"));
    }

    #[test]
    fn an_open_transaction_is_not_confirmed_even_if_acknowledged() {
        let mut t = DeliveryTracker::new();
        let a = t.add_event(100, 100);
        t.delivered(a, true);
        assert_eq!(t.confirmable(150), 0, "commit not decoded yet");
        t.close_txn(100);
        assert_eq!(t.confirmable(150), 150);
    }

    #[test]
    fn a_failure_stops_confirmation_until_reset() {
        let mut t = DeliveryTracker::new();
        let a = t.add_event(100, 100);
        t.close_txn(100);
        let b = t.add_event(200, 200);
        t.close_txn(200);
        let c = t.add_event(300, 300);
        t.close_txn(300);
        t.delivered(a, true);
        assert_eq!(t.confirmable(400), 100);
        t.delivered(b, false);
        t.delivered(c, true);
        assert!(t.has_failed());
        assert_eq!(t.confirmable(400), 100);
        t.reset();
        assert!(!t.has_failed());
        // Stale reports after the reset change nothing.
        assert_eq!(t.delivered(c, true), Progress::default());
        assert_eq!(t.confirmable(100), 100);
        // New work after the reset is tracked from scratch.
        let b2 = t.add_event(200, 200);
        t.close_txn(200);
        t.delivered(b2, true);
        assert_eq!(t.confirmable(250), 250);
    }

    #[test]
    fn a_set_aside_event_completes_its_transaction_without_counting_as_delivered() {
        let mut t = DeliveryTracker::new();
        let a1 = t.add_event(100, 100);
        let a2 = t.add_event(100, 100);
        t.close_txn(100);
        let b = t.add_event(200, 200);
        t.close_txn(200);
        t.delivered(b, true);
        t.delivered(a1, true);
        assert_eq!(t.confirmable(300), 0, "a2 is neither delivered nor set aside");
        assert_eq!(t.end_lsn_of(a2), Some(100));
        assert_eq!(t.set_aside(a2), Progress { events_completed: 2, txns_completed: 2 });
        assert_eq!(t.end_lsn_of(a2), None);
        assert_eq!(t.confirmable(300), 300);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.set_aside(a2), Progress::default(), "a stale seq changes nothing");
    }

    #[test]
    fn same_end_lsn_after_close_starts_a_new_transaction_only_if_later() {
        let mut t = DeliveryTracker::new();
        let a = t.add_event(100, 100);
        t.close_txn(100);
        let b = t.add_event(200, 200);
        assert_ne!(a, b);
        t.delivered(b, true);
        t.delivered(a, true);
        assert_eq!(t.confirmable(500), 100, "second transaction not closed");
    }
}
