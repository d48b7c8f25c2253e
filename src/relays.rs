//! The table of relays in shared memory (`ffi::shmem::RELAYS`): which database has an entry,
//! who makes and frees entries, and how CREATE EXTENSION asks for a relay.
//!
//! * The launcher makes an entry for every database it finds, marked `wanted`, so that a relay
//!   starts there and looks for the extension. CREATE EXTENSION does the same for its own
//!   database and wakes the launcher.
//! * A relay attaches to its database's entry. Finding no extension (and no slot to retire), it
//!   clears `wanted` and exits, unless a CREATE EXTENSION came in meanwhile.
//! * The launcher frees entries that are neither wanted nor attached, and those of databases
//!   that are gone.

use crate::ffi::shmem::{set_latch, RelayEntry, Relays, ShortName, MAX_RELAYS, RELAYS};

/// The entry of database `database`, if it has one.
pub fn index_of(relays: &Relays, database: u32) -> Option<usize> {
    relays.entries.iter().position(|e| e.database == database)
}

/// The entry of `database`, made if it has none; None if the table is full.
fn claim(relays: &mut Relays, database: u32, name: &str) -> Option<usize> {
    if let Some(i) = index_of(relays, database) {
        return Some(i);
    }
    let i = index_of(relays, 0)?;
    relays.entries[i] = RelayEntry { database, database_name: ShortName::new(name), ..RelayEntry::FREE };
    Some(i)
}

/// Why a relay could not be asked for.
#[derive(Debug)]
pub struct TableFull;

/// CREATE EXTENSION in `database`: a relay is to run there. Wakes the launcher.
pub fn request(database: u32, name: &str) -> Result<(), TableFull> {
    let latch = {
        let mut relays = RELAYS.exclusive();
        let i = claim(&mut relays, database, name).ok_or(TableFull)?;
        let e = &mut relays.entries[i];
        e.wanted = true;
        e.requests += 1;
        relays.launcher_latch
    };
    set_latch(latch);
    Ok(())
}

/// The launcher found `database`: a relay is to look for the extension there.
pub fn want(database: u32, name: &str) -> Result<(), TableFull> {
    let mut relays = RELAYS.exclusive();
    let i = claim(&mut relays, database, name).ok_or(TableFull)?;
    relays.entries[i].wanted = true;
    Ok(())
}

/// What the launcher needs to know of an entry.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub database: u32,
    pub name: String,
    pub wanted: bool,
    pub worker_pid: i32,
    pub requests: u64,
}

/// Every entry in use.
pub fn entries() -> Vec<Wanted> {
    let relays = RELAYS.share();
    relays
        .entries
        .iter()
        .filter(|e| e.database != 0)
        .map(|e| Wanted {
            database: e.database,
            name: e.database_name.as_string(),
            wanted: e.wanted,
            worker_pid: e.worker_pid,
            requests: e.requests,
        })
        .collect()
}

/// Frees `database`'s entry if no relay is attached and none is wanted, or if `gone` (the
/// database was dropped). Returns whether it did.
pub fn free(database: u32, gone: bool) -> bool {
    let mut relays = RELAYS.exclusive();
    match index_of(&relays, database) {
        Some(i) if relays.entries[i].worker_pid == 0 && (gone || !relays.entries[i].wanted) => {
            relays.entries[i] = RelayEntry::FREE;
            true
        }
        _ => false,
    }
}

/// The launcher's latch, for CREATE EXTENSION to wake it (0 when no launcher runs).
pub fn set_launcher_latch(latch: usize) {
    RELAYS.exclusive().launcher_latch = latch;
}

/// How many entries the table has.
pub const CAPACITY: usize = MAX_RELAYS;
