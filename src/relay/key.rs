//! Which key the relay opens its slot's records with (see `record_key.rs`).
//!
//! Normally the current installation's, from `outbox.relay_key`. But the slot can hold events of
//! an installation that is gone: `DROP EXTENSION` (the relay delivers what was committed before
//! it, then drops the slot), or `DROP` and `CREATE EXTENSION` again (the slot stays). Those
//! events are sealed with the old key, which the relay keeps in its key file. It opens them with
//! that copy, and takes the new installation's key only once it has delivered everything before
//! the change (see `slot::Retirement`); until then `emit` of the new installation waits.

use super::signals::sleep;
use crate::record_key::{self, InstalledKey, KeyFile, TableKey};
use crate::status::{RelayState, StatusWriter};
use pgrx::prelude::*;
use std::time::Duration;

/// The key the relay starts with: the current installation's, or (when the installation changed
/// while the relay was not running) the file's copy of the previous one. None if the extension
/// is gone and no copy exists: then no record in the slot can be authenticated. Err(()) if the
/// worker must stop.
pub fn starting_key(slot: &str, status: &mut StatusWriter) -> Result<Option<InstalledKey>, ()> {
    let table = wait_for_table_key(status)?;
    let copy = key_file().read().map(|(key, _)| key);
    Ok(match (table, copy) {
        (Some(current), Some(copy)) if copy == current => {
            record_key::publish(&current, slot);
            Some(current)
        }
        (Some(current), None) => {
            adopt(slot, &current);
            Some(current)
        }
        (current, Some(copy)) => {
            // Dropped, or dropped and created again, since the copy was written: the slot may
            // hold the old installation's events. emit of a new one waits for the switch.
            record_key::withdraw();
            log!(
                "outbox_ext relay: extension outbox_ext was {} since this slot's events were sealed; opening them with the previous installation's key until they are delivered",
                if current.is_some() { "dropped and created again" } else { "dropped" }
            );
            Some(copy)
        }
        (None, None) => {
            record_key::withdraw();
            None
        }
    })
}

/// Until the current installation's key can be read: the key, or None if the extension is not
/// installed. Err(()) if the worker must stop.
fn wait_for_table_key(status: &mut StatusWriter) -> Result<Option<InstalledKey>, ()> {
    loop {
        match record_key::read_table() {
            TableKey::Ready(key) => return Ok(Some(key)),
            TableKey::NotInstalled => return Ok(None),
            TableKey::UpdateRequired => {
                status.set_state(RelayState::UpdateRequired);
                status.set_error(
                    "the extension's SQL in this database predates the library (there is no outbox.relay_key): run ALTER EXTENSION outbox_ext UPDATE; until then emit fails and the relay waits",
                );
            }
            TableKey::Missing => {
                status.set_state(RelayState::ConfigError);
                status.set_error(
                    "outbox.relay_key holds no key, so no record can be authenticated: recreate the extension (DROP EXTENSION outbox_ext; CREATE EXTENSION outbox_ext)",
                );
            }
        }
        if !sleep(Duration::from_secs(1)) {
            return Err(());
        }
    }
}

/// A new slot is about to be made: it will hold only the current installation's events, so its
/// key is the one to keep and to let `emit` use, from the moment the slot exists (an
/// application that waits for `confirmed_lsn` in `outbox.status()` can emit at once).
pub fn before_new_slot(slot: &str) {
    if let TableKey::Ready(current) = record_key::read_table() {
        adopt(slot, &current);
    }
}

/// Takes the current installation's key once everything sealed with the previous one has been
/// delivered: keeps the copy, then lets `emit` seal with it.
pub fn switch_to_current(slot: &str) -> Option<InstalledKey> {
    match record_key::read_table() {
        TableKey::Ready(current) => {
            adopt(slot, &current);
            log!("outbox_ext relay: now opening records with the key of the installation of extension outbox_ext created since");
            Some(current)
        }
        _ => None,
    }
}

/// Makes `key` the one the relay keeps for `slot` and `emit` seals with: the copy first, so
/// that `emit` never seals with a key the relay could lose.
fn adopt(slot: &str, key: &InstalledKey) {
    key_file().write(key, slot);
    record_key::publish(key, slot);
}

/// The slot is gone: so is the reason to keep its key.
pub fn forget() {
    record_key::forget_slot();
    key_file().remove();
}

/// This database's key file.
fn key_file() -> KeyFile {
    KeyFile::for_database(crate::ffi::my_database_id())
}
