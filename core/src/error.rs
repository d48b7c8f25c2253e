//! One error type for everything a caller of `outbox.emit()` can get wrong, or that the server
//! is not ready for. Each variant carries the SQLSTATE it is reported with; the extension maps
//! [`SqlState`] onto pgrx's error codes in exactly one place (`src/error.rs`).

use std::fmt;

/// The SQLSTATE classes outbox_ext reports. Kept as our own enum so that this crate stays free
/// of pgrx; `code()` gives the five-character SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlState {
    /// 22004 null_value_not_allowed
    NullValueNotAllowed,
    /// 22023 invalid_parameter_value
    InvalidParameterValue,
    /// 54000 program_limit_exceeded
    ProgramLimitExceeded,
    /// 55000 object_not_in_prerequisite_state
    ObjectNotInPrerequisiteState,
    /// 53400 configuration_limit_exceeded
    ConfigurationLimitExceeded,
}

impl SqlState {
    pub fn code(self) -> &'static str {
        match self {
            SqlState::NullValueNotAllowed => "22004",
            SqlState::InvalidParameterValue => "22023",
            SqlState::ProgramLimitExceeded => "54000",
            SqlState::ObjectNotInPrerequisiteState => "55000",
            SqlState::ConfigurationLimitExceeded => "53400",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxError {
    /// An argument of `outbox.emit()` was SQL NULL.
    NullArgument { argument: &'static str },
    /// aggregatetype, aggregateid or type was the empty string.
    EmptyArgument { argument: &'static str },
    /// The topic that `outbox.topic` makes of this aggregatetype is not a legal Kafka topic.
    IllegalTopic { topic: String, reason: &'static str },
    /// `headers` was not a JSON object whose values are all strings, or used a reserved name.
    InvalidHeaders { reason: String },
    /// `outbox.traceparent`/`outbox.tracestate`, or the `traceparent`/`tracestate` header, is
    /// not W3C Trace Context (`source` names which).
    InvalidTraceContext { source: &'static str, reason: String },
    /// `emit_binary`'s content_type is not a media type.
    InvalidContentType { reason: String },
    /// The payload (JSON text or bytes) is longer than `outbox.max_payload_bytes`.
    PayloadTooLarge { size: usize, max: usize },
    /// The Kafka record the relay would make of the event (key, value and headers, as librdkafka
    /// sizes it) is larger than `outbox.max_record_bytes`.
    RecordTooLarge { size: usize, max: usize, key: usize, value: usize, headers: usize },
    /// A text argument is longer than the wire format can carry.
    ArgumentTooLong { argument: &'static str, size: usize },
    /// The library was not loaded through `shared_preload_libraries`.
    NotPreloaded,
    /// `wal_level` is below `logical`.
    WalLevelTooLow { current: String },
    /// The relay's replication slot does not exist (yet), so nothing would read the event.
    SlotMissing { database: String },
    /// The slot was invalidated (WAL it needed was removed).
    SlotInvalidated { slot: String },
    /// The relay has more WAL to get through than `outbox.max_pending_bytes` allows.
    TooMuchPending { pending: u64, max: u64 },
    /// The relay has not published this installation's record key (yet), so no event could be
    /// authenticated.
    KeyNotLoaded,
}

impl OutboxError {
    pub fn sqlstate(&self) -> SqlState {
        use OutboxError::*;
        match self {
            NullArgument { .. } => SqlState::NullValueNotAllowed,
            EmptyArgument { .. }
            | IllegalTopic { .. }
            | InvalidHeaders { .. }
            | InvalidTraceContext { .. }
            | InvalidContentType { .. } => {
                SqlState::InvalidParameterValue
            }
            PayloadTooLarge { .. } | RecordTooLarge { .. } | ArgumentTooLong { .. } => {
                SqlState::ProgramLimitExceeded
            }
            NotPreloaded
            | WalLevelTooLow { .. }
            | SlotMissing { .. }
            | SlotInvalidated { .. }
            | KeyNotLoaded => SqlState::ObjectNotInPrerequisiteState,
            TooMuchPending { .. } => SqlState::ConfigurationLimitExceeded,
        }
    }

    /// A hint telling the user what to do, where there is one.
    pub fn hint(&self) -> Option<String> {
        use OutboxError::*;
        match self {
            NotPreloaded => Some(
                "Add outbox_ext to shared_preload_libraries in postgresql.conf and restart PostgreSQL."
                    .into(),
            ),
            WalLevelTooLow { .. } => {
                Some("Set wal_level = logical in postgresql.conf and restart PostgreSQL.".into())
            }
            SlotMissing { .. } => Some(
                "The database's relay makes its slot within a few seconds of CREATE EXTENSION; \
                 check outbox.status() and the server log."
                    .into(),
            ),
            SlotInvalidated { .. } => Some(
                "The slot lost WAL it needed; see outbox.status() and the README section on slot invalidation."
                    .into(),
            ),
            KeyNotLoaded => Some(
                "If outbox.status() says update_required, run ALTER EXTENSION outbox_ext UPDATE; otherwise the relay is starting, or delivering the events of a dropped installation first: try again in a moment."
                    .into(),
            ),
            TooMuchPending { .. } => Some(
                "The relay is behind (see outbox.status(): state, last_error, pending_bytes); events can be emitted again once it catches up, or raise outbox.max_pending_bytes."
                    .into(),
            ),
            PayloadTooLarge { .. } => {
                Some("Raise outbox.max_payload_bytes (and the broker's message.max.bytes) or send a smaller payload.".into())
            }
            RecordTooLarge { .. } => Some(
                "Emit a smaller event, or raise outbox.max_record_bytes together with the topics' max.message.bytes on the brokers."
                    .into(),
            ),
            InvalidTraceContext { .. } => Some(format!(
                "A traceparent is {}, as OpenTelemetry formats it; a tracestate is key=value pairs separated by commas.",
                crate::trace_context::TRACEPARENT_FORM
            )),
            IllegalTopic { .. } => Some(
                "Kafka topic names use only ASCII letters, digits, '.', '_' and '-', at most 249 characters."
                    .into(),
            ),
            _ => None,
        }
    }
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use OutboxError::*;
        match self {
            NullArgument { argument } => write!(f, "outbox.emit(): {argument} must not be NULL"),
            EmptyArgument { argument } => write!(f, "outbox.emit(): {argument} must not be empty"),
            IllegalTopic { topic, reason } => {
                write!(f, "outbox.emit(): topic \"{}\" is not a legal Kafka topic name: {reason}", truncate_for_message(topic))
            }
            InvalidHeaders { reason } => write!(f, "outbox.emit(): invalid headers: {reason}"),
            InvalidTraceContext { source, reason } => write!(f, "outbox.emit(): {source} is not valid W3C trace context: {reason}"),
            InvalidContentType { reason } => write!(f, "outbox.emit_binary(): content_type {reason}"),
            PayloadTooLarge { size, max } => write!(
                f,
                "outbox.emit(): payload is {size} bytes, more than outbox.max_payload_bytes ({max})"
            ),
            RecordTooLarge { size, max, key, value, headers } => write!(
                f,
                "outbox.emit(): the Kafka record would be {size} bytes (key {key}, value {value}, headers {headers}, record overhead {}), more than outbox.max_record_bytes ({max})",
                crate::routing::RECORD_OVERHEAD
            ),
            ArgumentTooLong { argument, size } => {
                write!(f, "outbox.emit(): {argument} is {size} bytes, which is too long")
            }
            NotPreloaded => write!(f, "outbox_ext must be loaded via shared_preload_libraries"),
            WalLevelTooLow { current } => {
                write!(f, "outbox_ext requires wal_level = logical (current setting: {current})")
            }
            SlotMissing { database } => write!(
                f,
                "outbox_ext: database \"{database}\" has no relay replication slot, so no relay would read this event"
            ),
            SlotInvalidated { slot } => {
                write!(f, "outbox_ext: replication slot \"{slot}\" has been invalidated")
            }
            KeyNotLoaded => write!(
                f,
                "outbox_ext: the relay has not loaded this installation's record key, so the event could not be authenticated"
            ),
            TooMuchPending { pending, max } => write!(
                f,
                "outbox_ext: the relay has {pending} bytes of WAL still to deliver, more than outbox.max_pending_bytes ({max})"
            ),
        }
    }
}

impl std::error::Error for OutboxError {}

/// Keeps error messages readable when the offending value is huge.
fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_sqlstate_of_five_characters() {
        let all = [
            OutboxError::NullArgument { argument: "payload" },
            OutboxError::EmptyArgument { argument: "aggregateid" },
            OutboxError::IllegalTopic { topic: "a b".into(), reason: "x" },
            OutboxError::InvalidHeaders { reason: "x".into() },
            OutboxError::InvalidTraceContext { source: "outbox.traceparent", reason: "x".into() },
            OutboxError::InvalidContentType { reason: "x".into() },
            OutboxError::PayloadTooLarge { size: 2, max: 1 },
            OutboxError::RecordTooLarge { size: 2, max: 1, key: 0, value: 0, headers: 0 },
            OutboxError::ArgumentTooLong { argument: "type", size: 1 },
            OutboxError::NotPreloaded,
            OutboxError::WalLevelTooLow { current: "replica".into() },
            OutboxError::SlotMissing { database: "d".into() },
            OutboxError::SlotInvalidated { slot: "s".into() },
            OutboxError::TooMuchPending { pending: 2, max: 1 },
            OutboxError::KeyNotLoaded,
        ];
        for e in all {
            assert_eq!(e.sqlstate().code().len(), 5, "{e}");
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn long_topic_is_truncated_in_the_message() {
        let e = OutboxError::IllegalTopic { topic: "é".repeat(500), reason: "too long" };
        assert!(e.to_string().len() < 300);
    }
}
