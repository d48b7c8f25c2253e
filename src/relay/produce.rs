//! The librdkafka producer. Records are handed over on the worker's main thread; delivery
//! reports come back through `BaseProducer::poll` on that same thread and are passed on over a
//! crossbeam channel, so no Postgres code ever runs on a librdkafka thread.

use crossbeam_channel::{Receiver, Sender};
use outbox_core::dead_letter::{Record, RecordValue, Refusal};
use outbox_core::tracker::TxnSeq;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig};
use rdkafka::{ClientContext, Message};
use std::time::Duration;

/// What librdkafka tells the relay.
#[derive(Debug)]
pub enum Report {
    /// The record registered under `seq` was acknowledged (`error` is None) or failed.
    /// `dead_letter`: it was the dead-letter copy of a refused record (see [`KafkaProducer::send`]).
    /// Boxed: a poll can queue tens of thousands of reports, nearly all without an error.
    Delivery { seq: TxnSeq, dead_letter: bool, error: Option<Box<Failure>> },
    /// A client-level error (all brokers down, authentication, fatal idempotence error).
    Client { message: String },
}

struct RelayContext {
    reports: Sender<Report>,
    /// Values of secret-looking properties, cut out of every message before it is reported.
    secrets: Vec<String>,
}

impl RelayContext {
    fn redact(&self, text: &str) -> String {
        redact(text, &self.secrets)
    }
}

pub(super) fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.as_str(), "<hidden>");
        }
    }
    out
}

/// Property names whose values must never appear in a message: every SASL and TLS setting,
/// and anything that looks like a credential.
pub(super) fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.starts_with("sasl.")
        || k.starts_with("ssl.")
        || k.starts_with("ssl_")
        || ["password", "secret", "key", "token", "jaas", "pem", "credential"]
            .iter()
            .any(|s| k.contains(s))
}

impl ClientContext for RelayContext {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _message: &str) {
        // librdkafka's own log lines are not forwarded: they can name configuration values,
        // and errors reach the relay through `error` and delivery reports.
    }

    fn error(&self, _error: KafkaError, reason: &str) {
        // A fatal error arrives here with its underlying code; `KafkaProducer::fatal_error`
        // is how the relay tells it apart.
        let _ = self.reports.send(Report::Client { message: self.redact(reason) });
    }
}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (seq, dead_letter, binary) = unpack_opaque(opaque);
        let error = match result {
            Ok(_) => None,
            Err((e, m)) => {
                let mut failure = Failure::of(&event_id(m).unwrap_or_else(|| "?".into()), m.topic(), e);
                failure.message = self.redact(&failure.message);
                if failure.permanent {
                    // Kept only for records no retry can deliver: the dead-letter path needs them.
                    failure.record = Some(record_of(m, binary));
                }
                Some(Box::new(failure))
            }
        };
        let _ = self.reports.send(Report::Delivery { seq, dead_letter, error });
    }
}

/// Why Kafka did not take a record.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What happened, naming the event and topic, with secret values cut out.
    pub message: String,
    /// No retry can succeed (see [`is_permanent`]): the relay stops until an operator acts, or
    /// sets the record aside (`outbox.on_permanent_error`).
    pub permanent: bool,
    /// Kafka's reason: librdkafka's error code and its description.
    pub refusal: Refusal,
    /// The refused record, for a permanent failure reported by librdkafka.
    pub record: Option<Record>,
}

impl Failure {
    /// A failure that a rewind may get past (Kafka did not answer), described by `message`.
    pub fn passing(message: String, topic: &str) -> Failure {
        Failure {
            refusal: Refusal { code: -1, message: message.clone(), topic: topic.to_string() },
            message,
            permanent: false,
            record: None,
        }
    }

    /// Kafka refused event `id` for `topic` with `error`.
    pub fn of(id: &str, topic: &str, error: &KafkaError) -> Failure {
        let code = error.rdkafka_error_code();
        let reason = code.map(|c| c.to_string()).unwrap_or_else(|| error.to_string());
        Failure {
            message: format!("event {id} to topic {topic}: {reason}"),
            permanent: code.is_some_and(is_permanent),
            refusal: Refusal { code: code.map_or(-1, |c| c as i32), message: reason, topic: topic.to_string() },
            record: None,
        }
    }
}

/// The record librdkafka reports on, copied out of it; `binary` as it was sent.
fn record_of<M: Message>(m: &M, binary: bool) -> Record {
    use rdkafka::message::Headers;
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let headers =
        m.headers().map(|hs| hs.iter().map(|h| (h.key.to_string(), text(h.value))).collect()).unwrap_or_default();
    Record {
        topic: m.topic().to_string(),
        key: text(m.key()),
        value: RecordValue::from_kafka(m.payload(), binary),
        headers,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
    }
}

/// The opaque of a dead-letter copy has this bit set on top of its event's sequence number.
const DEAD_LETTER_BIT: usize = 1 << 63;
/// The value holds bytes from `emit_binary`, not JSON text (for the dead-letter table).
const BINARY_BIT: usize = 1 << 62;

fn pack_opaque(seq: TxnSeq, dead_letter: bool, binary: bool) -> usize {
    seq as usize | if dead_letter { DEAD_LETTER_BIT } else { 0 } | if binary { BINARY_BIT } else { 0 }
}

fn unpack_opaque(opaque: usize) -> (TxnSeq, bool, bool) {
    ((opaque & !(DEAD_LETTER_BIT | BINARY_BIT)) as TxnSeq, opaque & DEAD_LETTER_BIT != 0, opaque & BINARY_BIT != 0)
}

/// Errors for one record that resending the same bytes to the same cluster cannot fix: the
/// topic does not exist or may not be written, the record is too large or malformed, or the
/// broker's policy refuses it. Everything else (timeouts, leader changes, disconnects, a
/// fatal idempotence error) is retried by rewinding.
pub fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        UnknownTopicOrPartition
            | UnknownTopic
            | UnknownPartition
            | InvalidTopic
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | MessageSizeTooLarge
            | MessageBatchTooLarge
            | InvalidRecord
            | InvalidTimestamp
            | InvalidRequiredAcks
            | PolicyViolation
            | UnsupportedForMessageFormat
            | InvalidArgument
    )
}

/// The event id a record carries in its `id` (or, in the cloudevents format, `ce_id`) header.
fn event_id<M: Message>(message: &M) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    let id = headers.iter().find(|h| outbox_core::routing::is_id_header(h.key))?;
    id.value.map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Why a producer could not be made.
#[derive(Debug)]
pub enum ProducerError {
    /// librdkafka refused this property (unknown, or an invalid value).
    InvalidProperty { key: String },
    /// Anything else, with secret values cut out.
    Other(String),
}

pub struct KafkaProducer {
    producer: BaseProducer<RelayContext>,
    reports: Receiver<Report>,
    /// `outbox.bench_sink = instant` (feature `bench_sinks` only): acknowledge every record at
    /// once instead of handing it to librdkafka.
    pub instant_ack: bool,
}

/// A record the producer could not take because its queue is full.
pub struct QueueFull;

impl KafkaProducer {
    /// Builds a producer. The error never contains a property value.
    pub fn new(config: &[(String, String)]) -> Result<KafkaProducer, ProducerError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let secrets =
            config.iter().filter(|(k, _)| is_secret_key(k)).map(|(_, v)| v.clone()).collect::<Vec<_>>();
        let mut cc = ClientConfig::new();
        for (k, v) in config {
            cc.set(k, v);
        }
        let context = RelayContext { reports: tx, secrets: secrets.clone() };
        let producer = cc.create_with_context(context).map_err(|e| match e {
            KafkaError::ClientConfig(_, _, key, _) => ProducerError::InvalidProperty { key },
            other => ProducerError::Other(redact(
                &format!("could not create the Kafka producer: {other}"),
                &secrets,
            )),
        })?;
        Ok(KafkaProducer { producer, reports: rx, instant_ack: false })
    }

    /// Hands one record to librdkafka (which copies it), to `partition` or, if None, to the one
    /// librdkafka's partitioner picks; `value` None is a tombstone (a null value), and `binary`
    /// says it holds bytes rather than JSON text. On a full queue the caller should poll and
    /// try again. `dead_letter` marks the dead-letter copy of a refused record: its report says so.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        value: Option<&[u8]>,
        binary: bool,
        headers: &[(&str, &str)],
        timestamp_ms: i64,
        seq: TxnSeq,
        dead_letter: bool,
    ) -> Result<(), Result<QueueFull, KafkaError>> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        if cfg!(feature = "bench_sinks") && self.instant_ack {
            // The bench's ceiling N: everything up to here, and an acknowledgement at once.
            let _ = self.producer.context().reports.send(Report::Delivery { seq, dead_letter, error: None });
            return Ok(());
        }
        let mut record: BaseRecord<'_, str, [u8], usize> =
            BaseRecord::with_opaque_to(topic, pack_opaque(seq, dead_letter, binary));
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        let record = record.key(key).timestamp(timestamp_ms).headers(h);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(Ok(QueueFull)),
            Err((e, _)) => Err(Err(e)),
        }
    }

    /// Serves every librdkafka callback that is ready, on this thread, without waiting.
    /// rdkafka's poll serves one event per call when given no time (and spins on the clock
    /// during its last millisecond when given some), so call it until it yields no report.
    pub fn poll(&self) {
        for _ in 0..100_000 {
            let before = self.reports.len();
            self.producer.poll(Duration::ZERO);
            if self.reports.len() == before {
                break;
            }
        }
    }

    /// The fatal error this producer hit, if any: it cannot produce again and must be rebuilt.
    pub fn fatal_error(&self) -> Option<String> {
        let (code, reason) = self.producer.client().fatal_error()?;
        Some(format!("fatal producer error ({code}): {}", self.producer.context().redact(&reason)))
    }

    pub fn reports(&self) -> &Receiver<Report> {
        &self.reports
    }

    /// Fails everything queued or in flight; the reports arrive with the next polls.
    pub fn purge(&self) {
        self.producer.purge(PurgeConfig::default().queue().inflight());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_cut_out_of_messages() {
        let secrets = vec!["hunter2".to_string()];
        assert_eq!(redact("auth failed for hunter2", &secrets), "auth failed for <hidden>");
        assert!(is_secret_key("sasl.password"));
        assert!(is_secret_key("ssl.key.pem"));
        assert!(is_secret_key("sasl.oauthbearer.config"));
        assert!(!is_secret_key("linger.ms"));
    }

    #[test]
    fn reports_stay_small() {
        assert!(std::mem::size_of::<Report>() <= 32, "{}", std::mem::size_of::<Report>());
    }

    #[test]
    fn the_dead_letter_bit_round_trips() {
        for seq in [0, 1, 12345, (1 << 61) + 7] {
            for (dead_letter, binary) in [(false, false), (true, false), (false, true), (true, true)] {
                assert_eq!(unpack_opaque(pack_opaque(seq, dead_letter, binary)), (seq, dead_letter, binary));
            }
        }
    }
}
