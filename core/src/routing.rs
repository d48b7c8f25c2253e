//! Event → Kafka record: the topic template, the key and the headers.
//!
//! | record part | value |
//! |---|---|
//! | topic | `outbox.topic` with `{database}` and `{aggregatetype}` replaced |
//! | key | aggregateid, UTF-8 |
//! | value | the payload's JSON text |
//! | headers | `id`, `type`, `aggregatetype`, `commit_lsn`, `commit_index`, then the event's own headers |
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

/// The headers of the Kafka record for an event, in order. `id_text` is the hyphenated id.
pub fn record_headers<'a>(event: &'a EventRef<'a>, id_text: &'a str, position: &'a PositionText) -> Vec<(&'a str, &'a str)> {
    let mut headers = Vec::with_capacity(5 + event.headers.len());
    headers.push(("id", id_text));
    headers.push(("type", event.event_type));
    headers.push(("aggregatetype", event.aggregatetype));
    headers.push((COMMIT_LSN_HEADER, position.commit_lsn.as_str()));
    headers.push((COMMIT_INDEX_HEADER, position.commit_index.as_str()));
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
        let position = PositionText::new(Position { commit_lsn: 0x1_0000_0028, commit_index: 7 });
        assert_eq!(
            record_headers(&ev, &id, &position),
            vec![
                ("id", "00000000-0000-0000-0000-000000000000"),
                ("type", "OrderCreated"),
                ("aggregatetype", "order"),
                ("commit_lsn", "4294967336"),
                ("commit_index", "7"),
                ("trace", "t1")
            ]
        );
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
