//! The only `unsafe` code in outbox_ext: the PostgreSQL C APIs that pgrx does not wrap. The
//! crate root denies `unsafe_code`; this module alone allows it.
//!
//! * `compat.rs`      every difference between PostgreSQL 15, 16, 17 and 18, and nothing else
//! * `wal_message.rs` emit's WAL record (`LogLogicalMessage`) and its `jsonb` arguments
//! * `slot.rs`        the replication slot: looked up, created, acquired, dropped
//! * `decoding.rs`    the logical-decoding session the relay keeps open, and the output-plugin
//!   callbacks through which decoding hands events back
//! * `shmem.rs`       the relay's state in shared memory
//! * `server.rs`      globals, the clock, configuration, process exit, the bgworker entry point,
//!   and the log filter that hides secrets
//! * `kafka.rs`       librdkafka's produce call by topic handle, for the producing thread (the
//!   one C API here that is not PostgreSQL's)
//!
//! Every function outside this module is safe to call; each `unsafe` block says why it is
//! sound. All of them but `kafka.rs`'s must run on a Postgres backend's (or the worker's) main
//! thread, as every Postgres call must; `kafka.rs` calls librdkafka only.

mod compat;
pub mod decoding;
pub mod kafka;
pub mod server;
pub mod shmem;
pub mod slot;
pub mod wal_message;

pub use decoding::{DecodeSink, DecodingSession, TxnInfo};
pub use server::*;
pub use slot::{acquire_slot, check_slot, create_slot, databases_with_relay_slots, drop_held_slot, slot_active_pid, SlotCheck};
pub use wal_message::{log_event_message, JsonbText};

/// Runs a call into Postgres so that an ERROR raised inside it unwinds as a Rust panic (which
/// pgrx reports) instead of longjmp-ing over Rust frames.
unsafe fn guarded<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the caller upholds the called function's own contract.
    unsafe { pgrx::pg_sys::submodules::ffi::pg_guard_ffi_boundary(f) }
}

/// Decoding and slot work outside a transaction (as the walsender does it) needs a resource
/// owner for WAL file access; transactions reset `CurrentResourceOwner` to NULL when they end.
unsafe fn ensure_resource_owner() {
    use pgrx::pg_sys;
    // SAFETY: process-local globals of the main thread; the aux resource owner lives until exit.
    unsafe {
        if pg_sys::AuxProcessResourceOwner.is_null() {
            pg_sys::CreateAuxProcessResourceOwner();
        }
        if pg_sys::CurrentResourceOwner.is_null() {
            pg_sys::CurrentResourceOwner = pg_sys::AuxProcessResourceOwner;
        }
    }
}
