//! What the relay worker is doing, in shared memory, and `outbox.status()`.
//!
//! The worker is the only writer. Readers take the lock in shared mode for a copy. Nothing
//! written here ever contains a setting's value, so the status is safe to show to any role.

use crate::ffi::shmem::{ERROR_CAPACITY, NO_TIME, STATUS};
use outbox_core::latency::{self, LatencyHistogram};
use pgrx::prelude::*;

/// The relay's state, as `outbox.status()` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RelayState {
    /// The worker is not running.
    Stopped = 0,
    /// Connecting to the database and opening the slot.
    Starting = 1,
    /// `outbox.bootstrap_servers` is empty: events wait in WAL.
    Unconfigured = 2,
    /// Decoding and producing; Kafka acknowledges.
    Streaming = 3,
    /// Kafka does not acknowledge (brokers down, produce errors): retrying with backoff.
    KafkaUnavailable = 4,
    /// The Kafka settings are invalid (see last_error); the worker waits for a reload.
    ConfigError = 5,
    /// The slot cannot be used: held by another process, made by another plugin, invalidated
    /// or dropped.
    SlotError = 6,
    /// Kafka refused an event for good (unknown topic, not authorized, too large): the relay
    /// stopped at it and waits for an operator (`outbox.resume()` or a reload).
    DeliveryError = 7,
    /// Extension outbox_ext is not installed in outbox.database: there is no slot yet (or no
    /// longer).
    NotInstalled = 8,
    /// The extension's SQL in the database is older than the library: `ALTER EXTENSION
    /// outbox_ext UPDATE` is due. Events wait; emit fails until then.
    UpdateRequired = 9,
    /// Decoding waits for the standbys in `synchronized_standby_slots` to confirm WAL that
    /// holds the next commits (17 and later): nothing is produced past what they flushed.
    /// Delivery resumes by itself once they confirm.
    WaitingForStandby = 10,
}

impl RelayState {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::Stopped => "stopped",
            RelayState::Starting => "starting",
            RelayState::Unconfigured => "unconfigured",
            RelayState::Streaming => "streaming",
            RelayState::KafkaUnavailable => "kafka_unavailable",
            RelayState::ConfigError => "config_error",
            RelayState::SlotError => "slot_error",
            RelayState::DeliveryError => "delivery_error",
            RelayState::NotInstalled => "not_installed",
            RelayState::UpdateRequired => "update_required",
            RelayState::WaitingForStandby => "waiting_for_standby",
        }
    }

    fn from_u8(v: u8) -> RelayState {
        match v {
            1 => RelayState::Starting,
            2 => RelayState::Unconfigured,
            3 => RelayState::Streaming,
            4 => RelayState::KafkaUnavailable,
            5 => RelayState::ConfigError,
            6 => RelayState::SlotError,
            7 => RelayState::DeliveryError,
            8 => RelayState::NotInstalled,
            9 => RelayState::UpdateRequired,
            10 => RelayState::WaitingForStandby,
            _ => RelayState::Stopped,
        }
    }
}

/// The worker's handle on the shared status. Keeps a local copy of the counters so that the
/// lock is taken once per loop iteration, not per event.
pub struct StatusWriter {
    state: RelayState,
    /// Latencies measured since the last publish.
    ack_latency: LatencyHistogram,
}

impl StatusWriter {
    pub fn attach(pid: i32) -> StatusWriter {
        {
            let mut s = STATUS.exclusive();
            s.worker_pid = pid;
            s.state = RelayState::Starting as u8;
        }
        // However the worker ends (even by an ERROR), it no longer shows as running.
        crate::ffi::before_exit(clear_on_exit);
        StatusWriter { state: RelayState::Starting, ack_latency: LatencyHistogram::default() }
    }

    pub fn state(&self) -> RelayState {
        self.state
    }

    pub fn set_state(&mut self, state: RelayState) {
        if state != self.state {
            self.state = state;
            STATUS.exclusive().state = state as u8;
        }
    }

    /// Records an error for `outbox.status()`. Callers must not pass secrets.
    pub fn set_error(&mut self, message: &str) {
        let mut s = STATUS.exclusive();
        let mut len = message.len().min(ERROR_CAPACITY);
        while !message.is_char_boundary(len) {
            len -= 1;
        }
        s.last_error[..len].copy_from_slice(&message.as_bytes()[..len]);
        s.last_error_len = len as u16;
        s.last_error_at = crate::ffi::now();
    }

    /// Notes that a transaction committed `us` microseconds ago is now wholly acknowledged.
    /// Published with the next [`add_delivered`](Self::add_delivered).
    pub fn record_ack_latency(&mut self, us: i64) {
        self.ack_latency.record(us);
    }

    pub fn add_delivered(&mut self, events: u64) {
        if events > 0 || !self.ack_latency.is_empty() {
            let mut s = STATUS.exclusive();
            if events > 0 {
                s.events_delivered += events;
                s.last_delivery_at = crate::ffi::now();
            }
            for (shared, new) in s.ack_latency.iter_mut().zip(self.ack_latency.counts()) {
                *shared += new;
            }
            drop(s);
            self.ack_latency.clear();
        }
    }

    /// Counts messages under the outbox prefix that emit did not write, skipped by the relay.
    pub fn add_rejected(&mut self, n: u64) {
        if n > 0 {
            STATUS.exclusive().records_rejected += n;
        }
    }

    /// Counts events set aside because Kafka refused them for good.
    pub fn add_dead_lettered(&mut self, n: u64) {
        if n > 0 {
            STATUS.exclusive().events_dead_lettered += n;
        }
    }

    /// How many times `outbox.resume()` was called.
    pub fn resume_requests(&self) -> u64 {
        STATUS.share().resume_requests
    }

    /// Marks the window in which the slot of a dropped installation is being dropped.
    pub fn set_retiring(&mut self, retiring: bool) {
        STATUS.exclusive().retiring = retiring;
    }

    pub fn detach(&mut self) {
        let mut s = STATUS.exclusive();
        s.worker_pid = 0;
        s.state = RelayState::Stopped as u8;
        self.state = RelayState::Stopped;
    }
}

fn clear_on_exit() {
    let mut s = STATUS.exclusive();
    if s.worker_pid == crate::ffi::my_pid() {
        s.worker_pid = 0;
        s.state = RelayState::Stopped as u8;
        s.retiring = false;
    }
}

/// True while the relay drops the slot of a dropped installation.
pub fn relay_retiring() -> bool {
    STATUS.share().retiring
}

fn timestamp(v: i64) -> Option<TimestampWithTimeZone> {
    if v == NO_TIME {
        None
    } else {
        TimestampWithTimeZone::try_from(v).ok()
    }
}

/// The relay's state as `outbox.status()` shows it (the SQL function adds the slot's figures).
struct Snapshot {
    worker_pid: Option<i32>,
    state: String,
    events_delivered: i64,
    records_rejected: i64,
    events_dead_lettered: i64,
    last_error: Option<String>,
    last_error_at: Option<TimestampWithTimeZone>,
    last_delivery_at: Option<TimestampWithTimeZone>,
}

fn snapshot() -> Snapshot {
    crate::error::OrRaise::or_raise(crate::readiness::check_preloaded());
    let s = *STATUS.share();
    Snapshot {
        worker_pid: (s.worker_pid != 0).then_some(s.worker_pid),
        state: RelayState::from_u8(s.state).as_str().to_string(),
        events_delivered: s.events_delivered as i64,
        records_rejected: s.records_rejected as i64,
        events_dead_lettered: s.events_dead_lettered as i64,
        last_error: (s.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&s.last_error[..s.last_error_len as usize]).into_owned()),
        last_error_at: timestamp(s.last_error_at),
        last_delivery_at: timestamp(s.last_delivery_at),
    }
}

/// The worker's half of `outbox.status()`.
#[pg_extern(name = "_relay_state", stable, parallel_safe)]
#[allow(clippy::type_complexity)] // the columns, as pgrx spells them
fn relay_state() -> TableIterator<
    'static,
    (
        name!(worker_pid, Option<i32>),
        name!(state, String),
        name!(events_delivered, i64),
        name!(rejected_records, i64),
        name!(dead_lettered, i64),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(last_delivery_at, Option<TimestampWithTimeZone>),
    ),
> {
    let s = snapshot();
    TableIterator::once((
        s.worker_pid,
        s.state,
        s.events_delivered,
        s.records_rejected,
        s.events_dead_lettered,
        s.last_error,
        s.last_error_at,
        s.last_delivery_at,
    ))
}

/// 0.1.0's `_relay_status()`: its SQL, still installed between a package upgrade and
/// `ALTER EXTENSION outbox_ext UPDATE` (which drops it), calls this symbol.
#[pg_extern(name = "_relay_status", stable, parallel_safe, sql = false)]
#[allow(clippy::type_complexity)] // the columns, as pgrx spells them
fn relay_status() -> TableIterator<
    'static,
    (
        name!(worker_pid, Option<i32>),
        name!(state, String),
        name!(events_delivered, i64),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(last_delivery_at, Option<TimestampWithTimeZone>),
    ),
> {
    let s = snapshot();
    TableIterator::once((s.worker_pid, s.state, s.events_delivered, s.last_error, s.last_error_at, s.last_delivery_at))
}

/// The commit → Kafka acknowledgement latency of every transaction relayed since the server
/// started, as a cumulative histogram: `transactions` is how many took at most `le_ms`. The
/// last row (`le_ms` = infinity) is the total. A transaction counts once all its events are
/// acknowledged, including time spent waiting for Kafka and in retries.
#[pg_extern(name = "ack_latency", stable, parallel_safe)]
fn ack_latency() -> TableIterator<'static, (name!(le_ms, f64), name!(transactions, i64))> {
    crate::error::OrRaise::or_raise(crate::readiness::check_preloaded());
    let counts = STATUS.share().ack_latency;
    let mut cumulative = 0u64;
    TableIterator::new((0..latency::BUCKETS).map(move |i| {
        cumulative += counts[i];
        let le_ms = latency::upper_bound_us(i).map_or(f64::INFINITY, |us| us as f64 / 1000.0);
        (le_ms, cumulative as i64)
    }))
}

/// Asks a relay stopped on a delivery error to try again. Returns whether it was stopped.
#[pg_extern(name = "resume", volatile, parallel_unsafe)]
fn resume() -> bool {
    crate::error::OrRaise::or_raise(crate::readiness::check_preloaded());
    let mut s = STATUS.exclusive();
    s.resume_requests += 1;
    s.state == RelayState::DeliveryError as u8
}

pgrx::extension_sql_file!(
    "../sql/status.sql",
    name = "status_function",
    requires = [relay_state, ack_latency, resume]
);
