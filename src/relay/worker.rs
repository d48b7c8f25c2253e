//! The relay worker: one loop that decodes, produces, collects acknowledgements and confirms.
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
use super::signals::{shutdown_requested, sleep, take_reload};
use super::slot::{self, Due, Retirement, SlotWait};
use super::RelaySettings;
use crate::ffi::{self, DecodeSink, DecodingSession, TxnInfo};
use crate::gucs;
use pgrx::pg_sys;
use crate::record_key::InstalledKey;
use crate::status::{RelayState, StatusWriter};
use outbox_core::routing;
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
/// How long decoding waits for the standbys before `last_error` says so.
const STANDBY_WAIT_REPORT: Duration = Duration::from_secs(10);
/// The nap while decoding waits for the standbys. A standby reports each flush as it happens,
/// so a shorter one would mostly find nothing new.
const STANDBY_WAIT_NAP: Duration = Duration::from_millis(10);

/// A relay's main function (started by the launcher through `ffi::outbox_relay_main`), for
/// the database with oid `database_oid`.
pub fn relay_main(database_oid: u32) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // A database dropped since the launcher saw it ends the worker here (FATAL); the launcher
    // notices at its next look at pg_database.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database_oid)), None);
    ffi::allow_own_output_plugin();
    let database = BackgroundWorker::transaction(ffi::my_database_name);
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
    if cfg!(feature = "ceiling_sink") {
        warning!("outbox_ext was built with feature ceiling_sink, for benchmarks: events are acknowledged without being sent to Kafka");
    }
    if cfg!(feature = "unsealed_emit") {
        warning!("outbox_ext was built with feature unsealed_emit, for benchmarks: emit writes events the relay skips");
    }

    let mut announced = false;
    loop {
        let slot = slot::choose_name(&database, database_oid);
        status.set_slot(&slot);
        match slot::wait_for_slot(&slot, &mut status) {
            SlotWait::Ready => {}
            SlotWait::Stop => break,
            SlotWait::NotInstalled => {
                if status.not_wanted() {
                    // CREATE EXTENSION came in while we looked: look again.
                    continue;
                }
                if announced {
                    log!("outbox_ext relay: database \"{database}\" no longer has extension outbox_ext; its relay exits");
                }
                break;
            }
        }
        if !announced {
            log!("outbox_ext relay started: database \"{database}\" (oid {database_oid}), slot \"{slot}\"");
            announced = true;
        }
        crate::record_key::announce(&slot);
        let Ok(key) = key::starting_key(&slot, &mut status) else { break };
        ffi::acquire_slot(&slot);
        let mut relay = Relay::new(status, slot.clone(), database.clone(), key);
        let exit = relay.run();
        status = relay.status;
        if exit == Exit::Shutdown {
            break;
        }
    }
    status.detach();
    if announced {
        log!("outbox_ext relay stopped: database \"{database}\"");
    }
    // The launcher decides whether to start the relay again (see relays.rs).
    ffi::exit_worker(0);
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
        Relay {
            status,
            slot,
            settings: RelaySettings::read(&database),
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
                // 1 ms naps keep latency low while events flow or await acknowledgement; after
                // a second of quiet, 10 ms naps keep an idle relay cheap.
                let nap = if self.standby_wait.is_some() {
                    STANDBY_WAIT_NAP
                } else if in_flight || self.idle_streak < 1000 {
                    Duration::from_millis(1)
                } else {
                    Duration::from_millis(10)
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
        log!("outbox_ext relay: configuration reloaded");
        let rebuild = new.kafka_changed(&self.settings) || new.topic_template != self.settings.topic_template;
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
        let config = match self.settings.producer_config() {
            Ok(c) => c,
            Err(e) => {
                self.status.set_state(RelayState::ConfigError);
                self.status.set_error(&e.to_string());
                return false;
            }
        };
        match KafkaProducer::new(&config) {
            Ok(p) => {
                let mut router = EventRouter::new(p, self.settings.topic_template.clone(), self.settings.dead_letters.clone());
                router.refused = std::mem::take(&mut self.refused);
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
        sleep(self.backoff);
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
