//! Every difference between the PostgreSQL versions outbox_ext supports, and nothing else, as
//! pg_squeeze keeps them behind `PG_VERSION_NUM`. The rest of `ffi` calls these functions, so
//! that the relay reads the same on every version.
//!
//! | API                         | 15                 | 16                  | 17                 | 18                    |
//! |-----------------------------|--------------------|---------------------|--------------------|-----------------------|
//! | `LogLogicalMessage`         | 4 arguments        | 4                   | adds `flush`       | as 17                 |
//! | `ReplicationSlotCreate`     | 4 arguments        | 4                   | adds `failover`, `synced` | as 17          |
//! | `ReplicationSlotAcquire`    | 2 arguments        | 2                   | 2                  | adds `error_if_invalid` |
//! | `synchronized_standby_slots`, `StandbySlotsHaveCaughtup` | none | none   | exported           | as 17                 |
//! | slot invalidation           | `invalidated_at` LSN | `invalidated` cause | as 16            | as 16                 |
//! | `pqsignal` (backend)        | function           | function            | function           | macro for `pqsignal_be` |
//! | `proc_exit` binding         | returns `!`        | returns `!`         | returns `!`        | returns `()` (`pg_noreturn`) |
//!
//! One rule depends on the minor release, not the major: 15.20 and 18.6 load output plugins
//! only from `output_plugin_libraries`, while 16.2 and 17.9 have no such setting.
//! `server::allow_own_output_plugin` handles both without a version switch.

#[cfg(not(any(feature = "pg15", feature = "pg16", feature = "pg17", feature = "pg18")))]
compile_error!("outbox_ext supports PostgreSQL 15, 16, 17 and 18: build with feature pg15, pg16, pg17 or pg18");

use pgrx::pg_sys;
use std::ffi::{c_char, c_int, CStr};

extern "C-unwind" {
    /// replication/message.h, which pgrx does not bind.
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    fn LogLogicalMessage(
        prefix: *const c_char,
        message: *const c_char,
        size: pg_sys::Size,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;

    /// replication/message.h, which pgrx does not bind. PostgreSQL 17 added `flush`.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    fn LogLogicalMessage(
        prefix: *const c_char,
        message: *const c_char,
        size: pg_sys::Size,
        transactional: bool,
        flush: bool,
    ) -> pg_sys::XLogRecPtr;
}

/// Writes a transactional logical-decoding message into the current transaction and returns its
/// LSN. It is not flushed by itself: the transaction's commit record flushes it.
///
/// # Safety
/// Must be called in a backend inside a transaction, through `super::guarded`.
pub unsafe fn log_transactional_message(prefix: &CStr, body: &[u8]) -> pg_sys::XLogRecPtr {
    let (prefix, message, size) = (prefix.as_ptr(), body.as_ptr().cast::<c_char>(), body.len());
    // SAFETY: prefix is NUL-terminated and `message` is valid for `size` bytes; Postgres copies
    // both into the WAL insertion buffers before returning. The caller is in a transaction.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        let lsn = LogLogicalMessage(prefix, message, size, true);
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        let lsn = LogLogicalMessage(prefix, message, size, true, false);
        lsn
    }
}

/// Creates a database-specific logical slot `name` (without two-phase decoding) and makes it
/// this process's `MyReplicationSlot`. `failover`: a failover slot, which standbys with
/// `sync_replication_slots` copy (17 and later; ignored on 15 and 16, which have none).
///
/// # Safety
/// As `ReplicationSlotCreate`: outside a transaction, holding no slot, with a resource owner.
pub unsafe fn replication_slot_create(
    name: &CStr,
    persistency: pg_sys::ReplicationSlotPersistency::Type,
    failover: bool,
) {
    // SAFETY: the caller upholds ReplicationSlotCreate's contract; `name` is NUL-terminated and
    // copied into the slot.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        {
            let _ = failover;
            pg_sys::ReplicationSlotCreate(name.as_ptr(), true, persistency, false);
        }
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        pg_sys::ReplicationSlotCreate(name.as_ptr(), true, persistency, false, failover, false);
    }
}

/// Makes this process the owner of slot `name`, or raises an ERROR. An invalidated slot is
/// refused with an ERROR on every version: on 15 to 17 `CreateDecodingContext` raises it ("can
/// no longer get changes from replication slot"); on 18, which only asserts there, the acquire
/// itself does (`error_if_invalid`), after taking ownership, so a checkpoint that invalidates
/// the slot (`idle_replication_slot_timeout`) between the relay's own check and the acquire is
/// caught too. The worker ends on that ERROR, and when it starts again it finds the slot
/// invalidated and reports why (`slot_error`).
///
/// # Safety
/// As `ReplicationSlotAcquire`: outside a transaction, holding no slot, with a resource owner.
pub unsafe fn replication_slot_acquire(name: &CStr, nowait: bool) {
    // SAFETY: the caller upholds ReplicationSlotAcquire's contract; `name` is NUL-terminated.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), nowait);
        #[cfg(feature = "pg18")]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), nowait, true);
    }
}

/// Whether the standbys that must confirm WAL before logical decoding may pass it on have
/// confirmed (flushed) everything before `lsn`: PostgreSQL 17's `synchronized_standby_slots`,
/// which walsenders of failover slots obey (`NeedToWaitForStandbys` in walsender.c). True when
/// there is nothing to wait for: on 15 and 16 (no such setting), when the held slot is not a
/// failover slot, or when the setting is empty. `log_reason`: have PostgreSQL log, as a
/// WARNING, why a listed slot holds back (missing, logical, invalidated, or no standby
/// connected); otherwise at DEBUG1, since the relay asks many times a second.
///
/// # Safety
/// On the main thread of a process that holds its slot (`MyReplicationSlot`), outside any
/// spinlock. The WAL page reader is such a place.
pub unsafe fn standbys_confirmed(lsn: pg_sys::XLogRecPtr, log_reason: bool) -> bool {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    {
        let _ = (lsn, log_reason);
        true
    }
    // SAFETY: MyReplicationSlot is this process's own slot, whose `failover` flag only this
    // process (its owner) changes. `synchronized_standby_slots` is the GUC's string, written
    // only by this process's GUC machinery on this thread. StandbySlotsHaveCaughtup takes
    // ReplicationSlotControlLock and each slot's spinlock itself, and with an elevel below
    // ERROR it never raises: WARNING and DEBUG1 only log.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    unsafe {
        let slot = pg_sys::MyReplicationSlot;
        if slot.is_null() || !(*slot).data.failover {
            return true;
        }
        let setting = pg_sys::synchronized_standby_slots;
        if setting.is_null() || *setting == 0 {
            return true;
        }
        let elevel = if log_reason { pg_sys::WARNING } else { pg_sys::DEBUG1 };
        pg_sys::StandbySlotsHaveCaughtup(lsn, elevel as std::ffi::c_int)
    }
}

/// Puts this process on the wait list of the condition variable that walsenders of failover
/// slots sleep on while the standbys in `synchronized_standby_slots` catch up
/// (`WalSndCtl->wal_confirm_rcv_cv`, broadcast by a physical walsender whenever its standby
/// confirms WAL). Until [`stop_standby_wakeups`], each such confirmation sets this process's
/// latch, so a latch wait returns then, as `WalSndWait` does. Nothing on 15 and 16.
///
/// # Safety
/// On the main thread of a process attached to shared memory.
pub unsafe fn start_standby_wakeups() {
    // SAFETY: WalSndCtl points into shared memory for the life of the server; the condition
    // variable is initialised at start-up and only used through its functions.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    unsafe {
        pg_sys::ConditionVariablePrepareToSleep(&raw mut (*pg_sys::WalSndCtl).wal_confirm_rcv_cv);
    }
}

/// Takes this process off the wait list of [`start_standby_wakeups`].
///
/// # Safety
/// On the main thread of a process attached to shared memory.
pub unsafe fn stop_standby_wakeups() {
    // SAFETY: removes this process from whichever wait list it prepared for, if any.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    unsafe {
        pg_sys::ConditionVariableCancelSleep();
    }
}

/// Whether the slot whose persistent data is at `data` was invalidated (it lost WAL it needed,
/// or, from 16 on, rows it needed or `wal_level`; from 18 on, it was idle too long).
///
/// # Safety
/// `data` must point into a live entry of the shared slot array. The field is read with a
/// volatile read of one aligned word, as other processes may write it concurrently.
pub unsafe fn slot_invalidated(data: *const pg_sys::ReplicationSlotPersistentData) -> bool {
    // SAFETY: see above; no Rust reference to shared memory is formed.
    unsafe {
        #[cfg(feature = "pg15")]
        let invalidated = std::ptr::addr_of!((*data).invalidated_at).read_volatile() != 0;
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        let invalidated = std::ptr::addr_of!((*data).invalidated).read_volatile()
            != pg_sys::ReplicationSlotInvalidationCause::RS_INVAL_NONE;
        invalidated
    }
}

/// Installs a plain C signal handler, as the backend's `pqsignal` does.
///
/// # Safety
/// `handler` must be async-signal-safe in the way Postgres' own handlers are.
pub unsafe fn set_signal_handler(signal: c_int, handler: unsafe extern "C-unwind" fn(c_int)) {
    // SAFETY: pqsignal only installs the handler with sigaction.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::pqsignal(signal, Some(handler));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signal, Some(handler));
    }
}

/// Ends the process through Postgres' exit path (its exit callbacks run first).
///
/// # Safety
/// As `proc_exit`: on the process's main thread, with nothing that must not be skipped on
/// the Rust stack.
pub unsafe fn proc_exit(code: c_int) -> ! {
    // SAFETY: the caller upholds proc_exit's contract. From 18 on the binding no longer says
    // that it does not return, but proc_exit ends with exit() on every version.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::proc_exit(code);
        #[cfg(feature = "pg18")]
        {
            pg_sys::proc_exit(code);
            unreachable!("proc_exit returned")
        }
    }
}
