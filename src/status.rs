//! What the relay worker is doing, in shared memory, and `outbox.status()`.
//!
//! The worker is the only writer. Readers take the lock in shared mode for a copy. Nothing
//! written here ever contains a setting's value, so the status is safe to show to any role.

use crate::ffi::shmem::{RelayEntry, ShortName, ERROR_CAPACITY, NO_TIME, RELAYS};
use crate::relays;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Extension outbox_ext is not installed in the database: there is no slot yet (or no
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

/// The delivery guarantee in force for a relay's producer, as `outbox.status()` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Guarantee {
    /// No producer (not streaming yet, or stopped).
    Unknown = 0,
    ExactlyOnce = 1,
    /// `outbox.exactly_once` is off.
    Off = 2,
    /// `outbox.kafka_properties` sets a partitioner other than Kafka's murmur2.
    Partitioner = 3,
    /// A topic's partitions could not be read (see last_error).
    Unreadable = 4,
}

impl Guarantee {
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Guarantee::Unknown => None,
            Guarantee::ExactlyOnce => Some("exactly once"),
            Guarantee::Off => Some("at least once: outbox.exactly_once is off"),
            Guarantee::Partitioner => {
                Some("at least once: outbox.kafka_properties sets a partitioner other than murmur2_random")
            }
            Guarantee::Unreadable => Some("at least once: a topic could not be read (see last_error)"),
        }
    }

    fn from_u8(v: u8) -> Guarantee {
        match v {
            1 => Guarantee::ExactlyOnce,
            2 => Guarantee::Off,
            3 => Guarantee::Partitioner,
            4 => Guarantee::Unreadable,
            _ => Guarantee::Unknown,
        }
    }
}

/// The entry this process writes as a relay (usize::MAX: none), for the exit callback.
static MY_ENTRY: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Another relay of the same database is running.
pub struct AlreadyRunning {
    pub pid: i32,
}

/// The worker's handle on its database's entry. Keeps a local copy of the counters so that the
/// lock is taken once per loop iteration, not per event.
pub struct StatusWriter {
    index: usize,
    state: RelayState,
    /// Latencies measured since the last publish.
    ack_latency: LatencyHistogram,
}

impl StatusWriter {
    /// Attaches the relay of `database` to its entry (made, wanted, if the launcher has not).
    /// Err if another live relay holds it, or if the table is full.
    pub fn attach(pid: i32, database: u32, name: &str) -> Result<StatusWriter, Option<AlreadyRunning>> {
        let index = {
            let mut relays = RELAYS.exclusive();
            let index = match relays::index_of(&relays, database) {
                Some(i) => i,
                None => {
                    let i = relays::claim(&mut relays, database, name).ok_or(None)?;
                    relays.entries[i].wanted = true;
                    i
                }
            };
            let e = &mut relays.entries[index];
            if e.worker_pid != 0 && e.worker_pid != pid && crate::ffi::process_alive(e.worker_pid) {
                return Err(Some(AlreadyRunning { pid: e.worker_pid }));
            }
            e.worker_pid = pid;
            e.state = RelayState::Starting as u8;
            e.database_name = ShortName::new(name);
            index
        };
        MY_ENTRY.store(index, Ordering::Relaxed);
        // However the worker ends (even by an ERROR), it no longer shows as running.
        crate::ffi::before_exit(clear_on_exit);
        Ok(StatusWriter { index, state: RelayState::Starting, ack_latency: LatencyHistogram::default() })
    }

    fn with<R>(&self, f: impl FnOnce(&mut RelayEntry) -> R) -> R {
        f(&mut RELAYS.exclusive().entries[self.index])
    }

    pub fn state(&self) -> RelayState {
        self.state
    }

    pub fn set_state(&mut self, state: RelayState) {
        if state != self.state {
            self.state = state;
            self.with(|e| e.state = state as u8);
        }
    }

    /// The delivery guarantee of the relay's current producer, for `outbox.status()`.
    pub fn set_guarantee(&mut self, guarantee: Guarantee) {
        self.with(|e| e.guarantee = guarantee as u8);
    }

    /// The slot this relay serves, for `outbox.status()` and `outbox.relays()`.
    pub fn set_slot(&mut self, slot: &str) {
        self.with(|e| e.slot_name = ShortName::new(slot));
    }

    /// Records an error for `outbox.status()`. Callers must not pass secrets.
    pub fn set_error(&mut self, message: &str) {
        let mut len = message.len().min(ERROR_CAPACITY);
        while !message.is_char_boundary(len) {
            len -= 1;
        }
        let now = crate::ffi::now();
        self.with(|e| {
            e.last_error[..len].copy_from_slice(&message.as_bytes()[..len]);
            e.last_error_len = len as u16;
            e.last_error_at = now;
        });
    }

    /// Notes that a transaction committed `us` microseconds ago is now wholly acknowledged.
    /// Published with the next [`add_delivered`](Self::add_delivered).
    pub fn record_ack_latency(&mut self, us: i64) {
        self.ack_latency.record(us);
    }

    pub fn add_delivered(&mut self, events: u64) {
        if events > 0 || !self.ack_latency.is_empty() {
            let now = crate::ffi::now();
            let latency = &self.ack_latency;
            self.with(|e| {
                if events > 0 {
                    e.events_delivered += events;
                    e.last_delivery_at = now;
                }
                for (shared, new) in e.ack_latency.iter_mut().zip(latency.counts()) {
                    *shared += new;
                }
                e.ack_latency_sum_us = e.ack_latency_sum_us.saturating_add(latency.sum_us());
            });
            self.ack_latency.clear();
        }
    }

    /// Counts messages under the outbox prefix that emit did not write, skipped by the relay.
    pub fn add_rejected(&mut self, n: u64) {
        if n > 0 {
            self.with(|e| e.records_rejected += n);
        }
    }

    /// Counts events set aside because Kafka refused them for good.
    pub fn add_dead_lettered(&mut self, n: u64) {
        if n > 0 {
            self.with(|e| e.events_dead_lettered += n);
        }
    }

    /// How many times `outbox.resume()` was called.
    pub fn resume_requests(&self) -> u64 {
        RELAYS.share().entries[self.index].resume_requests
    }

    /// Marks the window in which the slot of a dropped installation is being dropped.
    pub fn set_retiring(&mut self, retiring: bool) {
        self.with(|e| e.retiring = retiring);
    }

    /// How many times CREATE EXTENSION asked for this database's relay (see `relays.rs`): read
    /// before looking for the extension, and given back to [`give_up`](Self::give_up).
    pub fn requests(&self) -> u64 {
        RELAYS.share().entries[self.index].requests
    }

    /// No extension and no slot were found after `seen` requests, under the installation lock:
    /// the launcher is not to start a relay here again, unless a request came in since.
    /// Returns whether the relay may exit.
    pub fn give_up(&mut self, seen: u64) -> bool {
        relays::give_up(self.index, seen)
    }

    pub fn detach(&mut self) {
        self.with(|e| {
            e.worker_pid = 0;
            e.state = RelayState::Stopped as u8;
            e.guarantee = Guarantee::Unknown as u8;
        });
        self.state = RelayState::Stopped;
    }
}

fn clear_on_exit() {
    let index = MY_ENTRY.load(Ordering::Relaxed);
    if index == usize::MAX {
        return;
    }
    let mut relays = RELAYS.exclusive();
    let e = &mut relays.entries[index];
    if e.worker_pid == crate::ffi::my_pid() {
        e.worker_pid = 0;
        e.state = RelayState::Stopped as u8;
        e.guarantee = Guarantee::Unknown as u8;
        e.retiring = false;
    }
}

/// The current database's entry, copied (None if it has none).
fn my_entry() -> Option<RelayEntry> {
    let relays = RELAYS.share();
    relays::index_of(&relays, crate::ffi::my_database_id()).map(|i| relays.entries[i])
}

/// True while the current database's relay drops the slot of a dropped installation.
pub fn relay_retiring() -> bool {
    my_entry().is_some_and(|e| e.retiring)
}

fn timestamp(v: i64) -> Option<TimestampWithTimeZone> {
    if v == NO_TIME {
        None
    } else {
        TimestampWithTimeZone::try_from(v).ok()
    }
}

/// A relay's state as `outbox.status()` and `outbox.relays()` show it (the SQL functions add
/// the slot's figures).
struct Snapshot {
    database: String,
    worker_pid: Option<i32>,
    state: String,
    slot_name: Option<String>,
    events_delivered: i64,
    records_rejected: i64,
    events_dead_lettered: i64,
    last_error: Option<String>,
    last_error_at: Option<TimestampWithTimeZone>,
    last_delivery_at: Option<TimestampWithTimeZone>,
    delivery_guarantee: Option<String>,
}

impl Snapshot {
    fn of(e: &RelayEntry) -> Snapshot {
        Snapshot {
            database: e.database_name.as_string(),
            worker_pid: (e.worker_pid != 0).then_some(e.worker_pid),
            state: RelayState::from_u8(e.state).as_str().to_string(),
            slot_name: (e.slot_name.len > 0).then(|| e.slot_name.as_string()),
            events_delivered: e.events_delivered as i64,
            records_rejected: e.records_rejected as i64,
            events_dead_lettered: e.events_dead_lettered as i64,
            last_error: (e.last_error_len > 0)
                .then(|| String::from_utf8_lossy(&e.last_error[..e.last_error_len as usize]).into_owned()),
            last_error_at: timestamp(e.last_error_at),
            last_delivery_at: timestamp(e.last_delivery_at),
            delivery_guarantee: Guarantee::from_u8(e.guarantee).as_str().map(str::to_string),
        }
    }
}

/// The current database's relay (a stopped one if it has no entry).
fn snapshot() -> Snapshot {
    crate::error::OrRaise::or_raise(crate::readiness::check_preloaded());
    Snapshot::of(&my_entry().unwrap_or(RelayEntry::FREE))
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
        name!(slot_name, Option<String>),
        name!(delivery_guarantee, Option<String>),
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
        s.slot_name,
        s.delivery_guarantee,
    ))
}

/// The relays' half of `outbox.relays()`: every database's relay, from any database.
#[pg_extern(name = "_relays", stable, parallel_safe)]
#[allow(clippy::type_complexity)] // the columns, as pgrx spells them
fn relays_table() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(worker_pid, Option<i32>),
        name!(state, String),
        name!(slot_name, Option<String>),
        name!(events_delivered, i64),
        name!(rejected_records, i64),
        name!(dead_lettered, i64),
        name!(last_error, Option<String>),
        name!(last_delivery_at, Option<TimestampWithTimeZone>),
        name!(acked_transactions, i64),
        name!(ack_latency_sum_us, i64),
    ),
> {
    TableIterator::new(relay_entries().into_iter().map(|e| {
        let s = Snapshot::of(&e);
        let acked: u64 = e.ack_latency.iter().sum();
        (
            s.database,
            s.worker_pid,
            s.state,
            s.slot_name,
            s.events_delivered,
            s.records_rejected,
            s.events_dead_lettered,
            s.last_error,
            s.last_delivery_at,
            acked as i64,
            e.ack_latency_sum_us.min(i64::MAX as u64) as i64,
        )
    }))
}

/// Every database's relay entry.
fn relay_entries() -> Vec<RelayEntry> {
    crate::error::OrRaise::or_raise(crate::readiness::check_preloaded());
    RELAYS.share().entries.iter().filter(|e| e.database != 0).copied().collect()
}

/// 0.2.0's `_relays()`: its SQL, still installed between a package upgrade and `ALTER
/// EXTENSION outbox_ext UPDATE` (which replaces it), calls this symbol.
#[pg_extern(name = "_relays", stable, parallel_safe, sql = false)]
#[allow(clippy::type_complexity)] // the columns, as pgrx spells them
fn relays_state() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(worker_pid, Option<i32>),
        name!(state, String),
        name!(slot_name, Option<String>),
        name!(events_delivered, i64),
        name!(last_error, Option<String>),
        name!(last_delivery_at, Option<TimestampWithTimeZone>),
    ),
> {
    TableIterator::new(relay_entries().into_iter().map(|e| {
        let s = Snapshot::of(&e);
        (s.database, s.worker_pid, s.state, s.slot_name, s.events_delivered, s.last_error, s.last_delivery_at)
    }))
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

/// The commit → Kafka acknowledgement latency of every transaction the relay of `database`
/// (this database's by default) relayed since the server started, as a cumulative histogram:
/// `transactions` is how many took at most `le_ms`. The last row (`le_ms` = infinity) is the
/// total. A transaction counts once all its events are acknowledged, including time spent
/// waiting for Kafka and in retries. A database without a relay has every count 0.
#[pg_extern(name = "ack_latency", stable, parallel_safe)]
fn ack_latency_of(
    database: default!(Option<&str>, "current_database()"),
) -> TableIterator<'static, (name!(le_ms, f64), name!(transactions, i64))> {
    let counts = match database {
        None => [0; latency::BUCKETS],
        Some(name) => relay_entries()
            .into_iter()
            .find(|e| e.database_name.as_string() == name)
            .map_or([0; latency::BUCKETS], |e| e.ack_latency),
    };
    cumulative(counts)
}

/// 0.2.0's `ack_latency()` (this database's relay), for its SQL until the update.
#[pg_extern(name = "ack_latency", stable, parallel_safe, sql = false)]
fn ack_latency() -> TableIterator<'static, (name!(le_ms, f64), name!(transactions, i64))> {
    crate::error::OrRaise::or_raise(crate::readiness::check_preloaded());
    cumulative(my_entry().map_or([0; latency::BUCKETS], |e| e.ack_latency))
}

fn cumulative(counts: [u64; latency::BUCKETS]) -> TableIterator<'static, (name!(le_ms, f64), name!(transactions, i64))> {
    let mut cumulative = 0u64;
    TableIterator::new((0..latency::BUCKETS).map(move |i| {
        cumulative += counts[i];
        let le_ms = latency::upper_bound_us(i).map_or(f64::INFINITY, |us| us as f64 / 1000.0);
        (le_ms, cumulative as i64)
    }))
}

/// Asks this database's relay, stopped on a delivery error, to try again. Returns whether it
/// was stopped.
#[pg_extern(name = "resume", volatile, parallel_unsafe)]
fn resume() -> bool {
    crate::error::OrRaise::or_raise(crate::readiness::check_preloaded());
    let mut relays = RELAYS.exclusive();
    let Some(i) = relays::index_of(&relays, crate::ffi::my_database_id()) else { return false };
    let e = &mut relays.entries[i];
    e.resume_requests += 1;
    e.state == RelayState::DeliveryError as u8
}

pgrx::extension_sql_file!(
    "../sql/status.sql",
    name = "status_function",
    requires = [relay_state, relays_table, ack_latency_of, resume]
);
