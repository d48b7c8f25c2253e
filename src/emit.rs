//! `outbox.emit()`, `outbox.emit_binary()` and `outbox.emit_tombstone()`: validate, encode,
//! and write the event into the caller's transaction as a transactional logical-decoding
//! message. It commits or rolls back with the caller, savepoints
//! and two-phase commit included, because WAL decoding only ever replays committed
//! (sub)transactions.

use crate::error::{raise, OrRaise};
use crate::ffi::{self, JsonbText, SlotCheck};
use crate::{gucs, readiness, record_key};
use outbox_core::event::{self, EmitArgs, EmitLimits, PayloadArg, TraceSettings};
use outbox_core::routing::{self, RecordFormat};
use outbox_core::uuid7::Uuid7Generator;
use outbox_core::OutboxError;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    /// One id generator per backend, seeded from pg_strong_random on first use.
    static IDS: RefCell<Option<Uuid7Generator>> = const { RefCell::new(None) };
}

fn next_id() -> [u8; 16] {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    IDS.with(|ids| {
        ids.borrow_mut()
            .get_or_insert_with(|| Uuid7Generator::new(ffi::strong_random_u64()))
            .generate(now_ms)
    })
}

/// Records one event in the caller's transaction and returns its id (a UUIDv7).
#[pg_extern(name = "emit", sql = false)]
fn emit(
    aggregatetype: Option<&str>,
    aggregateid: Option<&str>,
    event_type: Option<&str>,
    payload: Option<JsonbText>,
    headers: default!(Option<JsonbText>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::Uuid {
    let payload = PayloadArg::Json(payload.as_ref().map(|p| p.0.as_str()));
    // Sealed for this installation: the emit function being called.
    emit_traced(aggregatetype, aggregateid, event_type, payload, &headers, ffi::called_function_oid(fcinfo))
}

/// Records an event whose value is `payload`'s bytes, unchanged, typed `content_type`.
#[pg_extern(name = "emit_binary", sql = false)]
fn emit_binary(
    aggregatetype: Option<&str>,
    aggregateid: Option<&str>,
    event_type: Option<&str>,
    payload: Option<&[u8]>,
    headers: Option<JsonbText>,
    content_type: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::Uuid {
    let payload = PayloadArg::Bytes { data: payload, content_type };
    emit_traced(aggregatetype, aggregateid, event_type, payload, &headers, sibling_installation(fcinfo))
}

/// Records a tombstone: a record with the key and no value, which deletes the key from a
/// compacted topic.
#[pg_extern(name = "emit_tombstone", sql = false)]
fn emit_tombstone(
    aggregatetype: Option<&str>,
    aggregateid: Option<&str>,
    event_type: Option<&str>,
    headers: Option<JsonbText>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::Uuid {
    let installation = sibling_installation(fcinfo);
    emit_traced(aggregatetype, aggregateid, event_type, PayloadArg::Tombstone, &headers, installation)
}

/// The installation of the emit function called (not `outbox.emit` itself): the one that made it.
fn sibling_installation(fcinfo: pg_sys::FunctionCallInfo) -> u32 {
    record_key::installation_of_sibling(ffi::called_function_oid(fcinfo))
        .unwrap_or_else(|| raise(OutboxError::KeyNotLoaded))
}

/// The emit functions' common path: the transaction's trace context (outbox.traceparent,
/// outbox.tracestate) goes with the event, sealed for `installation`.
fn emit_traced(
    aggregatetype: Option<&str>,
    aggregateid: Option<&str>,
    event_type: Option<&str>,
    payload: PayloadArg<'_>,
    headers: &Option<JsonbText>,
    installation: u32,
) -> pgrx::Uuid {
    let (traceparent, tracestate) = (gucs::traceparent(), gucs::tracestate());
    let args = EmitArgs {
        aggregatetype,
        aggregateid,
        event_type,
        payload,
        headers: headers.as_ref().map(|h| h.0.as_str()),
        trace: TraceSettings { traceparent: Some(&traceparent), tracestate: Some(&tracestate) },
    };
    write_event(args, None, installation)
}

/// Validates the event, checks that the relay will read it, and writes it into the caller's
/// transaction sealed with the key of `installation` (the OID of its emit function). `id` is a
/// new UUIDv7 unless given (a redelivered event keeps its own).
pub fn write_event(args: EmitArgs<'_>, id: Option<[u8; 16]>, installation: u32) -> pgrx::Uuid {
    readiness::check_ready().or_raise();
    let topic_template = database_template(gucs::topic_template());
    let record_format = gucs::record_format();
    let cloudevents_source = match record_format {
        RecordFormat::Plain => String::new(),
        RecordFormat::CloudEvents => database_template(gucs::cloudevents_source_template()),
    };
    let limits = EmitLimits {
        max_payload_bytes: gucs::max_payload_bytes(),
        max_record_bytes: gucs::max_record_bytes(),
        topic_template: &topic_template,
        record_format,
        cloudevents_source: &cloudevents_source,
    };
    let event = event::validate(args, limits).or_raise();

    // This installation's key, and the slot of the database's relay.
    let sealing = record_key::for_emit(installation).or_raise();
    match ffi::check_slot(&sealing.slot) {
        SlotCheck::Ready { confirmed_flush } => {
            if let Some(max) = gucs::max_pending_bytes() {
                let pending = ffi::flush_lsn().saturating_sub(confirmed_flush);
                if pending > max {
                    raise(OutboxError::TooMuchPending { pending, max });
                }
            }
        }
        SlotCheck::Missing => raise(OutboxError::SlotMissing { database: ffi::my_database_name() }),
        SlotCheck::Invalidated => raise(OutboxError::SlotInvalidated { slot: sealing.slot }),
    }

    let id = id.unwrap_or_else(next_id);
    ffi::wake_at_commit(sealing.relay_latch);
    if cfg!(feature = "unsealed_emit") {
        // The bench's "before authentication" (see Cargo.toml); the relay skips these.
        ffi::log_event_message(&event::encode(&id, &event));
        return pgrx::Uuid::from_bytes(id);
    }
    // Sealed for this installation and this transaction.
    ffi::log_event_message(&event::seal(&sealing.key, ffi::top_transaction_id(), &id, &event));
    pgrx::Uuid::from_bytes(id)
}

thread_local! {
    /// This backend's database name: a connected database cannot be renamed.
    static DATABASE_NAME: std::cell::OnceCell<String> = const { std::cell::OnceCell::new() };
}

/// `outbox.topic` or `outbox.cloudevents_source` for this database (`{database}` replaced), as
/// its relay uses it.
fn database_template(template: String) -> String {
    if !template.contains(routing::DATABASE_PLACEHOLDER) {
        return template;
    }
    DATABASE_NAME.with(|name| routing::database_template(&template, name.get_or_init(ffi::my_database_name)))
}

// Its SQL (arguments, defaults, grants) is hand-written.
pgrx::extension_sql_file!("../sql/emit.sql", name = "emit");
