//! Event → Kafka record: the topic template, the key and the headers.
//!
//! | record part | value |
//! |---|---|
//! | topic | `outbox.topic` with `{database}` and `{aggregatetype}` replaced |
//! | key | aggregateid, UTF-8 |
//! | value | the payload's JSON text |
//! | headers | `id`, `type`, `aggregatetype`, then the event's own headers |
//! | timestamp | the commit time of the emitting transaction |

use crate::error::OutboxError;
use crate::event::EventRef;
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

/// The headers of the Kafka record for an event, in order. `id_text` is the hyphenated id.
pub fn record_headers<'a>(event: &'a EventRef<'a>, id_text: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut headers = Vec::with_capacity(3 + event.headers.len());
    headers.push(("id", id_text));
    headers.push(("type", event.event_type));
    headers.push(("aggregatetype", event.aggregatetype));
    headers.extend(event.headers.iter().copied());
    headers
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
pub fn record_size<'a>(key: &str, value: &str, headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    let headers: usize = headers
        .into_iter()
        .map(|(name, value)| varint_len(name.len()) + name.len() + varint_len(value.len()) + value.len())
        .sum();
    RECORD_OVERHEAD + key.len() + value.len() + headers
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
        assert_eq!(record_size("o-1", "{}", [("id", id)]), 36 + 3 + 2 + 40);
        // A length of 63 takes one varint byte, 64 two (zig-zag doubles it), 8192 three.
        for (len, varint) in [(0, 1), (63, 1), (64, 2), (8191, 2), (8192, 3), (1_048_575, 3), (1_048_576, 4)] {
            let value = "v".repeat(len);
            assert_eq!(record_size("", "", [("h", value.as_str())]), 36 + 2 + varint + len, "{len}");
        }
        assert_eq!(record_size("", "", []), RECORD_OVERHEAD);
    }

    #[test]
    fn timestamps_convert_from_the_postgres_epoch() {
        assert_eq!(pg_timestamp_to_unix_ms(0), 946_684_800_000);
        assert_eq!(pg_timestamp_to_unix_ms(1_999), 946_684_800_001);
        assert_eq!(pg_timestamp_to_unix_ms(-1), 946_684_799_999);
    }

    #[test]
    fn headers_come_in_record_order() {
        let ev = EventRef {
            id: [0; 16],
            aggregatetype: "order",
            aggregateid: "o-1",
            event_type: "OrderCreated",
            payload: "{}",
            headers: vec![("trace", "t1")],
        };
        let id = id_text(&ev);
        assert_eq!(
            record_headers(&ev, &id),
            vec![
                ("id", "00000000-0000-0000-0000-000000000000"),
                ("type", "OrderCreated"),
                ("aggregatetype", "order"),
                ("trace", "t1")
            ]
        );
    }
}
