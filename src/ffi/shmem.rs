//! The relay's state in shared memory: one block, written by the relay worker under an LWLock
//! and copied out by `outbox.status()` in any backend (see `status.rs` for what it means).

use outbox_core::latency;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

pub const ERROR_CAPACITY: usize = 1000;
/// A timestamp that was never set.
pub const NO_TIME: i64 = i64::MIN;

#[derive(Clone, Copy)]
pub struct RelayStatus {
    pub worker_pid: i32,
    /// A `status::RelayState`.
    pub state: u8,
    pub events_delivered: u64,
    pub last_error_len: u16,
    pub last_error: [u8; ERROR_CAPACITY],
    pub last_error_at: i64,
    pub last_delivery_at: i64,
    /// Bumped by `outbox.resume()`; the worker compares it with the value it saw when it stopped.
    pub resume_requests: u64,
    /// The worker is about to drop the slot of a dropped installation: CREATE EXTENSION waits.
    pub retiring: bool,
    /// Transactions per commit → acknowledgement latency bucket, since the server started.
    pub ack_latency: [u64; latency::BUCKETS],
    /// Messages under the outbox prefix that emit did not write, skipped since the server started.
    pub records_rejected: u64,
    /// Events Kafka refused for good that were set aside (dead-letter topic or table).
    pub events_dead_lettered: u64,
}

impl Default for RelayStatus {
    fn default() -> Self {
        RelayStatus {
            worker_pid: 0,
            state: 0,
            events_delivered: 0,
            last_error_len: 0,
            last_error: [0; ERROR_CAPACITY],
            last_error_at: NO_TIME,
            last_delivery_at: NO_TIME,
            resume_requests: 0,
            retiring: false,
            ack_latency: [0; latency::BUCKETS],
            records_rejected: 0,
            events_dead_lettered: 0,
        }
    }
}

// SAFETY: plain old data with no pointers, so the same bytes mean the same in every process;
// only accessed through STATUS's LWLock.
unsafe impl PGRXSharedMemory for RelayStatus {}

// SAFETY: PgLwLock::new is unsafe because the lock is unusable until pg_shmem_init! has run,
// which `init` does from _PG_init, before any process can read it.
pub static STATUS: PgLwLock<RelayStatus> = unsafe { PgLwLock::new(c"outbox_ext_status") };

/// The installation's record key (see `record_key.rs`), published by the relay for `emit`.
/// Shared memory is not reachable from SQL, and only the relay, which runs as a superuser,
/// reads the key from its table.
#[derive(Clone, Copy, Default)]
pub struct SharedKey {
    /// The database whose installation the key belongs to (0: none loaded).
    pub database: u32,
    /// The installation: the OID of its `outbox.emit` function.
    pub installation: u32,
    pub key: [u8; outbox_core::auth::KEY_LEN],
}

// SAFETY: plain old data with no pointers; only accessed through KEY's LWLock.
unsafe impl PGRXSharedMemory for SharedKey {}

// SAFETY: as for STATUS.
pub static KEY: PgLwLock<SharedKey> = unsafe { PgLwLock::new(c"outbox_ext_key") };

/// Reserves the shared memory; called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(STATUS);
    pg_shmem_init!(KEY);
}
