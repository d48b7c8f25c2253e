//! Which events a partition already holds: the core of the exactly-once rule (see
//! docs/research/issue19-exactly-once.md).
//!
//! Before the relay produces to a partition for the first time after a start, a rewind or a
//! promotion, it reads the partition backwards from its end and collects the records it finds
//! as [`Delivered`]. An event is skipped only if a record with **the same id and the same
//! position** (`commit_lsn`, `commit_index`) is in the partition: it was produced before and
//! Kafka holds it. Nothing is inferred from a record about any *other* event, so the rule does
//! not rest on the producer having written the partition without gaps, on clocks, on
//! timelines or on which cluster wrote a record:
//!
//! * an id is a UUIDv7 drawn from 74 random bits by `emit`: another database, another cluster,
//!   or another timeline's event at the same LSN carries another id;
//! * the same event on a promoted standby (the old primary's WAL, replicated) carries the same
//!   id at the same position, and is rightly skipped;
//! * an event redelivered from `outbox.dead_letter` keeps its id but has a new position.
//!
//! What the scan misses (records gone to retention, a partition added since, a record beyond
//! the scan's bounds, a produce request of a dead process that lands after the scan) costs a
//! duplicate, never a loss.

use crate::routing::Position;
use crate::uuid7;
use std::collections::HashSet;

/// The scan goes back chunk by chunk, and stops after the first chunk that shows it has gone
/// past the records that matter:
///
/// * it reaches back (by timestamp) past the first event's commit time minus this.
///   Generous: a commit timestamp is taken shortly before the commit record is inserted, and
///   clocks step;
/// * or it holds as many possible matches as the scan keeps.
///
/// Stopping early costs duplicates, never a loss.
pub const SKEW_MS: i64 = 60_000;

/// The most records one scan reads in a partition. The relay's own records that matter are
/// its last unconfirmed ones: at most what librdkafka holds (`queue.buffering.max.messages`)
/// plus what was acknowledged since the last confirmation (100 ms of drain).
pub const MAX_RECORDS: usize = 200_000;

/// An event as the scan knows it: its position and its id.
pub type Mark = (Position, [u8; 16]);

/// What a partition holds, as far as the scan read it.
#[derive(Debug, Default, Clone)]
pub struct Delivered {
    marks: HashSet<Mark>,
    /// The highest position among `marks`: events above it are not looked up.
    top: Option<Position>,
}

impl Delivered {
    /// Whether the partition holds the event with this `id` at this `position`.
    pub fn holds(&self, position: Position, id: &[u8; 16]) -> bool {
        self.top.is_some_and(|top| position <= top) && self.marks.contains(&(position, *id))
    }

    /// Whether no event at or above `position` can be held: the relay has passed them all.
    pub fn passed_by(&self, position: Position) -> bool {
        self.top.is_none_or(|top| position >= top)
    }

    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

/// A backward scan of one partition, fed the records of each chunk it reads.
#[derive(Debug)]
pub struct Scan {
    /// The commit time (Unix ms) of the first event the relay will produce to the partition.
    since_ms: i64,
    /// That event's position: records below it are of events the relay will not decode again.
    first: Position,
    /// The end of the WAL this server has written: records above it are not its own.
    upper: u64,
    /// The most records of possible matches kept; the scan stops once it has them.
    max_marks: usize,
    read: usize,
    oldest_in_chunk: Option<i64>,
    found: Delivered,
}

impl Scan {
    /// A scan for the events from `first` on, the first of them committed at `since_ms`, by a
    /// server whose WAL ends at `upper`, keeping at most `max_marks` records.
    pub fn new(first: Position, since_ms: i64, upper: u64, max_marks: usize) -> Scan {
        Scan {
            since_ms,
            first,
            upper,
            max_marks,
            read: 0,
            oldest_in_chunk: None,
            found: Delivered::default(),
        }
    }

    /// One record of the partition, with its timestamp and the values of its `id`,
    /// `commit_lsn` and `commit_index` headers. Records without them (another producer's, or
    /// made before outbox_ext had position headers) count towards the bound only.
    pub fn record(&mut self, timestamp_ms: i64, id: Option<&[u8]>, commit_lsn: Option<&[u8]>, commit_index: Option<&[u8]>) {
        self.read += 1;
        self.oldest_in_chunk = Some(self.oldest_in_chunk.map_or(timestamp_ms, |t| t.min(timestamp_ms)));
        let (Some(lsn), Some(index)) = (number(commit_lsn), number(commit_index)) else { return };
        let position = Position { commit_lsn: lsn, commit_index: index };
        let Some(id) = id.and_then(uuid7::parse_hyphenated) else { return };
        if position < self.first || lsn > self.upper || self.found.marks.len() >= self.max_marks {
            // Kept out of memory: no event the relay will decode can match it (or the scan is
            // full, and stops at the end of this chunk).
            return;
        }
        self.found.marks.insert((position, id));
        self.found.top = Some(self.found.top.map_or(position, |t| t.max(position)));
    }

    /// A chunk was read (`reached_low`: it began at the partition's low watermark). Whether
    /// the scan goes on with the chunk before it.
    pub fn go_back(&mut self, reached_low: bool) -> bool {
        let oldest = self.oldest_in_chunk.take();
        let recent = oldest.is_none_or(|t| t >= self.since_ms.saturating_sub(SKEW_MS));
        // Positions are no stop: in a topic shared with other databases of this cluster their
        // relays append in their own time, so a chunk of their records below the first event
        // says nothing about where ours are (a test caught 8,000 duplicates so).
        let full = self.found.marks.len() >= self.max_marks;
        !reached_low && self.read < MAX_RECORDS && recent && !full
    }

    pub fn records_read(&self) -> usize {
        self.read
    }

    pub fn finish(self) -> Delivered {
        self.found
    }
}

fn number(text: Option<&[u8]>) -> Option<u64> {
    let text = std::str::from_utf8(text?).ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// What the relay knows of a partition before producing to it.
#[derive(Debug, Clone, Default)]
pub enum Tail {
    /// Not read yet (after a start, a rewind or a promotion).
    #[default]
    Unknown,
    /// Read: events found there are skipped.
    Read(Delivered),
    /// Not read (no permission, a timeout, exactly once off): produce everything.
    Unreadable,
}

impl Tail {
    /// Whether the event with `id` at `position` is already in the partition.
    pub fn holds(&self, position: Position, id: &[u8; 16]) -> bool {
        matches!(self, Tail::Read(d) if d.holds(position, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uuid7;

    fn p(commit_lsn: u64, commit_index: u64) -> Position {
        Position { commit_lsn, commit_index }
    }

    fn id(n: u8) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[0] = 0x01;
        id[15] = n;
        id
    }

    fn feed(scan: &mut Scan, ts: i64, n: u8, position: Position) {
        let text = uuid7::to_hyphenated(&id(n));
        scan.record(
            ts,
            Some(text.as_bytes()),
            Some(position.commit_lsn.to_string().as_bytes()),
            Some(position.commit_index.to_string().as_bytes()),
        );
    }

    #[test]
    fn only_the_same_event_at_the_same_position_is_held() {
        let mut scan = Scan::new(p(99, 0), 1_000_000, 1_000, 100);
        feed(&mut scan, 1_000_000, 7, p(98, 3)); // below the first event to produce: not kept
        feed(&mut scan, 1_000_000, 1, p(100, 0));
        feed(&mut scan, 1_000_000, 2, p(100, 1));
        feed(&mut scan, 1_000_000, 8, p(1_001, 0)); // above this server's WAL: another cluster's
        scan.record(1_000_000, None, Some(b"500"), Some(b"0")); // another producer's record
        scan.record(1_000_000, Some(b"not a uuid"), Some(b"500"), Some(b"0"));
        let delivered = scan.finish();
        assert_eq!(delivered.len(), 2);
        assert!(!delivered.passed_by(p(100, 0)) && delivered.passed_by(p(100, 1)) && delivered.passed_by(p(101, 0)));
        let tail = Tail::Read(delivered);
        assert!(tail.holds(p(100, 0), &id(1)));
        assert!(tail.holds(p(100, 1), &id(2)));
        // Below the highest record found but not in the partition: a gap is never skipped.
        assert!(!tail.holds(p(99, 0), &id(3)));
        // Another timeline's (or cluster's) event at a position found here: another id.
        assert!(!tail.holds(p(100, 0), &id(9)));
        // A redelivered event: its id, at a new position.
        assert!(!tail.holds(p(200, 0), &id(1)));
        for nothing in [Tail::Unknown, Tail::Unreadable, Tail::Read(Delivered::default())] {
            assert!(!nothing.holds(p(100, 0), &id(1)));
        }
    }

    #[test]
    fn the_scan_goes_back_until_old_records_the_low_watermark_or_its_bound() {
        let since = 10_000_000;
        let mut scan = Scan::new(p(0, 0), since, u64::MAX, 100);
        feed(&mut scan, since + 5, 1, p(10, 0));
        assert!(scan.go_back(false));
        // An empty chunk (compacted away) tells nothing: go on.
        assert!(scan.go_back(false));
        feed(&mut scan, since - SKEW_MS + 1, 2, p(9, 0));
        assert!(scan.go_back(false));
        assert!(!scan.go_back(true), "the low watermark ends it");
        feed(&mut scan, since - SKEW_MS - 1, 3, p(8, 0));
        feed(&mut scan, since, 4, p(8, 1));
        assert!(!scan.go_back(false), "a chunk reaching back past the skew ends it");
        // Positions: a chunk whose positioned records are all below the first event ends it;
        // one record at or above it, or none with a position, goes on.
        let mut scan = Scan::new(p(100, 0), since, u64::MAX, 100);
        feed(&mut scan, since, 1, p(99, 5));
        scan.record(since, None, None, None);
        feed(&mut scan, since, 2, p(100, 0));
        assert!(scan.go_back(false));
        scan.record(since, None, None, None);
        assert!(scan.go_back(false));
        feed(&mut scan, since, 3, p(99, 0));
        scan.record(since, None, Some(b"98"), Some(b"0")); // another relay's, without our id
        assert!(scan.go_back(false), "another relay's records below the first event say nothing of ours");
        let mut big = Scan::new(p(0, 0), since, u64::MAX, 100);
        for _ in 0..MAX_RECORDS {
            big.record(since, None, None, None);
        }
        assert!(!big.go_back(false));
        assert_eq!(big.records_read(), MAX_RECORDS);
        assert!(big.finish().is_empty());
        // A full scan keeps what it has and goes no further back.
        let mut full = Scan::new(p(0, 0), since, u64::MAX, 2);
        for n in 0..5 {
            feed(&mut full, since, n, p(10 + n as u64, 0));
        }
        assert!(!full.go_back(false));
        assert_eq!(full.finish().len(), 2);
    }
}
