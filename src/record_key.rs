//! The installation's record key (see `outbox_core::auth`): where it lives, who may read it, and
//! how `emit` and the relay agree on it.
//!
//! * `CREATE EXTENSION` makes 32 random bytes and keeps them in `outbox.relay_key`: no privilege
//!   for anyone but superusers, and row-level security without a policy, which also hides the
//!   row from `pg_read_all_data`. The table is WAL-logged, so the key is the same after a
//!   restart, a crash, and on a physical standby after a failover.
//! * The database's relay, which runs as a superuser, reads it and publishes it in shared memory
//!   (one entry per database), together with the OID of this installation's `outbox.emit`
//!   function and the name of the relay's slot. `emit` runs as its caller,
//!   takes the key from there, and uses it only if that OID is its own: after `DROP EXTENSION`
//!   and `CREATE EXTENSION`, no event is ever sealed with the previous installation's key.
//!   Until the relay has published it after a restart, `emit` reads the relay's copy (below)
//!   under the same rule, so writers do not wait for the relay to start.
//! * The relay also keeps a copy, with its slot's name, in the data directory
//!   (`pg_outbox_ext/<database oid>.key`, readable by the server's OS user only). After `DROP EXTENSION` the table is gone, but events committed
//!   before the drop still wait to be delivered under the old key, also across a restart.

use crate::ffi;
use crate::ffi::shmem::{ShortName, SharedKey, KEYS, MAX_RELAYS};
use outbox_core::auth::{RecordKey, KEY_LEN};
use outbox_core::OutboxError;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;

/// The signature that names this installation's emit function.
const EMIT_SIGNATURE: &str = "outbox.emit(text,text,text,jsonb,jsonb)";

/// One installation's key: `installation` is the OID of its `outbox.emit` function.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InstalledKey {
    pub installation: u32,
    pub key: [u8; KEY_LEN],
}

impl std::fmt::Debug for InstalledKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InstalledKey {{ installation: {}, key: <hidden> }}", self.installation)
    }
}

impl InstalledKey {
    pub fn record_key(&self) -> RecordKey {
        RecordKey::new(&self.key)
    }
}

/// Makes a new key, for the extension's install script. Superusers only (the script revokes it
/// from PUBLIC); the key never leaves the table it is inserted into.
#[pg_extern(name = "_new_key", volatile, parallel_unsafe)]
fn new_key() -> Vec<u8> {
    ffi::strong_random_bytes::<KEY_LEN>().to_vec()
}

pgrx::extension_sql_file!("../sql/relay_key.sql", name = "relay_key", requires = [new_key]);

// ---------------------------------------------------------------------------------------------
// emit's side
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// The key this backend last sealed with, with its HMAC key schedule done, and its slot.
    static SEALING: RefCell<Option<(InstalledKey, RecordKey, String)>> = const { RefCell::new(None) };
    /// Where this database's entry was in KEYS last time (entries do not move while in use).
    static KEY_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What `emit` seals an event with, and the slot that will read it.
pub struct Sealing {
    pub key: RecordKey,
    pub slot: String,
    /// The relay's latch, to wake it at commit (0: unknown; it then finds the event within 1 s).
    pub relay_latch: usize,
}

/// This database's published key, if any.
fn published() -> Option<SharedKey> {
    let database = ffi::my_database_id();
    let keys = KEYS.share();
    let hint = KEY_INDEX.with(|i| i.get());
    if keys.entries[hint].database == database {
        return Some(keys.entries[hint]);
    }
    let i = keys.entries.iter().position(|k| k.database == database)?;
    KEY_INDEX.with(|c| c.set(i));
    Some(keys.entries[i])
}

/// The key to seal an event of the installation whose emit function is `installation`, in this
/// database, and the slot of this database's relay. An error if the relay has not published
/// them (yet): `SlotMissing` if nothing says the database has a slot at all.
pub fn for_emit(installation: u32) -> Result<Sealing, OutboxError> {
    let shared = published();
    let relay_latch = shared.map_or(0, |k| k.relay_latch);
    if let Some(k) = shared.filter(|k| k.installation == installation && installation != 0) {
        let slot = k.slot.as_string();
        return Ok(Sealing { key: sealing_key(InstalledKey { installation, key: k.key }, &slot), slot, relay_latch });
    }
    // Not published: the server just started and the relay has not yet (or runs in single-user
    // mode, where no relay runs). The relay's copy is as good if it is this installation's: the
    // relay writes it before it makes the slot and keeps it while the slot holds this
    // installation's events. (The caller then checks that the slot exists.) An installation's
    // key never changes, so the one this backend sealed with last serves too. The key stays
    // inside this process.
    let cached = SEALING.with(|cell| {
        cell.borrow()
            .as_ref()
            .filter(|(k, _, _)| k.installation == installation)
            .map(|(_, r, slot)| Sealing { key: r.clone(), slot: slot.clone(), relay_latch })
    });
    if let Some(sealing) = cached {
        return Ok(sealing);
    }
    match KeyFile::for_database(ffi::my_database_id()).read() {
        Some((copy, slot)) if copy.installation == installation => {
            Ok(Sealing { key: sealing_key(copy, &slot), slot, relay_latch })
        }
        Some(_) => Err(OutboxError::KeyNotLoaded),
        None if shared.is_some() => Err(OutboxError::KeyNotLoaded),
        None => Err(OutboxError::SlotMissing { database: ffi::my_database_name() }),
    }
}

/// `key`'s HMAC state, computed once per backend and key.
fn sealing_key(key: InstalledKey, slot: &str) -> RecordKey {
    SEALING.with(|cell| {
        let mut cached = cell.borrow_mut();
        match &*cached {
            Some((k, record_key, s)) if *k == key && s == slot => record_key.clone(),
            _ => {
                let record_key = key.record_key();
                *cached = Some((key, record_key.clone(), slot.to_string()));
                record_key
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// the relay's side
// ---------------------------------------------------------------------------------------------

/// Lets `emit` in this database seal events with `key`, for the relay's slot `slot`.
pub fn publish(key: &InstalledKey, slot: &str) {
    let relay_latch = crate::ffi::shmem::my_latch();
    set_entry(SharedKey { database: ffi::my_database_id(), installation: key.installation, key: key.key, slot: ShortName::new(slot), relay_latch });
}

/// Tells `emit` in this database which slot the relay serves before it has a key to publish
/// (the extension's SQL predates keys, or a dropped installation's events come first): `emit`
/// then reports the missing key, not a missing slot.
pub fn announce(slot: &str) {
    let database = ffi::my_database_id();
    let current = KEYS.share().entries.iter().find(|k| k.database == database).copied();
    if current.is_none_or(|k| k.slot.as_string() != slot) {
        let relay_latch = crate::ffi::shmem::my_latch();
        set_entry(SharedKey { database, installation: 0, key: [0; KEY_LEN], slot: ShortName::new(slot), relay_latch });
    }
}

/// Stops `emit` in this database from sealing events until the next `publish` (the
/// installation changed). The slot stays announced.
pub fn withdraw() {
    let database = ffi::my_database_id();
    let mut keys = KEYS.exclusive();
    if let Some(k) = keys.entries.iter_mut().find(|k| k.database == database) {
        k.installation = 0;
        k.key = [0; KEY_LEN];
    }
}

/// The relay's slot is gone: `emit` in this database finds neither key nor slot.
pub fn forget_slot() {
    let database = ffi::my_database_id();
    let mut keys = KEYS.exclusive();
    if let Some(k) = keys.entries.iter_mut().find(|k| k.database == database) {
        *k = SharedKey::default();
    }
}

fn set_entry(entry: SharedKey) {
    let mut keys = KEYS.exclusive();
    let i = keys.entries.iter().position(|k| k.database == entry.database);
    let i = i.or_else(|| keys.entries.iter().position(|k| k.database == 0));
    // As many entries as relays (MAX_RELAYS), and a relay needs one of those to run.
    let i = i.unwrap_or_else(|| error!("outbox_ext: no room for more than {MAX_RELAYS} databases' keys"));
    keys.entries[i] = entry;
}

/// What the database says about the current installation's key.
pub enum TableKey {
    /// Extension outbox_ext is not installed.
    NotInstalled,
    /// Installed, but its SQL predates record keys: `ALTER EXTENSION outbox_ext UPDATE` is due.
    UpdateRequired,
    /// The table exists without a key in it (someone deleted it).
    Missing,
    Ready(InstalledKey),
}

/// Reads the current installation's key (the relay runs as a superuser, so row-level security
/// does not hide the row from it).
pub fn read_table() -> TableKey {
    BackgroundWorker::transaction(read_in_transaction)
        .unwrap_or_else(|e| error!("outbox_ext: could not read the record key: {e}"))
}

/// [`read_table`] in the current transaction.
fn read_in_transaction() -> Result<TableKey, pgrx::spi::Error> {
    let Some(installation) = installation_in_transaction() else { return Ok(TableKey::NotInstalled) };
    let has_table = crate::catalog_read::one::<bool>("SELECT to_regclass('outbox.relay_key') IS NOT NULL")?;
    if has_table != Some(true) {
        return Ok(TableKey::UpdateRequired);
    }
    let key = crate::catalog_read::one::<Vec<u8>>("SELECT key FROM outbox.relay_key")?;
    Ok(match key.as_deref().and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok()) {
        Some(key) => TableKey::Ready(InstalledKey { installation, key }),
        None => TableKey::Missing,
    })
}

/// The installation whose emit function exists now, if any (a cheap check for the relay's idle
/// loop: has the extension been dropped, or dropped and created again?).
pub fn current_installation() -> Option<u32> {
    BackgroundWorker::transaction(installation_in_transaction)
}

thread_local! {
    /// The installation of each emit function other than `outbox.emit` this backend called
    /// (`emit_binary`, `emit_tombstone`), by the function's OID.
    static SIBLINGS: RefCell<Vec<(u32, u32)>> = const { RefCell::new(Vec::new()) };
}

/// The installation of the extension function `function` (the OID of the emit function of the
/// installation that made it): looked up once per function and backend. A function of a
/// dropped installation cannot be called, so an OID seen once keeps its installation.
pub fn installation_of_sibling(function: u32) -> Option<u32> {
    if let Some(found) = SIBLINGS.with(|s| s.borrow().iter().find(|(f, _)| *f == function).map(|(_, i)| *i)) {
        return Some(found);
    }
    let installation = installation_in_transaction()?;
    SIBLINGS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() >= 16 {
            s.clear();
        }
        s.push((function, installation));
    });
    Some(installation)
}

/// The installation whose emit function the current transaction sees, if any.
pub fn installation_in_transaction() -> Option<u32> {
    crate::catalog_read::one::<pg_sys::Oid>(&format!("SELECT to_regprocedure('{EMIT_SIGNATURE}')::oid"))
        .unwrap_or_else(|e| error!("outbox_ext: could not look up outbox.emit: {e}"))
        .map(|oid| oid.to_u32())
}

/// The relay's copy of the key its slot's events are sealed with, in the data directory, with
/// the slot's name.
pub struct KeyFile {
    path: PathBuf,
}

const FILE_VERSION: u8 = 2;

impl KeyFile {
    /// The copy for database `oid` (every process's working directory is the data directory).
    pub fn for_database(oid: u32) -> KeyFile {
        KeyFile { path: PathBuf::from("pg_outbox_ext").join(format!("{oid}.key")) }
    }

    pub fn read(&self) -> Option<(InstalledKey, String)> {
        let bytes = std::fs::read(&self.path).ok()?;
        let fixed = 1 + 4 + KEY_LEN + 1;
        if bytes.len() < fixed || bytes[0] != FILE_VERSION || bytes.len() != fixed + bytes[fixed - 1] as usize {
            warning!("outbox_ext: ignoring {}: not a key file of this version", self.path.display());
            return None;
        }
        let installation = u32::from_le_bytes(bytes[1..5].try_into().ok()?);
        let key = bytes[5..5 + KEY_LEN].try_into().ok()?;
        let slot = String::from_utf8(bytes[fixed..].to_vec()).ok()?;
        Some((InstalledKey { installation, key }, slot))
    }

    /// Writes the copy durably: a temporary file, fsync, rename, fsync of the directory.
    pub fn write(&self, key: &InstalledKey, slot: &str) {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = self.path.parent().expect("a directory");
        let tmp = self.path.with_extension("key.tmp");
        let result = (|| -> std::io::Result<()> {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&[FILE_VERSION])?;
            f.write_all(&key.installation.to_le_bytes())?;
            f.write_all(&key.key)?;
            f.write_all(&[slot.len() as u8])?;
            f.write_all(slot.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if let Err(e) = result {
            error!("outbox_ext: could not write {}: {e}", self.path.display());
        }
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
