//! One database's relay worker. Its life is a sequence of phases (`Phase`: looking for the
//! extension and the slot, finding the key, relaying, done); while relaying, one loop decodes,
//! produces, collects acknowledgements and confirms, through these states:
//!
//! ```text
//! starting ─▶ unconfigured ◀─▶ streaming ◀─▶ kafka_unavailable
//!                  │               │   ▲ ▲
//!                  └─ config_error ┘   │ └──▶ delivery_error   (stopped: no worker running)
//!                                      └──▶ waiting_for_standby
//! ```
//!
//! Every Postgres call happens on this thread. On a failed delivery the worker *rewinds*: it
//! drops the producer and the decoding context, waits with exponential backoff, and decodes
//! again from the slot's confirmed position, which never passed an unacknowledged event. A
//! failure that no retry can fix (see `produce::is_permanent`) stops the relay at that event
//! instead (`delivery_error`) until an operator calls `outbox.resume()` or reloads.

use super::decode::{EventRouter, Opener, Refused, Routing, ACK_STALL};
use super::key;
use super::produce::KafkaProducer;
use super::signals::{pause, shutdown_requested, sleep, take_reload};
use super::slot::{self, Due, Retirement, SlotWait};
use super::tail::Tails;
use super::test_hooks;
use super::RelaySettings;
use crate::ffi::{self, DecodeSink, DecodingSession, TxnInfo};
use crate::gucs;
use pgrx::pg_sys;
use crate::record_key::InstalledKey;
use crate::status::{Guarantee, RelayState, StatusWriter};
use outbox_core::routing::{self, RecordFormat};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Most records decoded before the loop looks at signals and acknowledgements again.
const DECODE_BATCH: usize = 4096;
/// How often the slot is confirmed while events flow.
const CONFIRM_INTERVAL: Duration = Duration::from_millis(100);
/// How long a client-level error (such as all brokers down) keeps the state unavailable.
const BROKER_ERROR_MEMORY: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long SIGTERM waits for in-flight events to be acknowledged before exiting.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// The longest an idle relay sleeps: emit's commits wake it, and it looks at its installation
/// (see `slot::Retirement`) and at WAL that no emit announced (prepared transactions committed
/// later, other databases' WAL to confirm past) at least this often.
const IDLE_SLEEP: Duration = Duration::from_secs(1);
/// How far WAL's insert position runs ahead of the end of its last record with nothing new
/// written (alignment, a page header), so that an idle relay does not take it for new WAL.
const WAL_SLACK: u64 = 64;
/// How long decoding waits for the standbys before `last_error` says so.
const STANDBY_WAIT_REPORT: Duration = Duration::from_secs(10);
/// The longest wait for the standbys in one go with nothing in flight: a standby's
/// confirmation ends it at once (see `DecodingSession::wait_for_standbys`), and this bounds how
/// long a change of `synchronized_standby_slots` or of the standbys goes unnoticed.
const STANDBY_WAIT_MAX: Duration = Duration::from_secs(1);

/// A relay's main function (started by the launcher through `ffi::outbox_relay_main`), for
/// the database with oid `database_oid`.
pub fn relay_main(database_oid: u32) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // A database dropped since the launcher saw it ends the worker here (FATAL); the launcher
    // notices at its next look at pg_database.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database_oid)), None);
    ffi::allow_own_output_plugin();
    ffi::kafka::without_fastbins();
    let database = BackgroundWorker::transaction(ffi::my_database_name);
    ffi::set_log_context(&format!("outbox_ext relay of database \"{database}\""));
    let mut status = match StatusWriter::attach(ffi::my_pid(), database_oid, &database) {
        Ok(status) => status,
        Err(Some(other)) => {
            log!("outbox_ext relay: database \"{database}\" already has a relay (process {}); exiting", other.pid);
            ffi::exit_worker(0);
        }
        Err(None) => {
            warning!("outbox_ext relay: no room for database \"{database}\": at most {} databases have relays", crate::relays::CAPACITY);
            ffi::exit_worker(0);
        }
    };
    if cfg!(feature = "unsealed_emit") {
        warning!("outbox_ext was built with feature unsealed_emit, for benchmarks: emit writes events the relay skips");
    }
    let mut life = Life { database, oid: database_oid, announced: false };
    let mut phase = if test_hooks::abandon(&life.database) {
        // A test of the launcher's safety net: leave as if the request had been lost.
        status.give_up(status.requests());
        Phase::Done(status)
    } else {
        Phase::Looking(status)
    };
    loop {
        phase = match phase {
            Phase::Done(mut status) => {
                status.detach();
                break;
            }
            other => life.step(other),
        };
    }
    if life.announced {
        log!("outbox_ext relay stopped: database \"{}\"", life.database);
    }
    // The launcher decides whether to start the relay again (see relays.rs).
    ffi::exit_worker(0);
}

/// Where a relay is in its life. Each phase owns what it works with and hands it to the next:
///
/// ```text
/// Looking ──slot usable──▶ Keying ──key loaded──▶ Relaying ──extension dropped, slot retired──▶ Looking
///    │                       │                      │
///    └─ no extension, no slot, or SIGTERM ──────────┴── SIGTERM ──▶ Done
/// ```
enum Phase {
    /// Looking for the extension and the database's slot (made here the first time); holds
    /// no slot.
    Looking(StatusWriter),
    /// The slot is usable: finding the key that opens its records.
    Keying(StatusWriter, String),
    /// Holding the slot: decoding, producing and confirming.
    Relaying(Box<Relay>),
    /// Nothing (more) to relay in this database, or the worker was told to stop.
    Done(StatusWriter),
}

/// What stays the same through a relay's phases.
struct Life {
    database: String,
    oid: u32,
    /// Whether the log said the relay started (only once it has a slot to serve).
    announced: bool,
}

impl Life {
    fn step(&mut self, phase: Phase) -> Phase {
        match phase {
            Phase::Looking(mut status) => {
                let slot = slot::choose_name(&self.database, self.oid);
                status.set_slot(&slot);
                match slot::wait_for_slot(&slot, &self.database, &mut status) {
                    SlotWait::Ready => Phase::Keying(status, slot),
                    SlotWait::Stop => Phase::Done(status),
                    SlotWait::NotInstalled => {
                        if self.announced {
                            log!("outbox_ext relay: database \"{}\" no longer has extension outbox_ext; its relay exits", self.database);
                        }
                        Phase::Done(status)
                    }
                }
            }
            Phase::Keying(mut status, slot) => {
                crate::record_key::announce(&slot);
                match key::starting_key(&slot, &mut status) {
                    Ok(key) => {
                        if !self.announced {
                            self.announced = true;
                            log!("outbox_ext relay started: database \"{}\" (oid {}), slot \"{slot}\"", self.database, self.oid);
                        }
                        ffi::acquire_slot(&slot);
                        Phase::Relaying(Box::new(Relay::new(status, slot, self.database.clone(), key)))
                    }
                    Err(()) => Phase::Done(status),
                }
            }
            Phase::Relaying(mut relay) => match relay.run() {
                Exit::Shutdown => Phase::Done(relay.status),
                Exit::Retired => Phase::Looking(relay.status),
            },
            done @ Phase::Done(_) => done,
        }
    }
}

/// Why `Relay::run` returned.
#[derive(PartialEq, Eq)]
enum Exit {
    Shutdown,
    /// The extension was dropped and its slot with it.
    Retired,
}

/// Notices events without producing them (see `Relay::advance_without_kafka`). Messages that
/// `emit` did not write are skipped here too, so they never hold an unconfigured relay.
struct EventProbe<'a> {
    opener: &'a mut Opener,
    found: bool,
}

impl DecodeSink for EventProbe<'_> {
    fn event(&mut self, txn: TxnInfo, lsn: u64, body: &[u8]) {
        if self.opener.open(txn, lsn, body).is_some() {
            self.found = true;
        }
    }

    fn commit(&mut self, _txn: TxnInfo) {}
}

struct Relay {
    status: StatusWriter,
    slot: String,
    /// The database's name, for `{database}` in the topic template.
    database: String,
    retirement: Retirement,
    /// Opens each message with the key of the installation that sealed it.
    opener: Opener,
    settings: RelaySettings,
    router: Option<EventRouter>,
    /// Kept from one router to the next across a rewind (see `Refused`).
    refused: Refused,
    session: Option<DecodingSession>,
    backoff: Duration,
    last_confirm: Instant,
    /// Unconfigured and an event was decoded: decoding waits for Kafka settings.
    waiting_at_event: bool,
    /// Consecutive loop iterations that found no WAL to decode.
    idle_streak: u32,
    /// Stopped on a permanent delivery error: the `outbox.resume()` count seen at that moment.
    stopped_at_resume: Option<u64>,
    /// Decoding waits for the standbys: since when, and whether `last_error` said so yet.
    standby_wait: Option<(Instant, bool)>,
}

impl Relay {
    fn new(status: StatusWriter, slot: String, database: String, key: Option<InstalledKey>) -> Relay {
        let settings = RelaySettings::read(&database);
        ffi::set_decoding_work_mem(settings.decoding_work_mem_kb);
        Relay {
            status,
            slot,
            settings,
            database,
            retirement: Retirement::new(key.map(|k| k.installation)),
            opener: Opener::new(key.map(|k| k.record_key())),
            router: None,
            refused: Refused::default(),
            session: None,
            backoff: BACKOFF_MIN,
            last_confirm: Instant::now(),
            waiting_at_event: false,
            idle_streak: 0,
            stopped_at_resume: None,
            standby_wait: None,
        }
    }

    fn run(&mut self) -> Exit {
        loop {
            if shutdown_requested() {
                self.shutdown();
                return Exit::Shutdown;
            }
            if take_reload() {
                ffi::reload_config();
                self.reload();
                self.resume("the configuration was reloaded");
            }
            if let Some(seen) = self.stopped_at_resume {
                if self.status.resume_requests() != seen {
                    self.resume("outbox.resume() was called");
                } else {
                    sleep(Duration::from_secs(1));
                    continue;
                }
            }
            if !self.settings.configured() {
                self.status.set_state(RelayState::Unconfigured);
                if self.advance_without_kafka() == Due::DropSlot {
                    self.retire();
                    return Exit::Retired;
                }
                continue;
            }
            if self.waiting_at_event {
                // Configured again after waiting: decode from the confirmed position.
                self.waiting_at_event = false;
                self.session = None;
            }
            if self.session.is_none() {
                self.session = Some(DecodingSession::start());
            }
            if self.router.is_none() && !self.build_router() {
                sleep(Duration::from_secs(1));
                continue;
            }
            let session = self.session.as_mut().expect("started above");
            let router = self.router.as_mut().expect("built above");
            let mut sink = Routing { router, opener: &mut self.opener };

            let started = Instant::now();
            let mut decoded = 0;
            while decoded < DECODE_BATCH && !sink.router.halted {
                if !session.decode_next(&mut sink) {
                    break;
                }
                decoded += 1;
                if decoded % 256 == 0 {
                    sink.router.poll();
                    if started.elapsed() > Duration::from_millis(50) {
                        break;
                    }
                }
            }
            sink.router.poll();

            if sink.router.halted {
                if shutdown_requested() {
                    self.shutdown();
                    return Exit::Shutdown;
                }
                self.rewind();
                continue;
            }
            let waiting_at = session.standby_wait();
            self.note_standby_wait(waiting_at);
            self.store_dead_letters();
            self.publish_progress();
            let idle = decoded == 0;
            if idle || self.last_confirm.elapsed() >= CONFIRM_INTERVAL {
                self.confirm();
            }
            if idle {
                self.idle_streak = self.idle_streak.saturating_add(1);
                let in_flight = self.router.as_ref().is_some_and(|r| r.tracker.in_flight() > 0);
                if !in_flight {
                    let upto = self.session.as_ref().map_or(0, |s| s.decoded_upto());
                    if self.installation_gone(upto) {
                        self.retire();
                        return Exit::Retired;
                    }
                }
                // Waiting for the standbys: until one confirms (or within 1 ms while
                // acknowledgements are due). Otherwise 1 ms naps keep latency low while events
                // flow or await acknowledgement. After a second of quiet: 10 ms naps while WAL is
                // written that is not decoded yet (not flushed, or another database's), else a
                // long sleep that emit's commit cuts short (`ffi::wake_at_commit`), so that idle
                // relays cost next to nothing.
                if let Some((session, lsn)) = self.session.as_ref().and_then(|s| Some((s, s.standby_wait()?))) {
                    let timeout = if in_flight { Duration::from_millis(1) } else { STANDBY_WAIT_MAX };
                    session.wait_for_standbys(lsn, timeout, |t| {
                        sleep(t);
                    });
                    continue;
                }
                let nap = if in_flight || self.idle_streak < 1000 {
                    Duration::from_millis(1)
                } else if ffi::wal_insert_lsn() > self.session.as_ref().map_or(0, |s| s.decoded_upto()) + WAL_SLACK {
                    Duration::from_millis(10)
                } else {
                    IDLE_SLEEP
                };
                sleep(nap);
            } else {
                self.idle_streak = 0;
            }
        }
    }

    /// Without Kafka settings: decode anyway, only to confirm WAL that holds no events, so an
    /// unconfigured relay does not pin WAL. At the first event, stop and wait: it and
    /// everything after it are decoded again once Kafka is configured. Returns `DropSlot` if
    /// the extension was dropped and the slot holds no event any more (see `Retirement`).
    fn advance_without_kafka(&mut self) -> Due {
        if self.router.is_some() {
            // Kafka was just unconfigured: settle what is in flight first.
            self.drain(SHUTDOWN_FLUSH);
            self.confirm();
            self.router = None;
            self.session = None;
        }
        if self.waiting_at_event {
            sleep(Duration::from_secs(1));
            return Due::Nothing;
        }
        let session = self.session.get_or_insert_with(DecodingSession::start);
        let mut probe = EventProbe { opener: &mut self.opener, found: false };
        let mut decoded = 0;
        while decoded < DECODE_BATCH && !probe.found && session.decode_next(&mut probe) {
            decoded += 1;
        }
        let found = probe.found;
        self.status.add_rejected(self.opener.take_rejected());
        if found {
            self.waiting_at_event = true;
        } else {
            // Every transaction committed before this point had no event.
            let upto = session.decoded_upto();
            session.confirm(upto);
            if decoded == 0 {
                if self.installation_gone(upto) {
                    return Due::DropSlot;
                }
                sleep(Duration::from_millis(100));
            }
        }
        Due::Nothing
    }

    /// While idle, decoded and confirmed up to `upto`: follows a change of installation (see
    /// `Retirement`), taking the new one's key when it is due. True if the extension is gone
    /// and the slot must be dropped now.
    fn installation_gone(&mut self, upto: u64) -> bool {
        match self.retirement.due(upto, &mut self.status) {
            Due::DropSlot => true,
            Due::SwitchKey => {
                self.switch_key();
                false
            }
            Due::Nothing => false,
        }
    }

    /// Every event of the previous installation was delivered: take the new one's key.
    fn switch_key(&mut self) {
        let key = key::switch_to_current(&self.slot);
        self.opener.set_key(key.map(|k| k.record_key()));
        self.retirement.serve(key.map(|k| k.installation));
        log!("outbox_ext relay: extension outbox_ext was created again; keeping the replication slot");
    }

    /// Picks up new settings after SIGHUP; a Kafka change rebuilds the producer, rewinding
    /// to the confirmed position so nothing in flight is lost.
    fn reload(&mut self) {
        let new = RelaySettings::read(&self.database);
        if new == self.settings {
            return;
        }
        // Takes effect at the reorder buffer's next look at its size.
        ffi::set_decoding_work_mem(new.decoding_work_mem_kb);
        log!("outbox_ext relay: configuration reloaded");
        let rebuild = new.kafka_changed(&self.settings) || new.routing_changed(&self.settings);
        if let Some(router) = self.router.as_mut() {
            router.policy = new.dead_letters.clone();
        }
        self.settings = new;
        if rebuild {
            self.drain(SHUTDOWN_FLUSH);
            self.confirm();
            self.router = None;
            self.session = None;
        }
    }

    fn build_router(&mut self) -> bool {
        let probe = routing::topic_for(&self.settings.topic_template, "x");
        if let Err(e) = routing::check_topic(&probe) {
            self.status.set_state(RelayState::ConfigError);
            self.status.set_error(&format!("outbox.topic: {e}"));
            return false;
        }
        let cloudevents_source = match self.settings.record_format {
            RecordFormat::Plain => None,
            RecordFormat::CloudEvents => {
                if let Err(e) = routing::check_cloudevents_source(&self.settings.cloudevents_source) {
                    self.status.set_state(RelayState::ConfigError);
                    self.status.set_error(&format!("outbox.cloudevents_source: {e}"));
                    return false;
                }
                Some(self.settings.cloudevents_source.clone())
            }
        };
        let config = match self.settings.producer_config() {
            Ok(c) => c,
            Err(e) => {
                self.status.set_state(RelayState::ConfigError);
                self.status.set_error(&e.to_string());
                return false;
            }
        };
        let sink = self.settings.bench_sink;
        match KafkaProducer::new(&config, sink == super::BenchSink::Instant) {
            Ok(p) => {
                if sink != super::BenchSink::Kafka {
                    warning!("outbox_ext relay: outbox.bench_sink = {sink:?}, for benchmarks: events are not sent to Kafka and are lost");
                }
                let mut router = EventRouter::new(
                    p,
                    self.settings.topic_template.clone(),
                    self.settings.dead_letters.clone(),
                    cloudevents_source,
                );
                router.refused = std::mem::take(&mut self.refused);
                router.drop_unopened = sink == super::BenchSink::Drop;
                let guarantee = guarantee_of(&self.settings, &config);
                if guarantee == Guarantee::ExactlyOnce {
                    router.tails = Some(Tails::new(&config));
                }
                self.status.set_guarantee(guarantee);
                self.router = Some(router);
                self.status.set_state(RelayState::Streaming);
                true
            }
            Err(e) => {
                self.status.set_state(RelayState::ConfigError);
                self.status.set_error(&self.settings.describe_producer_error(e));
                false
            }
        }
    }

    fn publish_progress(&mut self) {
        self.status.add_rejected(self.opener.take_rejected());
        let Some(router) = self.router.as_mut() else { return };
        if let Some(tails) = router.tails.as_mut() {
            tails.idle();
        }
        if let Some(why) = router.tails.as_mut().and_then(|t| t.unreadable.take()) {
            let message = format!("{why}; events to that topic are delivered at least once");
            warning!("outbox_ext relay: {message}");
            self.status.set_error(&message);
            self.status.set_guarantee(Guarantee::Unreadable);
        }
        let delivered = router.take_delivered();
        if delivered > 0 {
            self.backoff = BACKOFF_MIN;
        }
        let now = crate::ffi::now();
        let status = &mut self.status;
        router.tracker.take_completed(|commit_time| status.record_ack_latency(now - commit_time));
        self.status.add_delivered(delivered);
        self.status.add_dead_lettered(router.take_dead_lettered());
        let stalled = router.tracker.in_flight() > 0 && router.last_ack.elapsed() > ACK_STALL;
        let broker_error = router.broker_trouble && router.last_ack.elapsed() < BROKER_ERROR_MEMORY;
        if stalled || broker_error {
            if self.status.state() != RelayState::KafkaUnavailable {
                if let Some(e) = router.last_error.as_deref() {
                    self.status.set_error(e);
                }
            }
            self.status.set_state(RelayState::KafkaUnavailable);
        } else {
            router.broker_trouble = false;
            let state =
                if self.standby_wait.is_some() { RelayState::WaitingForStandby } else { RelayState::Streaming };
            self.status.set_state(state);
        }
    }

    /// Follows a wait for the standbys in `synchronized_standby_slots` (`waiting_at`: the WAL
    /// position decoding waits for them to confirm). A long one shows in `last_error` with the
    /// standbys' slots, since only an operator can help if a standby is gone.
    fn note_standby_wait(&mut self, waiting_at: Option<u64>) {
        let Some(lsn) = waiting_at else {
            if self.standby_wait.take().is_some_and(|(since, _)| since.elapsed() >= STANDBY_WAIT_REPORT) {
                log!("outbox_ext relay: the standbys in synchronized_standby_slots confirmed; delivering again");
            }
            return;
        };
        let (since, reported) = self.standby_wait.get_or_insert((Instant::now(), false));
        if !*reported && since.elapsed() >= STANDBY_WAIT_REPORT {
            *reported = true;
            let message = format!(
                "waiting for the standbys in synchronized_standby_slots ({}) to confirm WAL up to {:X}/{:X} for {} s: nothing is published before they have it; a standby that is down or was removed holds delivery back until it is taken out of synchronized_standby_slots (the server log says which slot)",
                gucs::synchronized_standby_slots(),
                lsn >> 32,
                lsn as u32,
                since.elapsed().as_secs()
            );
            warning!("outbox_ext relay: {message}");
            self.status.set_error(&message);
        }
    }

    /// Writes the events that the dead-letter topic refused too into `outbox.dead_letter`, and
    /// only then counts them as set aside. If the table cannot take them, the relay stops at
    /// the first (as `on_permanent_error = stop` would).
    fn store_dead_letters(&mut self) {
        let Some(router) = self.router.as_mut() else { return };
        if router.to_table.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut router.to_table);
        match crate::dead_letter::store(&rows) {
            Ok(()) => router.stored_in_table(rows.iter().map(|r| r.seq)),
            Err(e) => {
                let first = &rows[0];
                let id = first.event_id();
                router.fail_permanently(
                    rows.iter().map(|r| r.seq),
                    format!(
                        "event {id} to topic {}: {}; the dead-letter topic refused it too ({}), and it could not be stored: {e}",
                        first.refusal.topic,
                        first.refusal.message,
                        first.dead_letter_error.as_deref().unwrap_or("?"),
                    ),
                );
            }
        }
    }

    /// Moves the slot to the highest position whose events are all acknowledged.
    fn confirm(&mut self) {
        self.last_confirm = Instant::now();
        if let (Some(session), Some(router)) = (self.session.as_mut(), self.router.as_ref()) {
            let lsn = router.tracker.confirmable(session.decoded_upto());
            session.confirm(lsn);
        }
    }

    /// Serves librdkafka until nothing is in flight or `timeout` passed.
    fn drain(&mut self, timeout: Duration) {
        let Some(router) = self.router.as_mut() else { return };
        let deadline = Instant::now() + timeout;
        while router.tracker.in_flight() > 0 && Instant::now() < deadline {
            router.poll();
            // A plain nap: the latch would return at once on SIGTERM, which is why we drain.
            std::thread::sleep(Duration::from_millis(1));
        }
        let delivered = router.take_delivered();
        self.status.add_delivered(delivered);
    }

    /// After a failed delivery: keep what was acknowledged, drop the producer and the decoding
    /// context, back off, and decode again from the confirmed position.
    /// A permanent failure (reported before or during the drain) stops the relay instead.
    fn rewind(&mut self) {
        let Some(router) = self.router.as_mut() else { return };
        let error = router.last_error.clone().unwrap_or_else(|| "delivery failed".into());
        router.producer.purge();
        self.drain(Duration::from_secs(2));
        self.confirm();
        let router = self.router.take().expect("taken only here");
        let permanent = router.permanent;
        // Records refused for good before the producer went down (with the gapless guarantee,
        // such a refusal makes the producer fatal): the next router sets them aside at once.
        self.refused = router.refused;
        self.session = None;
        if let Some(failure) = permanent {
            self.stop_on(&failure);
            return;
        }
        warning!("outbox_ext relay: {error}; retrying from the last confirmed position in {:?}", self.backoff);
        self.status.set_error(&error);
        self.status.set_state(RelayState::KafkaUnavailable);
        // The whole backoff: writers' commits set the latch, and under load would otherwise cut
        // every wait short and rebuild the producer as fast as deliveries time out.
        pause(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Kafka refused an event for good. Skipping it would lose it and retrying cannot help, so
    /// the relay stops at it: the slot stays before its transaction, and nothing is produced
    /// until an operator has fixed the cause and calls `outbox.resume()` (or reloads).
    fn stop_on(&mut self, failure: &str) {
        let message = format!(
            "{failure}; the relay stopped at this event and retries after SELECT outbox.resume()"
        );
        warning!("outbox_ext relay: {message}");
        self.status.set_error(&message);
        self.status.set_state(RelayState::DeliveryError);
        self.stopped_at_resume = Some(self.status.resume_requests());
    }

    /// Leaves `delivery_error`: the next loop decodes again from the confirmed position.
    fn resume(&mut self, why: &str) {
        if self.stopped_at_resume.take().is_some() {
            log!("outbox_ext relay: retrying after a delivery error because {why}");
            self.backoff = BACKOFF_MIN;
        }
    }

    /// Drops the slot of a dropped installation (see `slot::Retirement`).
    fn retire(&mut self) {
        self.confirm();
        self.session = None;
        self.router = None;
        ffi::drop_held_slot(&self.slot);
        key::forget();
        self.status.set_retiring(false);
        log!(
            "outbox_ext relay: dropped replication slot \"{}\": extension outbox_ext was dropped and every event committed before that was delivered",
            self.slot
        );
    }

    fn shutdown(&mut self) {
        self.drain(SHUTDOWN_FLUSH);
        self.confirm();
        if let Some(session) = self.session.as_mut() {
            session.save();
        }
        self.session = None;
        self.router = None;
        self.status.detach();
    }
}

/// The guarantee `settings` allow with the producer configuration `config`: exactly once needs
/// the setting on and Kafka's murmur2 partitioner, which the relay computes itself.
fn guarantee_of(settings: &RelaySettings, config: &[(String, String)]) -> Guarantee {
    if !settings.exactly_once {
        return Guarantee::Off;
    }
    let partitioner = config.iter().rev().find(|(k, _)| k == "partitioner").map(|(_, v)| v.as_str());
    match partitioner {
        None | Some("murmur2_random" | "murmur2") => Guarantee::ExactlyOnce,
        Some(_) => Guarantee::Partitioner,
    }
}
