//! A live write load: writer threads that emit batches in their own transactions until told
//! to stop, some rolled back whole and some in part (to a savepoint), and remember which ids
//! committed. Each writer uses its own keys, so per-key emit order is well defined.

use crate::{Emitted, PgCluster};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Load {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicUsize>,
    writers: Vec<JoinHandle<Emitted>>,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    pub writers: usize,
    /// Events per transaction.
    pub batch: i64,
    /// Keys per writer.
    pub keys: i64,
    /// Every n-th transaction is rolled back (0: never).
    pub rollback_every: usize,
    /// Every n-th transaction also rolls back a savepoint (0: never).
    pub savepoint_every: usize,
}

impl Default for LoadShape {
    fn default() -> Self {
        LoadShape { writers: 2, batch: 50, keys: 10, rollback_every: 0, savepoint_every: 0 }
    }
}

/// Parses `id key,id key,...` as printed by the query of [`select_ids`].
pub fn parse_ids(line: &str) -> Vec<(String, String)> {
    line.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|p| {
            let (id, key) = p.split_once(' ').expect("id key");
            (id.to_string(), key.to_string())
        })
        .collect()
}

/// One query that emits seq `from..=to` over keys `{prefix}{seq % keys}` and prints the
/// ids with their keys, in emit order.
pub fn select_ids(aggregatetype: &str, prefix: &str, keys: i64, from: i64, to: i64) -> String {
    format!(
        "SELECT string_agg(id::text || ' ' || k, ',' ORDER BY i) FROM (
           SELECT i, '{prefix}' || (i % {keys}) AS k,
                  outbox.emit('{aggregatetype}', '{prefix}' || (i % {keys}), 'E', jsonb_build_object('seq', i)) AS id
           FROM generate_series({from}, {to}) AS i) s;"
    )
}

impl Load {
    pub fn start(pg: &PgCluster, aggregatetype: &str, shape: LoadShape) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicUsize::new(0));
        let writers = (0..shape.writers)
            .map(|w| {
                let pg = PgCluster::attach(pg, &pg.database);
                let stop = stop.clone();
                let committed = committed.clone();
                let aggregatetype = aggregatetype.to_string();
                std::thread::spawn(move || {
                    let prefix = format!("w{w}-");
                    let mut emitted = Emitted::default();
                    let mut seq = 0i64;
                    let mut txn = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        txn += 1;
                        let rollback = shape.rollback_every > 0 && txn % shape.rollback_every == 0;
                        let savepoint = shape.savepoint_every > 0 && txn % shape.savepoint_every == 0;
                        let n = shape.batch;
                        let mut script = String::from("BEGIN;\n");
                        script += &select_ids(&aggregatetype, &prefix, shape.keys, seq, seq + n - 1);
                        if savepoint {
                            script += "\nSAVEPOINT s;\n";
                            script += &select_ids(&aggregatetype, &prefix, shape.keys, seq + n, seq + 2 * n - 1);
                            script += "\nROLLBACK TO SAVEPOINT s;\n";
                        }
                        script += if rollback { "\nROLLBACK;" } else { "\nCOMMIT;" };
                        let out = pg.sql(&script);
                        let mut lines = out.lines();
                        let kept = parse_ids(lines.next().unwrap_or(""));
                        let undone = if savepoint { parse_ids(lines.next().unwrap_or("")) } else { vec![] };
                        for (id, _) in undone {
                            emitted.roll_back(id);
                        }
                        if rollback {
                            for (id, _) in kept {
                                emitted.roll_back(id);
                            }
                        } else {
                            committed.fetch_add(kept.len(), Ordering::Relaxed);
                            for (id, key) in kept {
                                emitted.commit(id, key);
                            }
                        }
                        seq += if savepoint { 2 * n } else { n };
                    }
                    emitted
                })
            })
            .collect();
        Load { stop, committed, writers }
    }

    /// Events committed so far.
    pub fn committed(&self) -> usize {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` events committed.
    pub fn wait_for_committed(&self, n: usize) {
        crate::wait_until(&format!("{n} committed events"), crate::DEADLINE, || self.committed() >= n);
    }

    /// Stops the writers and returns everything they emitted.
    pub fn stop(self) -> Emitted {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Emitted::default();
        for w in self.writers {
            let e = w.join().expect("writer thread");
            all.committed.extend(e.committed);
            all.rolled_back.extend(e.rolled_back);
        }
        all
    }
}
