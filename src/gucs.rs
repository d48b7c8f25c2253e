//! Every `outbox.*` setting: the statics Postgres writes, their registration, and typed
//! getters. Nothing else in the extension reads a GUC directly.
//!
//! Getters must run on a Postgres thread (the backend's or the worker's main thread). The relay
//! copies what it needs into [`crate::relay::RelaySettings`] before librdkafka sees any of it.

use outbox_core::dead_letter::OnPermanentError;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PostgresGucEnum;
use std::ffi::CString;

/// The setting that may hold secrets, by name (for the log filter in `ffi.rs`).
pub const KAFKA_PROPERTIES_NAME: &str = "outbox.kafka_properties";

static BOOTSTRAP_SERVERS_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
// 0.1.0's settings, ignored since one relay runs per database. Still defined so that a
// postgresql.conf of 0.1.0 starts without errors and 0.1.0's SQL (status() reads
// outbox.slot_name) works until ALTER EXTENSION outbox_ext UPDATE; the launcher warns if set.
static LEGACY_DATABASE_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static LEGACY_SLOT_NAME_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox_ext"));
static TOPIC_GUC: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"outbox.event.{aggregatetype}"));
static KAFKA_PROPERTIES_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static MAX_PAYLOAD_BYTES_GUC: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
static MAX_RECORD_BYTES_GUC: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
static MAX_PENDING_MB_GUC: GucSetting<i32> = GucSetting::<i32>::new(0);
static DECODING_WORK_MEM_KB_GUC: GucSetting<i32> = GucSetting::<i32>::new(DECODING_WORK_MEM_DEFAULT_KB);
/// `outbox.decoding_work_mem`'s default: with librdkafka's bounded queue (8 MB) and the
/// worker's own few MB, a relay stays within 64 MB while it drains (BENCHMARKS.md, Limits).
pub const DECODING_WORK_MEM_DEFAULT_KB: i32 = 32 * 1024;
static FAILOVER_SLOT_GUC: GucSetting<bool> = GucSetting::<bool>::new(true);
static EXACTLY_ONCE_GUC: GucSetting<bool> = GucSetting::<bool>::new(true);
static ON_PERMANENT_ERROR_GUC: GucSetting<PermanentErrorSetting> =
    GucSetting::<PermanentErrorSetting>::new(PermanentErrorSetting::Stop);
static DEAD_LETTER_TOPIC_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox.dead_letter"));
static RECORD_FORMAT_GUC: GucSetting<RecordFormatSetting> = GucSetting::<RecordFormatSetting>::new(RecordFormatSetting::Plain);
static CLOUDEVENTS_SOURCE_GUC: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"/outbox_ext/{database}"));
static TRACEPARENT_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static TRACESTATE_GUC: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
#[cfg(feature = "bench_sinks")]
static BENCH_SINK_GUC: GucSetting<BenchSinkSetting> = GucSetting::<BenchSinkSetting>::new(BenchSinkSetting::Kafka);

/// The values of `outbox.bench_sink`, defined only in a build with feature `bench_sinks`.
#[cfg(feature = "bench_sinks")]
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum BenchSinkSetting {
    #[name = c"kafka"]
    Kafka,
    #[name = c"instant"]
    Instant,
    #[name = c"drop"]
    Drop,
}

/// The values of `outbox.on_permanent_error`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum PermanentErrorSetting {
    #[name = c"stop"]
    Stop,
    #[name = c"dead_letter"]
    DeadLetter,
}

/// The values of `outbox.record_format`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum RecordFormatSetting {
    #[name = c"plain"]
    Plain,
    #[name = c"cloudevents"]
    CloudEvents,
}

/// Registers the settings and reserves the `outbox` prefix, so a typo such as
/// `outbox.bootstrap_server` is reported instead of silently ignored. Only called while the
/// postmaster preloads the library: postmaster-context settings cannot be defined later, and
/// without preloading the extension refuses to run anyway.
pub fn init() {
    GucRegistry::define_string_guc(
        c"outbox.bootstrap_servers",
        c"Kafka bootstrap servers (host:port,host:port) the relay produces to.",
        c"Empty means unconfigured: the relay waits and events stay in WAL.",
        &BOOTSTRAP_SERVERS_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    for (name, setting) in [(c"outbox.database", &LEGACY_DATABASE_GUC), (c"outbox.slot_name", &LEGACY_SLOT_NAME_GUC)] {
        GucRegistry::define_string_guc(
            name,
            c"No longer used: every database with the extension has its own relay and slot.",
            c"",
            setting,
            GucContext::Postmaster,
            GucFlags::NO_SHOW_ALL,
        );
    }
    GucRegistry::define_string_guc(
        c"outbox.topic",
        c"Kafka topic template; {aggregatetype} is replaced by the event's aggregatetype, {database} by the database's name.",
        c"",
        &TOPIC_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"outbox.kafka_properties",
        c"librdkafka producer properties as key=value;key=value (TLS, SASL, compression, linger).",
        c"May hold secrets: only superusers can read it.",
        &KAFKA_PROPERTIES_GUC,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_payload_bytes",
        c"outbox.emit() rejects payloads whose JSON text is longer than this.",
        c"The default matches librdkafka's default message.max.bytes.",
        &MAX_PAYLOAD_BYTES_GUC,
        1,
        1_000_000_000,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_record_bytes",
        c"outbox.emit() rejects events whose Kafka record (key, value and headers) would be larger than this.",
        c"Also the producer's message.max.bytes. The default is librdkafka's, and fits the broker's default max.message.bytes.",
        &MAX_RECORD_BYTES_GUC,
        1_000,
        1_000_000_000,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"outbox.decoding_work_mem",
        c"The relay's logical_decoding_work_mem: how much of the transactions it decodes it holds in memory before writing the largest to disk.",
        c"Bounds the relay's memory together with librdkafka's queue; logical_decoding_work_mem still applies to every other decoder.",
        &DECODING_WORK_MEM_KB_GUC,
        64,
        i32::MAX / 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"outbox.max_pending_bytes",
        c"outbox.emit() fails while the relay has more WAL than this still to get through (0: no limit).",
        c"Back-pressure on writers during a Kafka outage, before the slot fills the disk.",
        &MAX_PENDING_MB_GUC,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_bool_guc(
        c"outbox.failover_slot",
        c"The relay makes its slot a failover slot, which standbys with sync_replication_slots copy (PostgreSQL 17 and later).",
        c"Applies when the relay makes its slot. Ignored on PostgreSQL 15 and 16, which have no failover slots.",
        &FAILOVER_SLOT_GUC,
        GucContext::Postmaster,
        GucFlags::empty(),
    );
    GucRegistry::define_bool_guc(
        c"outbox.exactly_once",
        c"After a start, a rewind or a promotion, the relay reads what its partitions already hold and does not produce those events again.",
        c"off: at least once (events acknowledged but not yet confirmed are produced again after a crash).",
        &EXACTLY_ONCE_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_enum_guc(
        c"outbox.on_permanent_error",
        c"What the relay does with an event Kafka refuses for good: stop (until outbox.resume()) or dead_letter.",
        c"dead_letter sets the event aside, in outbox.dead_letter_topic or else the table outbox.dead_letter, and carries on.",
        &ON_PERMANENT_ERROR_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"outbox.dead_letter_topic",
        c"The Kafka topic that events refused for good go to when outbox.on_permanent_error = dead_letter.",
        c"",
        &DEAD_LETTER_TOPIC_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_enum_guc(
        c"outbox.record_format",
        c"How a Kafka record carries the event's attributes: plain headers (Debezium's outbox format) or cloudevents (CloudEvents 1.0, Kafka binding, binary mode).",
        c"The key and the value are the same in both.",
        &RECORD_FORMAT_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"outbox.cloudevents_source",
        c"The CloudEvents source (ce_source) of records in the cloudevents format, a URI reference; {database} is replaced by the database's name.",
        c"",
        &CLOUDEVENTS_SOURCE_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"outbox.traceparent",
        c"W3C traceparent that outbox.emit() copies into the header traceparent; set it for a transaction with SET LOCAL.",
        c"00-<trace id>-<parent id>-<flags>; a malformed value makes emit fail with 22023.",
        &TRACEPARENT_GUC,
        GucContext::Userset,
        GucFlags::empty(),
    );
    GucRegistry::define_string_guc(
        c"outbox.tracestate",
        c"W3C tracestate that outbox.emit() copies into the header tracestate, with outbox.traceparent.",
        c"",
        &TRACESTATE_GUC,
        GucContext::Userset,
        GucFlags::empty(),
    );
    #[cfg(feature = "bench_sinks")]
    GucRegistry::define_enum_guc(
        c"outbox.bench_sink",
        c"Benchmarks only: where the relay sends events (kafka; instant: acknowledged at once; drop: dropped unopened). Every event not sent to Kafka is lost.",
        c"",
        &BENCH_SINK_GUC,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    crate::ffi::reserve_guc_prefix("outbox");
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn bootstrap_servers() -> String {
    string(&BOOTSTRAP_SERVERS_GUC).trim().to_string()
}

/// 0.1.0's settings that postgresql.conf still sets, by name (they no longer do anything).
pub fn legacy_settings_in_use() -> Vec<&'static str> {
    let mut used = Vec::new();
    if string(&LEGACY_DATABASE_GUC) != "postgres" {
        used.push("outbox.database");
    }
    if string(&LEGACY_SLOT_NAME_GUC) != "outbox_ext" {
        used.push("outbox.slot_name");
    }
    used
}

pub fn topic_template() -> String {
    string(&TOPIC_GUC)
}

/// May contain secrets: never log or display it.
pub fn kafka_properties() -> String {
    string(&KAFKA_PROPERTIES_GUC)
}

/// The pending-WAL limit in bytes, or None when off.
pub fn max_pending_bytes() -> Option<u64> {
    let mb = MAX_PENDING_MB_GUC.get();
    (mb > 0).then(|| mb as u64 * 1024 * 1024)
}

/// `outbox.decoding_work_mem`, in kB.
pub fn decoding_work_mem_kb() -> i32 {
    DECODING_WORK_MEM_KB_GUC.get()
}

pub fn max_payload_bytes() -> usize {
    MAX_PAYLOAD_BYTES_GUC.get().max(1) as usize
}

/// The largest Kafka record, in librdkafka's measure; also the producer's message.max.bytes.
pub fn max_record_bytes() -> usize {
    MAX_RECORD_BYTES_GUC.get().max(1) as usize
}

pub fn on_permanent_error() -> OnPermanentError {
    match ON_PERMANENT_ERROR_GUC.get() {
        PermanentErrorSetting::Stop => OnPermanentError::Stop,
        PermanentErrorSetting::DeadLetter => OnPermanentError::DeadLetter,
    }
}

pub fn dead_letter_topic() -> String {
    string(&DEAD_LETTER_TOPIC_GUC).trim().to_string()
}

/// `outbox.bench_sink` (always Kafka without feature `bench_sinks`).
pub fn bench_sink() -> crate::relay::BenchSink {
    use crate::relay::BenchSink;
    #[cfg(feature = "bench_sinks")]
    return match BENCH_SINK_GUC.get() {
        BenchSinkSetting::Kafka => BenchSink::Kafka,
        BenchSinkSetting::Instant => BenchSink::Instant,
        BenchSinkSetting::Drop => BenchSink::Drop,
    };
    #[cfg(not(feature = "bench_sinks"))]
    BenchSink::Kafka
}

pub fn record_format() -> outbox_core::routing::RecordFormat {
    match RECORD_FORMAT_GUC.get() {
        RecordFormatSetting::Plain => outbox_core::routing::RecordFormat::Plain,
        RecordFormatSetting::CloudEvents => outbox_core::routing::RecordFormat::CloudEvents,
    }
}

/// `outbox.cloudevents_source` with `{database}` still in it.
pub fn cloudevents_source_template() -> String {
    string(&CLOUDEVENTS_SOURCE_GUC).trim().to_string()
}

/// The transaction's trace context, as `emit` captures it (empty: unset).
pub fn traceparent() -> String {
    string(&TRACEPARENT_GUC)
}

pub fn tracestate() -> String {
    string(&TRACESTATE_GUC)
}

/// Whether the relay reads its partitions' tails so as not to produce an event twice.
pub fn exactly_once() -> bool {
    EXACTLY_ONCE_GUC.get()
}

/// Whether the relay makes its slot a failover slot (17 and later).
pub fn failover_slot() -> bool {
    FAILOVER_SLOT_GUC.get()
}

/// PostgreSQL's `synchronized_standby_slots` (17 and later; empty before): the physical slots
/// of the standbys that must confirm WAL before the relay's failover slot may pass it on.
pub fn synchronized_standby_slots() -> String {
    crate::ffi::config_option("synchronized_standby_slots").unwrap_or_default()
}
