//! Dead letters: what becomes of an event that Kafka refuses for good when
//! `outbox.on_permanent_error = dead_letter`.
//!
//! The relay first produces the refused record to the dead-letter topic, unchanged (key, value,
//! headers, timestamp), with [`HEADERS`] appended that say why. If the dead-letter topic refuses
//! it as well, the event goes into the table `outbox.dead_letter`; [`EventFields`] recovers the
//! event's columns from the record.

/// What the relay does with an event Kafka refuses for good (`outbox.on_permanent_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPermanentError {
    /// Stop at the event (`delivery_error`) until an operator acts: nothing after it is sent.
    Stop,
    /// Set the event aside (dead-letter topic, else table) and carry on.
    DeadLetter,
}

/// The header names a dead-lettered record carries in addition to its own, in this order.
pub const HEADERS: [&str; 4] = [ERROR_CODE, ERROR_MESSAGE, ORIGINAL_TOPIC, TIME];
/// Kafka's error code (librdkafka's number: a broker error's protocol code, or a negative local code).
pub const ERROR_CODE: &str = "outbox.dead_letter.error_code";
/// Kafka's error message, for example "Broker: Topic authorization failed".
pub const ERROR_MESSAGE: &str = "outbox.dead_letter.error_message";
/// The topic that refused the record.
pub const ORIGINAL_TOPIC: &str = "outbox.dead_letter.topic";
/// When the relay set the record aside, RFC 3339 in UTC with milliseconds.
pub const TIME: &str = "outbox.dead_letter.time";

/// The prefix of [`HEADERS`]: `emit` refuses event headers under it, so that a dead-lettered
/// record's reasons are never ambiguous.
pub const RESERVED_PREFIX: &str = "outbox.dead_letter.";

/// Why a record was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: i32,
    pub message: String,
    pub topic: String,
}

/// A Kafka record as the relay made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub key: String,
    pub value: RecordValue,
    pub headers: Vec<(String, String)>,
    pub timestamp_ms: i64,
}

/// A record's value, owned, by the kind of event it came from (the table keeps each kind in
/// its own column, and redelivery writes the same kind again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordValue {
    Json(String),
    Tombstone,
    Bytes(Vec<u8>),
}

impl RecordValue {
    pub fn of(value: &crate::event::Value<'_>) -> RecordValue {
        match *value {
            crate::event::Value::Json(text) => RecordValue::Json(text.to_string()),
            crate::event::Value::Tombstone => RecordValue::Tombstone,
            crate::event::Value::Bytes { data, .. } => RecordValue::Bytes(data.to_vec()),
        }
    }

    /// The record's value: None for a tombstone.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            RecordValue::Json(text) => Some(text.as_bytes()),
            RecordValue::Tombstone => None,
            RecordValue::Bytes(data) => Some(data),
        }
    }

    /// Whether the value holds bytes from `emit_binary` (they travel as such through librdkafka).
    pub fn is_binary(&self) -> bool {
        matches!(self, RecordValue::Bytes(_))
    }

    /// What librdkafka gives back, `binary` as the relay marked it when producing.
    pub fn from_kafka(value: Option<&[u8]>, binary: bool) -> RecordValue {
        match value {
            None => RecordValue::Tombstone,
            Some(data) if binary => RecordValue::Bytes(data.to_vec()),
            // The relay only produces JSON text as a non-binary value.
            Some(data) => RecordValue::Json(String::from_utf8_lossy(data).into_owned()),
        }
    }
}

/// A refused record on its way to the dead-letter topic or table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event's number in the delivery tracker: it stays outstanding until the dead letter
    /// is stored.
    pub seq: u64,
    /// The original record.
    pub record: Record,
    /// Why its topic refused it.
    pub refusal: Refusal,
    /// Why the dead-letter topic refused it too (then it goes into the table).
    pub dead_letter_error: Option<String>,
}

impl DeadLetter {
    /// The event's id, from the record's `id` header ("?" for a record the relay did not make).
    pub fn event_id(&self) -> &str {
        EventFields::of_record(&self.record.headers).map_or("?", |f| f.id)
    }

    /// The dead-letter copy (`copy`, made with [`dead_letter_headers`]) of an event was refused
    /// for good as well, with `why`: the original record and refusal again, for the table.
    pub fn refused_again(seq: u64, copy: Record, why: String) -> DeadLetter {
        let header = |name: &str| copy.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let refusal = Refusal {
            code: header(ERROR_CODE).and_then(|c| c.parse().ok()).unwrap_or(-1),
            message: header(ERROR_MESSAGE).unwrap_or_default(),
            topic: header(ORIGINAL_TOPIC).unwrap_or_default(),
        };
        let mut record = copy;
        record.headers.retain(|(k, _)| !k.starts_with(RESERVED_PREFIX));
        record.topic = refusal.topic.clone();
        DeadLetter { seq, record, refusal, dead_letter_error: Some(why) }
    }
}

/// The headers of the dead-letter record: the original ones, then the reasons, set aside at
/// `unix_ms`.
pub fn dead_letter_headers(original: &[(String, String)], refusal: &Refusal, unix_ms: i64) -> Vec<(String, String)> {
    let mut headers = original.to_vec();
    headers.push((ERROR_CODE.into(), refusal.code.to_string()));
    headers.push((ERROR_MESSAGE.into(), refusal.message.clone()));
    headers.push((ORIGINAL_TOPIC.into(), refusal.topic.clone()));
    headers.push((TIME.into(), crate::time::rfc3339_utc_ms(unix_ms)));
    headers
}


/// The event behind a record the relay made (see `routing::record_headers`), in either record
/// format: its id, type and aggregatetype, the content type of a binary value, and its own
/// headers (everything that is not the relay's: the position, the CloudEvents attributes and
/// copies, `content-type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFields<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub aggregatetype: &'a str,
    pub content_type: Option<&'a str>,
    pub headers: Vec<&'a (String, String)>,
}

impl<'a> EventFields<'a> {
    /// None if the headers are not the relay's (which cannot happen for a record it made).
    pub fn of_record(headers: &'a [(String, String)]) -> Option<EventFields<'a>> {
        use crate::routing::{ce, CONTENT_TYPE_HEADER};
        let find = |plain: &str, cloudevents: &str| {
            headers.iter().find(|(k, _)| k == plain || k == cloudevents).map(|(_, v)| v.as_str())
        };
        Some(EventFields {
            id: find("id", ce::ID)?,
            event_type: find("type", ce::TYPE)?,
            aggregatetype: find("aggregatetype", ce::AGGREGATETYPE)?,
            content_type: find(CONTENT_TYPE_HEADER, CONTENT_TYPE_HEADER),
            headers: headers.iter().filter(|(k, _)| !crate::event::is_reserved_header(k)).collect(),
        })
    }

    /// The event's own headers as the JSON object `emit` took.
    pub fn headers_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> =
            self.headers.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        serde_json::Value::Object(map).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_keep_the_originals_and_add_the_reasons() {
        let original = vec![("id".to_string(), "x".to_string()), ("trace".to_string(), "t".to_string())];
        let refusal = Refusal { code: 29, message: "Broker: Topic authorization failed".into(), topic: "outbox.event.a".into() };
        let h = dead_letter_headers(&original, &refusal, 0);
        let names: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["id", "trace", ERROR_CODE, ERROR_MESSAGE, ORIGINAL_TOPIC, TIME]);
        assert_eq!(h[2].1, "29");
        assert_eq!(h[4].1, "outbox.event.a");
        assert!(HEADERS.iter().all(|h| h.starts_with(RESERVED_PREFIX)));
    }

    #[test]
    fn a_refused_copy_gives_back_the_original() {
        let original = Record {
            topic: "outbox.event.a".into(),
            key: "k".into(),
            value: RecordValue::Bytes(vec![0, 1]),
            headers: vec![("id".into(), "1".into()), ("trace".into(), "t".into())],
            timestamp_ms: 5,
        };
        let refusal = Refusal { code: 10, message: "Broker: Message size too large".into(), topic: original.topic.clone() };
        let copy = Record {
            topic: "outbox.dead_letter".into(),
            headers: dead_letter_headers(&original.headers, &refusal, 7),
            ..original.clone()
        };
        let dead = DeadLetter::refused_again(3, copy, "too large".into());
        assert_eq!(dead, DeadLetter { seq: 3, record: original, refusal, dead_letter_error: Some("too large".into()) });
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn event_fields_come_back_from_the_record() {
        let h = owned(&[("id", "0190"), ("type", "T"), ("aggregatetype", "order"), ("a", "1"), ("b", "\"")]);
        let f = EventFields::of_record(&h).unwrap();
        assert_eq!((f.id, f.event_type, f.aggregatetype, f.content_type), ("0190", "T", "order", None));
        assert_eq!(f.headers_json(), r#"{"a":"1","b":"\""}"#);
        assert!(EventFields::of_record(&h[1..]).is_none());
        // The position is the record's, not the event's: a redelivered event gets a new one.
        let mut with_position = h.clone();
        with_position.insert(3, ("commit_lsn".into(), "123".into()));
        with_position.insert(4, ("commit_index".into(), "0".into()));
        assert_eq!(EventFields::of_record(&with_position), EventFields::of_record(&h));
    }

    #[test]
    fn event_fields_come_back_from_a_cloudevents_record() {
        let h = owned(&[
            ("ce_specversion", "1.0"),
            ("ce_id", "0190"),
            ("ce_source", "/outbox_ext/db"),
            ("ce_type", "T"),
            ("ce_subject", "k"),
            ("ce_time", "2026-01-01T00:00:00.000000Z"),
            ("content-type", "application/avro"),
            ("ce_aggregatetype", "order"),
            ("ce_commitlsn", "1"),
            ("ce_commitindex", "0"),
            ("a", "1"),
            ("traceparent", "00-x"),
            ("ce_traceparent", "00-x"),
        ]);
        let f = EventFields::of_record(&h).unwrap();
        assert_eq!((f.id, f.event_type, f.aggregatetype, f.content_type), ("0190", "T", "order", Some("application/avro")));
        assert_eq!(f.headers_json(), r#"{"a":"1","traceparent":"00-x"}"#);
    }

    #[test]
    fn values_come_back_as_their_kind() {
        assert_eq!(RecordValue::from_kafka(None, false), RecordValue::Tombstone);
        assert_eq!(RecordValue::from_kafka(Some(b"{}"), false), RecordValue::Json("{}".into()));
        assert_eq!(RecordValue::from_kafka(Some(b"{}"), true), RecordValue::Bytes(b"{}".to_vec()));
        for v in [RecordValue::Tombstone, RecordValue::Json("1".into()), RecordValue::Bytes(vec![0xff])] {
            assert_eq!(RecordValue::from_kafka(v.bytes(), v.is_binary()), v);
        }
    }
}
