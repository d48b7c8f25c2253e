//! Is this server set up for outbox_ext? Checked by `CREATE EXTENSION` and by every emit, so
//! that a misconfigured server refuses events instead of writing WAL no relay will read.

use crate::error::OrRaise;
use crate::ffi;
use outbox_core::OutboxError;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by `_PG_init` when the postmaster preloads the library. Backends inherit it by fork.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn mark_preloaded() {
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn check_preloaded() -> Result<(), OutboxError> {
    if PRELOADED.load(Ordering::Relaxed) {
        Ok(())
    } else {
        Err(OutboxError::NotPreloaded)
    }
}

/// The library is preloaded (so the relay runs) and WAL carries logical-decoding messages.
pub fn check_ready() -> Result<(), OutboxError> {
    check_preloaded()?;
    if !ffi::wal_level_is_logical() {
        return Err(OutboxError::WalLevelTooLow { current: ffi::wal_level_name().to_string() });
    }
    Ok(())
}

/// Run by `CREATE EXTENSION` (see the SQL below); raises if the server is not ready.
#[pg_extern(name = "_assert_ready")]
fn assert_ready() -> bool {
    check_ready().or_raise();
    if !ffi::database_is_utf8() {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "outbox_ext requires a database with UTF8 encoding",
            "Kafka keys, headers and values are UTF-8."
        );
    }
    // Ask for this database's relay now; it waits for this transaction to end and makes the
    // slot if it committed. Templates get none (a relay there would block CREATE DATABASE).
    let template = Spi::get_one::<bool>("SELECT datistemplate FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()")
        .ok()
        .flatten()
        .unwrap_or(false);
    // Held until this transaction ends: the relay cannot conclude that there is no extension
    // while it runs (see relays.rs).
    ffi::lock_installation();
    wait_for_retirement();
    if !template && crate::relays::request(ffi::my_database_id(), &ffi::my_database_name()).is_err() {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("outbox_ext relays at most {} databases per cluster, and that many have it", crate::relays::CAPACITY),
            "Drop the extension in a database that no longer needs it."
        );
    }
    true
}

/// How long CREATE EXTENSION waits for the relay to drop the slot of a dropped installation.
const RETIREMENT_WAIT: Duration = Duration::from_secs(10);

/// Waits while this database's relay drops the slot of the previous installation, which takes
/// moments. The relay only starts that once it holds the installation lock (which the caller
/// now holds), so nothing new starts while we wait.
fn wait_for_retirement() {
    let deadline = Instant::now() + RETIREMENT_WAIT;
    while crate::status::relay_retiring() {
        if Instant::now() >= deadline {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "the outbox_ext relay is dropping the replication slot of the previous installation",
                "Try again in a moment."
            );
        }
        std::thread::sleep(Duration::from_millis(10));
        pgrx::check_for_interrupts!();
    }
}

pgrx::extension_sql_file!("../sql/finalize.sql", name = "assert_ready_at_create", finalize);
