//! The table of relays in shared memory (`ffi::shmem::RELAYS`): which database has an entry,
//! who makes and frees entries, and how CREATE EXTENSION asks for a relay.
//!
//! * The launcher makes an entry for every database it finds, marked `wanted`, so that a relay
//!   starts there and looks for the extension. CREATE EXTENSION does the same for its own
//!   database (a *request*, counted in `requests`) and wakes the launcher. The launcher also
//!   marks `wanted` every database that has a slot of ours (see `launcher.rs`).
//! * A relay attaches to its database's entry. Finding no extension (and no slot to retire), it
//!   clears `wanted` and exits, unless a request came in meanwhile ([`give_up`]).
//! * The launcher frees entries that are neither wanted nor attached, and those of databases
//!   that are gone.
//!
//! # A request stands until a relay has seen the extension it asked for
//!
//! CREATE EXTENSION asks for its relay from inside its own transaction, before it commits. A
//! relay that looks for the extension then sees nothing yet, and must not take that for "no
//! extension here". Before this protocol, one did, and the database kept no relay until the
//! next restart:
//!
//! ```text
//!   launcher             relay R of database D               CREATE EXTENSION in D
//!   ────────             ──────────────────────              ─────────────────────
//!   starts R (boot)                                          inserts its pg_extension row
//!                                                            (and releases pg_extension's
//!                                                            lock at once, as catalog
//!                                                            writes do)
//!                                                            request(): requests 0 → 1
//!                        attaches: seen = 1
//!                        locks pg_extension: free
//!                        looks: the row is not committed,
//!                        "no extension"
//!                        requests (1) == seen (1):
//!                        wanted = false, exits
//!                                                            commits
//!   D is not wanted,
//!   frees its entry       ── D has no relay, for good ──
//! ```
//!
//! The same happens when the launcher starts R because of the request itself. Now:
//!
//! 1. CREATE EXTENSION takes D's *installation lock* (`ffi::lock_installation`) exclusively,
//!    then requests; the lock is held until its transaction ends.
//! 2. A relay that has found no extension reads `requests` (`seen`), then takes the
//!    installation lock shared without waiting and looks again. If it cannot have the lock, a
//!    CREATE EXTENSION is running: it looks again shortly.
//! 3. Only if it still finds no extension and `requests` is still `seen` does it clear
//!    `wanted`, under the table's lock, and exit.
//!
//! Every interleaving is safe: a request made before the relay read `seen` was made under the
//! installation lock, so the relay's look waited for that CREATE EXTENSION to end and sees it
//! if it committed; a request made after makes `requests` differ from `seen`, and the relay
//! looks again instead of exiting.

use crate::ffi::shmem::{set_latch, RelayEntry, Relays, ShortName, MAX_RELAYS, RELAYS};

/// The entry of database `database`, if it has one.
pub fn index_of(relays: &Relays, database: u32) -> Option<usize> {
    relays.entries.iter().position(|e| e.database == database)
}

/// The entry of `database`, made if it has none; None if the table is full.
pub fn claim(relays: &mut Relays, database: u32, name: &str) -> Option<usize> {
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

/// The launcher found `database`, or a slot of ours in it: a relay is to run there (and look
/// for the extension). Returns whether the entry was not wanted before.
pub fn want(database: u32, name: &str) -> Result<bool, TableFull> {
    let mut relays = RELAYS.exclusive();
    let i = claim(&mut relays, database, name).ok_or(TableFull)?;
    let before = std::mem::replace(&mut relays.entries[i].wanted, true);
    Ok(!before)
}

/// A relay found no extension in its database after reading `seen` requests and looking under
/// the installation lock: it is no longer wanted, unless a request came in since. Returns
/// whether the relay may exit (`wanted` is then false).
pub fn give_up(index: usize, seen: u64) -> bool {
    let mut relays = RELAYS.exclusive();
    let e = &mut relays.entries[index];
    if e.requests == seen {
        e.wanted = false;
        true
    } else {
        false
    }
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
