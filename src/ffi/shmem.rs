//! The relays' state in shared memory: one entry per database that has (or is about to have)
//! a relay, keyed by the database's oid. Relays write their own entry, the launcher allocates
//! and frees entries, and `outbox.status()`, `outbox.relays()` and CREATE EXTENSION read or
//! request through them (see `relays.rs` for the rules, `status.rs` for what is shown).
//!
//! Record keys live in a table of their own under another lock, so that `emit`'s key lookup
//! never waits for a relay publishing its counters.

use outbox_core::latency;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// How many databases can have a relay at once (one entry each).
pub const MAX_RELAYS: usize = 128;
pub const ERROR_CAPACITY: usize = 1000;
/// NAMEDATALEN: database and slot names fit in 63 bytes.
pub const NAME_CAPACITY: usize = 64;
/// A timestamp that was never set.
pub const NO_TIME: i64 = i64::MIN;

/// A name as shared memory holds it: bytes and a length.
#[derive(Clone, Copy)]
pub struct ShortName {
    pub len: u8,
    pub bytes: [u8; NAME_CAPACITY],
}

impl ShortName {
    pub const EMPTY: ShortName = ShortName { len: 0, bytes: [0; NAME_CAPACITY] };

    /// `name`, cut at a character boundary if it is longer than 63 bytes.
    pub fn new(name: &str) -> ShortName {
        let mut len = name.len().min(NAME_CAPACITY - 1);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0; NAME_CAPACITY];
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        ShortName { len: len as u8, bytes }
    }

    pub fn as_string(&self) -> String {
        String::from_utf8_lossy(&self.bytes[..self.len as usize]).into_owned()
    }
}

/// One database's relay.
#[derive(Clone, Copy)]
pub struct RelayEntry {
    /// The database's oid; 0 marks a free entry.
    pub database: u32,
    pub database_name: ShortName,
    /// The launcher is to keep a relay running here.
    pub wanted: bool,
    /// CREATE EXTENSION calls in this database since the entry was made: a relay that finds no
    /// extension stays wanted if one came in while it looked.
    pub requests: u64,
    pub worker_pid: i32,
    /// A `status::RelayState`.
    pub state: u8,
    pub slot_name: ShortName,
    pub events_delivered: u64,
    pub last_error_len: u16,
    pub last_error: [u8; ERROR_CAPACITY],
    pub last_error_at: i64,
    pub last_delivery_at: i64,
    /// Bumped by `outbox.resume()`; the worker compares it with the value it saw when it stopped.
    pub resume_requests: u64,
    /// The worker is about to drop the slot of a dropped installation: CREATE EXTENSION waits.
    pub retiring: bool,
    /// Transactions per commit → acknowledgement latency bucket, since the entry was made.
    pub ack_latency: [u64; latency::BUCKETS],
    /// The sum of those latencies, in µs.
    pub ack_latency_sum_us: u64,
    /// Messages under the outbox prefix that emit did not write, skipped since the entry was made.
    pub records_rejected: u64,
    /// Events Kafka refused for good that were set aside (dead-letter topic or table).
    pub events_dead_lettered: u64,
    /// A `status::Guarantee`: the delivery guarantee in force for the relay's producer.
    pub guarantee: u8,
}

impl RelayEntry {
    pub const FREE: RelayEntry = RelayEntry {
        database: 0,
        database_name: ShortName::EMPTY,
        wanted: false,
        requests: 0,
        worker_pid: 0,
        state: 0,
        slot_name: ShortName::EMPTY,
        events_delivered: 0,
        last_error_len: 0,
        last_error: [0; ERROR_CAPACITY],
        last_error_at: NO_TIME,
        last_delivery_at: NO_TIME,
        resume_requests: 0,
        retiring: false,
        ack_latency: [0; latency::BUCKETS],
        ack_latency_sum_us: 0,
        records_rejected: 0,
        events_dead_lettered: 0,
        guarantee: 0,
    };
}

#[derive(Clone, Copy)]
pub struct Relays {
    /// The launcher's latch (an address in shared memory, the same in every process), or 0.
    pub launcher_latch: usize,
    pub entries: [RelayEntry; MAX_RELAYS],
}

impl Default for Relays {
    fn default() -> Self {
        Relays { launcher_latch: 0, entries: [RelayEntry::FREE; MAX_RELAYS] }
    }
}

// SAFETY: plain old data with no pointers but the latch address, which points into the main
// shared-memory segment, mapped at the same address in every process (the postmaster forks
// them); only accessed through RELAYS's LWLock.
unsafe impl PGRXSharedMemory for Relays {}

// SAFETY: PgLwLock::new is unsafe because the lock is unusable until pg_shmem_init! has run,
// which `init` does from _PG_init, before any process can read it.
pub static RELAYS: PgLwLock<Relays> = unsafe { PgLwLock::new(c"outbox_ext_relays") };

/// A database's record key (see `record_key.rs`), published by its relay for `emit`. Shared
/// memory is not reachable from SQL, and only relays, which run as superusers, read keys from
/// their tables.
#[derive(Clone, Copy, Default)]
pub struct SharedKey {
    /// The database whose installation the key belongs to (0: a free entry).
    pub database: u32,
    /// The installation: the OID of its `outbox.emit` function.
    pub installation: u32,
    pub key: [u8; outbox_core::auth::KEY_LEN],
    /// The relay's slot, which will read what emit seals with this key.
    pub slot: ShortName,
    /// The relay's latch (see `my_latch`), which emit sets when its transaction commits.
    pub relay_latch: usize,
}

impl Default for ShortName {
    fn default() -> Self {
        ShortName::EMPTY
    }
}

#[derive(Clone, Copy)]
pub struct Keys {
    pub entries: [SharedKey; MAX_RELAYS],
}

impl Default for Keys {
    fn default() -> Self {
        Keys { entries: [SharedKey::default(); MAX_RELAYS] }
    }
}

// SAFETY: plain old data with no pointers; only accessed through KEYS's LWLock.
unsafe impl PGRXSharedMemory for Keys {}

// SAFETY: as for RELAYS.
pub static KEYS: PgLwLock<Keys> = unsafe { PgLwLock::new(c"outbox_ext_keys") };

/// Reserves the shared memory; called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(RELAYS);
    pg_shmem_init!(KEYS);
}

/// This process's latch, as an address to keep in shared memory.
pub fn my_latch() -> usize {
    // SAFETY: MyLatch is set for every process that can reach this code (backends and workers
    // set it before running any extension code) and points into shared memory (the PGPROC's
    // latch) for as long as the process lives.
    unsafe { pg_sys::MyLatch as usize }
}

/// Wakes the process waiting on `latch` (an address from [`my_latch`]). Setting the latch of a
/// process that has since exited only wakes whoever holds that PGPROC now, which latch waits
/// tolerate by design.
pub fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: the address is of a PGPROC latch in the shared segment, which stays mapped
        // and initialised for the server's life; SetLatch is safe to call on any such latch.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) }
    }
}
