//! The librdkafka producer configuration: defaults, then `outbox.kafka_properties`, then the
//! settings outbox_ext's guarantees depend on.
//!
//! `outbox.kafka_properties` holds `key=value;key=value`. Its values may be secrets (SASL
//! passwords, private keys), so no error or log line made here ever contains a value: errors
//! name the key or the position only.

use std::fmt;

/// Producer settings that apply unless `outbox.kafka_properties` says otherwise.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "outbox_ext"),
    // The Java client's partitioner, so that a key lands on the partition where a Java
    // producer (Debezium, Kafka Connect) would put it.
    ("partitioner", "murmur2_random"),
    // Bound what librdkafka buffers, so that the relay's memory stays flat while it drains a
    // backlog (librdkafka's default allows about 1 GB): with outbox.decoding_work_mem, a relay
    // stays under 64 MB. 8 MB in flight drains more than 340,000 events/s (BENCHMARKS.md).
    ("queue.buffering.max.kbytes", "8192"),
    // librdkafka's per-record overhead (headers, bookkeeping) is not in the kbytes limit: cap
    // the count too (librdkafka's default is 100,000).
    ("queue.buffering.max.messages", "10000"),
    // Batches fill by themselves under load; a short linger keeps an idle relay's latency low.
    ("linger.ms", "1"),
];

/// Settings the relay's guarantees rest on; a user value that contradicts them is refused.
/// Idempotence keeps each partition free of duplicates from retries and in order; the gapless
/// guarantee turns any failure that would leave a gap (a later record written, an earlier one
/// failed) into a fatal error, after which the relay resends from the slot in order.
pub const REQUIRED: &[(&str, &str)] =
    &[("enable.idempotence", "true"), ("enable.gapless.guarantee", "true")];

/// Keys that the relay sets from other GUCs and that `outbox.kafka_properties` cannot set.
/// `message.max.bytes` is `outbox.max_record_bytes`, the limit `outbox.emit()` enforces, so that
/// librdkafka never refuses for its size a record that emit accepted.
pub const OWNED_ELSEWHERE: &[(&str, &str)] = &[
    ("bootstrap.servers", "outbox.bootstrap_servers"),
    ("message.max.bytes", "outbox.max_record_bytes"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsError {
    /// Entry number `index` (1-based) has no `=`.
    MissingEquals { index: usize },
    /// An entry has an empty key.
    EmptyKey { index: usize },
    /// The key is set by another GUC.
    OwnedElsewhere { key: String, guc: &'static str },
    /// The key would weaken a guarantee.
    Required { key: String, required: &'static str },
    /// `acks` other than `all`/`-1`, which idempotence needs.
    Acks,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingsError::MissingEquals { index } => {
                write!(f, "outbox.kafka_properties: entry {index} is not of the form key=value")
            }
            SettingsError::EmptyKey { index } => {
                write!(f, "outbox.kafka_properties: entry {index} has an empty key")
            }
            SettingsError::OwnedElsewhere { key, guc } => {
                write!(f, "outbox.kafka_properties: \"{key}\" is set with {guc}, not here")
            }
            SettingsError::Required { key, required } => write!(
                f,
                "outbox.kafka_properties: \"{key}\" must stay \"{required}\"; outbox_ext's delivery guarantees depend on it"
            ),
            SettingsError::Acks => write!(
                f,
                "outbox.kafka_properties: \"acks\" must be \"all\" (the idempotent producer needs it)"
            ),
        }
    }
}

impl std::error::Error for SettingsError {}

/// Splits on `;`, except where it is escaped as `\;` (and `\\` is a backslash).
fn split_entries(text: &str) -> Vec<String> {
    let mut entries = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next @ (';' | '\\')) => entries.last_mut().unwrap().push(next),
                Some(other) => {
                    let e = entries.last_mut().unwrap();
                    e.push('\\');
                    e.push(other);
                }
                None => entries.last_mut().unwrap().push('\\'),
            },
            ';' => entries.push(String::new()),
            c => entries.last_mut().unwrap().push(c),
        }
    }
    entries
}

/// Parses `key=value;key=value`. A `;` inside a value is written `\;`. Whitespace around keys
/// and values is trimmed; empty entries (as left by a trailing `;`) are skipped.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, SettingsError> {
    let mut out = Vec::new();
    for (i, entry) in split_entries(text).iter().enumerate() {
        let index = i + 1;
        if entry.trim().is_empty() {
            continue;
        }
        let (key, value) = entry.split_once('=').ok_or(SettingsError::MissingEquals { index })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(SettingsError::EmptyKey { index });
        }
        out.push((key.to_string(), value.trim().to_string()));
    }
    Ok(out)
}

/// The whole producer configuration, in the order it should be applied.
pub fn producer_config(
    bootstrap_servers: &str,
    kafka_properties: &str,
    max_record_bytes: usize,
) -> Result<Vec<(String, String)>, SettingsError> {
    let user = parse_properties(kafka_properties)?;
    let mut config: Vec<(String, String)> =
        DEFAULTS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for (key, value) in user {
        if let Some((_, guc)) = OWNED_ELSEWHERE.iter().find(|(k, _)| *k == key) {
            return Err(SettingsError::OwnedElsewhere { key, guc });
        }
        if let Some((_, required)) = REQUIRED.iter().find(|(k, _)| *k == key) {
            if !value.eq_ignore_ascii_case(required) {
                return Err(SettingsError::Required { key, required });
            }
        }
        if (key == "acks" || key == "request.required.acks")
            && !(value.eq_ignore_ascii_case("all") || value == "-1")
        {
            return Err(SettingsError::Acks);
        }
        config.retain(|(k, _)| *k != key);
        config.push((key, value));
    }
    config.push(("bootstrap.servers".into(), bootstrap_servers.to_string()));
    config.push(("message.max.bytes".into(), max_record_bytes.to_string()));
    for (k, v) in REQUIRED {
        config.retain(|(key, _)| key != k);
        config.push((k.to_string(), v.to_string()));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1_000_000;

    fn get<'a>(c: &'a [(String, String)], k: &str) -> Option<&'a str> {
        c.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn user_settings_override_defaults_and_required_ones_win() {
        let c = producer_config(
            "b1:9092,b2:9092",
            " security.protocol = SASL_SSL ; sasl.password=s3cret ;linger.ms=0;",
            MAX,
        )
        .unwrap();
        assert_eq!(get(&c, "bootstrap.servers"), Some("b1:9092,b2:9092"));
        assert_eq!(get(&c, "security.protocol"), Some("SASL_SSL"));
        assert_eq!(get(&c, "linger.ms"), Some("0"));
        assert_eq!(get(&c, "enable.idempotence"), Some("true"));
        assert_eq!(get(&c, "partitioner"), Some("murmur2_random"));
        assert_eq!(c.iter().filter(|(k, _)| k == "linger.ms").count(), 1);
    }

    #[test]
    fn semicolons_in_values_are_escaped() {
        let p = parse_properties(r"sasl.password=a\;b=c\\d;linger.ms=1").unwrap();
        assert_eq!(
            p,
            vec![
                ("sasl.password".to_string(), r"a;b=c\d".to_string()),
                ("linger.ms".to_string(), "1".to_string())
            ]
        );
    }

    #[test]
    fn errors_never_contain_values() {
        let secret = "hunter2-very-secret";
        for text in [
            format!("sasl.password{secret}"),
            format!("=x;sasl.password={secret};enable.idempotence=false"),
            format!("sasl.password={secret};enable.idempotence=false"),
            format!("sasl.password={secret};acks=1"),
            format!("sasl.password={secret};bootstrap.servers=x"),
            format!("sasl.password={secret};message.max.bytes=5"),
        ] {
            let e = producer_config("b:1", &text, MAX).unwrap_err();
            assert!(!e.to_string().contains(secret), "{e}");
            assert!(!format!("{e:?}").contains(secret), "{e:?}");
        }
    }

    #[test]
    fn idempotence_and_acks_cannot_be_weakened() {
        assert!(matches!(
            producer_config("b:1", "enable.idempotence=false", MAX),
            Err(SettingsError::Required { .. })
        ));
        assert_eq!(producer_config("b:1", "acks=1", MAX), Err(SettingsError::Acks));
        assert!(producer_config("b:1", "acks=all;enable.idempotence=TRUE", MAX).is_ok());
    }

    #[test]
    fn message_max_bytes_is_max_record_bytes() {
        assert_eq!(get(&producer_config("b:1", "", 12_345).unwrap(), "message.max.bytes"), Some("12345"));
        assert_eq!(
            producer_config("b:1", "message.max.bytes=2000000", MAX),
            Err(SettingsError::OwnedElsewhere { key: "message.max.bytes".into(), guc: "outbox.max_record_bytes" })
        );
    }

    #[test]
    fn empty_properties_give_defaults() {
        let c = producer_config("b:1", "", MAX).unwrap();
        assert_eq!(get(&c, "queue.buffering.max.kbytes"), Some("8192"));
        assert_eq!(parse_properties(" ; ;").unwrap(), vec![]);
        assert_eq!(parse_properties("a"), Err(SettingsError::MissingEquals { index: 1 }));
        assert_eq!(parse_properties("a=1;=2"), Err(SettingsError::EmptyKey { index: 2 }));
    }
}
