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
    pub value: String,
    pub headers: Vec<(String, String)>,
    pub timestamp_ms: i64,
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
    headers.push((TIME.into(), rfc3339_utc_ms(unix_ms)));
    headers
}

/// `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_utc_ms(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, ms) =
        (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{ms:03}Z")
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The event behind a record the relay made (see `routing::record_headers`): the first three
/// headers are `id`, `type` and `aggregatetype`, then its position (`commit_lsn`,
/// `commit_index`; records made before the relay wrote them have none), the rest are the
/// event's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFields<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub aggregatetype: &'a str,
    pub headers: &'a [(String, String)],
}

impl<'a> EventFields<'a> {
    /// None if the headers are not the relay's (which cannot happen for a record it made).
    pub fn of_record(headers: &'a [(String, String)]) -> Option<EventFields<'a>> {
        match headers {
            [(id, id_v), (ty, ty_v), (at, at_v), rest @ ..] if id == "id" && ty == "type" && at == "aggregatetype" => {
                let rest = match rest {
                    [(lsn, _), (index, _), own @ ..]
                        if lsn == crate::routing::COMMIT_LSN_HEADER && index == crate::routing::COMMIT_INDEX_HEADER =>
                    {
                        own
                    }
                    own => own,
                };
                Some(EventFields { id: id_v, event_type: ty_v, aggregatetype: at_v, headers: rest })
            }
            _ => None,
        }
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
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(1_795_519_506_789), "2026-11-24T11:25:06.789Z");
        assert_eq!(rfc3339_utc_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_utc_ms(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

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
            value: "{}".into(),
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

    #[test]
    fn event_fields_come_back_from_the_record() {
        let h: Vec<(String, String)> = [("id", "0190"), ("type", "T"), ("aggregatetype", "order"), ("a", "1"), ("b", "\"")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let f = EventFields::of_record(&h).unwrap();
        assert_eq!((f.id, f.event_type, f.aggregatetype), ("0190", "T", "order"));
        assert_eq!(f.headers_json(), r#"{"a":"1","b":"\""}"#);
        assert!(EventFields::of_record(&h[1..]).is_none());
        // The position is the record's, not the event's: a redelivered event gets a new one.
        let mut with_position = h.clone();
        with_position.insert(3, ("commit_lsn".into(), "123".into()));
        with_position.insert(4, ("commit_index".into(), "0".into()));
        assert_eq!(EventFields::of_record(&with_position), EventFields::of_record(&h));
    }
}
