//! The relay: one background worker per database with the extension (started by
//! `launcher.rs`), which decodes committed events from its database's replication slot,
//! produces them to Kafka and confirms the slot only through what Kafka acknowledged.
//!
//! * `worker.rs`  — the loop, its states, signals, backoff and confirmation
//! * `decode.rs`  — WAL message → event → Kafka record (the decoding sink)
//! * `tail.rs`    — what Kafka already holds: each partition's tail, read before producing
//! * `produce.rs` — the librdkafka producer and its delivery reports
//! * `slot.rs`    — the replication slot's lifetime: made, guarded, retired with the extension
//! * `key.rs`     — which key the relay opens its slot's records with
//! * `signals.rs` — SIGTERM and SIGHUP, latched, and the latch sleep
//! * `test_hooks.rs` — where a test build lets the end-to-end tests hold a relay

pub mod decode;
pub mod key;
pub mod produce;
pub mod signals;
pub mod slot;
pub mod tail;
pub mod test_hooks;
pub mod worker;

use crate::gucs;
use outbox_core::kafka_settings::{self, SettingsError};
use outbox_core::routing;
use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker};
use std::time::Duration;

/// How long the launcher waits before starting a database's relay again after it ended
/// without being told to (an ERROR, or an operator's pg_terminate_backend).
pub const RESTART_INTERVAL: Duration = Duration::from_secs(5);

/// The worker type every relay shows in `pg_stat_activity.backend_type`.
pub const RELAY_TYPE: &str = "outbox_ext relay";

/// Starts the relay of database `oid` (`name` for `pg_stat_activity`), telling this process
/// (the launcher) when it starts and stops. None if no background worker slot is free.
pub fn launch(oid: u32, name: &str) -> Option<DynamicBackgroundWorker> {
    let mut title = format!("outbox_ext relay {name}");
    while title.len() > 95 {
        title.pop();
    }
    BackgroundWorkerBuilder::new(&title)
        .set_type(RELAY_TYPE)
        .set_function("outbox_relay_main")
        .set_library("outbox_ext")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(crate::ffi::relay_argument(oid)))
        .set_notify_pid(crate::ffi::my_pid())
        .load_dynamic()
        .ok()
}

/// Where the relay sends events. Anything but Kafka exists only in a build with feature
/// `bench_sinks` (`outbox.bench_sink`), for `make bench`'s limits, and loses every event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchSink {
    Kafka,
    /// N, the ceiling: decoded, opened, routed and tracked; each record acknowledged at once
    /// instead of handed to librdkafka.
    Instant,
    /// D, the decode floor: each message dropped unopened as decoding hands it over.
    Drop,
}

/// The settings the relay runs with, copied out of the GUCs on the worker's main thread so
/// that no other thread ever reads a GUC.
#[derive(Clone, PartialEq, Eq)]
pub struct RelaySettings {
    pub bootstrap_servers: String,
    pub topic_template: String,
    /// `outbox.max_record_bytes`, the producer's `message.max.bytes`.
    pub max_record_bytes: usize,
    /// `outbox.on_permanent_error` and `outbox.dead_letter_topic`.
    pub dead_letters: decode::DeadLetterPolicy,
    /// `outbox.exactly_once`.
    pub exactly_once: bool,
    /// `outbox.record_format`.
    pub record_format: routing::RecordFormat,
    /// `outbox.cloudevents_source` with `{database}` replaced.
    pub cloudevents_source: String,
    /// `outbox.bench_sink` (always Kafka in a released build).
    pub bench_sink: BenchSink,
    /// `outbox.decoding_work_mem`, in kB.
    pub decoding_work_mem_kb: i32,
    /// May hold secrets: never logged, never shown (see the Debug impl).
    kafka_properties: String,
}

impl std::fmt::Debug for RelaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_template", &self.topic_template)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("dead_letters", &self.dead_letters)
            .field("exactly_once", &self.exactly_once)
            .field("record_format", &self.record_format)
            .field("cloudevents_source", &self.cloudevents_source)
            .field("bench_sink", &self.bench_sink)
            .field("decoding_work_mem_kb", &self.decoding_work_mem_kb)
            .field("kafka_properties", &"<hidden>")
            .finish()
    }
}

impl RelaySettings {
    /// The settings of the relay of `database` (its name fills `{database}` in the topic
    /// template, as `emit` fills it).
    pub fn read(database: &str) -> RelaySettings {
        RelaySettings {
            bootstrap_servers: gucs::bootstrap_servers(),
            topic_template: routing::database_template(&gucs::topic_template(), database),
            max_record_bytes: gucs::max_record_bytes(),
            dead_letters: decode::DeadLetterPolicy {
                on_permanent_error: gucs::on_permanent_error(),
                topic: gucs::dead_letter_topic(),
            },
            exactly_once: gucs::exactly_once(),
            record_format: gucs::record_format(),
            cloudevents_source: routing::database_template(&gucs::cloudevents_source_template(), database),
            bench_sink: gucs::bench_sink(),
            decoding_work_mem_kb: gucs::decoding_work_mem_kb(),
            kafka_properties: gucs::kafka_properties(),
        }
    }

    pub fn configured(&self) -> bool {
        !self.bootstrap_servers.is_empty()
    }

    /// The full producer configuration, or why it is invalid (without any value in it).
    pub fn producer_config(&self) -> Result<Vec<(String, String)>, SettingsError> {
        kafka_settings::producer_config(&self.bootstrap_servers, &self.kafka_properties, self.max_record_bytes)
    }

    /// Words a producer-creation error for outbox.status() without showing any value of
    /// `outbox.kafka_properties`. A key librdkafka rejects is named by its entry number when it
    /// came from the user: with a mistyped separator, a "key" can be part of a password.
    pub fn describe_producer_error(&self, error: produce::ProducerError) -> String {
        match error {
            produce::ProducerError::InvalidProperty { key } => {
                let user = kafka_settings::parse_properties(&self.kafka_properties).unwrap_or_default();
                match user.iter().position(|(k, _)| *k == key) {
                    Some(i) => format!(
                        "outbox.kafka_properties: entry {} is not a librdkafka producer property or has an invalid value",
                        i + 1
                    ),
                    None => format!("invalid librdkafka setting \"{key}\""),
                }
            }
            produce::ProducerError::Other(message) => message,
        }
    }

    /// True if a change from `other` to `self` changes the records the router makes.
    pub fn routing_changed(&self, other: &RelaySettings) -> bool {
        self.topic_template != other.topic_template
            || self.record_format != other.record_format
            || self.cloudevents_source != other.cloudevents_source
    }

    /// True if a change from `other` to `self` needs a new producer.
    pub fn kafka_changed(&self, other: &RelaySettings) -> bool {
        self.bootstrap_servers != other.bootstrap_servers
            || self.kafka_properties != other.kafka_properties
            || self.max_record_bytes != other.max_record_bytes
            || self.exactly_once != other.exactly_once
            || self.bench_sink != other.bench_sink
    }
}
