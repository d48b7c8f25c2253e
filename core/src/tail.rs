//! Which records in a partition are this relay's own, and how far they let it skip: the core
//! of the exactly-once rule (see docs/research/issue19-exactly-once.md).
//!
//! Every record carries, besides its [`Position`], a *source*: the cluster's system
//! identifier, the database's oid, the timeline the commit was on, and the partition count the
//! relay routed it under. Reading a partition's tail, the relay keeps the highest position
//! among the records that are
//!
//! * **ours**: the same system identifier (a primary and its physical standbys share it; a
//!   fresh `initdb` or a restored dump does not) and the same database;
//! * **on our history**: the timeline that the current timeline's history gives for the
//!   record's `commit_lsn` is the record's own. A record that another branch wrote (an old
//!   primary that published past the point where this standby was promoted, the future that a
//!   point-in-time recovery abandoned) can then never make the relay skip an event, although
//!   its LSN may be above the new timeline's;
//! * **routed as now**: the same partition count, since a key maps to another partition once
//!   partitions are added.
//!
//! Anything else is ignored: at worst the relay produces an event again (a duplicate), never
//! skips one that is not there (a loss).

use crate::routing::Position;

/// Where a record came from (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub system_identifier: u64,
    pub database: u32,
    pub timeline: u32,
    pub partitions: u32,
}

/// The header that carries a record's [`Source`].
pub const SOURCE_HEADER: &str = "outbox_source";

/// The longest text of [`SOURCE_HEADER`]'s value, for emit's size check.
pub const MAX_SOURCE_TEXT: &str = "18446744073709551615.4294967295.4294967295.4294967295";

impl Source {
    /// `<system identifier>.<database oid>.<timeline>.<partition count>`, decimal.
    pub fn to_text(&self) -> String {
        format!("{}.{}.{}.{}", self.system_identifier, self.database, self.timeline, self.partitions)
    }

    /// None unless `text` is exactly what [`Source::to_text`] writes.
    pub fn parse(text: &str) -> Option<Source> {
        fn number<T: std::str::FromStr>(part: Option<&str>) -> Option<T> {
            part.filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
        }
        let mut parts = text.split('.');
        let source = Source {
            system_identifier: number(parts.next())?,
            database: number(parts.next())?,
            timeline: number(parts.next())?,
            partitions: number(parts.next())?,
        };
        parts.next().is_none().then_some(source)
    }
}

/// One timeline of a history: WAL before `end` (exclusive; `u64::MAX` for the current one)
/// and from the previous entry's end on is on timeline `tli`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSpan {
    pub tli: u32,
    pub end: u64,
}

/// The current timeline's history, oldest first, as `readTimeLineHistory` gives it (with the
/// current timeline last, ending at `u64::MAX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    spans: Vec<TimelineSpan>,
}

impl History {
    /// `spans` oldest first; the last is the current timeline.
    pub fn new(mut spans: Vec<TimelineSpan>) -> History {
        spans.sort_by_key(|s| s.end);
        History { spans }
    }

    /// A history of one timeline (a server never promoted).
    pub fn single(tli: u32) -> History {
        History { spans: vec![TimelineSpan { tli, end: u64::MAX }] }
    }

    /// The timeline WAL at `lsn` is on, in this history (PostgreSQL's `tliOfPointInHistory`).
    pub fn timeline_at(&self, lsn: u64) -> u32 {
        self.spans.iter().find(|s| lsn < s.end).or(self.spans.last()).map_or(0, |s| s.tli)
    }

    pub fn current(&self) -> u32 {
        self.spans.last().map_or(0, |s| s.tli)
    }
}

/// Which records count for the rule: this relay's system identifier, database and history,
/// and the partition count it routes a topic under now.
#[derive(Debug, Clone)]
pub struct Ours<'a> {
    pub system_identifier: u64,
    pub database: u32,
    pub history: &'a History,
    pub partitions: u32,
}

impl Ours<'_> {
    /// The position of a record with these `source` and `position` headers' values, if it is
    /// one the rule may rely on.
    pub fn position_of(&self, source: Option<&str>, commit_lsn: Option<&str>, commit_index: Option<&str>) -> Option<Position> {
        let source = Source::parse(source?)?;
        let position = Position { commit_lsn: commit_lsn?.parse().ok()?, commit_index: commit_index?.parse().ok()? };
        let ours = source.system_identifier == self.system_identifier
            && source.database == self.database
            && source.partitions == self.partitions
            && self.history.timeline_at(position.commit_lsn) == source.timeline;
        ours.then_some(position)
    }
}

/// What a partition's tail says about events still to produce there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tail {
    /// Not read yet (after a start, a rewind or a promotion).
    #[default]
    Unknown,
    /// Read: the highest position among our records there, if any.
    Read(Option<Position>),
    /// Could not be read (no permission, a timeout): produce everything (at least once).
    Unreadable,
}

impl Tail {
    /// Whether an event at `position` is already in the partition, so that producing it again
    /// would duplicate it.
    pub fn covers(&self, position: Position) -> bool {
        matches!(self, Tail::Read(Some(top)) if position <= *top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(commit_lsn: u64, commit_index: u64) -> Position {
        Position { commit_lsn, commit_index }
    }

    #[test]
    fn sources_round_trip_and_refuse_anything_else() {
        let s = Source { system_identifier: u64::MAX, database: u32::MAX, timeline: u32::MAX, partitions: u32::MAX };
        assert_eq!(s.to_text(), MAX_SOURCE_TEXT);
        assert_eq!(Source::parse(&s.to_text()), Some(s));
        let small = Source { system_identifier: 7, database: 5, timeline: 1, partitions: 3 };
        assert_eq!(Source::parse("7.5.1.3"), Some(small));
        for bad in ["", "7.5.1", "7.5.1.3.9", "7.5.1.x", "7..1.3", "+7.5.1.3", " 7.5.1.3", "7.5.1.4294967296"] {
            assert_eq!(Source::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_timeline_of_a_point_follows_the_history() {
        // Timeline 1 until 0/3000000, 2 until 0/5000000, then 3.
        let h = History::new(vec![
            TimelineSpan { tli: 3, end: u64::MAX },
            TimelineSpan { tli: 1, end: 0x300_0000 },
            TimelineSpan { tli: 2, end: 0x500_0000 },
        ]);
        assert_eq!(h.timeline_at(0), 1);
        assert_eq!(h.timeline_at(0x2ff_ffff), 1);
        assert_eq!(h.timeline_at(0x300_0000), 2);
        assert_eq!(h.timeline_at(0x500_0000), 3);
        assert_eq!(h.current(), 3);
        assert_eq!(History::single(1).timeline_at(u64::MAX - 1), 1);
    }

    #[test]
    fn only_our_records_on_our_history_and_routing_count() {
        // Promoted at 0/5000000: timeline 1 before, 2 after.
        let history = History::new(vec![TimelineSpan { tli: 1, end: 0x500_0000 }, TimelineSpan { tli: 2, end: u64::MAX }]);
        let ours = Ours { system_identifier: 42, database: 5, history: &history, partitions: 3 };
        let at = |source: &str, lsn: u64| ours.position_of(Some(source), Some(&lsn.to_string()), Some("4"));
        // The old primary's records before the switch, and ours after it.
        assert_eq!(at("42.5.1.3", 0x400_0000), Some(p(0x400_0000, 4)));
        assert_eq!(at("42.5.2.3", 0x600_0000), Some(p(0x600_0000, 4)));
        // The old primary published past the switch point: another branch, never ours.
        assert_eq!(at("42.5.1.3", 0x600_0000), None);
        // A timeline that claims WAL from before it began.
        assert_eq!(at("42.5.2.3", 0x400_0000), None);
        // Another cluster, another database, another partition count.
        assert_eq!(at("43.5.1.3", 0x400_0000), None);
        assert_eq!(at("42.6.1.3", 0x400_0000), None);
        assert_eq!(at("42.5.1.4", 0x400_0000), None);
        // A record without the headers (another producer, or made before they existed).
        assert_eq!(ours.position_of(None, Some("1"), Some("0")), None);
        assert_eq!(ours.position_of(Some("42.5.1.3"), None, Some("0")), None);
        assert_eq!(ours.position_of(Some("42.5.1.3"), Some("x"), Some("0")), None);
    }

    #[test]
    fn a_tail_covers_what_is_at_or_below_it_and_nothing_when_unknown() {
        let tail = Tail::Read(Some(p(100, 2)));
        assert!(tail.covers(p(99, 7)));
        assert!(tail.covers(p(100, 2)));
        assert!(!tail.covers(p(100, 3)));
        assert!(!tail.covers(p(101, 0)));
        for nothing in [Tail::Unknown, Tail::Unreadable, Tail::Read(None)] {
            assert!(!nothing.covers(p(0, 0)));
        }
    }
}
