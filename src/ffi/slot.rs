//! The relay's replication slot in shared memory: looked up (by `emit` and the relay),
//! created, acquired and dropped, as the walsender does for a replication client.

use super::{compat, decoding, ensure_resource_owner};
use pgrx::pg_sys;
use std::ffi::{c_int, CString};

extern "C-unwind" {
    /// tcop/tcopprot.h: the standard SIGTERM handler of backends.
    #[link_name = "die"]
    fn c_die(signal: c_int);
}

/// What emit needs to know about the relay's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotCheck {
    /// No persistent slot of that name in this database (it may be being created).
    Missing,
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
    // the 64-bit platforms this extension builds for. A slot dropped right after the check is
    // the same race as a slot dropped right after the event is written, and the README
    // documents it.
    unsafe {
        let slot = pg_sys::SearchNamedReplicationSlot(cname.as_ptr(), true);
        if slot.is_null() {
            return SlotCheck::Missing;
        }
        let data = std::ptr::addr_of!((*slot).data);
        let persistency = std::ptr::addr_of!((*data).persistency).read_volatile();
        let database = std::ptr::addr_of!((*data).database).read_volatile();
        let restart_lsn = std::ptr::addr_of!((*data).restart_lsn).read_volatile();
        let confirmed_flush = std::ptr::addr_of!((*data).confirmed_flush).read_volatile();
        if persistency != pg_sys::ReplicationSlotPersistency::RS_PERSISTENT {
            return SlotCheck::Missing;
        }
        if database != pg_sys::MyDatabaseId {
            return SlotCheck::Missing;
        }
        if compat::slot_invalidated(data) || restart_lsn == 0 {
            return SlotCheck::Invalidated;
        }
        SlotCheck::Ready { confirmed_flush }
    }
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

/// Creates the logical slot `name` for this database with this library as its output plugin,
/// as `pg_create_logical_replication_slot` does, but outside any transaction. Waits for the
/// transactions running now to finish (the slot's consistent point), which can take long (a
/// prepared transaction, a long batch job): during the wait SIGTERM uses Postgres' own `die`
/// handler, so that the wait's CHECK_FOR_INTERRUPTS ends the worker. The caller reinstalls its
/// handlers afterwards.
pub fn create_slot(name: &str, failover: bool) {
    let cname = CString::new(name).expect("slot names have no NUL");
    // SAFETY: the worker holds no slot and is outside a transaction, as the walsender is for
    // CREATE_REPLICATION_SLOT. The slot is created ephemeral, so that an ERROR (or `die`)
    // before ReplicationSlotPersist drops it again; the routine struct is copied by the reader.
    // `die` is the handler every backend runs for SIGTERM.
    unsafe {
        compat::set_signal_handler(pg_sys::SIGTERM as c_int, c_die);
        ensure_resource_owner();
        pg_sys::CheckLogicalDecodingRequirements();
        compat::replication_slot_create(&cname, pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL, failover);
        let mut routine = decoding::local_wal_routine();
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
        compat::replication_slot_acquire(&cname, true);
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

/// `ReplicationSlotControlLock`, a macro pgrx does not bind: entry 37 of the main LWLock
/// array on 15, 16, 17 and 18 alike (lwlocknames.h, lwlocklist.h).
const REPLICATION_SLOT_CONTROL_LOCK: usize = 37;

/// The databases that have a persistent logical slot with outbox_ext as its output plugin:
/// each has the extension, or events of a dropped installation still to deliver, and so needs
/// its relay. For the launcher, which is connected to no database and reads shared memory only.
pub fn databases_with_relay_slots() -> Vec<u32> {
    let mut databases = Vec::new();
    // SAFETY: the slot array lives in shared memory for the server's life, with
    // max_replication_slots entries; `in_use` only changes under ReplicationSlotControlLock held
    // exclusively, so no slot is freed or reused while we hold it shared. A slot's database
    // and plugin are written once, while it is created and still ephemeral; the copy of its
    // persistent data is taken without the slot's spinlock (a volatile read, no reference to
    // shared memory), so a slot in the middle of being made may read wrongly. The answer is a
    // hint for the launcher: a wrong one costs a relay that looks and exits, or a wait for the
    // next scan. LWLockAcquire cannot raise, and nothing between it and the release can.
    unsafe {
        let lock = std::ptr::addr_of_mut!((*pg_sys::MainLWLockArray.add(REPLICATION_SLOT_CONTROL_LOCK)).lock);
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_SHARED);
        let slots = std::ptr::addr_of!((*pg_sys::ReplicationSlotCtl).replication_slots).cast::<pg_sys::ReplicationSlot>();
        for i in 0..pg_sys::max_replication_slots.max(0) as usize {
            let slot = slots.add(i);
            if !std::ptr::addr_of!((*slot).in_use).read_volatile() {
                continue;
            }
            let data = std::ptr::addr_of!((*slot).data).read_volatile();
            let plugin = std::ffi::CStr::from_ptr(data.plugin.data.as_ptr());
            if data.database != pg_sys::InvalidOid
                && data.persistency == pg_sys::ReplicationSlotPersistency::RS_PERSISTENT
                && plugin.to_bytes() == b"outbox_ext"
            {
                databases.push(data.database.to_u32());
            }
        }
        pg_sys::LWLockRelease(lock);
    }
    databases
}
