//! Small server calls and globals: `wal_level`, the clock, WAL positions, configuration, the
//! extension's catalog entry, process exit, and the log filter that keeps secrets out of the
//! server log.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};


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

/// `N` bytes from the operating system's cryptographically strong generator.
pub fn strong_random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // SAFETY: pg_strong_random writes exactly `len` bytes into the buffer.
    let ok = unsafe { pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) };
    if !ok {
        pgrx::error!("outbox_ext: could not generate random bytes");
    }
    buf
}

pub fn strong_random_u64() -> u64 {
    u64::from_ne_bytes(strong_random_bytes())
}

/// The id of the current top-level transaction, assigned now if it has none yet (emit writes
/// WAL in it anyway). Raises an ERROR where no id can be assigned (during recovery).
pub fn top_transaction_id() -> u32 {
    // SAFETY: called by emit inside a transaction; pgrx's binding turns an ERROR into a panic.
    unsafe { pg_sys::GetTopTransactionId() }.into()
}

/// The OID of the SQL function being called through `fcinfo`.
pub fn called_function_oid(fcinfo: pg_sys::FunctionCallInfo) -> u32 {
    // SAFETY: pgrx passes the live FunctionCallInfo of the current call; flinfo is set by the
    // executor before any call and stays valid for its duration.
    unsafe { (*(*fcinfo).flinfo).fn_oid.to_u32() }
}

/// The database this backend is connected to.
pub fn my_database_id() -> u32 {
    // SAFETY: MyDatabaseId is set once when the backend connects.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// The name of the database this backend is connected to.
pub fn my_database_name() -> String {
    // SAFETY: get_database_name looks the connected database up in the syscache (inside a
    // transaction, as every caller is) and returns a palloc'd copy, or NULL if it was dropped.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            return String::new();
        }
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

thread_local! {
    /// The latch to set when the current transaction commits (0: none), and whether this
    /// backend registered its transaction callback.
    static WAKE_AT_COMMIT: std::cell::Cell<(usize, bool)> = const { std::cell::Cell::new((0, false)) };
}

/// Sets `latch` (an address from `shmem::my_latch`) when the current transaction commits, so
/// that the database's relay, asleep while idle, decodes the commit at once. Nothing happens
/// if the transaction aborts or is prepared (the relay then finds the commit at its next look).
pub fn wake_at_commit(latch: usize) {
    #[pg_guard]
    unsafe extern "C-unwind" fn at_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
        use pg_sys::XactEvent::*;
        if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PARALLEL_ABORT) {
            let (latch, registered) = WAKE_AT_COMMIT.get();
            WAKE_AT_COMMIT.set((0, registered));
            if event == XACT_EVENT_COMMIT {
                super::shmem::set_latch(latch);
            }
        }
    }
    let (_, registered) = WAKE_AT_COMMIT.get();
    if !registered {
        // SAFETY: registers a pg_guard'ed function of this library, loaded for the backend's
        // life, once per backend; it only touches this thread's state and the latch.
        unsafe { pg_sys::RegisterXactCallback(Some(at_end), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.set((latch, true));
}

extern "C" {
    /// utils/elog.h (`errcontext`): adds a CONTEXT line to the message being reported.
    fn errcontext_msg(fmt: *const std::ffi::c_char, ...) -> std::ffi::c_int;
}

static LOG_CONTEXT: std::sync::OnceLock<CString> = std::sync::OnceLock::new();

/// Adds `context` (for example `outbox_ext relay of database "orders"`) as the CONTEXT of every
/// message this process reports from now on, PostgreSQL's own included, so that the server log
/// says which database's relay wrote each line. Once per process.
pub fn set_log_context(context: &str) {
    #[pg_guard]
    unsafe extern "C-unwind" fn add_context(_arg: *mut std::ffi::c_void) {
        if let Some(text) = LOG_CONTEXT.get() {
            // SAFETY: called by errfinish while a message is being built, which is when
            // errcontext may be called; "%s" takes the NUL-terminated text, which lives in a
            // static until the process exits.
            unsafe {
                pg_sys::set_errcontext_domain(std::ptr::null());
                errcontext_msg(c"%s".as_ptr(), text.as_ptr());
            }
        }
    }
    let Ok(text) = CString::new(context) else { return };
    if LOG_CONTEXT.set(text).is_err() {
        return;
    }
    // SAFETY: error_context_stack is the main thread's list of callbacks; the entry is leaked,
    // so it outlives every message. Error recovery that resets the stack only drops the context.
    unsafe {
        let entry = Box::leak(Box::new(pg_sys::ErrorContextCallback {
            previous: pg_sys::error_context_stack,
            callback: Some(add_context),
            arg: std::ptr::null_mut(),
        }));
        pg_sys::error_context_stack = entry;
    }
}

/// Whether a server process with this PID runs (is in the proc array).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: BackendPidGetProc takes ProcArrayLock itself; only the pointer's nullness is used.
    unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
}

/// A database the launcher can start a relay in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRow {
    pub oid: u32,
    pub name: String,
}

/// Every database that accepts connections and is not a template, read from the shared
/// catalog `pg_database` (the launcher is connected to no database). Must run inside a
/// transaction.
pub fn connectable_databases() -> Vec<DatabaseRow> {
    let mut rows = Vec::new();
    // SAFETY: inside a transaction, as autovacuum's get_database_list does it: the shared
    // catalog is opened with AccessShareLock and scanned with a catalog snapshot; each tuple's
    // fixed-size part is FormData_pg_database, copied out before the next heap_getnext. pg_database
    // is a heap, so heap_endscan is its scan_end.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            // datconnlimit -2: a database that DROP DATABASE left half-dropped.
            if form.datallowconn && !form.datistemplate && form.datconnlimit != -2 {
                let name = CStr::from_ptr(form.datname.data.as_ptr()).to_string_lossy().into_owned();
                rows.push(DatabaseRow { oid: form.oid.to_u32(), name });
            }
        }
        pg_sys::heap_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    rows
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

/// Flushes WAL up to `lsn` (at most the insert position), as a commit does. Records that are
/// not commits (a page pruned by a read, a standby snapshot) can otherwise stay unflushed in
/// the last partial page until the next commit or checkpoint, and the relay decodes flushed
/// WAL only.
pub fn flush_wal(lsn: u64) {
    // SAFETY: XLogFlush may be called by any process that may write WAL, in or out of a
    // transaction (the relay runs on a primary); it only raises on an I/O failure.
    unsafe { pg_sys::XLogFlush(lsn) }
}

/// The current value of a PostgreSQL setting, as `SHOW` prints it; None if there is no such
/// setting in this version. Not for settings that may hold secrets.
pub fn config_option(name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    // SAFETY: GetConfigOption returns NULL for an unknown setting (missing_ok) or a pointer to
    // the current value, copied at once. restrict_privileged = false: the caller is the relay
    // or a function that shows only non-secret settings.
    unsafe {
        let value = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        (!value.is_null()).then(|| CStr::from_ptr(value).to_string_lossy().into_owned())
    }
}

/// Re-reads postgresql.conf after SIGHUP.
pub fn reload_config() {
    // SAFETY: called from the worker's main loop, outside any transaction, as the postmaster's
    // own children do on SIGHUP.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) }
}

/// Runs `callback` when this process exits, while shared memory and LWLocks still work (also
/// after an ERROR ends a background worker).
pub fn before_exit(callback: fn()) {
    #[pg_guard]
    unsafe extern "C-unwind" fn call(_code: i32, arg: pg_sys::Datum) {
        // SAFETY: `arg` is the `fn()` that before_exit registered, as an address.
        let callback = unsafe { std::mem::transmute::<usize, fn()>(arg.value()) };
        callback();
    }
    // SAFETY: before_shmem_exit stores the pointer and the datum; `call` is a pg_guard'ed
    // function of this library, which stays loaded until the process exits, and the datum is
    // a function pointer, valid for as long.
    unsafe { pg_sys::before_shmem_exit(Some(call), pg_sys::Datum::from(callback as usize)) }
}

/// The workers' main functions, set by `_PG_init` before the postmaster starts any worker
/// (which inherits them): the launcher's, and the relay's, which gets its database's oid.
static LAUNCHER_MAIN: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();
static RELAY_MAIN: std::sync::OnceLock<fn(u32)> = std::sync::OnceLock::new();

/// Names the functions that the workers' exported entry points run.
pub fn set_worker_mains(launcher: fn(), relay: fn(u32)) {
    let _ = LAUNCHER_MAIN.set(launcher);
    let _ = RELAY_MAIN.set(relay);
}

/// The launcher's entry point, by the name given to the postmaster.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn outbox_launcher_main(_arg: pg_sys::Datum) {
    let main = LAUNCHER_MAIN.get().expect("_PG_init sets the launcher's main function");
    main();
}

/// A relay's entry point: its argument is the database's oid (see `relay_argument`).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn outbox_relay_main(arg: pg_sys::Datum) {
    let main = RELAY_MAIN.get().expect("_PG_init sets the relay's main function");
    main(arg.value() as u32);
}

/// The argument that starts a relay for database `oid`.
pub fn relay_argument(oid: u32) -> pg_sys::Datum {
    pg_sys::Datum::from(oid as usize)
}

/// Ends the worker with `code` after running the usual exit callbacks (which release the
/// replication slot). Exit code 1 asks the postmaster to start the worker again after its
/// restart interval.
pub fn exit_worker(code: i32) -> ! {
    // SAFETY: proc_exit runs Postgres' exit callbacks and ends the process.
    unsafe { super::compat::proc_exit(code) }
}

/// Some releases (15.20 and 18.6 among the tested ones, not 16.2 or 17.9) only load output
/// plugins listed in `output_plugin_libraries`, a superuser setting. The relay decodes with this library as its plugin, so the
/// worker adds `outbox_ext` to the setting for its own process only (session level); other
/// backends keep the server's list.
pub fn allow_own_output_plugin() {
    let Some(current) = config_option("output_plugin_libraries") else { return };
    if current.split(',').any(|lib| lib.trim() == "outbox_ext") {
        return;
    }
    let value = if current.trim().is_empty() { "outbox_ext".to_string() } else { format!("{current}, outbox_ext") };
    // The worker runs as the bootstrap superuser, so PGC_SUSET applies.
    set_for_this_process(c"output_plugin_libraries", &value, pg_sys::GucContext::PGC_SUSET);
}

/// Sets `logical_decoding_work_mem` for this process only (session level): the relay's own
/// limit (`outbox.decoding_work_mem`), read by the reorder buffer each time it checks its size.
pub fn set_decoding_work_mem(kb: i32) {
    set_for_this_process(c"logical_decoding_work_mem", &format!("{kb}kB"), pg_sys::GucContext::PGC_USERSET);
}

/// Sets server setting `name` to `value` for this process only, at session level, as a
/// process whose privileges reach `context` (SetConfigOption reports an error otherwise).
fn set_for_this_process(name: &CStr, value: &str, context: pg_sys::GucContext::Type) {
    let value = CString::new(value).expect("no NUL");
    // SAFETY: SetConfigOption copies its arguments.
    unsafe {
        pg_sys::SetConfigOption(name.as_ptr(), value.as_ptr(), context, pg_sys::GucSource::PGC_S_SESSION);
    }
}

/// Lock class of the installation lock, in the advisory lock space: SQL's `pg_advisory_*`
/// functions use classes 1 and 2 only, so no session can take or release this lock by hand.
/// `pg_locks` shows it as an advisory lock with `classid` 0x6f757462, `objid` 0x6f786578 and
/// `objsubid` 0x6f78.
const INSTALLATION_LOCK_CLASS: u16 = 0x6f78;

/// The lock that orders `CREATE EXTENSION outbox_ext` against this database's relay (the
/// protocol is in `relays.rs`): CREATE EXTENSION takes it exclusively before it asks for a
/// relay and keeps it until its transaction ends; a relay takes it shared to look for the
/// extension. A lock on pg_extension would not do: CREATE EXTENSION releases that one as soon
/// as it has inserted its row, long before it commits.
fn installation_locktag() -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is a backend-local global, set at connection start.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: 0x6f75_7462,
        locktag_field3: 0x6f78_6578,
        locktag_field4: INSTALLATION_LOCK_CLASS,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Takes this database's installation lock exclusively until the current transaction ends,
/// waiting (as any lock wait: cancellable, with deadlock detection) for relays looking at the
/// catalogs this moment. For CREATE EXTENSION.
pub fn lock_installation() {
    let tag = installation_locktag();
    // SAFETY: inside a transaction; a transaction-level lock (sessionLock = false) is released
    // by the transaction's end, commit or abort. An ERROR (a cancelled wait) unwinds through
    // pgrx's guarded binding.
    unsafe {
        pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, false);
    }
}

/// Whether extension `outbox_ext` exists in this database. Must run inside a transaction.
/// With `after_writers`, first takes the installation lock shared (until the caller's
/// transaction ends), so that the answer counts every CREATE EXTENSION that has asked for a
/// relay: such a one has either committed, and is seen, or ended without. Returns None if one
/// is still running, so that the caller tries again later instead of blocking.
pub fn extension_installed(after_writers: bool) -> Option<bool> {
    // SAFETY: inside a transaction. The lock is transaction-level (released at its end). Once
    // it is held, invalidations are processed and the catalog snapshot dropped, as
    // LockRelationOid does after a lock, so that the lookup sees every transaction that
    // committed before the lock was granted.
    unsafe {
        if after_writers {
            let tag = installation_locktag();
            let got = pg_sys::LockAcquire(&tag, pg_sys::ShareLock as pg_sys::LOCKMODE, false, true);
            if got == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
                return None;
            }
            pg_sys::AcceptInvalidationMessages();
            pg_sys::InvalidateCatalogSnapshot();
        }
        Some(pg_sys::get_extension_oid(c"outbox_ext".as_ptr(), true) != pg_sys::InvalidOid)
    }
}

/// The current WAL insert position.
pub fn wal_insert_lsn() -> u64 {
    // SAFETY: GetXLogInsertRecPtr reads shared state under its own spinlock.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// Where the last record inserted into WAL ends: the insert position, less the page header it
/// points past when the next record starts a page (PostgreSQL's XLogBytePosToEndRecPtr; 17 and
/// later export it as GetXLogInsertEndRecPtr). A reader whose `EndRecPtr` reached this has read
/// every record inserted so far; the insert position itself may lie a header beyond what any
/// reader reaches until more WAL is written.
pub fn wal_insert_end_lsn() -> u64 {
    const fn maxalign(n: usize) -> u64 {
        n.next_multiple_of(8) as u64
    }
    let lsn = wal_insert_lsn();
    // SAFETY: wal_segment_size is set at start-up from the control file and never changes.
    let segment = unsafe { pg_sys::wal_segment_size } as u64;
    if segment > 0 && lsn % segment == maxalign(size_of::<pg_sys::XLogLongPageHeaderData>()) {
        lsn - maxalign(size_of::<pg_sys::XLogLongPageHeaderData>())
    } else if lsn % pg_sys::XLOG_BLCKSZ as u64 == maxalign(size_of::<pg_sys::XLogPageHeaderData>()) {
        lsn - maxalign(size_of::<pg_sys::XLogPageHeaderData>())
    } else {
        lsn
    }
}

/// The timeline this server writes WAL on (outside recovery).
pub fn wal_insert_timeline() -> u32 {
    // SAFETY: GetWALInsertionTimeLine reads a shared-memory field set once recovery ends; the
    // relay only runs after that.
    unsafe { pg_sys::GetWALInsertionTimeLine() }
}
