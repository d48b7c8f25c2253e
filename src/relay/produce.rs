//! The librdkafka producer. Records are handed over on the worker's main thread; delivery
//! reports come back through `BaseProducer::poll` on that same thread and are passed on over a
//! crossbeam channel, so no Postgres code ever runs on a librdkafka thread.

use crossbeam_channel::{Receiver, Sender};
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
    Delivery { seq: TxnSeq, error: Option<String> },
    /// A client-level error (all brokers down, authentication, fatal idempotence error).
    Client { message: String, fatal: bool },
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

fn redact(text: &str, secrets: &[String]) -> String {
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
fn is_secret_key(key: &str) -> bool {
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

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
        let _ = self.reports.send(Report::Client { message: self.redact(reason), fatal });
    }
}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let error = match result {
            Ok(_) => None,
            Err((e, m)) => Some(self.redact(&format!("{} (topic {})", e, m.topic()))),
        };
        let _ = self.reports.send(Report::Delivery { seq: seq as TxnSeq, error });
    }
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
        Ok(KafkaProducer { producer, reports: rx })
    }

    /// Hands one record to librdkafka (which copies it). On a full queue the caller should
    /// poll and try again.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &str,
        headers: &[(&str, &str)],
        timestamp_ms: i64,
        seq: TxnSeq,
    ) -> Result<(), Result<QueueFull, String>> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let record = BaseRecord::with_opaque_to(topic, seq as usize)
            .key(key)
            .payload(payload)
            .timestamp(timestamp_ms)
            .headers(h);
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Err(Ok(QueueFull)),
            Err((e, _)) => Err(Err(e.to_string())),
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
}
