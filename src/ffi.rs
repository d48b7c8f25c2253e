//! The only `unsafe` code in outbox_ext: the Postgres C APIs that pgrx does not wrap.
//!
//! * writing an event into WAL (`LogLogicalMessage`);
//! * reading the relay's slot (`SearchNamedReplicationSlot`) for emit's checks;
//! * the logical-decoding session the relay keeps open (`CreateDecodingContext`,
//!   `XLogReadRecord`, `LogicalDecodingProcessRecord`, `LogicalConfirmReceivedLocation`);
//! * the output-plugin callbacks through which decoding hands events back;
//! * a handful of globals (wal_level, MyProcPid, ...).
//!
//! Every function here is safe to call; each `unsafe` block says why it is sound. All of them
//! must run on a Postgres backend's (or the worker's) main thread, as every Postgres call must.

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::datum::FromDatum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable,
};
use std::ffi::{c_char, c_void, CStr, CString};

// Declared here because pgrx's bindings lack them (their headers are not in pgrx's list), or
// because decoding needs the real C function pointers rather than pgrx's guarded wrappers.
// Calls go through `guarded`, which turns a Postgres ERROR into a Rust panic.
extern "C-unwind" {
    /// replication/message.h (PG15). PG17 adds a trailing `bool flush`.
    fn LogLogicalMessage(
        prefix: *const c_char,
        message: *const c_char,
        size: pg_sys::Size,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;

    /// replication/decode.h
    fn LogicalDecodingProcessRecord(
        ctx: *mut pg_sys::LogicalDecodingContext,
        record: *mut pg_sys::XLogReaderState,
    );

    /// access/xlogutils.h: the page reader for WAL of the local server.
    #[link_name = "read_local_xlog_page"]
    fn c_read_local_xlog_page(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        req_len: std::ffi::c_int,
        target_rec: pg_sys::XLogRecPtr,
        cur_page: *mut c_char,
    ) -> std::ffi::c_int;
    #[link_name = "wal_segment_open"]
    fn c_wal_segment_open(
        state: *mut pg_sys::XLogReaderState,
        next_seg: pg_sys::XLogSegNo,
        tli: *mut pg_sys::TimeLineID,
    );
    #[link_name = "wal_segment_close"]
    fn c_wal_segment_close(state: *mut pg_sys::XLogReaderState);

    /// tcop/tcopprot.h: the standard SIGTERM handler of backends.
    #[link_name = "die"]
    fn c_die(signal: std::ffi::c_int);
}

/// Runs a call into Postgres so that an ERROR raised inside it unwinds as a Rust panic (which
/// pgrx reports) instead of longjmp-ing over Rust frames.
unsafe fn guarded<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the caller upholds the called function's own contract.
    unsafe { pgrx::pg_sys::submodules::ffi::pg_guard_ffi_boundary(f) }
}

// ---------------------------------------------------------------------------------------------
// emit: writing an event
// ---------------------------------------------------------------------------------------------

/// Writes `body` as a transactional logical-decoding message under the outbox prefix, in the
/// caller's (sub)transaction. Returns the message's LSN.
pub fn log_event_message(body: &[u8]) -> u64 {
    static PREFIX: &CStr = c"outbox_ext";
    debug_assert_eq!(PREFIX.to_str().unwrap(), outbox_core::event::MESSAGE_PREFIX);
    // SAFETY: PREFIX is NUL-terminated; `body` is valid for `body.len()` bytes and
    // LogLogicalMessage copies it into the WAL insertion buffers before returning. The call is
    // made in a backend inside a transaction (emit is a SQL function); pg_guard turns an ERROR
    // into a Rust panic that pgrx reports.
    unsafe {
        guarded(|| LogLogicalMessage(PREFIX.as_ptr(), body.as_ptr().cast(), body.len(), true))
    }
}

/// A `jsonb` argument as its JSON text, exactly as `jsonb_out` prints it.
pub struct JsonbText(pub String);

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: pgrx only builds this type from a jsonb argument (see SqlTranslatable below),
        // so `datum` is a valid, possibly toasted, jsonb; jsonb_out detoasts it and returns a
        // palloc'd NUL-terminated string, which we copy and free.
        unsafe {
            let text = pgrx::direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)])
                .expect("jsonb_out never returns NULL");
            let owned = String::from_utf8_lossy(text.to_bytes()).into_owned();
            pg_sys::pfree(text.as_ptr() as *mut c_void);
            Some(JsonbText(owned))
        }
    }
}

// SAFETY: unboxing goes through from_polymorphic_datum above, which handles NULL.
unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: pgrx calls this only for a non-NULL jsonb argument.
        unsafe {
            arg.unbox_arg_using_from_datum()
                .unwrap_or_else(|| panic!("argument {index} must not be null"))
        }
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above; NULL becomes Nullable::Null.
        unsafe { arg.unbox_arg_using_from_datum().into() }
    }
}

// SAFETY: the SQL type named here is the one `from_polymorphic_datum` expects.
unsafe impl SqlTranslatable for JsonbText {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(JsonbText);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}

/// What emit needs to know about the relay's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotCheck {
    /// No persistent slot of that name (it may be being created).
    Missing,
    OtherDatabase,
    Invalidated,
    /// Ready; the slot's confirmed position.
    Ready { confirmed_flush: u64 },
}

/// Looks the slot up in shared memory. Cheap: one shared LWLock and a scan of
/// `max_replication_slots` entries.
pub fn check_slot(name: &str) -> SlotCheck {
    let Ok(cname) = CString::new(name) else { return SlotCheck::Missing };
    // SAFETY: SearchNamedReplicationSlot takes ReplicationSlotControlLock itself (need_lock =
    // true) and returns a pointer into the fixed shared-memory slot array, which is never
    // freed. Other processes write these fields concurrently, so they are copied with volatile
    // reads of single aligned words (no Rust reference to shared memory is formed): `database`
    // and `persistency` only change while the slot is created, and a 64-bit LSN cannot tear on
    // the 64-bit platforms this extension builds for. A slot dropped right after the check is the same race as
    // a slot dropped right after the event is written, and the README documents it.
    unsafe {
        let slot = pg_sys::SearchNamedReplicationSlot(cname.as_ptr(), true);
        if slot.is_null() {
            return SlotCheck::Missing;
        }
        let data = std::ptr::addr_of!((*slot).data);
        let persistency = std::ptr::addr_of!((*data).persistency).read_volatile();
        let database = std::ptr::addr_of!((*data).database).read_volatile();
        let invalidated_at = std::ptr::addr_of!((*data).invalidated_at).read_volatile();
        let restart_lsn = std::ptr::addr_of!((*data).restart_lsn).read_volatile();
        let confirmed_flush = std::ptr::addr_of!((*data).confirmed_flush).read_volatile();
        if persistency != pg_sys::ReplicationSlotPersistency::RS_PERSISTENT {
            return SlotCheck::Missing;
        }
        if database != pg_sys::MyDatabaseId {
            return SlotCheck::OtherDatabase;
        }
        if invalidated_at != 0 || restart_lsn == 0 {
            return SlotCheck::Invalidated;
        }
        SlotCheck::Ready { confirmed_flush }
    }
}

// ---------------------------------------------------------------------------------------------
// globals and small server calls
// ---------------------------------------------------------------------------------------------

/// `wal_level` as its name.
pub fn wal_level_name() -> &'static str {
    // SAFETY: wal_level is a plain int GUC variable, only written by the GUC machinery on this
    // same thread.
    match unsafe { pg_sys::wal_level } as u32 {
        pg_sys::WalLevel::WAL_LEVEL_MINIMAL => "minimal",
        pg_sys::WalLevel::WAL_LEVEL_REPLICA => "replica",
        _ => "logical",
    }
}

pub fn wal_level_is_logical() -> bool {
    // SAFETY: as above.
    unsafe { pg_sys::wal_level as u32 >= pg_sys::WalLevel::WAL_LEVEL_LOGICAL }
}

/// True while `shared_preload_libraries` is being processed by the postmaster.
pub fn loading_shared_preload_libraries() -> bool {
    // SAFETY: a plain bool global set by the postmaster around library preloading.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

/// True if the current database's encoding is UTF-8.
pub fn database_is_utf8() -> bool {
    // SAFETY: GetDatabaseEncoding reads a backend-local global set at connection start.
    unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 }
}

pub fn strong_random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: pg_strong_random writes exactly `len` bytes into the buffer.
    let ok = unsafe { pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) };
    if !ok {
        pgrx::error!("outbox_ext: could not generate random bytes");
    }
    u64::from_ne_bytes(buf)
}

static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

/// Installs a log hook that keeps `outbox.kafka_properties` out of the server log: on reload
/// Postgres logs `parameter "X" changed to "value"` for every changed setting, whatever its
/// flags, and the value may hold a SASL password. Called from `_PG_init` in the postmaster,
/// so every server process inherits the hook.
pub fn install_secret_log_filter() {
    // SAFETY: hooks are installed once, from _PG_init while the postmaster preloads libraries,
    // before any other thread or process exists to read them.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(secret_log_filter);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn secret_log_filter(edata: *mut pg_sys::ErrorData) {
    // SAFETY: Postgres passes the ErrorData being reported; its strings are palloc'd in
    // ErrorContext, which is also where we allocate the replacement message.
    unsafe {
        let e = &mut *edata;
        if !e.message_id.is_null()
            && !e.message.is_null()
            && CStr::from_ptr(e.message_id).to_bytes() == b"parameter \"%s\" changed to \"%s\""
            && CStr::from_ptr(e.message).to_string_lossy().contains(crate::gucs::KAFKA_PROPERTIES_NAME)
        {
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::ErrorContext);
            e.message = pg_sys::pstrdup(
                c"parameter \"outbox.kafka_properties\" changed (value hidden)".as_ptr(),
            );
            pg_sys::MemoryContextSwitchTo(old);
        }
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            prev(edata);
        }
    }
}

/// Makes `prefix.anything` a reserved GUC namespace (PG15+).
pub fn reserve_guc_prefix(prefix: &str) {
    let c = CString::new(prefix).expect("prefix has no NUL");
    // SAFETY: MarkGUCPrefixReserved copies the string; called from _PG_init.
    unsafe { pg_sys::MarkGUCPrefixReserved(c.as_ptr()) }
}

pub fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set once at process start.
    unsafe { pg_sys::MyProcPid }
}

/// The current time as a Postgres `TimestampTz`.
pub fn now() -> i64 {
    // SAFETY: GetCurrentTimestamp only reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// The WAL position known flushed to disk.
pub fn flush_lsn() -> u64 {
    // SAFETY: GetFlushRecPtr reads shared state under its own spinlock; NULL means we do not
    // want the timeline.
    unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) }
}

/// Re-reads postgresql.conf after SIGHUP.
pub fn reload_config() {
    // SAFETY: called from the worker's main loop, outside any transaction, as the postmaster's
    // own children do on SIGHUP.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) }
}

/// Runs `callback` when this process exits, while shared memory and LWLocks still work (also
/// after an ERROR ends a background worker).
pub fn before_exit(callback: unsafe extern "C-unwind" fn(i32, pg_sys::Datum)) {
    // SAFETY: before_shmem_exit stores the function pointer; the callback is a pg_guard'ed
    // function of this library, which stays loaded until the process exits.
    unsafe { pg_sys::before_shmem_exit(Some(callback), pg_sys::Datum::from(0usize)) }
}

/// Ends the worker with `code` after running the usual exit callbacks (which release the
/// replication slot). Exit code 1 asks the postmaster to start the worker again after its
/// restart interval.
pub fn exit_worker(code: i32) -> ! {
    // SAFETY: proc_exit runs Postgres' exit callbacks and never returns.
    unsafe { pg_sys::proc_exit(code) }
}

// ---------------------------------------------------------------------------------------------
// decode: the logical-decoding session the relay keeps open
// ---------------------------------------------------------------------------------------------

/// One committed transaction, as the decoder reports it.
#[derive(Debug, Clone, Copy)]
pub struct TxnInfo {
    /// End of the commit record: the position to confirm once the transaction is delivered.
    pub end_lsn: u64,
    /// Commit time as a Postgres `TimestampTz`.
    pub commit_time: i64,
}

/// Receives what decoding finds, in commit order.
pub trait DecodeSink {
    /// A transactional message under the outbox prefix, from transaction `txn`.
    fn event(&mut self, txn: TxnInfo, body: &[u8]);
    /// The commit of `txn` (called for every decoded transaction, with events or not).
    fn commit(&mut self, txn: TxnInfo);
}

/// Who holds a slot, as seen in shared memory.
pub fn slot_active_pid(name: &str) -> Option<i32> {
    let cname = CString::new(name).ok()?;
    // SAFETY: see check_slot; active_pid is an int read without the slot's spinlock, which
    // can only make this answer stale, never unsafe.
    unsafe {
        let slot = pg_sys::SearchNamedReplicationSlot(cname.as_ptr(), true);
        if slot.is_null() {
            return None;
        }
        Some(std::ptr::addr_of!((*slot).active_pid).read_volatile())
    }
}

/// Newer minor releases (15.20+) only load output plugins listed in
/// `output_plugin_libraries`. The relay decodes with this library as its plugin, so the
/// worker adds `outbox_ext` to the setting for its own process only (session level); other
/// backends keep the server's list.
pub fn allow_own_output_plugin() {
    // SAFETY: GetConfigOption returns NULL for an unknown setting (missing_ok) or a pointer to
    // the current value, which we copy at once. SetConfigOption copies its arguments; the
    // worker runs as the bootstrap superuser, so PGC_SUSET applies.
    unsafe {
        let current = pg_sys::GetConfigOption(c"output_plugin_libraries".as_ptr(), true, false);
        if current.is_null() {
            return;
        }
        let current = CStr::from_ptr(current).to_string_lossy().into_owned();
        if current.split(',').any(|lib| lib.trim() == "outbox_ext") {
            return;
        }
        let value = if current.trim().is_empty() {
            "outbox_ext".to_string()
        } else {
            format!("{current}, outbox_ext")
        };
        let value = CString::new(value).expect("no NUL");
        pg_sys::SetConfigOption(
            c"output_plugin_libraries".as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

/// The XLogReaderRoutine for reading this server's own WAL.
fn local_wal_routine() -> pg_sys::XLogReaderRoutine {
    pg_sys::XLogReaderRoutine {
        page_read: Some(c_read_local_xlog_page),
        segment_open: Some(c_wal_segment_open),
        segment_close: Some(c_wal_segment_close),
    }
}

/// Creates the logical slot `name` for this database with this library as its output plugin,
/// as `pg_create_logical_replication_slot` does, but outside any transaction. Waits for the
/// transactions running now to finish (the slot's consistent point), which can take long (a
/// prepared transaction, a long batch job): during the wait SIGTERM uses Postgres' own `die`
/// handler, so that the wait's CHECK_FOR_INTERRUPTS ends the worker. The caller reinstalls its
/// handlers afterwards.
pub fn create_slot(name: &str) {
    let cname = CString::new(name).expect("slot names have no NUL");
    // SAFETY: the worker holds no slot and is outside a transaction, as the walsender is for
    // CREATE_REPLICATION_SLOT. The slot is created ephemeral, so that an ERROR (or `die`)
    // before ReplicationSlotPersist drops it again; the routine struct is copied by the reader.
    // pqsignal installs a plain C handler.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(c_die));
        ensure_resource_owner();
        pg_sys::CheckLogicalDecodingRequirements();
        pg_sys::ReplicationSlotCreate(
            cname.as_ptr(),
            true,
            pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL,
            false,
        );
        let mut routine = local_wal_routine();
        let ctx = pg_sys::CreateInitDecodingContext(
            c"outbox_ext".as_ptr(),
            std::ptr::null_mut(),
            false,
            0,
            &mut routine,
            None,
            None,
            None,
        );
        pg_sys::DecodingContextFindStartpoint(ctx);
        pg_sys::FreeDecodingContext(ctx);
        pg_sys::ReplicationSlotPersist();
        pg_sys::ReplicationSlotRelease();
    }
}

/// Makes this process the owner of the slot. Raises an ERROR (which ends the worker) if
/// another process holds it.
pub fn acquire_slot(name: &str) {
    let cname = CString::new(name).expect("slot names have no NUL");
    // SAFETY: called once by the worker outside a transaction, with no slot held, as the
    // walsender does. The slot is released by Postgres' exit callbacks when the worker ends.
    unsafe {
        ensure_resource_owner();
        pg_sys::ReplicationSlotAcquire(cname.as_ptr(), true);
    }
}

/// Drops the slot this process holds, once its decoding session is gone.
pub fn drop_held_slot(name: &str) {
    let cname = CString::new(name).expect("slot names have no NUL");
    // SAFETY: outside a transaction, with no decoding context open (the caller dropped it),
    // holding the slot, as the walsender is for DROP_REPLICATION_SLOT. Between the release and
    // the drop another process could take the slot; with nowait the drop then raises an ERROR,
    // which ends the worker, and the postmaster starts it again.
    unsafe {
        pg_sys::ReplicationSlotRelease();
        pg_sys::ReplicationSlotDrop(cname.as_ptr(), true);
    }
}

/// Whether extension `outbox_ext` exists in this database. Must run inside a transaction.
/// With `after_writers`, first waits for no transaction to be creating or dropping an
/// extension (a share lock on pg_extension, held until the caller's transaction ends); returns
/// None if one is, so that the caller tries again later instead of blocking.
pub fn extension_installed(after_writers: bool) -> Option<bool> {
    // SAFETY: inside a transaction. ConditionalLockRelationOid takes a lock that the
    // transaction's end releases; acquiring it processes invalidations, so the catalog lookup
    // that follows sees every transaction that committed before we got the lock.
    unsafe {
        if after_writers
            && !pg_sys::ConditionalLockRelationOid(pg_sys::ExtensionRelationId, pg_sys::ShareLock as i32)
        {
            return None;
        }
        Some(pg_sys::get_extension_oid(c"outbox_ext".as_ptr(), true) != pg_sys::InvalidOid)
    }
}

/// The current WAL insert position.
pub fn wal_insert_lsn() -> u64 {
    // SAFETY: GetXLogInsertRecPtr reads shared state under its own spinlock.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// Decoding outside a transaction (as the walsender does) needs a resource owner for WAL file
/// access; transactions reset CurrentResourceOwner to NULL when they end.
unsafe fn ensure_resource_owner() {
    unsafe {
        if pg_sys::AuxProcessResourceOwner.is_null() {
            pg_sys::CreateAuxProcessResourceOwner();
        }
        if pg_sys::CurrentResourceOwner.is_null() {
            pg_sys::CurrentResourceOwner = pg_sys::AuxProcessResourceOwner;
        }
    }
}

/// An open logical-decoding context on the held slot, reading WAL from the slot's
/// `restart_lsn` and skipping transactions that committed before `confirmed_flush`.
pub struct DecodingSession {
    ctx: *mut pg_sys::LogicalDecodingContext,
    /// When the slot was last written to disk by us.
    last_save: std::time::Instant,
    /// The confirmed position moved since then.
    unsaved: bool,
}

/// How often a moving slot is written to disk. Postgres itself writes a logical slot only at
/// checkpoints (or when restart_lsn moves); after a crash, everything confirmed since is sent
/// again. Saving once a second bounds those duplicates to about a second of traffic, for one
/// small fsync'd file write a second.
const SLOT_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Points the output plugin at the sink for the duration of one record, and clears the
/// pointer again even if decoding raises an ERROR (which pgrx turns into a panic).
struct SinkGuard {
    ctx: *mut pg_sys::LogicalDecodingContext,
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        // SAFETY: ctx is the live context of the session that created this guard.
        unsafe { (*self.ctx).output_plugin_private = std::ptr::null_mut() }
    }
}

/// What the plugin callbacks find behind `output_plugin_private`.
struct SinkRef<'a> {
    sink: &'a mut dyn DecodeSink,
}

impl DecodingSession {
    /// Starts decoding on the held slot, from its confirmed position.
    pub fn start() -> DecodingSession {
        // SAFETY: runs in the worker, outside a transaction, holding the slot, as walsender's
        // StartLogicalReplication does. The context is allocated under TopMemoryContext so
        // that it lives until `Drop` frees it. The routine struct is copied by
        // XLogReaderAllocate. read_local_xlog_page waits for WAL that is not yet flushed; we
        // only ask for a record once the flush position is past the reader's position, so it
        // waits at most for the tail of a record that is being flushed.
        unsafe {
            ensure_resource_owner();
            pg_sys::CheckLogicalDecodingRequirements();
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let mut routine = local_wal_routine();
            let ctx = pg_sys::CreateDecodingContext(
                0, // InvalidXLogRecPtr: start at the slot's confirmed_flush
                std::ptr::null_mut(),
                false,
                &mut routine,
                None,
                None,
                None,
            );
            pg_sys::MemoryContextSwitchTo(old);
            pg_sys::XLogBeginRead((*ctx).reader, (*pg_sys::MyReplicationSlot).data.restart_lsn);
            DecodingSession { ctx, last_save: std::time::Instant::now(), unsaved: false }
        }
    }

    /// The position after the last record decoded.
    pub fn decoded_upto(&self) -> u64 {
        // SAFETY: ctx and its reader live until Drop.
        unsafe { (*(*self.ctx).reader).EndRecPtr }
    }

    /// True if flushed WAL beyond what was decoded exists.
    pub fn wal_available(&self) -> bool {
        flush_lsn() > self.decoded_upto()
    }

    /// Decodes the next WAL record if one has been flushed, handing events and commits to
    /// `sink`. Returns false when there is no flushed WAL to read.
    pub fn decode_next(&mut self, sink: &mut dyn DecodeSink) -> bool {
        if !self.wal_available() {
            return false;
        }
        // SAFETY: ctx is live; XLogReadRecord returns a record owned by the reader, valid until
        // the next read. The sink pointer stored in output_plugin_private points at a stack
        // value that outlives the LogicalDecodingProcessRecord call, and SinkGuard clears it
        // afterwards (also when an ERROR unwinds through here).
        unsafe {
            ensure_resource_owner();
            let mut errormsg: *mut c_char = std::ptr::null_mut();
            let record = pg_sys::XLogReadRecord((*self.ctx).reader, &mut errormsg);
            if !errormsg.is_null() {
                let msg = CStr::from_ptr(errormsg).to_string_lossy().into_owned();
                pgrx::error!("outbox_ext: could not read WAL: {msg}");
            }
            if record.is_null() {
                return false;
            }
            let mut sink_ref = SinkRef { sink };
            (*self.ctx).output_plugin_private = (&mut sink_ref as *mut SinkRef<'_>).cast();
            let _guard = SinkGuard { ctx: self.ctx };
            let ctx = self.ctx;
            guarded(|| LogicalDecodingProcessRecord(ctx, (*ctx).reader));
        }
        true
    }

    /// Tells Postgres that everything before `lsn` has been delivered: the slot's
    /// confirmed_flush (and in time its restart_lsn) moves up to it. The slot is marked dirty
    /// so that the next checkpoint (including the shutdown checkpoint) writes the new position
    /// to disk: in PG15, LogicalConfirmReceivedLocation alone keeps it in memory unless
    /// restart_lsn moves, and a restart would then resend what was already delivered.
    pub fn confirm(&mut self, lsn: u64) {
        // SAFETY: we hold the slot; LogicalConfirmReceivedLocation updates it under its
        // spinlock (and saves it when restart_lsn moves), as for a walsender's feedback;
        // ReplicationSlotMarkDirty only sets flags on our own slot.
        unsafe {
            if lsn > (*pg_sys::MyReplicationSlot).data.confirmed_flush {
                pg_sys::LogicalConfirmReceivedLocation(lsn);
                pg_sys::ReplicationSlotMarkDirty();
                self.unsaved = true;
            }
            // Also when the position stopped moving: the last move of a burst must reach disk
            // within a second, not at the next checkpoint, or a crash resends the whole burst.
            if self.unsaved && self.last_save.elapsed() >= SLOT_SAVE_INTERVAL {
                pg_sys::ReplicationSlotSave();
                self.last_save = std::time::Instant::now();
                self.unsaved = false;
            }
        }
    }

    /// Writes the slot's state to disk now (used when the worker stops).
    pub fn save(&mut self) {
        // SAFETY: we hold the slot; ReplicationSlotSave writes our own slot's file.
        unsafe { pg_sys::ReplicationSlotSave() }
    }
}

impl Drop for DecodingSession {
    fn drop(&mut self) {
        // SAFETY: ctx was made by CreateDecodingContext and is freed exactly once, here.
        unsafe { pg_sys::FreeDecodingContext(self.ctx) }
    }
}

// ---------------------------------------------------------------------------------------------
// The output plugin: `_PG_output_plugin_init` makes this library usable as the slot's plugin.
// ---------------------------------------------------------------------------------------------

/// Called by Postgres when a slot with plugin `outbox_ext` starts decoding.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: Postgres passes a valid, zeroed callback struct for us to fill in.
    unsafe {
        (*cb).startup_cb = Some(plugin_startup);
        (*cb).begin_cb = Some(plugin_begin);
        (*cb).change_cb = Some(plugin_change);
        (*cb).commit_cb = Some(plugin_commit);
        (*cb).message_cb = Some(plugin_message);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn plugin_startup(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    // SAFETY: options is a valid struct owned by the decoding context.
    unsafe {
        (*options).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*options).receive_rewrites = false;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn plugin_begin(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
}

#[pg_guard]
unsafe extern "C-unwind" fn plugin_change(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    _relation: pg_sys::Relation,
    _change: *mut pg_sys::ReorderBufferChange,
) {
    // Table changes are not events: only outbox messages are relayed.
}

/// The sink behind the context, or an ERROR if the plugin is used by anything but the relay
/// (for example pg_logical_slot_get_changes on a slot created with this plugin).
unsafe fn sink_of<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut dyn DecodeSink {
    // SAFETY: output_plugin_private is either NULL or the SinkRef set by decode_next for the
    // duration of this callback.
    unsafe {
        let private = (*ctx).output_plugin_private as *mut SinkRef<'a>;
        if private.is_null() {
            pgrx::error!(
                "the outbox_ext output plugin can only be used by the outbox_ext relay worker"
            );
        }
        &mut *(*private).sink
    }
}

unsafe fn txn_info(txn: *mut pg_sys::ReorderBufferTXN) -> TxnInfo {
    // SAFETY: txn is the transaction being replayed; ReorderBufferCommit sets end_lsn and
    // commit_time before replay starts.
    unsafe { TxnInfo { end_lsn: (*txn).end_lsn, commit_time: (*txn).xact_time.commit_time } }
}

#[pg_guard]
unsafe extern "C-unwind" fn plugin_commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: see sink_of and txn_info.
    unsafe {
        if (*ctx).output_plugin_private.is_null() {
            return;
        }
        sink_of(ctx).commit(txn_info(txn));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn plugin_message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const c_char,
    message_size: pg_sys::Size,
    message: *const c_char,
) {
    // SAFETY: prefix is NUL-terminated and message holds message_size bytes, both owned by
    // the reorder buffer for the duration of the callback.
    unsafe {
        if !transactional || CStr::from_ptr(prefix).to_bytes() != b"outbox_ext" {
            return;
        }
        let body = std::slice::from_raw_parts(message as *const u8, message_size);
        sink_of(ctx).event(txn_info(txn), body);
    }
}
