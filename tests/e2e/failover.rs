//! A primary and a streaming standby: failover, switchover, and a standby that stops
//! confirming, judged by what the new primary holds after the promotion. Writers insert a
//! business row and emit its event in one transaction; after the promotion, the rows in the new
//! primary's table are the truth:
//!
//! * **lost**: an event of a row the new primary has never arrives;
//! * **phantom**: an event arrives whose row the new primary does not have (a transaction
//!   that the failover lost, but that the old primary had already published);
//! * each key's first deliveries are in row order, across the promotion;
//! * no duplicates: the events that the old primary delivered after the position the standby's
//!   copy of the slot last received from it are found in Kafka by the new primary's relay,
//!   which reads its partitions' tails before producing (`outbox.exactly_once`).
//!
//! On 17 and 18 the relay's slot is a failover slot, and the primary lists the standby's slot
//! in `synchronized_standby_slots`. The control runs the lagging standby without that setting
//! and shows the phantoms it prevents. On 15 and 16, and on 17 and 18 without a failover slot,
//! the promoted standby has no slot, and the relay says why.

use outbox_tests::{check, pg_major, wait_until, Collector, Emitted, MockKafka, PgCluster, DEADLINE};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = "outbox.event.orders";
const TOPICS: &[(&str, i32)] = &[(TOPIC, 3)];
/// A second relayed database in the failover and switchover scenarios; its orders have the
/// aggregatetype `billing`, so their own topic.
const SECOND: &str = "billing";
const SECOND_TOPIC: &str = "outbox.event.billing";
/// The standby's physical slot on the primary.
const STANDBY_SLOT: &str = "standby1";

/// Whether this PostgreSQL has failover slots (17 and later); the tests that need them say so
/// and pass on 15 and 16, where `a_promoted_standby_without_the_slot_says_why` covers failover.
fn failover_slots() -> bool {
    if pg_major() < 17 {
        eprintln!("not applicable: PostgreSQL {} has no failover slots", pg_major());
        return false;
    }
    true
}

/// A mock Kafka cluster, a primary relaying to it, and a streaming standby.
struct Pair {
    kafka: MockKafka,
    primary: PgCluster,
    standby: PgCluster,
}

impl Pair {
    /// `wait_for_standby`: the primary lists the standby's slot in `synchronized_standby_slots`.
    /// `extra`: postgresql.conf lines of the primary (the standby copies them).
    fn start(wait_for_standby: bool, extra: &[(&str, &str)]) -> Pair {
        let kafka = MockKafka::start(3);
        kafka.create_topic(TOPIC, 3);
        let mut settings = vec![("outbox.bootstrap_servers", kafka.bootstrap.as_str())];
        settings.extend_from_slice(extra);
        let primary = PgCluster::start(&settings);
        primary.wait_for_state("streaming", DEADLINE);
        primary.sql("CREATE TABLE orders (id bigserial PRIMARY KEY, event_id uuid NOT NULL UNIQUE, customer text NOT NULL)");
        let standby = PgCluster::standby_of(&primary, STANDBY_SLOT, &[]);
        if wait_for_standby {
            // After the base backup: the standby, once promoted, has no standby of its own.
            primary.set("synchronized_standby_slots", STANDBY_SLOT);
        }
        Pair { kafka, primary, standby }
    }

    /// Waits until the standby holds a synchronised copy of every relay's slot (`slots` of
    /// them) that a promotion keeps (persistent, not a temporary one still catching up with the
    /// primary's).
    fn wait_for_slot_copies(&self, slots: usize) {
        wait_until("the standby's copies of the relays' slots", DEADLINE, || {
            // A running-transactions record lets the primary's slots (and so their copies) move on.
            self.primary.sql("SELECT pg_log_standby_snapshot()");
            self.standby.sql(
                "SELECT count(*) FROM pg_replication_slots WHERE plugin = 'outbox_ext' AND synced AND NOT temporary",
            ) == slots.to_string()
        });
    }

    fn wait_for_slot_copy(&self) {
        self.wait_for_slot_copies(1);
    }

    /// A second database with the extension and its own relay on the primary, and the same
    /// database on the standby.
    fn add_database(&self, name: &str) -> (PgCluster, PgCluster) {
        self.kafka.create_topic(SECOND_TOPIC, 3);
        self.primary.sql(&format!("CREATE DATABASE {name}"));
        let primary = PgCluster::attach(&self.primary, name);
        primary.create_extension();
        primary.wait_for_state("streaming", DEADLINE);
        primary.sql("CREATE TABLE orders (id bigserial PRIMARY KEY, event_id uuid NOT NULL UNIQUE, customer text NOT NULL)");
        (primary, PgCluster::attach(&self.standby, name))
    }

    /// Promotes the standby and waits for its relay to stream.
    fn promote(&self) {
        wait_until("the standby to accept connections", DEADLINE, || self.standby.try_sql("SELECT 1").is_ok());
        self.standby.promote();
        self.standby.wait_for_state("streaming", DEADLINE);
    }
}

/// Writer threads, each inserting orders for its own customers and emitting one event per order
/// in the same transaction, 10 orders a transaction, until stopped or until the server goes
/// away. What they were told was committed is only reported: the table decides.
struct Writers {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Writers {
    fn start(pg: &PgCluster, writers: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicUsize::new(0));
        let threads = (0..writers)
            .map(|w| {
                let pg = PgCluster::attach(pg, &pg.database);
                let (stop, committed) = (stop.clone(), committed.clone());
                std::thread::spawn(move || {
                    let mut acknowledged = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(ids) = place_orders(&pg, &format!("w{w}-"), 10) else { break };
                        committed.fetch_add(ids.len(), Ordering::Relaxed);
                        acknowledged.extend(ids);
                    }
                    acknowledged
                })
            })
            .collect();
        Writers { stop, committed, threads }
    }

    fn wait_for_committed(&self, n: usize) {
        wait_until(&format!("{n} committed orders"), DEADLINE, || self.committed.load(Ordering::Relaxed) >= n);
    }

    /// Stops the writers; returns the event ids of the orders whose commit they saw.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().flat_map(|t| t.join().expect("writer")).collect()
    }
}

/// One transaction of `n` orders over the customers `{prefix}0..9`; returns their event ids.
fn place_orders(pg: &PgCluster, prefix: &str, n: i64) -> Result<Vec<String>, String> {
    let out = pg.try_sql(&format!(
        "INSERT INTO orders (event_id, customer)
         SELECT outbox.emit('{}', c, 'OrderPlaced', jsonb_build_object('n', i)), c
         FROM (SELECT i, '{prefix}' || (i % 10) AS c FROM generate_series(1, {n}) AS i) s
         RETURNING event_id",
        if pg.database == SECOND { SECOND } else { "orders" }
    ))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The events of every order the server holds, in order: the truth after a promotion.
fn orders_on(pg: &PgCluster) -> Emitted {
    let mut emitted = Emitted::default();
    for line in pg.sql("SELECT event_id || ' ' || customer FROM orders ORDER BY id").lines() {
        let (id, customer) = line.split_once(' ').expect("id customer");
        emitted.commit(id, customer);
    }
    emitted
}

/// After the promotion: more orders on the new primary (`db`: one of its databases), then
/// everything the new primary holds must arrive, and then the partitions are read to their end,
/// so that every phantom the old primary published is seen too.
fn finish_on_new_primary(db: &PgCluster, c: &mut Collector, topics: &[(&str, i32)]) -> Emitted {
    let writers = Writers::start(db, 2);
    writers.wait_for_committed(500);
    assert!(!writers.stop().is_empty());
    let emitted = orders_on(db);
    c.until_all(&emitted, DEADLINE);
    c.until_end(topics, DEADLINE);
    emitted
}

/// Writers in two relayed databases of the primary until events flow, then `stop` it
/// (immediate or fast) with the writers still running, promote the standby, write on in both,
/// and check each database against its own topic.
fn fail_over(stop_mode: &str) {
    let mut p = Pair::start(true, &[]);
    let (second, second_on_standby) = p.add_database(SECOND);
    p.wait_for_slot_copies(2);
    let mut c = Collector::new(&p.kafka.bootstrap, TOPICS);
    let second_topics = [(SECOND_TOPIC, 3)];
    let mut c2 = Collector::new(&p.kafka.bootstrap, &second_topics);
    let writers = Writers::start(&p.primary, 2);
    let writers2 = Writers::start(&second, 1);
    writers.wait_for_committed(3000);
    writers2.wait_for_committed(1000);
    c.until("events to flow", DEADLINE, |r| r.len() >= 1000);
    c2.until("events to flow in the second database", DEADLINE, |r| r.len() >= 300);
    p.primary.pg_ctl_stop(stop_mode);
    let acknowledged = writers.stop();
    writers2.stop();
    // Nothing publishes now: everything the old primary produced is in Kafka.
    c.until_end(TOPICS, DEADLINE);
    c2.until_end(&second_topics, DEADLINE);
    let (before, before2) = (c.records.len(), c2.records.len());
    p.promote();
    assert_eq!(p.standby.status("slot_failover"), "true", "the promoted copy is a failover slot too");
    second_on_standby.wait_for_state("streaming", DEADLINE);
    assert_eq!(second_on_standby.status("slot_failover"), "true");
    let emitted = finish_on_new_primary(&p.standby, &mut c, TOPICS);
    let emitted2 = finish_on_new_primary(&second_on_standby, &mut c2, &second_topics);
    let report = check(&emitted, &c.records);
    let held: HashSet<&str> = emitted.committed.iter().map(|(id, _)| id.as_str()).collect();
    eprintln!(
        "[pg_ctl stop -m {stop_mode}, promote] {before} records before the promotion; {} of {} orders whose commit a writer saw are not on the new primary (asynchronous replication)",
        acknowledged.iter().filter(|id| !held.contains(id.as_str())).count(),
        acknowledged.len()
    );
    eprintln!("[pg_ctl stop -m {stop_mode}, promote] {report}; database {SECOND}: {before2} records before");
    report.assert_ok(&format!("PostgreSQL {}: pg_ctl stop -m {stop_mode}, promote", pg_major()), 0);
    check(&emitted2, &c2.records)
        .assert_ok(&format!("PostgreSQL {}: pg_ctl stop -m {stop_mode}, promote: database {SECOND}", pg_major()), 0);
}

#[test]
fn failover_loses_nothing_and_publishes_nothing_the_new_primary_lacks() {
    if !failover_slots() {
        return;
    }
    fail_over("immediate");
}

#[test]
fn switchover_loses_nothing() {
    if !failover_slots() {
        return;
    }
    fail_over("fast");
}

/// The standby stops confirming (its WAL receiver is frozen) while the primary commits 200
/// orders; then the primary dies and the standby, which never received them, is promoted.
/// Returns the checker's report, the 200 orders' ids and every record consumed.
fn lagging_standby(wait_for_standby: bool) -> (outbox_tests::Report, HashSet<String>, Vec<outbox_tests::Record>) {
    let mut p = Pair::start(wait_for_standby, &[]);
    p.wait_for_slot_copy();
    let mut c = Collector::new(&p.kafka.bootstrap, TOPICS);
    let writers = Writers::start(&p.primary, 2);
    writers.wait_for_committed(1000);
    assert!(!writers.stop().is_empty());
    c.until_all(&orders_on(&p.primary), DEADLINE);

    let receiver = p.standby.wal_receiver_pid().expect("the standby's WAL receiver");
    p.standby.signal(receiver, "STOP");
    let mut lagged = HashSet::new();
    for _ in 0..20 {
        lagged.extend(place_orders(&p.primary, "lag-", 10).expect("orders"));
    }
    if wait_for_standby {
        // None of them may be published while the standby lacks them.
        let arrived = c.try_until(Duration::from_secs(3), |r| r.iter().any(|r| r.header("id").is_some_and(|id| lagged.contains(id))));
        assert!(!arrived, "an event arrived before the standby confirmed its transaction");
        assert_eq!(p.primary.status("state"), "waiting_for_standby");
        let pending: i64 = p.primary.status("pending_bytes").parse().unwrap();
        assert!(pending > 0, "pending_bytes should show the held-back WAL");
    } else {
        c.until("the orders the standby lacks to be published", DEADLINE, |r| {
            r.iter().filter(|r| r.header("id").is_some_and(|id| lagged.contains(id))).count() == lagged.len()
        });
    }
    p.primary.pg_ctl_stop("immediate");
    // Killed while frozen, the WAL receiver never writes what its socket still held; the
    // standby, stopped and started again, has only what it had flushed: not the 200 orders.
    p.standby.signal(receiver, "KILL");
    p.standby.pg_ctl_stop("immediate");
    p.standby.pg_ctl_start();
    c.until_end(TOPICS, DEADLINE);
    p.promote();
    let emitted = finish_on_new_primary(&p.standby, &mut c, TOPICS);
    assert!(
        emitted.committed.iter().all(|(id, _)| !lagged.contains(id)),
        "the new primary holds orders committed while its WAL receiver was frozen"
    );
    (check(&emitted, &c.records), lagged, c.records.clone())
}

#[test]
fn nothing_is_published_before_the_standby_has_it() {
    if !failover_slots() {
        return;
    }
    let (report, _, _) = lagging_standby(true);
    report.assert_ok(&format!("PostgreSQL {}: lagging standby, then failover", pg_major()), 0);
}

/// The control: without `synchronized_standby_slots` the relay publishes what only the primary
/// has, and the failover turns it into phantoms. This is what the test above would catch.
#[test]
fn without_synchronized_standby_slots_a_failover_leaves_phantoms() {
    if !failover_slots() {
        return;
    }
    let (report, lagged, records) = lagging_standby(false);
    eprintln!("[PostgreSQL {}: control, no synchronized_standby_slots] {report}", pg_major());
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.phantom, lagged.len(), "every order the failover lost was published: {report}");
    // The new timeline wrote its events at LSNs the old one had published at: in the same
    // partitions, records of the lost branch sit at higher positions than new events, which
    // arrived all the same (no loss above), and none twice.
    let lsn = |r: &outbox_tests::Record| r.header("commit_lsn").and_then(|v| v.parse::<u64>().ok()).expect("commit_lsn");
    let mut highest_lost = std::collections::HashMap::new();
    for r in records.iter().filter(|r| r.header("id").is_some_and(|id| lagged.contains(id))) {
        let top = highest_lost.entry(r.partition).or_insert(0);
        *top = lsn(r).max(*top);
    }
    let after_promotion = records.iter().filter(|r| r.timestamp_ms.is_some_and(|t| t > promoted_at_ms(&records, &lagged)));
    let below = after_promotion.filter(|r| highest_lost.get(&r.partition).is_some_and(|top| lsn(r) < *top)).count();
    assert!(below > 0, "no event of the new timeline has an LSN below the lost branch's records: nothing was tested");
    eprintln!("[PostgreSQL {}: control] {below} events of the new timeline at LSNs below the lost branch's records arrived", pg_major());
    assert_eq!(report.duplicates, 0, "{report}");
}

/// The commit time (Unix ms) of the newest record of the lost branch: the new primary's
/// events committed after it.
fn promoted_at_ms(records: &[outbox_tests::Record], lagged: &HashSet<String>) -> i64 {
    records
        .iter()
        .filter(|r| r.header("id").is_some_and(|id| lagged.contains(id)))
        .filter_map(|r| r.timestamp_ms)
        .max()
        .expect("the lost branch's records arrived")
}

/// On 15 and 16 (no failover slots), and on 17 and 18 with `outbox.failover_slot = off`, the
/// promoted standby has no slot. The relay stops in slot_error and says why and what to do;
/// emit refuses events no slot would read; outbox.reset_slot() starts over with a new slot.
#[test]
fn a_promoted_standby_without_the_slot_says_why() {
    let extra: &[(&str, &str)] = if pg_major() >= 17 { &[("outbox.failover_slot", "off")] } else { &[] };
    let mut p = Pair::start(false, extra);
    p.primary.sql("SELECT outbox.emit('orders', 'c', 'OrderPlaced', '{}')");
    wait_until("the standby to replay the extension", DEADLINE, || {
        p.standby.sql("SELECT count(*) FROM pg_extension WHERE extname = 'outbox_ext'") == "1"
            && p.standby.sql("SELECT count(*) FROM outbox.relay_slot") == "1"
    });
    p.primary.pg_ctl_stop("immediate");
    wait_until("the standby to accept connections", DEADLINE, || p.standby.try_sql("SELECT 1").is_ok());
    p.standby.promote();
    p.standby.wait_for_state("slot_error", DEADLINE);
    let error = p.standby.status("last_error");
    eprintln!("[PostgreSQL {}: promoted without a copy of the slot] last_error: {error}", pg_major());
    assert!(error.contains("promoted from a standby") && error.ends_with("(README: High availability)"), "{error}");
    assert!(error.contains("outbox.reset_slot()"), "{error}");
    if pg_major() < 17 {
        assert!(error.contains("PostgreSQL 15 and 16 do not copy logical slots to standbys"), "{error}");
    } else {
        assert!(error.contains("no synchronised copy") && error.contains("sync_replication_slots"), "{error}");
    }
    let err = p.standby.sql_error("SELECT outbox.emit('orders', 'c', 'OrderPlaced', '{}')");
    assert!(err.starts_with("55000"), "{err}");
    p.standby.sql("SELECT outbox.reset_slot()");
    p.standby.wait_for_state("streaming", DEADLINE);
    let mut c = Collector::new(&p.kafka.bootstrap, TOPICS);
    let id = p.standby.sql("SELECT outbox.emit('orders', 'c', 'AfterReset', '{}')");
    c.until("the event after the reset", DEADLINE, |r| r.iter().any(|r| r.header("id") == Some(id.as_str())));
}
