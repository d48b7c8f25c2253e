//! Event → Kafka record: the topic template, the key and the headers.
//!
//! | record part | value |
//! |---|---|
//! | topic | `outbox.topic` with `{database}` and `{aggregatetype}` replaced |
//! | key | aggregateid, UTF-8 |
//! | value | the payload's JSON text, the bytes of `emit_binary`, or none (a tombstone) |
//! | headers | by `outbox.record_format`, see [`record_headers`] |
//! | timestamp | the commit time of the emitting transaction |

use crate::error::OutboxError;
use crate::event::{EventRef, Value};
use crate::time::Rfc3339Micros;
use crate::trace_context::{TRACEPARENT, TRACESTATE};
use crate::uuid7;

/// The placeholders that `outbox.topic` may contain.
pub const AGGREGATETYPE_PLACEHOLDER: &str = "{aggregatetype}";
pub const DATABASE_PLACEHOLDER: &str = "{database}";

/// Kafka's limit on topic name length.
pub const MAX_TOPIC_LEN: usize = 249;

/// The template of one database: `{database}` replaced by its name. Both `emit` (to check the
/// topic) and the database's relay (to route) apply it once, so the two always agree.
pub fn database_template(template: &str, database: &str) -> String {
    template.replace(DATABASE_PLACEHOLDER, database)
}

/// The topic for an aggregatetype under a database's template (Debezium's
/// `outbox.event.{aggregatetype}` by default).
pub fn topic_for(template: &str, aggregatetype: &str) -> String {
    template.replace(AGGREGATETYPE_PLACEHOLDER, aggregatetype)
}

/// Kafka's rules for topic names: `[A-Za-z0-9._-]`, 1 to 249 characters, not `.` or `..`.
pub fn check_topic(topic: &str) -> Result<(), OutboxError> {
    let illegal = |reason| Err(OutboxError::IllegalTopic { topic: topic.to_string(), reason });
    if topic.is_empty() {
        return illegal("it is empty");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return illegal("it is longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return illegal("\".\" and \"..\" are reserved");
    }
    if !topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return illegal("it contains characters other than ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod database_tests {
    use super::*;

    #[test]
    fn the_database_placeholder_is_replaced_once_per_database() {
        let t = database_template("{database}.outbox.{aggregatetype}", "orders");
        assert_eq!(topic_for(&t, "Order"), "orders.outbox.Order");
        // The default template has no {database}: topics keep their names.
        assert_eq!(topic_for(&database_template("outbox.event.{aggregatetype}", "x"), "Order"), "outbox.event.Order");
        // A database name that Kafka refuses makes the topic illegal, which emit reports.
        assert!(check_topic(&topic_for(&database_template("{database}.{aggregatetype}", "my db"), "a")).is_err());
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A PostgreSQL `TimestampTz` (µs since 2000-01-01) as Kafka's timestamp (ms since 1970).
pub fn pg_timestamp_to_unix_ms(ts: i64) -> i64 {
    (ts + PG_EPOCH_OFFSET_US).div_euclid(1000)
}

/// A PostgreSQL `TimestampTz` as microseconds since the Unix epoch.
pub fn pg_timestamp_to_unix_us(ts: i64) -> i64 {
    ts.saturating_add(PG_EPOCH_OFFSET_US)
}

/// Where an event stands among its database's events: the LSN of its transaction's commit
/// record, then its 0-based index among that transaction's committed events in emit order
/// (events rolled back to a savepoint take none). Ordered as the relay produces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit_lsn: u64,
    pub commit_index: u64,
}

/// Header names of an event's position (see [`Position`]), decimal integers.
pub const COMMIT_LSN_HEADER: &str = "commit_lsn";
pub const COMMIT_INDEX_HEADER: &str = "commit_index";

/// The longest decimal text of a position header's value (u64::MAX), for emit's size check.
pub const MAX_POSITION_TEXT: &str = "18446744073709551615";

/// A u64 as decimal text, on the stack: the relay formats two per event.
#[derive(Clone, Copy)]
pub struct Decimal {
    digits: [u8; 20],
    start: u8,
}

impl Decimal {
    pub fn new(mut n: u64) -> Decimal {
        let mut digits = [0u8; 20];
        let mut start = 20;
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Decimal { digits, start: start as u8 }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.digits[self.start as usize..]).unwrap_or("0")
    }
}

/// A position's header values.
#[derive(Clone, Copy)]
pub struct PositionText {
    pub commit_lsn: Decimal,
    pub commit_index: Decimal,
}

impl PositionText {
    pub fn new(position: Position) -> PositionText {
        PositionText { commit_lsn: Decimal::new(position.commit_lsn), commit_index: Decimal::new(position.commit_index) }
    }
}

/// The media type of a JSON payload, and the header that carries a value's media type (in
/// `cloudevents` mode, CloudEvents' `datacontenttype`).
pub const CONTENT_TYPE_HEADER: &str = "content-type";
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The prefix of CloudEvents attributes in Kafka headers (binary content mode).
pub const CLOUDEVENTS_PREFIX: &str = "ce_";

/// The CloudEvents headers, in the order the relay writes them. Extension names follow the
/// spec's naming rule: lower-case ASCII letters and digits, at most 20.
pub mod ce {
    pub const SPECVERSION: &str = "ce_specversion";
    pub const ID: &str = "ce_id";
    pub const SOURCE: &str = "ce_source";
    pub const TYPE: &str = "ce_type";
    pub const SUBJECT: &str = "ce_subject";
    pub const TIME: &str = "ce_time";
    pub const AGGREGATETYPE: &str = "ce_aggregatetype";
    pub const COMMIT_LSN: &str = "ce_commitlsn";
    pub const COMMIT_INDEX: &str = "ce_commitindex";
    pub const TRACEPARENT: &str = "ce_traceparent";
    pub const TRACESTATE: &str = "ce_tracestate";
    /// The only CloudEvents version there is.
    pub const SPECVERSION_1_0: &str = "1.0";
}

/// `outbox.record_format`: how a record carries the event's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// Plain headers, as Debezium's outbox event router makes them.
    Plain,
    /// CloudEvents 1.0, Kafka protocol binding, binary content mode.
    CloudEvents,
}

/// What a record's envelope needs beyond the event: nothing in `plain`; in `cloudevents`, the
/// source and the commit time as `ce_time`.
#[derive(Clone, Copy)]
pub enum Envelope<'a> {
    Plain,
    CloudEvents { source: &'a str, time: Rfc3339Micros },
}

/// `outbox.cloudevents_source`'s default: the database, under the extension's name.
pub const DEFAULT_CLOUDEVENTS_SOURCE: &str = "/outbox_ext/{database}";

/// The longest `outbox.cloudevents_source` after `{database}` is replaced.
pub const MAX_CLOUDEVENTS_SOURCE_LEN: usize = 255;

/// Checks `outbox.cloudevents_source` after `{database}` is replaced: a non-empty URI
/// reference (RFC 3986 characters, no spaces), at most [`MAX_CLOUDEVENTS_SOURCE_LEN`] bytes.
pub fn check_cloudevents_source(source: &str) -> Result<(), String> {
    if source.is_empty() {
        return Err("it is empty; CloudEvents requires a source".into());
    }
    if source.len() > MAX_CLOUDEVENTS_SOURCE_LEN {
        return Err(format!("it is {} bytes, more than {MAX_CLOUDEVENTS_SOURCE_LEN}", source.len()));
    }
    let uri_char = |b: u8| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b);
    if !source.bytes().all(uri_char) {
        return Err("it has characters a URI reference cannot have (spaces, quotes, non-ASCII: percent-encode them)".into());
    }
    Ok(())
}

/// The headers of the Kafka record for an event, in order. `id_text` is the hyphenated id.
///
/// | `plain` | `cloudevents` |
/// |---|---|
/// | | `ce_specversion` = `1.0` |
/// | `id` | `ce_id` |
/// | | `ce_source` |
/// | `type` | `ce_type` |
/// | | `ce_subject` = aggregateid |
/// | | `ce_time` = commit time, RFC 3339 in UTC, microseconds |
/// | `content-type` for bytes | `content-type`: `application/json`, or the bytes' (none for a tombstone) |
/// | `aggregatetype` | `ce_aggregatetype` |
/// | `commit_lsn`, `commit_index` | `ce_commitlsn`, `ce_commitindex` |
/// | the event's own headers (with `traceparent`, `tracestate`) | the same |
/// | | `ce_traceparent`, `ce_tracestate`: copies of the trace context |
pub fn record_headers<'a>(
    event: &'a EventRef<'a>,
    id_text: &'a str,
    position: &'a PositionText,
    envelope: &'a Envelope<'a>,
) -> Vec<(&'a str, &'a str)> {
    let content_type = match event.value {
        Value::Json(_) => Some(JSON_CONTENT_TYPE),
        Value::Tombstone => None,
        Value::Bytes { content_type, .. } => Some(content_type),
    };
    match envelope {
        Envelope::Plain => {
            let mut headers = Vec::with_capacity(6 + event.headers.len());
            headers.push(("id", id_text));
            headers.push(("type", event.event_type));
            headers.push(("aggregatetype", event.aggregatetype));
            headers.push((COMMIT_LSN_HEADER, position.commit_lsn.as_str()));
            headers.push((COMMIT_INDEX_HEADER, position.commit_index.as_str()));
            if let (Value::Bytes { .. }, Some(content_type)) = (event.value, content_type) {
                headers.push((CONTENT_TYPE_HEADER, content_type));
            }
            headers.extend(event.headers.iter().copied());
            headers
        }
        Envelope::CloudEvents { source, time } => {
            let mut headers = Vec::with_capacity(12 + event.headers.len());
            headers.push((ce::SPECVERSION, ce::SPECVERSION_1_0));
            headers.push((ce::ID, id_text));
            headers.push((ce::SOURCE, *source));
            headers.push((ce::TYPE, event.event_type));
            headers.push((ce::SUBJECT, event.aggregateid));
            headers.push((ce::TIME, time.as_str()));
            if let Some(content_type) = content_type {
                headers.push((CONTENT_TYPE_HEADER, content_type));
            }
            headers.push((ce::AGGREGATETYPE, event.aggregatetype));
            headers.push((ce::COMMIT_LSN, position.commit_lsn.as_str()));
            headers.push((ce::COMMIT_INDEX, position.commit_index.as_str()));
            headers.extend(event.headers.iter().copied());
            // CloudEvents' distributed-tracing extension, the same context as the plain headers.
            for (name, copy) in [(TRACEPARENT, ce::TRACEPARENT), (TRACESTATE, ce::TRACESTATE)] {
                if let Some((_, v)) = event.headers.iter().find(|(k, _)| *k == name) {
                    headers.push((copy, v));
                }
            }
            headers
        }
    }
}

/// The event id and position a record carries, by header name in either format: what the
/// tail reader of exactly once looks for.
pub fn is_id_header(name: &str) -> bool {
    name == "id" || name == ce::ID
}
pub fn is_commit_lsn_header(name: &str) -> bool {
    name == COMMIT_LSN_HEADER || name == ce::COMMIT_LSN
}
pub fn is_commit_index_header(name: &str) -> bool {
    name == COMMIT_INDEX_HEADER || name == ce::COMMIT_INDEX
}

/// What librdkafka adds to key, value and headers when it sizes a record against
/// `message.max.bytes` (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`): the largest varints of the record's
/// length (5), attributes (1), timestamp delta (10), offset delta (5), key length (5), value
/// length (5) and header count (5).
pub const RECORD_OVERHEAD: usize = 36;

/// The length of a header name or value's length as the record carries it: a zig-zag varint.
fn varint_len(n: usize) -> usize {
    let mut zigzag = (n as u64) << 1;
    let mut len = 1;
    while zigzag >= 0x80 {
        zigzag >>= 7;
        len += 1;
    }
    len
}

/// The size librdkafka gives a record when it checks it against `message.max.bytes`
/// (`rd_kafka_msg_max_wire_size`): [`RECORD_OVERHEAD`], key, value, and for each header its name
/// and value with their varint lengths. A record of exactly `message.max.bytes` is accepted.
pub fn record_size<'a>(key: &str, value_len: usize, headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    let headers: usize = headers
        .into_iter()
        .map(|(name, value)| varint_len(name.len()) + name.len() + varint_len(value.len()) + value.len())
        .sum();
    RECORD_OVERHEAD + key.len() + value_len + headers
}

/// The hyphenated form of an event id, for the `id` header.
pub fn id_text(event: &EventRef<'_>) -> String {
    uuid7::to_hyphenated(&event.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_follows_debezium() {
        assert_eq!(topic_for("outbox.event.{aggregatetype}", "order"), "outbox.event.order");
        assert_eq!(topic_for("all-events", "order"), "all-events");
        assert_eq!(topic_for("{aggregatetype}.{aggregatetype}", "a"), "a.a");
    }

    #[test]
    fn topic_rules() {
        assert!(check_topic("outbox.event.Order_v2-x").is_ok());
        assert!(check_topic(&"a".repeat(249)).is_ok());
        for bad in ["", ".", "..", "a b", "a/b", "ä", "a\u{0}", &"a".repeat(250)] {
            assert!(check_topic(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn record_size_is_librdkafkas() {
        // 36 of overhead, key 3, value 2, and the header "id" (1 + 2 + 1 + 36 bytes).
        let id = "00000000-0000-0000-0000-000000000000";
        assert_eq!(record_size("o-1", 2, [("id", id)]), 36 + 3 + 2 + 40);
        // A length of 63 takes one varint byte, 64 two (zig-zag doubles it), 8192 three.
        for (len, varint) in [(0, 1), (63, 1), (64, 2), (8191, 2), (8192, 3), (1_048_575, 3), (1_048_576, 4)] {
            let value = "v".repeat(len);
            assert_eq!(record_size("", 0, [("h", value.as_str())]), 36 + 2 + varint + len, "{len}");
        }
        assert_eq!(record_size("", 0, []), RECORD_OVERHEAD);
    }

    #[test]
    fn timestamps_convert_from_the_postgres_epoch() {
        assert_eq!(pg_timestamp_to_unix_ms(0), 946_684_800_000);
        assert_eq!(pg_timestamp_to_unix_ms(1_999), 946_684_800_001);
        assert_eq!(pg_timestamp_to_unix_ms(-1), 946_684_799_999);
    }

    fn event(value: Value<'static>, headers: Vec<(&'static str, &'static str)>) -> EventRef<'static> {
        EventRef { id: [0; 16], aggregatetype: "order", aggregateid: "o-1", event_type: "OrderCreated", value, headers }
    }

    #[test]
    fn headers_come_in_record_order() {
        let ev = event(Value::Json("{}"), vec![("trace", "t1")]);
        let id = id_text(&ev);
        let position = PositionText::new(Position { commit_lsn: 0x1_0000_0028, commit_index: 7 });
        assert_eq!(
            record_headers(&ev, &id, &position, &Envelope::Plain),
            vec![
                ("id", "00000000-0000-0000-0000-000000000000"),
                ("type", "OrderCreated"),
                ("aggregatetype", "order"),
                ("commit_lsn", "4294967336"),
                ("commit_index", "7"),
                ("trace", "t1")
            ]
        );
        // Bytes say what they are; a tombstone has no value to describe.
        let bytes = event(Value::Bytes { data: b"\0\0", content_type: "application/avro" }, vec![]);
        assert_eq!(record_headers(&bytes, &id, &position, &Envelope::Plain)[5], ("content-type", "application/avro"));
        let tombstone = event(Value::Tombstone, vec![]);
        assert_eq!(record_headers(&tombstone, &id, &position, &Envelope::Plain).len(), 5);
    }

    #[test]
    fn cloudevents_headers_follow_the_kafka_binding() {
        let traced = vec![("x", "1"), ("traceparent", "00-a-b-01"), ("tracestate", "k=v")];
        let ev = event(Value::Json("{}"), traced);
        let id = id_text(&ev);
        let position = PositionText::new(Position { commit_lsn: 40, commit_index: 0 });
        let envelope = Envelope::CloudEvents { source: "/outbox_ext/shop", time: Rfc3339Micros::new(1_795_519_506_789_012) };
        assert_eq!(
            record_headers(&ev, &id, &position, &envelope),
            vec![
                ("ce_specversion", "1.0"),
                ("ce_id", "00000000-0000-0000-0000-000000000000"),
                ("ce_source", "/outbox_ext/shop"),
                ("ce_type", "OrderCreated"),
                ("ce_subject", "o-1"),
                ("ce_time", "2026-11-24T11:25:06.789012Z"),
                ("content-type", "application/json"),
                ("ce_aggregatetype", "order"),
                ("ce_commitlsn", "40"),
                ("ce_commitindex", "0"),
                ("x", "1"),
                ("traceparent", "00-a-b-01"),
                ("tracestate", "k=v"),
                ("ce_traceparent", "00-a-b-01"),
                ("ce_tracestate", "k=v"),
            ]
        );
        // Attribute names: lower-case letters and digits, at most 20 (the spec's naming rule).
        for (name, _) in record_headers(&ev, &id, &position, &envelope) {
            if let Some(attribute) = name.strip_prefix(CLOUDEVENTS_PREFIX) {
                assert!(attribute.len() <= 20 && attribute.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{name}");
            }
        }
        let tombstone = event(Value::Tombstone, vec![]);
        let headers = record_headers(&tombstone, &id, &position, &envelope);
        assert!(headers.iter().all(|(k, _)| *k != "content-type"), "{headers:?}");
        let bytes = event(Value::Bytes { data: b"\0", content_type: "application/x-protobuf" }, vec![]);
        assert!(record_headers(&bytes, &id, &position, &envelope).contains(&("content-type", "application/x-protobuf")));
    }

    #[test]
    fn cloudevents_sources_are_uri_references() {
        for good in ["/outbox_ext/shop", "https://example.com/db?x=1#f", "urn:uuid:123", "a%20b"] {
            assert_eq!(check_cloudevents_source(good), Ok(()), "{good}");
        }
        for bad in ["", "a b", "é", "\"q\"", &"a".repeat(256)] {
            assert!(check_cloudevents_source(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn decimals_are_exact_at_the_edges() {
        for n in [0, 1, 9, 10, 99, 100, 4_294_967_295, 4_294_967_296, u64::MAX - 1, u64::MAX] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
        assert_eq!(Decimal::new(u64::MAX).as_str(), MAX_POSITION_TEXT);
    }

    #[test]
    fn positions_order_by_commit_then_index() {
        let p = |commit_lsn, commit_index| Position { commit_lsn, commit_index };
        assert!(p(100, 5) < p(101, 0));
        assert!(p(100, 0) < p(100, 1));
    }
}
