//! The outbox event: what `outbox.emit()` (and `emit_binary`, `emit_tombstone`) accepts, how
//! it is checked, and its WAL wire format.
//!
//! An event travels through WAL as the body of one transactional logical-decoding message
//! under the prefix [`MESSAGE_PREFIX`]:
//!
//! ```text
//! u8        format version (3)
//! [u8; 16]  tag that authenticates the record (see auth.rs)
//! record:
//!   [u8; 16]  event id (UUIDv7)
//!   u8        kind of value: 0 JSON, 1 none (a tombstone), 2 bytes
//!   u32 LE    length of aggregatetype, then its UTF-8 bytes
//!   u32 LE    length of aggregateid,   then its UTF-8 bytes
//!   u32 LE    length of type,          then its UTF-8 bytes
//!   JSON:  u32 LE length of the payload, then its JSON text
//!   bytes: u32 LE length of the content type, then its text; u32 LE length of the bytes, then them
//!   u32 LE    number of headers, then for each: u32 LE key length, key, u32 LE value length, value
//! ```
//!
//! Format 2 (0.2.0's) is format 3 without the kind byte, always JSON: it still opens, for the
//! events an upgrade finds in WAL. [`seal`] writes a message, [`open`] checks its tag and reads
//! it. Format 1 (the version byte followed directly by the record, before records were
//! authenticated) is refused. [`decode`] borrows from the message, so the relay never copies an
//! event before handing it to librdkafka.

use crate::auth::{RecordKey, TAG_LEN};
use crate::error::OutboxError;
use crate::routing::{self, Envelope, PositionText, RecordFormat};
use crate::trace_context::{self, TRACEPARENT, TRACESTATE};

/// The logical-decoding message prefix that marks outbox_ext events in WAL.
pub const MESSAGE_PREFIX: &str = "outbox_ext";

/// Version byte at the start of every message `emit` writes.
pub const FORMAT_VERSION: u8 = 3;

/// 0.2.0's format: a JSON payload and no kind byte. Still opened, never written.
pub const JSON_ONLY_FORMAT: u8 = 2;

/// The format before records were authenticated; no longer relayed.
pub const UNAUTHENTICATED_FORMAT: u8 = 1;

/// Bytes before the record: the version and the tag.
const SEAL_LEN: usize = 1 + TAG_LEN;

/// Header names that outbox_ext sets itself on a Kafka record (see `routing::record_headers`).
pub const RESERVED_HEADERS: [&str; 6] =
    ["id", "type", "aggregatetype", routing::COMMIT_LSN_HEADER, routing::COMMIT_INDEX_HEADER, routing::CONTENT_TYPE_HEADER];

/// Header name prefixes that outbox_ext keeps for itself, compared ignoring ASCII case: the
/// CloudEvents attributes (`ce_`), which a CloudEvents consumer would take for the event's own,
/// and the reasons a dead letter carries.
pub const RESERVED_PREFIXES: [&str; 2] = [routing::CLOUDEVENTS_PREFIX, crate::dead_letter::RESERVED_PREFIX];

/// Whether `emit` refuses a header of this name (see [`RESERVED_HEADERS`], [`RESERVED_PREFIXES`]).
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS.contains(&name)
        || name.eq_ignore_ascii_case(routing::CONTENT_TYPE_HEADER)
        || RESERVED_PREFIXES
            .iter()
            .any(|p| name.len() >= p.len() && name.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}

/// The content type of `emit_binary` when the caller names none.
pub const DEFAULT_BINARY_CONTENT_TYPE: &str = "application/octet-stream";

/// The value the caller passed, by function, with SQL NULL as `None`.
#[derive(Debug, Clone, Copy)]
pub enum PayloadArg<'a> {
    /// `emit`: the payload's JSON text (as jsonb prints it).
    Json(Option<&'a str>),
    /// `emit_binary`: the bytes and their media type.
    Bytes { data: Option<&'a [u8]>, content_type: Option<&'a str> },
    /// `emit_tombstone`: no value.
    Tombstone,
}

/// The value of an event's Kafka record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// JSON text, from `emit`.
    Json(&'a str),
    /// No value at all (a null value, not an empty one): a tombstone, from `emit_tombstone`.
    Tombstone,
    /// Bytes passed through unchanged, with their media type, from `emit_binary`.
    Bytes { data: &'a [u8], content_type: &'a str },
}

impl<'a> Value<'a> {
    /// The record's value: None for a tombstone.
    pub fn bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Json(text) => Some(text.as_bytes()),
            Value::Tombstone => None,
            Value::Bytes { data, .. } => Some(data),
        }
    }

    /// Whether the value is bytes from `emit_binary` rather than JSON text.
    pub fn is_binary(&self) -> bool {
        matches!(self, Value::Bytes { .. })
    }

    /// The value's length in bytes (0 for a tombstone).
    pub fn len(&self) -> usize {
        self.bytes().map_or(0, <[u8]>::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn kind(&self) -> u8 {
        match self {
            Value::Json(_) => 0,
            Value::Tombstone => 1,
            Value::Bytes { .. } => 2,
        }
    }
}

/// `outbox.traceparent` and `outbox.tracestate` as the emitting transaction has them (None or
/// empty: not set).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceSettings<'a> {
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

/// What the caller of `outbox.emit()` passed, with SQL NULL as `None`.
#[derive(Debug, Clone, Copy)]
pub struct EmitArgs<'a> {
    pub aggregatetype: Option<&'a str>,
    pub aggregateid: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub payload: PayloadArg<'a>,
    /// The headers object's JSON text, or `None` for SQL NULL (no extra headers).
    pub headers: Option<&'a str>,
    /// The trace context settings (none for a redelivered event, whose headers have it).
    pub trace: TraceSettings<'a>,
}

/// Limits that come from configuration at emit time.
#[derive(Debug, Clone, Copy)]
pub struct EmitLimits<'a> {
    pub max_payload_bytes: usize,
    /// The largest Kafka record (key, value and headers as the relay sends them in
    /// `record_format`, sized as librdkafka sizes them against `message.max.bytes`).
    pub max_record_bytes: usize,
    pub topic_template: &'a str,
    /// `outbox.record_format`: the record that is sized.
    pub record_format: RecordFormat,
    /// `outbox.cloudevents_source` for this database: a `cloudevents` record carries it.
    pub cloudevents_source: &'a str,
}

/// An event that passed validation, ready to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEvent<'a> {
    pub aggregatetype: &'a str,
    pub aggregateid: &'a str,
    pub event_type: &'a str,
    pub value: Value<'a>,
    /// The event's own headers, with the trace context of the settings at the end.
    pub headers: Vec<(String, String)>,
}

/// A decoded event, borrowing from the WAL message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef<'a> {
    pub id: [u8; 16],
    pub aggregatetype: &'a str,
    pub aggregateid: &'a str,
    pub event_type: &'a str,
    pub value: Value<'a>,
    pub headers: Vec<(&'a str, &'a str)>,
}

/// Checks every argument of `outbox.emit()`. Nothing is written unless this returns `Ok`.
pub fn validate<'a>(
    args: EmitArgs<'a>,
    limits: EmitLimits<'_>,
) -> Result<ValidEvent<'a>, OutboxError> {
    let aggregatetype = required("aggregatetype", args.aggregatetype)?;
    let aggregateid = required("aggregateid", args.aggregateid)?;
    let event_type = required("type", args.event_type)?;
    let value = match args.payload {
        PayloadArg::Json(text) => Value::Json(text.ok_or(OutboxError::NullArgument { argument: "payload" })?),
        PayloadArg::Tombstone => Value::Tombstone,
        PayloadArg::Bytes { data, content_type } => {
            let data = data.ok_or(OutboxError::NullArgument { argument: "payload" })?;
            let content_type = required("content_type", content_type)?;
            check_content_type(content_type)?;
            Value::Bytes { data, content_type }
        }
    };

    let topic = routing::topic_for(limits.topic_template, aggregatetype);
    routing::check_topic(&topic)?;

    if value.len() > limits.max_payload_bytes {
        return Err(OutboxError::PayloadTooLarge { size: value.len(), max: limits.max_payload_bytes });
    }
    for (argument, value) in
        [("aggregatetype", aggregatetype), ("aggregateid", aggregateid), ("type", event_type)]
    {
        if value.len() > u32::MAX as usize {
            return Err(OutboxError::ArgumentTooLong { argument, size: value.len() });
        }
    }
    let mut headers = match args.headers {
        None => Vec::new(),
        Some(json) => parse_headers(json)?,
    };
    add_trace_context(&mut headers, args.trace)?;
    let event = ValidEvent { aggregatetype, aggregateid, event_type, value, headers };
    check_record_size(&event, limits)?;
    Ok(event)
}

/// Checks the trace context in `headers` (the caller's) and in the settings, and adds the
/// settings' to `headers` unless the caller passed a `traceparent` of its own: a context given
/// with the event is more specific than the transaction's, and a record carries one.
fn add_trace_context(headers: &mut Vec<(String, String)>, settings: TraceSettings<'_>) -> Result<(), OutboxError> {
    fn set(v: Option<&str>) -> Option<&str> {
        v.filter(|v| !v.is_empty())
    }
    let (setting_parent, setting_state) = (set(settings.traceparent), set(settings.tracestate));
    check_trace_pair(setting_parent, setting_state, ["outbox.traceparent", "outbox.tracestate"])?;
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let (own_parent, own_state) = (header(TRACEPARENT), header(TRACESTATE));
    check_trace_pair(own_parent, own_state, ["the traceparent header", "the tracestate header"])?;
    if own_parent.is_none() {
        if let Some(v) = setting_parent {
            headers.push((TRACEPARENT.to_string(), v.to_string()));
            if let Some(state) = setting_state {
                headers.push((TRACESTATE.to_string(), state.to_string()));
            }
        }
    }
    Ok(())
}

/// Checks one source's `traceparent` and `tracestate` (`names` say where they come from): each
/// W3C Trace Context, and no `tracestate` without a `traceparent`.
fn check_trace_pair(parent: Option<&str>, state: Option<&str>, names: [&'static str; 2]) -> Result<(), OutboxError> {
    let invalid = |source: &'static str| move |reason| OutboxError::InvalidTraceContext { source, reason };
    if let Some(v) = parent {
        trace_context::check_traceparent(v).map_err(invalid(names[0]))?;
    }
    if let Some(v) = state {
        trace_context::check_tracestate(v).map_err(invalid(names[1]))?;
        if parent.is_none() {
            return Err(invalid(names[1])(format!("it is given without {}", names[0])));
        }
    }
    Ok(())
}

/// `content_type` must be a media type, `type/subtype` with optional `; parameter=value`s, in
/// printable ASCII (it becomes the `content-type` header and CloudEvents' `datacontenttype`).
pub fn check_content_type(content_type: &str) -> Result<(), OutboxError> {
    let invalid = |reason: &str| {
        Err(OutboxError::InvalidContentType { reason: format!("\"{}\" {reason}", content_type.escape_debug()) })
    };
    if content_type.len() > 255 {
        return Err(OutboxError::InvalidContentType {
            reason: format!("it is {} bytes, more than 255", content_type.len()),
        });
    }
    if !content_type.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t') {
        return invalid("has characters other than printable ASCII");
    }
    let media_type = content_type.split(';').next().unwrap_or_default().trim_end_matches([' ', '\t']);
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    match media_type.split_once('/') {
        Some((t, sub)) if token(t) && token(sub) => Ok(()),
        _ => invalid("is not a media type such as application/avro or application/x-protobuf; charset=utf-8"),
    }
}

/// The record the relay will make of `event` (see `routing::record_headers`) in the record
/// format in force must fit `max_record_bytes`, so that neither librdkafka nor the broker
/// refuses it for its size.
fn check_record_size(event: &ValidEvent<'_>, limits: EmitLimits<'_>) -> Result<(), OutboxError> {
    // The id header is the hyphenated UUID: 36 characters, whatever the id. The position is
    // not known before commit: counted at its longest, so the relay can always send the record.
    // ce_time has a fixed length.
    const ID_TEXT: &str = "00000000-0000-0000-0000-000000000000";
    let position = PositionText::new(routing::Position { commit_lsn: u64::MAX, commit_index: u64::MAX });
    let headers: Vec<(&str, &str)> = event.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let record = EventRef {
        id: [0; 16],
        aggregatetype: event.aggregatetype,
        aggregateid: event.aggregateid,
        event_type: event.event_type,
        value: event.value,
        headers,
    };
    let time = crate::time::Rfc3339Micros::new(0);
    let envelope = match limits.record_format {
        RecordFormat::Plain => Envelope::Plain,
        RecordFormat::CloudEvents => Envelope::CloudEvents { source: limits.cloudevents_source, time },
    };
    let headers = routing::record_headers(&record, ID_TEXT, &position, &envelope);
    let size = routing::record_size(event.aggregateid, event.value.len(), headers);
    if size > limits.max_record_bytes {
        let (key, value) = (event.aggregateid.len(), event.value.len());
        return Err(OutboxError::RecordTooLarge {
            size,
            max: limits.max_record_bytes,
            key,
            value,
            headers: size - routing::RECORD_OVERHEAD - key - value,
        });
    }
    Ok(())
}

fn required<'a>(argument: &'static str, value: Option<&'a str>) -> Result<&'a str, OutboxError> {
    match value {
        None => Err(OutboxError::NullArgument { argument }),
        Some("") => Err(OutboxError::EmptyArgument { argument }),
        Some(v) => Ok(v),
    }
}

/// `headers` must be a JSON object whose values are strings; `null` (the JSON value) is
/// treated like SQL NULL. Reserved names are refused so that a consumer can trust them.
pub fn parse_headers(json: &str) -> Result<Vec<(String, String)>, OutboxError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        OutboxError::InvalidHeaders { reason: format!("not valid JSON ({e})") }
    })?;
    let object = match value {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Object(o) => o,
        other => {
            return Err(OutboxError::InvalidHeaders {
                reason: format!("expected a JSON object of strings, got {}", json_kind(&other)),
            })
        }
    };
    let mut headers = Vec::with_capacity(object.len());
    for (key, value) in object {
        if is_reserved_header(&key) {
            return Err(OutboxError::InvalidHeaders {
                reason: format!("\"{key}\" is set by outbox_ext itself and cannot be overridden"),
            });
        }
        match value {
            serde_json::Value::String(s) => headers.push((key, s)),
            other => {
                return Err(OutboxError::InvalidHeaders {
                    reason: format!(
                        "the value of \"{key}\" must be a string, got {}",
                        json_kind(&other)
                    ),
                })
            }
        }
    }
    Ok(headers)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The WAL message for a validated event with its id, written in transaction `xid`: the format
/// version, the tag, then the record. One allocation; the tag is computed over the record in
/// place.
pub fn seal(key: &RecordKey, xid: u32, id: &[u8; 16], event: &ValidEvent<'_>) -> Vec<u8> {
    let mut message = Vec::with_capacity(SEAL_LEN + record_len(event));
    message.push(FORMAT_VERSION);
    message.extend_from_slice(&[0; TAG_LEN]);
    encode_into(&mut message, id, event);
    let tag = key.tag(xid, &message[SEAL_LEN..]);
    message[1..SEAL_LEN].copy_from_slice(&tag);
    message
}

/// Checks a message's format and tag for transaction `xid` and decodes its record.
pub fn open<'a>(key: &RecordKey, xid: u32, message: &'a [u8]) -> Result<EventRef<'a>, DecodeError> {
    let version = match message.first() {
        None => return Err(DecodeError::Truncated),
        Some(&v @ (FORMAT_VERSION | JSON_ONLY_FORMAT)) => v,
        Some(&UNAUTHENTICATED_FORMAT) => return Err(DecodeError::Unauthenticated),
        Some(&other) => return Err(DecodeError::UnknownVersion(other)),
    };
    if message.len() < SEAL_LEN {
        return Err(DecodeError::Truncated);
    }
    let (tag, record) = (&message[1..SEAL_LEN], &message[SEAL_LEN..]);
    if !key.verify(xid, record, tag) {
        return Err(DecodeError::BadTag);
    }
    if version == JSON_ONLY_FORMAT {
        decode_format2(record)
    } else {
        decode(record)
    }
}

fn value_len(value: &Value<'_>) -> usize {
    match value {
        Value::Json(text) => 4 + text.len(),
        Value::Tombstone => 0,
        Value::Bytes { data, content_type } => 8 + content_type.len() + data.len(),
    }
}

fn record_len(event: &ValidEvent<'_>) -> usize {
    let strings = [event.aggregatetype, event.aggregateid, event.event_type];
    let header_bytes: usize = event.headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    16 + 1 + strings.iter().map(|s| 4 + s.len()).sum::<usize>() + value_len(&event.value) + 4 + header_bytes
}

/// The record of a validated event with its id (the part of the message after the tag).
pub fn encode(id: &[u8; 16], event: &ValidEvent<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(record_len(event));
    encode_into(&mut buf, id, event);
    buf
}

fn encode_into(buf: &mut Vec<u8>, id: &[u8; 16], event: &ValidEvent<'_>) {
    let start = buf.len();
    buf.extend_from_slice(id);
    buf.push(event.value.kind());
    for s in [event.aggregatetype, event.aggregateid, event.event_type] {
        put_bytes(buf, s.as_bytes());
    }
    match event.value {
        Value::Json(text) => put_bytes(buf, text.as_bytes()),
        Value::Tombstone => {}
        Value::Bytes { data, content_type } => {
            put_bytes(buf, content_type.as_bytes());
            put_bytes(buf, data);
        }
    }
    buf.extend_from_slice(&(event.headers.len() as u32).to_le_bytes());
    for (k, v) in &event.headers {
        put_bytes(buf, k.as_bytes());
        put_bytes(buf, v.as_bytes());
    }
    debug_assert_eq!(buf.len() - start, record_len(event));
}

fn put_bytes(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s);
}

/// Why a message under our prefix was not opened. Only a message that `outbox.emit()` did not
/// write (for example one forged with `pg_logical_emit_message`, or one of format 1) can fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    UnknownVersion(u8),
    /// Format 1: written before records were authenticated, or forged in that format.
    Unauthenticated,
    /// The tag does not match the installation's key and the committing transaction.
    BadTag,
    Truncated,
    NotUtf8,
    TrailingBytes,
    UnknownKind(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownVersion(v) => write!(f, "unknown event format version {v}"),
            DecodeError::Unauthenticated => write!(f, "unauthenticated record of format 1"),
            DecodeError::BadTag => {
                write!(f, "its tag does not verify with this installation's key and transaction")
            }
            DecodeError::Truncated => write!(f, "event record is truncated"),
            DecodeError::NotUtf8 => write!(f, "event record holds invalid UTF-8"),
            DecodeError::TrailingBytes => write!(f, "event record has trailing bytes"),
            DecodeError::UnknownKind(k) => write!(f, "unknown kind of value {k}"),
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError::NotUtf8)
    }

    /// The header list and the end of the record.
    fn headers(mut self) -> Result<Vec<(&'a str, &'a str)>, DecodeError> {
        let count = self.u32()? as usize;
        // Each header needs at least 8 bytes, which bounds the allocation for forged counts.
        if count > self.buf.len() / 8 {
            return Err(DecodeError::Truncated);
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            headers.push((self.str()?, self.str()?));
        }
        if !self.buf.is_empty() {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(headers)
    }
}

/// Decodes a record made by [`encode`] (only [`open`] knows whether to trust it).
pub fn decode(record: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    let mut r = Reader { buf: record };
    let mut id = [0u8; 16];
    id.copy_from_slice(r.take(16)?);
    let kind = r.take(1)?[0];
    let aggregatetype = r.str()?;
    let aggregateid = r.str()?;
    let event_type = r.str()?;
    let value = match kind {
        0 => Value::Json(r.str()?),
        1 => Value::Tombstone,
        2 => {
            let content_type = r.str()?;
            Value::Bytes { content_type, data: r.bytes()? }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    let headers = r.headers()?;
    Ok(EventRef { id, aggregatetype, aggregateid, event_type, value, headers })
}

/// Decodes a record of format 2 (0.2.0's): no kind byte, always JSON.
fn decode_format2(record: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    let mut r = Reader { buf: record };
    let mut id = [0u8; 16];
    id.copy_from_slice(r.take(16)?);
    let aggregatetype = r.str()?;
    let aggregateid = r.str()?;
    let event_type = r.str()?;
    let value = Value::Json(r.str()?);
    let headers = r.headers()?;
    Ok(EventRef { id, aggregatetype, aggregateid, event_type, value, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: EmitLimits<'static> = EmitLimits {
        max_payload_bytes: 1000,
        max_record_bytes: 1_000_000,
        topic_template: "outbox.event.{aggregatetype}",
        record_format: RecordFormat::Plain,
        cloudevents_source: "/outbox_ext/test",
    };

    /// The same, in the cloudevents record format.
    const CLOUDEVENTS: EmitLimits<'static> = EmitLimits { record_format: RecordFormat::CloudEvents, ..LIMITS };

    const TRACEPARENT_A: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACEPARENT_B: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

    fn args() -> EmitArgs<'static> {
        EmitArgs {
            aggregatetype: Some("order"),
            aggregateid: Some("o-1"),
            event_type: Some("OrderCreated"),
            payload: PayloadArg::Json(Some(r#"{"a": 1}"#)),
            headers: None,
            trace: TraceSettings::default(),
        }
    }

    fn bytes<'a>(data: &'a [u8], content_type: &'a str) -> PayloadArg<'a> {
        PayloadArg::Bytes { data: Some(data), content_type: Some(content_type) }
    }

    #[test]
    fn valid_event_round_trips_through_the_wire_format() {
        let a = EmitArgs { headers: Some(r#"{"x": "ü"}"#), ..args() };
        let ev = validate(a, LIMITS).unwrap();
        let id = [7u8; 16];
        let body = encode(&id, &ev);
        let back = decode(&body).unwrap();
        assert_eq!(back.id, id);
        assert_eq!(back.aggregatetype, "order");
        assert_eq!(back.aggregateid, "o-1");
        assert_eq!(back.event_type, "OrderCreated");
        assert_eq!(back.value, Value::Json(r#"{"a": 1}"#));
        assert_eq!(back.headers, vec![("x", "ü")]);
    }

    #[test]
    fn every_kind_of_value_round_trips() {
        let avro: &[u8] = &[0, 0, 0, 0, 42, 0xff, 0, b'\n'];
        for (payload, value) in [
            (PayloadArg::Tombstone, Value::Tombstone),
            (bytes(avro, "application/avro"), Value::Bytes { data: avro, content_type: "application/avro" }),
            (bytes(b"", "application/octet-stream"), Value::Bytes { data: b"", content_type: "application/octet-stream" }),
        ] {
            let ev = validate(EmitArgs { payload, ..args() }, LIMITS).unwrap();
            assert_eq!(ev.value, value);
            let body = encode(&[1; 16], &ev);
            assert_eq!(decode(&body).unwrap().value, value);
            let key = RecordKey::new(&[3; crate::auth::KEY_LEN]);
            assert_eq!(open(&key, 9, &seal(&key, 9, &[1; 16], &ev)).unwrap().value, value);
        }
        assert_eq!(Value::Tombstone.bytes(), None);
        assert_eq!(Value::Bytes { data: b"", content_type: "a/b" }.bytes(), Some(&b""[..]));
    }

    #[test]
    fn format_2_records_still_open_as_json() {
        // 0.2.0's layout: id, then the four strings, then the headers; no kind byte.
        let mut record = vec![5u8; 16];
        for s in ["order", "o-1", "T", "{}"] {
            put_bytes(&mut record, s.as_bytes());
        }
        record.extend_from_slice(&1u32.to_le_bytes());
        put_bytes(&mut record, b"h");
        put_bytes(&mut record, b"v");
        let key = RecordKey::new(&[3; crate::auth::KEY_LEN]);
        let mut message = vec![JSON_ONLY_FORMAT];
        message.extend_from_slice(&key.tag(12, &record));
        message.extend_from_slice(&record);
        let ev = open(&key, 12, &message).unwrap();
        assert_eq!((ev.aggregatetype, ev.aggregateid, ev.event_type), ("order", "o-1", "T"));
        assert_eq!(ev.value, Value::Json("{}"));
        assert_eq!(ev.headers, vec![("h", "v")]);
        // The same record read as format 3 is garbage, never a different valid event.
        let mut as3 = message.clone();
        as3[0] = FORMAT_VERSION;
        assert!(open(&key, 12, &as3).is_err());
    }

    #[test]
    fn nulls_are_refused_with_22004() {
        for (name, a) in [
            ("aggregatetype", EmitArgs { aggregatetype: None, ..args() }),
            ("aggregateid", EmitArgs { aggregateid: None, ..args() }),
            ("type", EmitArgs { event_type: None, ..args() }),
            ("payload", EmitArgs { payload: PayloadArg::Json(None), ..args() }),
            ("payload", EmitArgs { payload: PayloadArg::Bytes { data: None, content_type: Some("a/b") }, ..args() }),
            ("content_type", EmitArgs { payload: PayloadArg::Bytes { data: Some(b"x"), content_type: None }, ..args() }),
        ] {
            let e = validate(a, LIMITS).unwrap_err();
            assert_eq!(e, OutboxError::NullArgument { argument: name });
            assert_eq!(e.sqlstate().code(), "22004");
        }
    }

    #[test]
    fn empty_strings_are_refused_with_22023() {
        for a in [
            EmitArgs { aggregatetype: Some(""), ..args() },
            EmitArgs { aggregateid: Some(""), ..args() },
            EmitArgs { event_type: Some(""), ..args() },
            EmitArgs { payload: bytes(b"x", ""), ..args() },
        ] {
            assert_eq!(validate(a, LIMITS).unwrap_err().sqlstate().code(), "22023");
        }
    }

    #[test]
    fn content_types_are_media_types() {
        for good in ["application/avro", "application/x-protobuf", "application/json; charset=utf-8", "text/plain;a=\"b c\""] {
            assert!(validate(EmitArgs { payload: bytes(b"x", good), ..args() }, LIMITS).is_ok(), "{good}");
        }
        for bad in ["avro", "application/", "/avro", "application/av ro", "a/b\n", "applicatión/x", "a/b/c", &format!("a/{}", "b".repeat(254))] {
            let e = validate(EmitArgs { payload: bytes(b"x", bad), ..args() }, LIMITS).unwrap_err();
            assert!(matches!(e, OutboxError::InvalidContentType { .. }), "{bad:?}: {e:?}");
            assert_eq!(e.sqlstate().code(), "22023");
        }
    }

    #[test]
    fn illegal_topics_are_refused() {
        for t in ["a b", "ordér", "a/b", &"x".repeat(249)] {
            let e = validate(EmitArgs { aggregatetype: Some(t), ..args() }, LIMITS).unwrap_err();
            assert!(matches!(e, OutboxError::IllegalTopic { .. }), "{t}: {e:?}");
        }
        // 249 characters in all is still legal.
        let ok = "x".repeat(249 - "outbox.event.".len());
        assert!(validate(EmitArgs { aggregatetype: Some(&ok), ..args() }, LIMITS).is_ok());
    }

    #[test]
    fn headers_must_be_an_object_of_strings() {
        for h in ["[]", "1", r#""s""#, r#"{"a": 1}"#, r#"{"a": null}"#, r#"{"a": {"b": "c"}}"#, "true"] {
            let e = validate(EmitArgs { headers: Some(h), ..args() }, LIMITS).unwrap_err();
            assert!(matches!(e, OutboxError::InvalidHeaders { .. }), "{h}");
            assert_eq!(e.sqlstate().code(), "22023");
        }
        let reserved = RESERVED_HEADERS.into_iter().chain(crate::dead_letter::HEADERS);
        for name in reserved.chain(["ce_id", "ce_anything", "CE_ID", "Content-Type", "ce_"]) {
            let h = format!(r#"{{"{name}": "x"}}"#);
            let e = validate(EmitArgs { headers: Some(&h), ..args() }, LIMITS).unwrap_err();
            assert!(matches!(e, OutboxError::InvalidHeaders { .. }), "{name}: {e:?}");
        }
        for free in ["ce", "cex", "c_e", "content_type", "ID"] {
            let h = format!(r#"{{"{free}": "x"}}"#);
            assert!(validate(EmitArgs { headers: Some(&h), ..args() }, LIMITS).is_ok(), "{free}");
        }
        // JSON null and the empty object mean no extra headers.
        assert!(validate(EmitArgs { headers: Some("null"), ..args() }, LIMITS).unwrap().headers.is_empty());
        assert!(validate(EmitArgs { headers: Some("{}"), ..args() }, LIMITS).unwrap().headers.is_empty());
    }

    #[test]
    fn the_trace_context_of_the_settings_becomes_headers() {
        let trace = |traceparent, tracestate| TraceSettings { traceparent, tracestate };
        let headers = |a: EmitArgs<'_>| validate(a, LIMITS).map(|e| e.headers);
        let owned = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        // Unset (NULL or empty): nothing.
        assert_eq!(headers(EmitArgs { trace: trace(Some(""), Some("")), ..args() }), Ok(vec![]));
        assert_eq!(
            headers(EmitArgs { trace: trace(Some(TRACEPARENT_A), Some("k=v")), headers: Some(r#"{"x": "1"}"#), ..args() }),
            Ok(owned(&[("x", "1"), ("traceparent", TRACEPARENT_A), ("tracestate", "k=v")]))
        );
        // The event's own traceparent wins, with its own tracestate (or none).
        let own = format!(r#"{{"traceparent": "{TRACEPARENT_B}"}}"#);
        assert_eq!(
            headers(EmitArgs { trace: trace(Some(TRACEPARENT_A), Some("k=v")), headers: Some(&own), ..args() }),
            Ok(owned(&[("traceparent", TRACEPARENT_B)]))
        );
        // Anything malformed is refused with 22023, wherever it comes from, even if unused.
        for a in [
            EmitArgs { trace: trace(Some("00-ab"), None), ..args() },
            EmitArgs { trace: trace(Some(TRACEPARENT_A), Some("K=v")), ..args() },
            EmitArgs { trace: trace(None, Some("k=v")), ..args() },
            EmitArgs { trace: trace(Some("garbage"), None), headers: Some(&own), ..args() },
            EmitArgs { headers: Some(r#"{"traceparent": "00-ab"}"#), ..args() },
            EmitArgs { headers: Some(r#"{"tracestate": "k=v"}"#), trace: trace(Some(TRACEPARENT_A), None), ..args() },
        ] {
            let e = validate(a, LIMITS).unwrap_err();
            assert!(matches!(e, OutboxError::InvalidTraceContext { .. }), "{a:?}: {e:?}");
            assert_eq!(e.sqlstate().code(), "22023");
            assert!(e.hint().unwrap().contains("00-<32"), "{:?}", e.hint());
        }
    }

    #[test]
    fn payload_over_the_limit_is_refused_with_54000() {
        let big = format!("\"{}\"", "x".repeat(999));
        let e = validate(EmitArgs { payload: PayloadArg::Json(Some(&big)), ..args() }, LIMITS).unwrap_err();
        assert_eq!(e, OutboxError::PayloadTooLarge { size: 1001, max: 1000 });
        assert_eq!(e.sqlstate().code(), "54000");
        let fits = format!("\"{}\"", "x".repeat(998));
        assert!(validate(EmitArgs { payload: PayloadArg::Json(Some(&fits)), ..args() }, LIMITS).is_ok());
        // Bytes count as themselves.
        let data = vec![0u8; 1001];
        let bin = PayloadArg::Bytes { data: Some(&data), content_type: Some("a/b") };
        assert_eq!(validate(EmitArgs { payload: bin, ..args() }, LIMITS).unwrap_err(), OutboxError::PayloadTooLarge { size: 1001, max: 1000 });
        let bin = PayloadArg::Bytes { data: Some(&data[..1000]), content_type: Some("a/b") };
        assert!(validate(EmitArgs { payload: bin, ..args() }, LIMITS).is_ok());
    }

    /// The record of `args()` in `plain`: 36 of overhead, key "o-1" (3), value `{"a": 1}` (8),
    /// headers id (1 + 2 + 1 + 36), type (1 + 4 + 1 + 12), aggregatetype (1 + 13 + 1 + 5), and
    /// the position at its longest: commit_lsn (1 + 10 + 1 + 20) and commit_index (1 + 12 + 1 + 20).
    const ARGS_RECORD: usize = 36 + 3 + 8 + 40 + 18 + 20 + 32 + 34;
    /// The same in `cloudevents`: ce_specversion (1 + 14 + 1 + 3), ce_id (1 + 5 + 1 + 36),
    /// ce_source (1 + 9 + 1 + 16), ce_type (1 + 7 + 1 + 12), ce_subject (1 + 10 + 1 + 3), ce_time
    /// (1 + 7 + 1 + 27), content-type (1 + 12 + 1 + 16), ce_aggregatetype (1 + 16 + 1 + 5),
    /// ce_commitlsn (1 + 12 + 1 + 20), ce_commitindex (1 + 14 + 1 + 20).
    const CE_RECORD: usize = 36 + 3 + 8 + 19 + 43 + 27 + 21 + 15 + 36 + 30 + 23 + 34 + 36;

    #[test]
    fn every_part_of_the_record_counts_against_max_record_bytes() {
        let at = |max| EmitLimits { max_record_bytes: max, ..LIMITS };
        assert!(validate(args(), at(ARGS_RECORD)).is_ok());
        let e = validate(args(), at(ARGS_RECORD - 1)).unwrap_err();
        assert_eq!(
            e,
            OutboxError::RecordTooLarge { size: ARGS_RECORD, max: ARGS_RECORD - 1, key: 3, value: 8, headers: 144 }
        );
        assert_eq!(e.sqlstate().code(), "54000");
        assert!(e.hint().is_some());
        // One more byte in any part: key, value, type, aggregatetype, a header name or value;
        // and the trace context of the settings.
        let header = r#"{"k": "v"}"#;
        let with_header = ARGS_RECORD + 1 + 1 + 1 + 1;
        let traced = TraceSettings { traceparent: Some(TRACEPARENT_A), tracestate: Some("k=v") };
        // traceparent (1 + 11 + 1 + 55), tracestate (1 + 10 + 1 + 3).
        let with_trace = ARGS_RECORD + 68 + 15;
        for (part, a, size) in [
            ("key", EmitArgs { aggregateid: Some("o-12"), ..args() }, ARGS_RECORD + 1),
            ("value", EmitArgs { payload: PayloadArg::Json(Some(r#"{"a": 12}"#)), ..args() }, ARGS_RECORD + 1),
            ("type", EmitArgs { event_type: Some("OrderCreatedX"), ..args() }, ARGS_RECORD + 1),
            ("aggregatetype", EmitArgs { aggregatetype: Some("orders"), ..args() }, ARGS_RECORD + 1),
            ("headers", EmitArgs { headers: Some(header), ..args() }, with_header),
            ("trace context", EmitArgs { trace: traced, ..args() }, with_trace),
        ] {
            assert!(validate(a, at(size)).is_ok(), "{part} at the limit");
            let e = validate(a, at(size - 1)).unwrap_err();
            assert!(matches!(e, OutboxError::RecordTooLarge { .. }), "{part} one byte over: {e:?}");
        }
        // A tombstone has no value; bytes have their content-type: 3 bytes typed a/b are value
        // 3 and content-type (1 + 12 + 1 + 3).
        let tombstone = ARGS_RECORD - 8;
        assert!(validate(EmitArgs { payload: PayloadArg::Tombstone, ..args() }, at(tombstone)).is_ok());
        assert!(validate(EmitArgs { payload: PayloadArg::Tombstone, ..args() }, at(tombstone - 1)).is_err());
        let binary = ARGS_RECORD - 8 + 3 + 17;
        assert!(validate(EmitArgs { payload: bytes(b"abc", "a/b"), ..args() }, at(binary)).is_ok());
        assert!(validate(EmitArgs { payload: bytes(b"abc", "a/b"), ..args() }, at(binary - 1)).is_err());
    }

    #[test]
    fn a_cloudevents_record_counts_its_own_headers() {
        let at = |max| EmitLimits { max_record_bytes: max, ..CLOUDEVENTS };
        assert!(validate(args(), at(CE_RECORD)).is_ok());
        let e = validate(args(), at(CE_RECORD - 1)).unwrap_err();
        assert_eq!(e, OutboxError::RecordTooLarge { size: CE_RECORD, max: CE_RECORD - 1, key: 3, value: 8, headers: 284 });
        // The key counts twice (also ce_subject), the source, and the trace context twice
        // (ce_traceparent: 1 + 14 + 1 + 55; ce_tracestate: 1 + 13 + 1 + 3).
        let traced = TraceSettings { traceparent: Some(TRACEPARENT_A), tracestate: Some("k=v") };
        let source = EmitLimits { cloudevents_source: "/outbox_ext/tests", ..CLOUDEVENTS };
        for (part, a, limits, size) in [
            ("key", EmitArgs { aggregateid: Some("o-12"), ..args() }, CLOUDEVENTS, CE_RECORD + 2),
            ("source", args(), source, CE_RECORD + 1),
            ("trace context", EmitArgs { trace: traced, ..args() }, CLOUDEVENTS, CE_RECORD + 68 + 15 + 71 + 18),
        ] {
            assert!(validate(a, EmitLimits { max_record_bytes: size, ..limits }).is_ok(), "{part} at the limit");
            let e = validate(a, EmitLimits { max_record_bytes: size - 1, ..limits }).unwrap_err();
            assert!(matches!(e, OutboxError::RecordTooLarge { .. }), "{part} one byte over: {e:?}");
        }
        // A tombstone has no content-type (it has no data): value 8 and 30 less.
        let tombstone = CE_RECORD - 8 - 30;
        assert!(validate(EmitArgs { payload: PayloadArg::Tombstone, ..args() }, at(tombstone)).is_ok());
        assert!(validate(EmitArgs { payload: PayloadArg::Tombstone, ..args() }, at(tombstone - 1)).is_err());
    }

    #[test]
    fn sealed_messages_open_only_with_their_key_and_transaction() {
        let key = RecordKey::new(&[3; crate::auth::KEY_LEN]);
        let ev = validate(args(), LIMITS).unwrap();
        let message = seal(&key, 1000, &[9; 16], &ev);
        assert_eq!(message[0], FORMAT_VERSION);
        assert_eq!(&message[SEAL_LEN..], encode(&[9; 16], &ev).as_slice());
        let back = open(&key, 1000, &message).unwrap();
        assert_eq!((back.id, back.aggregateid), ([9; 16], "o-1"));
        // The same bytes in another transaction, or under another installation's key.
        assert_eq!(open(&key, 1001, &message), Err(DecodeError::BadTag));
        assert_eq!(open(&RecordKey::new(&[4; 32]), 1000, &message), Err(DecodeError::BadTag));
        // Any byte changed, the tag included.
        for i in 1..message.len() {
            let mut m = message.clone();
            m[i] ^= 0x80;
            assert_eq!(open(&key, 1000, &m), Err(DecodeError::BadTag), "byte {i}");
        }
        // Format 1 (version byte, then the record), other versions, short messages.
        let mut format1 = vec![UNAUTHENTICATED_FORMAT];
        format1.extend_from_slice(&encode(&[9; 16], &ev));
        assert_eq!(open(&key, 1000, &format1), Err(DecodeError::Unauthenticated));
        assert_eq!(open(&key, 1000, &[7, 0, 0]), Err(DecodeError::UnknownVersion(7)));
        assert_eq!(open(&key, 1000, &message[..SEAL_LEN - 1]), Err(DecodeError::Truncated));
        assert_eq!(open(&key, 1000, &[]), Err(DecodeError::Truncated));
    }

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        let ev = validate(EmitArgs { headers: Some(r#"{"h": "v"}"#), ..args() }, LIMITS).unwrap();
        let body = encode(&[1; 16], &ev);
        for cut in 0..body.len() {
            assert!(decode(&body[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        let mut extra = body.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(DecodeError::TrailingBytes));
        let mut kind = body.clone();
        kind[16] = 3;
        assert_eq!(decode(&kind), Err(DecodeError::UnknownKind(3)));
        // A forged header count must not allocate gigabytes.
        let no_headers = encode(&[1; 16], &validate(args(), LIMITS).unwrap());
        let mut forged = no_headers[..no_headers.len() - 4].to_vec();
        forged.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&forged), Err(DecodeError::Truncated));
    }
}
