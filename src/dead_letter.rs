//! The table `outbox.dead_letter`: the last place an event goes when Kafka refused it for good
//! and the dead-letter topic refused it too (`outbox.on_permanent_error = dead_letter`), and
//! how a superuser sends it again once the cause is fixed.
//!
//! * The relay inserts the rows in a transaction of its own, between decoding steps, and only
//!   then lets the tracker count the events as set aside: the slot never moves past an event
//!   that is neither delivered nor stored here. After a crash in between, the event is decoded
//!   and refused again; `ON CONFLICT (id) DO NOTHING` keeps one row.
//! * `outbox.redeliver(id)` and `outbox.redeliver_all()` delete rows and write their events
//!   again, in the caller's transaction, through `emit`'s own path (`_redeliver_event`): the
//!   same checks, sealed with the installation's key, with the event's original id.

use crate::emit;
use crate::ffi::JsonbText;
use crate::record_key;
use outbox_core::dead_letter::{DeadLetter, EventFields, RecordValue};
use outbox_core::event::{EmitArgs, PayloadArg, TraceSettings};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

/// Stores `rows` durably (one committed transaction). An error says why they could not be
/// stored; the relay then stops at the first of them.
pub fn store(rows: &[DeadLetter]) -> Result<(), String> {
    BackgroundWorker::transaction(|| {
        let exists = crate::catalog_read::one::<bool>("SELECT to_regclass('outbox.dead_letter') IS NOT NULL")
            .map_err(|e| e.to_string())?;
        if exists != Some(true) {
            return Err("table outbox.dead_letter does not exist (extension outbox_ext was dropped, or ALTER EXTENSION outbox_ext UPDATE is due)".to_string());
        }
        for row in rows {
            let r = &row.record;
            let fields = EventFields::of_record(&r.headers)
                .ok_or_else(|| format!("a record to topic {} does not carry the relay's headers", r.topic))?;
            let (json, binary, content_type) = match &r.value {
                RecordValue::Json(text) => (Some(text.as_str()), None, None),
                RecordValue::Tombstone => (None, None, None),
                RecordValue::Bytes(data) => (None, Some(data.as_slice()), fields.content_type),
            };
            Spi::run_with_args(
                "INSERT INTO outbox.dead_letter
                     (id, aggregatetype, aggregateid, \"type\", payload, headers, topic,
                      error_code, error, dead_letter_error, committed_at, payload_binary, content_type)
                 VALUES ($1::uuid, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8, $9, $10,
                         to_timestamp($11::float8 / 1000), $12, $13)
                 ON CONFLICT (id) DO NOTHING",
                &[
                    fields.id.into(),
                    fields.aggregatetype.into(),
                    r.key.as_str().into(),
                    fields.event_type.into(),
                    json.into(),
                    fields.headers_json().into(),
                    row.refusal.topic.as_str().into(),
                    row.refusal.code.into(),
                    row.refusal.message.as_str().into(),
                    row.dead_letter_error.as_deref().into(),
                    r.timestamp_ms.into(),
                    binary.into(),
                    content_type.into(),
                ],
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// Writes a dead-lettered event again, with its own id, into the caller's transaction. Called
/// by `outbox.redeliver()` and `outbox.redeliver_all()` (superusers only). The kind of event
/// is the row's: JSON if `payload` is set, bytes if `payload_binary` is, else a tombstone. The
/// trace context is the event's own (in its headers), not the caller's.
#[pg_extern(name = "_redeliver_event", sql = false)]
#[allow(clippy::too_many_arguments)]
fn redeliver_any_event(
    id: pgrx::Uuid,
    aggregatetype: Option<&str>,
    aggregateid: Option<&str>,
    event_type: Option<&str>,
    payload: Option<JsonbText>,
    payload_binary: Option<&[u8]>,
    content_type: Option<&str>,
    headers: Option<JsonbText>,
) -> pgrx::Uuid {
    let payload = match (&payload, payload_binary) {
        (Some(json), _) => PayloadArg::Json(Some(json.0.as_str())),
        (None, Some(data)) => PayloadArg::Bytes { data: Some(data), content_type },
        (None, None) => PayloadArg::Tombstone,
    };
    redeliver(id, aggregatetype, aggregateid, event_type, payload, &headers)
}

/// 0.2.0's `_redeliver_event` (JSON events only): its C symbol stays, because ALTER EXTENSION
/// UPDATE from 0.1.0 creates the function (0.1.0 → 0.2.0) before 0.2.0 → 0.3.0 replaces it.
#[pg_extern(name = "_redeliver_event", sql = false)]
fn redeliver_event(
    id: pgrx::Uuid,
    aggregatetype: Option<&str>,
    aggregateid: Option<&str>,
    event_type: Option<&str>,
    payload: Option<JsonbText>,
    headers: Option<JsonbText>,
) -> pgrx::Uuid {
    let payload = PayloadArg::Json(payload.as_ref().map(|p| p.0.as_str()));
    redeliver(id, aggregatetype, aggregateid, event_type, payload, &headers)
}

/// Writes the event again through emit's path, without the caller's trace context: the event's
/// own is in its headers.
fn redeliver(
    id: pgrx::Uuid,
    aggregatetype: Option<&str>,
    aggregateid: Option<&str>,
    event_type: Option<&str>,
    payload: PayloadArg<'_>,
    headers: &Option<JsonbText>,
) -> pgrx::Uuid {
    let args = EmitArgs {
        aggregatetype,
        aggregateid,
        event_type,
        payload,
        headers: headers.as_ref().map(|h| h.0.as_str()),
        trace: TraceSettings::default(),
    };
    let installation = record_key::installation_in_transaction()
        .unwrap_or_else(|| error!("outbox_ext: function outbox.emit does not exist"));
    let id: [u8; 16] = *id.as_bytes();
    emit::write_event(args, Some(id), installation)
}

pgrx::extension_sql_file!("../sql/dead_letter.sql", name = "dead_letter", requires = ["emit", redeliver_any_event, redeliver_event]);
