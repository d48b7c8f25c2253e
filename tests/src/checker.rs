//! The delivery checker: compares what was committed (and rolled back) with what Kafka holds.
//!
//! * **lost** — a committed event id never consumed;
//! * **phantom** — a rolled-back (or never-emitted) id consumed;
//! * **duplicates** — consumed records beyond the first of each id;
//! * **order violations** — within one aggregateid, a first delivery that comes after the
//!   first delivery of an event emitted later.

use crate::Record;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// What the test emitted, in emit (commit) order per aggregateid.
#[derive(Debug, Default, Clone)]
pub struct Emitted {
    /// (event id, aggregateid), in emit order.
    pub committed: Vec<(String, String)>,
    pub rolled_back: HashSet<String>,
}

impl Emitted {
    pub fn commit(&mut self, id: impl Into<String>, key: impl Into<String>) {
        self.committed.push((id.into(), key.into()));
    }

    pub fn roll_back(&mut self, id: impl Into<String>) {
        self.rolled_back.insert(id.into());
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub committed: usize,
    pub consumed: usize,
    pub lost: usize,
    pub phantom: usize,
    pub duplicates: usize,
    pub order_violations: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "committed={} consumed={} lost={} phantom={} duplicates={} order_violations={}",
            self.committed, self.consumed, self.lost, self.phantom, self.duplicates, self.order_violations
        )
    }
}

impl Report {
    /// Panics unless nothing was lost, nothing phantom, nothing out of order, and duplicates
    /// stay within `max_duplicates`.
    pub fn assert_ok(&self, scenario: &str, max_duplicates: usize) {
        eprintln!("[{scenario}] {self}");
        assert_eq!(self.lost, 0, "[{scenario}] lost events: {self}");
        assert_eq!(self.phantom, 0, "[{scenario}] phantom events: {self}");
        assert_eq!(self.order_violations, 0, "[{scenario}] order violations: {self}");
        assert!(self.duplicates <= max_duplicates, "[{scenario}] more than {max_duplicates} duplicates: {self}");
    }
}

/// Checks consumed `records` against `emitted`. Records of one partition must be in offset
/// order (as a consumer reads them).
pub fn check(emitted: &Emitted, records: &[Record]) -> Report {
    let position: HashMap<&str, usize> =
        emitted.committed.iter().enumerate().map(|(i, (id, _))| (id.as_str(), i)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut report = Report { committed: emitted.committed.len(), consumed: records.len(), ..Report::default() };
    // Highest emit position first-delivered so far, per key.
    let mut high_water: HashMap<&str, usize> = HashMap::new();
    let mut ordered: Vec<&Record> = records.iter().collect();
    ordered.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    for r in ordered {
        let Some(id) = r.event_id() else {
            report.phantom += 1;
            continue;
        };
        if !seen.insert(id) {
            report.duplicates += 1;
            continue;
        }
        match position.get(id) {
            None => report.phantom += 1,
            Some(&pos) => {
                let key = r.key.as_deref().unwrap_or("");
                let hw = high_water.entry(key).or_insert(pos);
                if pos < *hw {
                    report.order_violations += 1;
                } else {
                    *hw = pos;
                }
            }
        }
    }
    report.lost = emitted.committed.iter().filter(|(id, _)| !seen.contains(id.as_str())).count();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: i32, offset: i64, key: &str, id: &str) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            key: Some(key.into()),
            value: None,
            raw_value: None,
            headers: vec![("id".into(), id.into())],
            timestamp_ms: None,
        }
    }

    fn emitted() -> Emitted {
        let mut e = Emitted::default();
        for (id, key) in [("1", "a"), ("2", "a"), ("3", "b"), ("4", "a"), ("5", "a")] {
            e.commit(id, key);
        }
        e.roll_back("x");
        e
    }

    #[test]
    fn a_clean_delivery_passes() {
        let r = check(&emitted(), &[rec(0, 0, "a", "1"), rec(0, 1, "a", "2"), rec(1, 0, "b", "3"), rec(0, 2, "a", "4"), rec(0, 3, "a", "5")]);
        assert_eq!(r, Report { committed: 5, consumed: 5, ..Report::default() });
    }

    #[test]
    fn finds_lost_phantom_duplicates_and_a_naive_retry_reorder() {
        // 1,2,3,4,5 retried naively arrives as 1,4,5,2,3 (issue 3, scenario 2), with one lost
        // (3 never arrives on partition 1), one phantom and one duplicate.
        let records = [
            rec(0, 0, "a", "1"),
            rec(0, 1, "a", "4"),
            rec(0, 2, "a", "5"),
            rec(0, 3, "a", "2"),
            rec(0, 4, "a", "4"),
            rec(1, 0, "b", "x"),
        ];
        let r = check(&emitted(), &records);
        assert_eq!(r.lost, 1, "{r}");
        assert_eq!(r.phantom, 1, "{r}");
        assert_eq!(r.duplicates, 1, "{r}");
        assert_eq!(r.order_violations, 1, "{r}");
    }

    #[test]
    fn a_resend_after_the_originals_is_a_duplicate_not_a_violation() {
        let records = [rec(0, 0, "a", "1"), rec(0, 1, "a", "2"), rec(0, 2, "a", "1"), rec(0, 3, "a", "2"), rec(0, 4, "a", "4"), rec(0, 5, "a", "5"), rec(1, 0, "b", "3")];
        let r = check(&emitted(), &records);
        assert_eq!((r.lost, r.phantom, r.duplicates, r.order_violations), (0, 0, 2, 0), "{r}");
    }
}
