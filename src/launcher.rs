//! The launcher: one static background worker that keeps a relay running in every database
//! with the extension, as PostgreSQL's logical replication launcher keeps one apply worker per
//! subscription. It is connected to no database; it reads the shared catalog `pg_database`.
//!
//! * At start, and when it sees a new database, it starts a relay there. The relay looks for
//!   the extension and, finding none (and no slot of a dropped installation), exits for good.
//!   This is what makes a restart at any moment safe: every database is looked at again, so one
//!   whose CREATE EXTENSION committed just before a crash, before its relay made the slot, gets
//!   its relay and its slot.
//! * CREATE EXTENSION asks for a relay (`relays::request`) and wakes the launcher, which starts
//!   one at once.
//! * A relay that ends while still wanted (an ERROR, pg_terminate_backend) is started again
//!   after `RESTART_INTERVAL`; the others are not touched. The postmaster tells the launcher
//!   when a relay starts or stops, which wakes it.
//! * A safety net that needs no message to arrive: every `SCAN_INTERVAL`, each database that
//!   has a replication slot of ours (read from shared memory) is marked wanted, so a database
//!   whose relay was lost, whatever the cause, gets one again within that time. Between
//!   CREATE EXTENSION's commit and the slot's creation the request is what keeps it wanted.
//!
//! Which entries exist and who may change them, and why no request is lost: `relays.rs`.

use crate::ffi::{self, shmem};
use crate::relay::signals::{shutdown_requested, sleep, take_reload};
use crate::relay::{self, RESTART_INTERVAL};
use crate::relays::{self, Wanted};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime};
use pgrx::bgworkers::{DynamicBackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How often the launcher reads `pg_database` for databases created or dropped since.
const SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// The longest the launcher sleeps; CREATE EXTENSION and relays starting or stopping wake it.
const NAP: Duration = Duration::from_secs(1);

/// Registers the launcher; called from `_PG_init` while preloading.
pub fn register() {
    ffi::set_worker_mains(launcher_main, relay::worker::relay_main);
    BackgroundWorkerBuilder::new("outbox_ext launcher")
        .set_type("outbox_ext launcher")
        .set_function("outbox_launcher_main")
        .set_library("outbox_ext")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_INTERVAL))
        .load();
}

fn launcher_main() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: only shared catalogs, which is all the launcher reads.
    BackgroundWorker::connect_worker_to_spi(None, None);
    relays::set_launcher_latch(shmem::my_latch());
    ffi::before_exit(|| relays::set_launcher_latch(0));
    log!("outbox_ext launcher started");
    for setting in crate::gucs::legacy_settings_in_use() {
        warning!("outbox_ext: {setting} is no longer used and is ignored: every database with extension outbox_ext has its own relay and slot (see the README); remove it from postgresql.conf");
    }

    let mut launcher = Launcher::default();
    let mut next_scan = Instant::now();
    while !shutdown_requested() {
        if take_reload() {
            ffi::reload_config();
        }
        if Instant::now() >= next_scan {
            launcher.scan();
            next_scan = Instant::now() + SCAN_INTERVAL;
        }
        let wait = launcher.supervise();
        sleep(wait.min(NAP));
    }
    // Relays stop on their own SIGTERM; a launcher terminated by itself is started again by
    // the postmaster (exit code 1) and finds the relays still running.
    ffi::exit_worker(1);
}

/// A relay the launcher started.
struct Launched {
    handle: DynamicBackgroundWorker,
    at: Instant,
    /// The entry's CREATE EXTENSION count at launch: a newer request starts the next relay at
    /// once, without waiting for RESTART_INTERVAL.
    requests: u64,
}

impl Launched {
    /// Started or about to be: the postmaster has not reported it stopped.
    fn alive(&self) -> bool {
        !matches!(self.handle.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied))
    }
}

#[derive(Default)]
struct Launcher {
    /// Databases seen in pg_database (each got a relay to look for the extension once).
    known: HashSet<u32>,
    /// Databases in entries but missing from the last scan: freed if missing again.
    missing: HashSet<u32>,
    launched: HashMap<u32, Launched>,
    /// Whether the log already says that no worker slot was free.
    short_of_workers: bool,
    short_of_entries: bool,
}

impl Launcher {
    /// Reads pg_database: a relay looks at each new database, and runs in every database with
    /// a slot of ours (the safety net); entries of dropped ones go.
    fn scan(&mut self) {
        let databases = BackgroundWorker::transaction(ffi::connectable_databases);
        let present: HashSet<u32> = databases.iter().map(|d| d.oid).collect();
        let with_slots = ffi::databases_with_relay_slots();
        for db in &databases {
            let has_slot = with_slots.contains(&db.oid);
            if self.known.contains(&db.oid) && !has_slot {
                continue;
            }
            match relays::want(db.oid, &db.name) {
                Ok(newly) => {
                    // The safety net: requests (relays.rs) keep every database with the
                    // extension wanted; one with a slot of ours that is not has lost its relay.
                    if newly && has_slot && self.known.contains(&db.oid) {
                        log!("outbox_ext launcher: database \"{}\" has a replication slot of outbox_ext but no relay; starting one", db.name);
                    }
                    self.known.insert(db.oid);
                }
                Err(_) if !self.short_of_entries => {
                    self.short_of_entries = true;
                    warning!(
                        "outbox_ext launcher: database \"{}\" gets no relay: at most {} databases can have one",
                        db.name,
                        relays::CAPACITY
                    );
                }
                Err(_) => {}
            }
        }
        self.known.retain(|oid| present.contains(oid));
        let mut missing = HashSet::new();
        for entry in relays::entries() {
            if present.contains(&entry.database) {
                continue;
            }
            // Missing twice in a row: not a database created during the scan, but a dropped one.
            if self.missing.contains(&entry.database) && relays::free(entry.database, true) {
                self.launched.remove(&entry.database);
            } else {
                missing.insert(entry.database);
            }
        }
        self.missing = missing;
    }

    /// Starts the relays that are wanted and not running; frees the entries of relays that
    /// are neither. Returns how soon it wants to look again.
    fn supervise(&mut self) -> Duration {
        let mut soonest = NAP;
        for entry in relays::entries() {
            if entry.worker_pid != 0 || self.launched.get(&entry.database).is_some_and(Launched::alive) {
                continue;
            }
            if !entry.wanted {
                if relays::free(entry.database, false) {
                    self.launched.remove(&entry.database);
                }
                continue;
            }
            match self.due_in(&entry) {
                Duration::ZERO => {}
                later => {
                    soonest = soonest.min(later);
                    continue;
                }
            }
            match relay::launch(entry.database, &entry.name) {
                Some(handle) => {
                    self.short_of_workers = false;
                    self.launched
                        .insert(entry.database, Launched { handle, at: Instant::now(), requests: entry.requests });
                }
                None => {
                    if !self.short_of_workers {
                        self.short_of_workers = true;
                        warning!(
                            "outbox_ext launcher: no background worker slot is free for the relay of database \"{}\"; raise max_worker_processes (one launcher plus one relay per database with the extension, besides other workers)",
                            entry.name
                        );
                    }
                    return Duration::from_secs(1);
                }
            }
        }
        soonest
    }

    /// How long until the relay of `entry` may be started (again).
    fn due_in(&self, entry: &Wanted) -> Duration {
        match self.launched.get(&entry.database) {
            None => Duration::ZERO,
            Some(last) if last.requests != entry.requests => Duration::ZERO,
            Some(last) => RESTART_INTERVAL.saturating_sub(last.at.elapsed()),
        }
    }
}
