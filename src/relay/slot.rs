//! The relay's replication slot over its lifetime: made when the extension is created, refused
//! when it went missing or lost WAL behind the relay's back, and dropped once the extension is
//! dropped and everything before the drop was delivered.
//!
//! ```text
//! not_installed ─CREATE EXTENSION─▶ create slot, record it in outbox.relay_slot ─▶ streaming
//!       ▲                                                                            │
//!       └──── drop slot ◀── deliver what WAL holds up to the drop ◀─DROP EXTENSION───┘
//! slot listed in outbox.relay_slot but missing, or invalidated ─▶ slot_error (never remade)
//! ```

use super::signals::{shutdown_requested, sleep};
use super::test_hooks;
use crate::{catalog_read, ffi};
use outbox_core::slot_name;
use crate::record_key;
use crate::status::{RelayState, StatusWriter};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How often an idle relay looks whether the extension still exists.
const EXTENSION_CHECK: Duration = Duration::from_secs(1);

/// The slot this database's relay serves: the one `outbox.relay_slot` records (the relay made
/// it, perhaps under an earlier name or naming scheme), else an outbox_ext slot the database
/// still has (a dropped installation's, with events to deliver), else a new name derived from
/// the database (`outbox_core::slot_name`).
pub fn choose_name(database: &str, oid: u32) -> String {
    let chosen = BackgroundWorker::transaction(|| -> Result<Option<String>, pgrx::spi::Error> {
        let installed = ffi::extension_installed(false) == Some(true);
        let recorded = if installed {
            catalog_read::one::<String>(
                "SELECT (SELECT slot_name::text FROM outbox.relay_slot ORDER BY created_at DESC LIMIT 1)",
            )?
        } else {
            None
        };
        let existing = catalog_read::one::<String>(
            "SELECT (SELECT slot_name::text FROM pg_catalog.pg_replication_slots
                     WHERE plugin = 'outbox_ext' AND database = current_database() ORDER BY slot_name LIMIT 1)",
        )?;
        Ok(recorded.or(existing))
    });
    chosen
        .unwrap_or_else(|e| error!("outbox_ext: could not look up this database's slot: {e}"))
        .unwrap_or_else(|| slot_name::for_database(database, oid))
}

/// How [`wait_for_slot`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotWait {
    /// The slot exists, is this relay's to use, and the extension is installed (or was, and
    /// the slot still holds its events).
    Ready,
    /// The extension is not installed, no slot of it is left, and no CREATE EXTENSION asked
    /// for a relay meanwhile: the relay is no longer wanted and exits.
    NotInstalled,
    /// SIGTERM: the worker stops.
    Stop,
}

/// What the catalogs say about the slot, read in one transaction.
struct SlotFacts {
    /// The slot's output plugin, if the slot exists.
    plugin: Option<String>,
    /// Why PostgreSQL invalidated the slot, if it did: `pg_replication_slots.invalidation_reason`
    /// (17 and later), `wal_removed` for `wal_status = 'lost'`, or `conflict` for 16's
    /// `conflicting`.
    invalidated: Option<String>,
    /// CREATE EXTENSION outbox_ext has run in this database.
    installed: bool,
    /// outbox.relay_slot lists the slot: the relay made it for this installation.
    recorded: bool,
    /// The server's timeline when the slot was recorded (NULL for slots recorded by 0.1.0), and
    /// now: a higher one now means this server was promoted since.
    recorded_timeline: Option<i32>,
    timeline: i32,
}

fn read_facts(slot: &str) -> SlotFacts {
    let facts = BackgroundWorker::transaction(|| -> Result<SlotFacts, pgrx::spi::Error> {
        // to_jsonb: columns that only some versions have (invalidation_reason from 17,
        // conflicting from 16) read as NULL on the others.
        let (plugin, invalidated) = catalog_read::two::<String, String>(&format!(
            "SELECT (SELECT plugin::text FROM pg_catalog.pg_replication_slots WHERE slot_name = '{slot}'),
                    (SELECT coalesce(to_jsonb(s) ->> 'invalidation_reason',
                                     CASE WHEN s.wal_status = 'lost' THEN 'wal_removed' END,
                                     CASE WHEN (to_jsonb(s) ->> 'conflicting')::boolean THEN 'conflict' END)
                     FROM pg_catalog.pg_replication_slots s WHERE slot_name = '{slot}')"
        ))?;
        let installed = ffi::extension_installed(false) == Some(true);
        let (recorded, recorded_timeline) = if installed {
            // The column `timeline` is new in 0.2.0: read through to_jsonb, so that a 0.1.0
            // schema (before ALTER EXTENSION UPDATE) reads NULL.
            catalog_read::two::<bool, i32>(&format!(
                "SELECT EXISTS (SELECT 1 FROM outbox.relay_slot WHERE slot_name = '{slot}'),
                        (SELECT (to_jsonb(r) ->> 'timeline')::int FROM outbox.relay_slot r WHERE slot_name = '{slot}')"
            ))?
        } else {
            (Some(false), None)
        };
        Ok(SlotFacts {
            plugin,
            invalidated,
            installed,
            recorded: recorded.unwrap_or(false),
            recorded_timeline,
            timeline: ffi::wal_insert_timeline() as i32,
        })
    });
    facts.unwrap_or_else(|e| error!("outbox_ext: could not look up slot \"{slot}\": {e}"))
}

/// What an operator does about a slot that is gone or invalidated, in every such error.
const RESET: &str = "compare Kafka with your data, then run SELECT outbox.reset_slot() to start with a new slot";

/// Why a slot that `outbox.relay_slot` lists is missing, and what to do.
fn missing_slot_error(slot: &str, facts: &SlotFacts) -> String {
    if facts.recorded_timeline.is_none_or(|t| facts.timeline <= t) {
        return format!(
            "replication slot \"{slot}\" was dropped behind the relay's back: events committed before that and not yet delivered are lost; {RESET}"
        );
    }
    let (from, to) = (facts.recorded_timeline.unwrap_or_default(), facts.timeline);
    let (why, keep) = if cfg!(any(feature = "pg15", feature = "pg16")) {
        (
            "and PostgreSQL 15 and 16 do not copy logical slots to standbys",
            "PostgreSQL 17 and later keep the slot across a failover",
        )
    } else {
        (
            "that had no synchronised copy of it",
            "To keep it across a failover: outbox.failover_slot = on, and sync_replication_slots, hot_standby_feedback, primary_slot_name and a dbname in primary_conninfo on the standby",
        )
    };
    format!(
        "replication slot \"{slot}\" is missing: this server was promoted from a standby (timeline {from} → {to}) {why}. Events the old primary had not delivered were not published and cannot be from here; {RESET}. {keep} (README: High availability)"
    )
}

/// Why the slot was invalidated, and what to do.
fn invalidated_slot_error(slot: &str, reason: &str) -> String {
    match reason {
        "idle_timeout" => format!(
            "replication slot \"{slot}\" was invalidated by idle_replication_slot_timeout: no relay held it for longer than that (the relay was not running), and PostgreSQL gave up the WAL it kept; events committed since its last confirmed position cannot be delivered; {RESET}, and raise idle_replication_slot_timeout or set it to 0"
        ),
        "wal_removed" => format!(
            "replication slot \"{slot}\" was invalidated (it lost WAL it needed, see max_slot_wal_keep_size): events committed since its last confirmed position may be missing; {RESET}"
        ),
        other => format!(
            "replication slot \"{slot}\" was invalidated ({other}): events committed since its last confirmed position cannot be delivered; {RESET}"
        ),
    }
}

/// Lists the slot in outbox.relay_slot, so that its disappearance is noticed.
fn record(slot: &str) {
    BackgroundWorker::transaction(|| {
        Spi::run(&format!(
            "INSERT INTO outbox.relay_slot (slot_name) VALUES ('{slot}') ON CONFLICT DO NOTHING"
        ))
    })
    .unwrap_or_else(|e| error!("outbox_ext: could not record slot \"{slot}\": {e}"));
}

/// Waits until the slot is usable, creating it the first time, or finds that the database has
/// nothing to relay.
pub fn wait_for_slot(slot: &str, database: &str, status: &mut StatusWriter) -> SlotWait {
    if !slot_name::is_valid(slot) {
        // Only a name recorded by hand could be invalid.
        status.set_state(RelayState::SlotError);
        status.set_error(&format!(
            "slot name \"{slot}\" in outbox.relay_slot is not a valid slot name (lower-case letters, digits and underscores)"
        ));
        while sleep(Duration::from_secs(60)) {}
        return SlotWait::Stop;
    }
    loop {
        if shutdown_requested() {
            return SlotWait::Stop;
        }
        let facts = read_facts(slot);
        match facts.plugin.as_deref() {
            None if !facts.installed => {
                // Definitive only under the installation lock, and only if no CREATE EXTENSION
                // asked for a relay since `seen` (see relays.rs): one may be running now.
                let seen = status.requests();
                let installed = BackgroundWorker::transaction(|| ffi::extension_installed(true));
                if installed != Some(true) {
                    test_hooks::hold(test_hooks::Point::AfterExtensionCheck, database);
                }
                if installed == Some(false) && status.give_up(seen) {
                    return SlotWait::NotInstalled;
                }
                status.set_state(RelayState::NotInstalled);
                if !sleep(Duration::from_millis(100)) {
                    return SlotWait::Stop;
                }
                continue;
            }
            None if facts.recorded => {
                status.set_state(RelayState::SlotError);
                status.set_error(&missing_slot_error(slot, &facts));
            }
            None => {
                status.set_state(RelayState::Starting);
                test_hooks::hold(test_hooks::Point::BeforeSlotCreation, database);
                log!("outbox_ext relay: creating logical replication slot \"{slot}\"");
                super::key::before_new_slot(slot);
                ffi::create_slot(slot, crate::gucs::failover_slot());
                BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
                record(slot);
                continue;
            }
            Some(p) if p != "outbox_ext" => {
                status.set_state(RelayState::SlotError);
                status.set_error(&format!(
                    "replication slot \"{slot}\" uses output plugin \"{p}\", not outbox_ext; drop it, or delete its row from outbox.relay_slot"
                ));
            }
            Some(_) if facts.invalidated.is_some() => {
                status.set_state(RelayState::SlotError);
                status.set_error(&invalidated_slot_error(slot, facts.invalidated.as_deref().unwrap_or_default()));
            }
            Some(_) => match ffi::slot_active_pid(slot) {
                Some(pid) if pid != 0 => {
                    status.set_state(RelayState::SlotError);
                    status.set_error(&format!("replication slot \"{slot}\" is in use by process {pid}"));
                }
                _ => {
                    if facts.installed && !facts.recorded {
                        record(slot);
                    }
                    return SlotWait::Ready;
                }
            },
        }
        if !sleep(Duration::from_secs(1)) {
            return SlotWait::Stop;
        }
    }
}

/// What the relay must do about its installation (see [`Retirement::due`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    Nothing,
    /// The extension is gone and every event committed before was delivered: drop the slot.
    DropSlot,
    /// The extension was created again and every event of the previous installation was
    /// delivered: open records with the new installation's key from here on.
    SwitchKey,
}

/// Notices that the installation the relay serves is gone (the extension was dropped, or
/// dropped and created again), and decides when the slot may go or the key may change: once
/// every event committed before the change is delivered, and no CREATE EXTENSION can slip in.
pub struct Retirement {
    checked: Instant,
    /// The installation whose key opens the records (`record_key::InstalledKey`), if any.
    installation: Option<u32>,
    /// Where WAL ended when the change was noticed (`ffi::wal_insert_end_lsn`).
    after: Option<u64>,
}

impl Retirement {
    pub fn new(installation: Option<u32>) -> Retirement {
        Retirement { checked: Instant::now(), installation, after: None }
    }

    /// Called while the relay is idle with nothing in flight, having decoded and confirmed up
    /// to `decoded_upto`. After `DropSlot`, the caller drops the slot and then calls
    /// `status.set_retiring(false)`; after `SwitchKey`, it takes the new key and calls
    /// [`Retirement::serve`].
    pub fn due(&mut self, decoded_upto: u64, status: &mut StatusWriter) -> Due {
        match self.after {
            None => {
                if self.checked.elapsed() < EXTENSION_CHECK {
                    return Due::Nothing;
                }
                self.checked = Instant::now();
                let current = record_key::current_installation();
                if current.is_some() && current == self.installation {
                    return Due::Nothing;
                }
                // emit of a new installation waits until its key is the relay's.
                record_key::withdraw();
                let lsn = ffi::wal_insert_end_lsn();
                log!(
                    "outbox_ext relay: extension outbox_ext was {}; delivering the events committed before {:X}/{:X} first",
                    if current.is_some() { "dropped and created again" } else { "dropped" },
                    lsn >> 32,
                    lsn as u32
                );
                self.after = Some(lsn);
                Due::Nothing
            }
            Some(after) if decoded_upto < after => {
                // Idle below `after`: what is left may be WAL nobody flushes (see flush_wal),
                // while the new installation's emit fails until we get there.
                if ffi::flush_lsn() < after {
                    ffi::flush_wal(after);
                }
                Due::Nothing
            }
            Some(_) => {
                // A CREATE EXTENSION that starts from here on waits until the slot is dropped
                // (`readiness.rs`); the installation lock tells whether one is running (then we
                // try again later) and makes one that committed visible below.
                status.set_retiring(true);
                match BackgroundWorker::transaction(|| ffi::extension_installed(true)) {
                    Some(false) => Due::DropSlot,
                    installed => {
                        status.set_retiring(false);
                        if installed == Some(true) {
                            self.after = None;
                            return Due::SwitchKey;
                        }
                        Due::Nothing
                    }
                }
            }
        }
    }

    /// The relay now opens records with `installation`'s key.
    pub fn serve(&mut self, installation: Option<u32>) {
        self.installation = installation;
    }
}

pgrx::extension_sql_file!("../../sql/relay_slot.sql", name = "relay_slot", requires = ["status_function"]);
