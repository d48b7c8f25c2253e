//! decode: the logical-decoding session the relay keeps open on its slot, and the output-plugin
//! callbacks (`_PG_output_plugin_init`) through which Postgres hands back each committed
//! transaction's outbox messages, in commit order.

use super::{ensure_resource_owner, guarded, server::flush_lsn};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, CStr};

extern "C-unwind" {
    /// replication/decode.h
    fn LogicalDecodingProcessRecord(
        ctx: *mut pg_sys::LogicalDecodingContext,
        record: *mut pg_sys::XLogReaderState,
    );

    /// access/xlogutils.h: the page reader for WAL of the local server. Declared here because
    /// decoding needs the C function pointers rather than pgrx's guarded wrappers.
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
}

/// One committed transaction, as the decoder reports it.
#[derive(Debug, Clone, Copy)]
pub struct TxnInfo {
    /// The top-level transaction id, which the record's tag names.
    pub xid: u32,
    /// Start of the commit record: the transaction's place in commit order (`commit_lsn`).
    pub commit_lsn: u64,
    /// End of the commit record: the position to confirm once the transaction is delivered.
    pub end_lsn: u64,
    /// Commit time as a Postgres `TimestampTz`.
    pub commit_time: i64,
}

/// Receives what decoding finds, in commit order.
pub trait DecodeSink {
    /// A transactional message under the outbox prefix, written at `lsn` in transaction `txn`.
    fn event(&mut self, txn: TxnInfo, lsn: u64, body: &[u8]);
    /// The commit of `txn` (called for every decoded transaction, with events or not).
    fn commit(&mut self, txn: TxnInfo);
}

/// The XLogReaderRoutine for reading this server's own WAL, waiting for WAL that is not yet
/// flushed (used while creating the slot, where `die` handles SIGTERM).
pub(super) fn local_wal_routine() -> pg_sys::XLogReaderRoutine {
    pg_sys::XLogReaderRoutine {
        page_read: Some(c_read_local_xlog_page),
        segment_open: Some(c_wal_segment_open),
        segment_close: Some(c_wal_segment_close),
    }
}

/// `XLREAD_FAIL`: the page reader could not supply the page (xlogreader.h, 15 and later).
const XLREAD_FAIL: std::ffi::c_int = -1;

/// How often PostgreSQL may log, as a WARNING, why a standby in `synchronized_standby_slots`
/// holds decoding back; in between it logs at DEBUG1.
const STANDBY_REASON_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

thread_local! {
    /// The position decoding waits for the standbys to confirm, while it does (see
    /// `read_flushed_wal_page`). Only the worker's main thread reads WAL.
    static STANDBY_WAIT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    /// When the reason for a standby wait was last logged as a WARNING.
    static STANDBY_REASON_LOGGED: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Whether decoding may read WAL up to `need`: it is flushed here and, on 17 and later, the
/// standbys in `synchronized_standby_slots` have flushed it too (for a failover slot). Notes a
/// standby wait for [`DecodingSession::standby_wait`].
fn readable_upto(need: u64) -> bool {
    if need > flush_lsn() {
        return false;
    }
    let log_reason = STANDBY_REASON_LOGGED.get().is_none_or(|t| t.elapsed() >= STANDBY_REASON_LOG_INTERVAL);
    // SAFETY: called by the page reader on the worker's main thread, which holds its slot.
    let confirmed = unsafe { super::compat::standbys_confirmed(need, log_reason) };
    if confirmed {
        STANDBY_WAIT.set(None);
    } else {
        if log_reason {
            STANDBY_REASON_LOGGED.set(Some(std::time::Instant::now()));
        }
        STANDBY_WAIT.set(Some(need));
    }
    confirmed
}

/// The relay's page reader: `read_local_xlog_page`, except that it never waits, and that it
/// reads no further than the standbys have confirmed.
///
/// * **Never waits.** That function sleeps until the requested bytes are flushed, and its
///   sleep only ends early for interrupts that a worker with pgrx's signal handlers never
///   raises. A record whose tail is not flushed (the WAL writer flushes whole pages, and
///   nothing flushes the records of a transaction that rolled back) would then hold the
///   worker: no delivery reports, no reload, no SIGTERM, and a fast shutdown waits for ever,
///   since the shutdown checkpoint that would flush the tail only comes after the worker exits.
/// * **Never ahead of the standbys** (17 and later, failover slot, `synchronized_standby_slots`
///   set). A walsender waits in the same place (`logical_read_xlog_page` →
///   `WalSndWaitForWal` → `NeedToWaitForStandbys`): a record, a commit record included, is
///   decoded only once all of its bytes are read, so no transaction reaches Kafka, and the slot
///   is never confirmed past WAL, before the standbys have flushed its commit. A failover to
///   one of them can then never lose a transaction whose events were published.
///
/// Either way the page is reported as unavailable: XLogReadRecord returns no record and no
/// error, and reads the same record again on the next call.
#[pg_guard]
unsafe extern "C-unwind" fn read_flushed_wal_page(
    state: *mut pg_sys::XLogReaderState,
    target_page: pg_sys::XLogRecPtr,
    req_len: std::ffi::c_int,
    target_rec: pg_sys::XLogRecPtr,
    cur_page: *mut c_char,
) -> std::ffi::c_int {
    if !readable_upto(target_page + req_len as u64) {
        return XLREAD_FAIL;
    }
    // SAFETY: the reader passes its own valid arguments through; the requested bytes are
    // flushed, so read_local_xlog_page reads them without waiting.
    unsafe { guarded(|| c_read_local_xlog_page(state, target_page, req_len, target_rec, cur_page)) }
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

/// Makes the reorder buffer keep each transactional message in a chunk of its own size.
///
/// PostgreSQL copies every transactional message into `rb->context`, an AllocSet, which rounds
/// each chunk up to the next power of two: a 265-byte event takes 512 bytes, so the reorder
/// buffer used about twice what it accounts for (and what `logical_decoding_work_mem` limits).
/// A Generation context, which PostgreSQL itself uses for the buffer's tuples, takes chunks
/// of their own size and frees a block once every chunk in it is freed, which suits the
/// reorder buffer's first-in first-out life of changes. Everything else PostgreSQL allocates in
/// `rb->context` (prefixes, snapshots, invalidations) works the same in it: `pfree` and
/// `repalloc` follow each chunk's own context, and deleting `rb->context` when decoding ends
/// (ReorderBufferFree) deletes ours, while the original one, its parent, goes with the
/// decoding context. Only the relay's own decoding sessions are changed.
///
/// SAFETY: `rb` was just allocated by CreateDecodingContext and nothing was decoded yet.
unsafe fn use_exact_size_messages(rb: *mut pg_sys::ReorderBuffer) {
    // SAFETY: see above; GenerationContextCreate has this signature in 15–18.
    unsafe {
        (*rb).context = pg_sys::GenerationContextCreate(
            (*rb).context,
            c"outbox_ext reorder buffer messages".as_ptr(),
            0,
            8 * 1024,
            8 * 1024,
        );
    }
}

impl DecodingSession {
    /// Starts decoding on the held slot, from its confirmed position.
    pub fn start() -> DecodingSession {
        // SAFETY: runs in the worker, outside a transaction, holding the slot, as walsender's
        // StartLogicalReplication does. The context is allocated under TopMemoryContext so
        // that it lives until `Drop` frees it. The routine struct is copied by
        // XLogReaderAllocate. The page reader never waits (see read_flushed_wal_page).
        unsafe {
            ensure_resource_owner();
            pg_sys::CheckLogicalDecodingRequirements();
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let mut routine =
                pg_sys::XLogReaderRoutine { page_read: Some(read_flushed_wal_page), ..local_wal_routine() };
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
            use_exact_size_messages((*ctx).reorder);
            pg_sys::XLogBeginRead((*ctx).reader, (*pg_sys::MyReplicationSlot).data.restart_lsn);
            STANDBY_WAIT.set(None);
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

    /// While decoding waits for the standbys in `synchronized_standby_slots` to confirm WAL it
    /// could otherwise read: the position it waits for (see `read_flushed_wal_page`).
    pub fn standby_wait(&self) -> Option<u64> {
        STANDBY_WAIT.get()
    }

    /// While decoding waits for the standbys (see [`DecodingSession::standby_wait`]): sleeps on
    /// the worker's latch until a standby in `synchronized_standby_slots` confirms more WAL (the
    /// condition variable their walsenders broadcast), the latch is set otherwise, or `timeout`
    /// passes, as walsenders wait. Returns at once if they already confirmed `lsn`. `sleep` is
    /// the worker's latch wait.
    pub fn wait_for_standbys(&self, lsn: u64, timeout: std::time::Duration, sleep: impl FnOnce(std::time::Duration)) {
        // SAFETY: on the worker's main thread, holding its slot; registered before the check so
        // that a confirmation between the check and the sleep still sets the latch.
        unsafe {
            super::compat::start_standby_wakeups();
            if !super::compat::standbys_confirmed(lsn, false) {
                sleep(timeout);
            }
            super::compat::stop_standby_wakeups();
        }
    }

    /// Decodes the next WAL record if all of it has been flushed (and, where the standbys must
    /// confirm it first, confirmed), handing events and commits to `sink`. Returns false,
    /// without waiting, when there is none.
    pub fn decode_next(&mut self, sink: &mut dyn DecodeSink) -> bool {
        if !self.wal_available() {
            STANDBY_WAIT.set(None);
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
    // SAFETY: txn is the transaction being replayed; ReorderBufferCommit sets final_lsn (the
    // commit record's start), end_lsn and commit_time before replay starts.
    unsafe {
        TxnInfo {
            xid: (*txn).xid.into(),
            commit_lsn: (*txn).final_lsn,
            end_lsn: (*txn).end_lsn,
            commit_time: (*txn).xact_time.commit_time,
        }
    }
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
    message_lsn: pg_sys::XLogRecPtr,
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
        sink_of(ctx).event(txn_info(txn), message_lsn, body);
    }
}
