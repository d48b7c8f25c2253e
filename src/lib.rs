//! outbox_ext: a transactional outbox for PostgreSQL with an in-database relay to Kafka.
//!
//! The pipeline, file by file:
//!
//! ```text
//! emit.rs ─▶ WAL ─▶ relay/decode.rs ─▶ core routing ─▶ relay/produce.rs ─▶ relay/worker.rs
//! (emit)            (decode, route)                    (produce)           (confirm)
//! ```
//!
//! One relay runs per database with the extension; `launcher.rs` starts and restarts them, and
//! `relays.rs` is their table in shared memory.
//!
//! The rules (validation, wire format, routing, what may be confirmed) live in the pure-Rust
//! `outbox_core` crate; this crate is the Postgres and librdkafka glue around it. All `unsafe`
//! code is in `ffi/`, the only module where the lint below allows it, and every difference
//! between PostgreSQL versions is in `ffi/compat.rs`.

#![deny(unsafe_code)]

mod catalog_read;
mod dead_letter;
mod emit;
mod error;
#[allow(unsafe_code)]
mod ffi;
mod gucs;
mod launcher;
mod readiness;
mod record_key;
mod relay;
mod relays;
mod status;

::pgrx::pg_module_magic!(name, version);

#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Without preloading nothing is registered: CREATE EXTENSION and emit() then fail with a
    // message that says to add outbox_ext to shared_preload_libraries.
    if ffi::loading_shared_preload_libraries() {
        gucs::init();
        ffi::install_secret_log_filter();
        readiness::mark_preloaded();
        ffi::shmem::init();
        launcher::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'outbox_ext'",
            "wal_level = logical",
            "max_prepared_transactions = 10",
        ]
    }
}
