//! The outbox event: what `outbox.emit()` accepts, how it is checked, and its WAL wire format.
//!
//! An event travels through WAL as the body of one transactional logical-decoding message
//! under the prefix [`MESSAGE_PREFIX`]:
//!
//! ```text
//! u8        format version (2)
//! [u8; 16]  tag that authenticates the record (see auth.rs)
//! record:
//!   [u8; 16]  event id (UUIDv7)
//!   u32 LE    length of aggregatetype, then its UTF-8 bytes
//!   u32 LE    length of aggregateid,   then its UTF-8 bytes
//!   u32 LE    length of type,          then its UTF-8 bytes
//!   u32 LE    length of payload,       then the payload's JSON text
//!   u32 LE    number of headers, then for each: u32 LE key length, key, u32 LE value length, value
//! ```
//!
//! [`seal`] writes a message, [`open`] checks its tag and reads it. Format 1 (the version byte
//! followed directly by the record, before records were authenticated) is refused. [`decode`]
//! borrows from the message, so the relay never copies an event before handing it to
//! librdkafka.

use crate::auth::{RecordKey, TAG_LEN};
use crate::error::OutboxError;
use crate::routing;

/// The logical-decoding message prefix that marks outbox_ext events in WAL.
pub const MESSAGE_PREFIX: &str = "outbox_ext";

/// Version byte at the start of every message `emit` writes.
pub const FORMAT_VERSION: u8 = 2;

/// The format before records were authenticated; no longer relayed.
pub const UNAUTHENTICATED_FORMAT: u8 = 1;

/// Bytes before the record: the version and the tag.
const SEAL_LEN: usize = 1 + TAG_LEN;

/// Header names that outbox_ext sets itself on every Kafka record.
pub const RESERVED_HEADERS: [&str; 5] =
    ["id", "type", "aggregatetype", routing::COMMIT_LSN_HEADER, routing::COMMIT_INDEX_HEADER];

/// What the caller of `outbox.emit()` passed, with SQL NULL as `None`.
#[derive(Debug, Clone, Copy)]
pub struct EmitArgs<'a> {
    pub aggregatetype: Option<&'a str>,
    pub aggregateid: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// The payload's JSON text (as jsonb prints it).
    pub payload: Option<&'a str>,
    /// The headers object's JSON text, or `None` for SQL NULL (no extra headers).
    pub headers: Option<&'a str>,
}

/// Limits that come from configuration at emit time.
#[derive(Debug, Clone, Copy)]
pub struct EmitLimits<'a> {
    pub max_payload_bytes: usize,
    /// The largest Kafka record (key, value and headers as the relay sends them, sized as
    /// librdkafka sizes them against `message.max.bytes`).
    pub max_record_bytes: usize,
    pub topic_template: &'a str,
}

/// An event that passed validation, ready to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEvent<'a> {
    pub aggregatetype: &'a str,
    pub aggregateid: &'a str,
    pub event_type: &'a str,
    pub payload: &'a str,
    pub headers: Vec<(String, String)>,
}

/// A decoded event, borrowing from the WAL message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef<'a> {
    pub id: [u8; 16],
    pub aggregatetype: &'a str,
    pub aggregateid: &'a str,
    pub event_type: &'a str,
    pub payload: &'a str,
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
    let payload = args.payload.ok_or(OutboxError::NullArgument { argument: "payload" })?;

    let topic = routing::topic_for(limits.topic_template, aggregatetype);
    routing::check_topic(&topic)?;

    if payload.len() > limits.max_payload_bytes {
        return Err(OutboxError::PayloadTooLarge {
            size: payload.len(),
            max: limits.max_payload_bytes,
        });
    }
    for (argument, value) in
        [("aggregatetype", aggregatetype), ("aggregateid", aggregateid), ("type", event_type)]
    {
        if value.len() > u32::MAX as usize {
            return Err(OutboxError::ArgumentTooLong { argument, size: value.len() });
        }
    }
    let headers = match args.headers {
        None => Vec::new(),
        Some(json) => parse_headers(json)?,
    };
    let event = ValidEvent { aggregatetype, aggregateid, event_type, payload, headers };
    check_record_size(&event, limits.max_record_bytes)?;
    Ok(event)
}

/// The record the relay will make of `event` (see `routing::record_headers`) must fit
/// `max_record_bytes`, so that librdkafka and the broker never refuse it for its size.
fn check_record_size(event: &ValidEvent<'_>, max_record_bytes: usize) -> Result<(), OutboxError> {
    // The id header is the hyphenated UUID: 36 characters, whatever the id. The position is
    // not known before commit: counted at its longest, so the relay can always send the record.
    const ID_TEXT: &str = "00000000-0000-0000-0000-000000000000";
    let headers = [
        ("id", ID_TEXT),
        ("type", event.event_type),
        ("aggregatetype", event.aggregatetype),
        (routing::COMMIT_LSN_HEADER, routing::MAX_POSITION_TEXT),
        (routing::COMMIT_INDEX_HEADER, routing::MAX_POSITION_TEXT),
    ]
    .into_iter()
    .chain(event.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let size = routing::record_size(event.aggregateid, event.payload, headers);
    if size > max_record_bytes {
        let (key, value) = (event.aggregateid.len(), event.payload.len());
        return Err(OutboxError::RecordTooLarge {
            size,
            max: max_record_bytes,
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
        if RESERVED_HEADERS.contains(&key.as_str()) || key.starts_with(crate::dead_letter::RESERVED_PREFIX) {
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
    match message.first() {
        None => return Err(DecodeError::Truncated),
        Some(&FORMAT_VERSION) => {}
        Some(&UNAUTHENTICATED_FORMAT) => return Err(DecodeError::Unauthenticated),
        Some(&other) => return Err(DecodeError::UnknownVersion(other)),
    }
    if message.len() < SEAL_LEN {
        return Err(DecodeError::Truncated);
    }
    let (tag, record) = (&message[1..SEAL_LEN], &message[SEAL_LEN..]);
    if !key.verify(xid, record, tag) {
        return Err(DecodeError::BadTag);
    }
    decode(record)
}

fn record_len(event: &ValidEvent<'_>) -> usize {
    let strings = [event.aggregatetype, event.aggregateid, event.event_type, event.payload];
    let header_bytes: usize = event.headers.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    16 + strings.iter().map(|s| 4 + s.len()).sum::<usize>() + 4 + header_bytes
}

/// The record of a validated event with its id (the part of the message after the tag).
pub fn encode(id: &[u8; 16], event: &ValidEvent<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(record_len(event));
    encode_into(&mut buf, id, event);
    buf
}

fn encode_into(buf: &mut Vec<u8>, id: &[u8; 16], event: &ValidEvent<'_>) {
    let start = buf.len();
    let strings = [event.aggregatetype, event.aggregateid, event.event_type, event.payload];
    buf.extend_from_slice(id);
    for s in strings {
        put_str(buf, s);
    }
    buf.extend_from_slice(&(event.headers.len() as u32).to_le_bytes());
    for (k, v) in &event.headers {
        put_str(buf, k);
        put_str(buf, v);
    }
    debug_assert_eq!(buf.len() - start, record_len(event));
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
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

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::NotUtf8)
    }
}

/// Decodes a record made by [`encode`] (only [`open`] knows whether to trust it).
pub fn decode(record: &[u8]) -> Result<EventRef<'_>, DecodeError> {
    let mut r = Reader { buf: record };
    let mut id = [0u8; 16];
    id.copy_from_slice(r.take(16)?);
    let aggregatetype = r.str()?;
    let aggregateid = r.str()?;
    let event_type = r.str()?;
    let payload = r.str()?;
    let count = r.u32()? as usize;
    // Each header needs at least 8 bytes, which bounds the allocation for forged counts.
    if count > r.buf.len() / 8 {
        return Err(DecodeError::Truncated);
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        headers.push((r.str()?, r.str()?));
    }
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(EventRef { id, aggregatetype, aggregateid, event_type, payload, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: EmitLimits<'static> = EmitLimits {
        max_payload_bytes: 1000,
        max_record_bytes: 1_000_000,
        topic_template: "outbox.event.{aggregatetype}",
    };

    fn args() -> EmitArgs<'static> {
        EmitArgs {
            aggregatetype: Some("order"),
            aggregateid: Some("o-1"),
            event_type: Some("OrderCreated"),
            payload: Some(r#"{"a": 1}"#),
            headers: None,
        }
    }

    #[test]
    fn valid_event_round_trips_through_the_wire_format() {
        let a = EmitArgs { headers: Some(r#"{"traceparent": "00-ab", "x": "ü"}"#), ..args() };
        let ev = validate(a, LIMITS).unwrap();
        let id = [7u8; 16];
        let body = encode(&id, &ev);
        let back = decode(&body).unwrap();
        assert_eq!(back.id, id);
        assert_eq!(back.aggregatetype, "order");
        assert_eq!(back.aggregateid, "o-1");
        assert_eq!(back.event_type, "OrderCreated");
        assert_eq!(back.payload, r#"{"a": 1}"#);
        assert_eq!(back.headers, vec![("traceparent", "00-ab"), ("x", "ü")]);
    }

    #[test]
    fn nulls_are_refused_with_22004() {
        for (name, a) in [
            ("aggregatetype", EmitArgs { aggregatetype: None, ..args() }),
            ("aggregateid", EmitArgs { aggregateid: None, ..args() }),
            ("type", EmitArgs { event_type: None, ..args() }),
            ("payload", EmitArgs { payload: None, ..args() }),
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
        ] {
            assert_eq!(validate(a, LIMITS).unwrap_err().sqlstate().code(), "22023");
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
        for reserved in RESERVED_HEADERS.into_iter().chain(crate::dead_letter::HEADERS) {
            let h = format!(r#"{{"{reserved}": "x"}}"#);
            assert!(validate(EmitArgs { headers: Some(&h), ..args() }, LIMITS).is_err());
        }
        // JSON null and the empty object mean no extra headers.
        assert!(validate(EmitArgs { headers: Some("null"), ..args() }, LIMITS).unwrap().headers.is_empty());
        assert!(validate(EmitArgs { headers: Some("{}"), ..args() }, LIMITS).unwrap().headers.is_empty());
    }

    #[test]
    fn payload_over_the_limit_is_refused_with_54000() {
        let big = format!("\"{}\"", "x".repeat(999));
        let e = validate(EmitArgs { payload: Some(&big), ..args() }, LIMITS).unwrap_err();
        assert_eq!(e, OutboxError::PayloadTooLarge { size: 1001, max: 1000 });
        assert_eq!(e.sqlstate().code(), "54000");
        let fits = format!("\"{}\"", "x".repeat(998));
        assert!(validate(EmitArgs { payload: Some(&fits), ..args() }, LIMITS).is_ok());
    }

    /// The record of `args()`: 36 of overhead, key "o-1" (3), value `{"a": 1}` (8), headers id
    /// (1 + 2 + 1 + 36), type (1 + 4 + 1 + 12), aggregatetype (1 + 13 + 1 + 5), and the
    /// position at its longest: commit_lsn (1 + 10 + 1 + 20) and commit_index (1 + 12 + 1 + 20).
    const ARGS_RECORD: usize = 36 + 3 + 8 + 40 + 18 + 20 + 32 + 34;

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
        // One more byte in any part: key, value, type, aggregatetype, a header name or value.
        let header = r#"{"k": "v"}"#;
        let with_header = ARGS_RECORD + 1 + 1 + 1 + 1;
        for (part, a, size) in [
            ("key", EmitArgs { aggregateid: Some("o-12"), ..args() }, ARGS_RECORD + 1),
            ("value", EmitArgs { payload: Some(r#"{"a": 12}"#), ..args() }, ARGS_RECORD + 1),
            ("type", EmitArgs { event_type: Some("OrderCreatedX"), ..args() }, ARGS_RECORD + 1),
            ("aggregatetype", EmitArgs { aggregatetype: Some("orders"), ..args() }, ARGS_RECORD + 1),
            ("headers", EmitArgs { headers: Some(header), ..args() }, with_header),
        ] {
            assert!(validate(a, at(size)).is_ok(), "{part} at the limit");
            let e = validate(a, at(size - 1)).unwrap_err();
            assert!(matches!(e, OutboxError::RecordTooLarge { .. }), "{part} one byte over: {e:?}");
        }
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
        let ev = validate(args(), LIMITS).unwrap();
        let body = encode(&[1; 16], &ev);
        for cut in 0..body.len() {
            assert!(decode(&body[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        let mut extra = body.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(DecodeError::TrailingBytes));
        // A forged header count must not allocate gigabytes.
        let mut forged = body[..body.len() - 4].to_vec();
        forged.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&forged), Err(DecodeError::Truncated));
    }
}
