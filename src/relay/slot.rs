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
use crate::ffi;
use crate::record_key;
use crate::status::{RelayState, StatusWriter};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How often an idle relay looks whether the extension still exists.
const EXTENSION_CHECK: Duration = Duration::from_secs(1);

/// Slot names Postgres accepts: lower-case letters, digits and underscores, at most 63.
fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// What the catalogs say about the slot, read in one transaction.
struct SlotFacts {
    /// The slot's output plugin, if the slot exists.
    plugin: Option<String>,
    /// wal_status = 'lost'.
    lost: bool,
    /// CREATE EXTENSION outbox_ext has run in this database.
    installed: bool,
    /// outbox.relay_slot lists the slot: the relay made it for this installation.
    recorded: bool,
}

fn read_facts(slot: &str) -> SlotFacts {
    let facts = BackgroundWorker::transaction(|| -> Result<SlotFacts, pgrx::spi::Error> {
        let (plugin, lost) = Spi::get_two::<String, bool>(&format!(
            "SELECT (SELECT plugin::text FROM pg_catalog.pg_replication_slots WHERE slot_name = '{slot}'),
                    coalesce((SELECT wal_status = 'lost' FROM pg_catalog.pg_replication_slots WHERE slot_name = '{slot}'), false)"
        ))?;
        let installed = ffi::extension_installed(false) == Some(true);
        let recorded = installed
            && Spi::get_one::<bool>(&format!(
                "SELECT EXISTS (SELECT 1 FROM outbox.relay_slot WHERE slot_name = '{slot}')"
            ))?
            .unwrap_or(false);
        Ok(SlotFacts { plugin, lost: lost.unwrap_or(false), installed, recorded })
    });
    facts.unwrap_or_else(|e| error!("outbox_ext: could not look up slot \"{slot}\": {e}"))
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

/// Waits until the extension exists and the slot is usable, creating the slot the first
/// time. Returns false if the worker must stop instead.
pub fn wait_for_slot(slot: &str, status: &mut StatusWriter) -> bool {
    if !valid_slot_name(slot) {
        status.set_state(RelayState::SlotError);
        status.set_error(&format!(
            "outbox.slot_name \"{slot}\" is not a valid slot name (lower-case letters, digits and underscores)"
        ));
        while sleep(Duration::from_secs(60)) {}
        return false;
    }
    loop {
        if shutdown_requested() {
            return false;
        }
        let facts = read_facts(slot);
        match facts.plugin.as_deref() {
            None if !facts.installed => status.set_state(RelayState::NotInstalled),
            None if facts.recorded => {
                status.set_state(RelayState::SlotError);
                status.set_error(&format!(
                    "replication slot \"{slot}\" was dropped behind the relay's back: events committed before that and not yet delivered are lost; compare Kafka with your data, then run SELECT outbox.reset_slot() to start with a new slot"
                ));
            }
            None => {
                log!("outbox_ext relay: creating logical replication slot \"{slot}\"");
                status.set_state(RelayState::Starting);
                super::key::before_new_slot(slot);
                ffi::create_slot(slot, crate::gucs::failover_slot());
                BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
                record(slot);
                continue;
            }
            Some(p) if p != "outbox_ext" => {
                status.set_state(RelayState::SlotError);
                status.set_error(&format!(
                    "replication slot \"{slot}\" uses output plugin \"{p}\", not outbox_ext; drop it or set outbox.slot_name"
                ));
            }
            Some(_) if facts.lost => {
                status.set_state(RelayState::SlotError);
                status.set_error(&format!(
                    "replication slot \"{slot}\" was invalidated (it lost WAL it needed, see max_slot_wal_keep_size): events committed since its last confirmed position may be missing; compare Kafka with your data, then run SELECT outbox.reset_slot() to start with a new slot"
                ));
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
                    return true;
                }
            },
        }
        if !sleep(Duration::from_secs(1)) {
            return false;
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
    /// The WAL insert position when the change was noticed.
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
                let lsn = ffi::wal_insert_lsn();
                log!(
                    "outbox_ext relay: extension outbox_ext was {}; delivering the events committed before {:X}/{:X} first",
                    if current.is_some() { "dropped and created again" } else { "dropped" },
                    lsn >> 32,
                    lsn as u32
                );
                self.after = Some(lsn);
                Due::Nothing
            }
            Some(after) if decoded_upto < after => Due::Nothing,
            Some(_) => {
                // CREATE EXTENSION refuses to run from here on; the share lock waits out one
                // that is running, so an installation that committed is seen below.
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
