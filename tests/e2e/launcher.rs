//! No database is ever left without its relay (issue 18): CREATE EXTENSION right after a
//! server start, CREATE EXTENSION whose transaction commits after its relay looked, DROP and
//! CREATE back to back, and a relay lost whatever the cause. The windows are held open with
//! the relay's test hooks (src/relay/test_hooks.rs), so that each interleaving happens on
//! purpose rather than by luck; the stress test then runs the real race many times under load.

use outbox_tests::load::{parse_ids, select_ids};
use outbox_tests::{check, eventually, wait_until, Collector, Emitted, MockKafka, PgCluster, DEADLINE};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = "outbox.event.order";
/// Holds a database's relay after it looked for the extension and found none.
const HOLD: &str = "outbox_test_hold.after_extension_check";
/// Shows that the relay is held there.
const HELD: &str = "outbox_test_held.after_extension_check";
/// Has a database's relay leave as if its request had been lost.
const ABANDON: &str = "outbox_test_abandon";
/// How soon a database must have its relay and slot after CREATE EXTENSION (issue 18).
const RELAY_COMES: Duration = Duration::from_secs(10);

fn hook(kind: &str, database: &str) -> String {
    format!("{kind}.{database}")
}

/// A mock Kafka cluster with topic `outbox.event.order`, and a cluster relaying to it with no
/// extension anywhere yet.
fn cluster() -> (MockKafka, PgCluster) {
    let kafka = MockKafka::start(1);
    kafka.create_topic(TOPIC, 3);
    let pg = PgCluster::init(&[("outbox.bootstrap_servers", &kafka.bootstrap)]);
    (kafka, pg)
}

/// Emits `count` events of aggregate type `order` from seq `from` in one transaction; None if
/// emit refused them (the transaction then rolled back).
fn try_emit(db: &PgCluster, from: i64, count: i64) -> Option<Vec<(String, String)>> {
    let sql = format!("BEGIN;\n{}\nCOMMIT;", select_ids("order", "k", 5, from, from + count - 1));
    db.try_sql(&sql).ok().map(|out| parse_ids(&out))
}

/// Emits `count` events in `db` as soon as emit takes them (within 10 s), adding them to
/// `emitted`.
fn emit_soon(db: &PgCluster, emitted: &mut Emitted, count: i64, scenario: &str) {
    let from = emitted.committed.len() as i64;
    let mut ids = None;
    if !eventually(RELAY_COMES, || {
        ids = try_emit(db, from, count);
        ids.is_some()
    }) {
        let why = db.sql_error(&select_ids("order", "k", 5, from, from));
        panic!("{scenario}: emit still fails after {RELAY_COMES:?}: {why}\n{}", db.log());
    }
    for (id, key) in ids.unwrap_or_default() {
        emitted.commit(id, key);
    }
}

/// Emits 20 more events in `db` and checks that Kafka has exactly `emitted` and these, in
/// order.
fn delivers(kafka: &MockKafka, db: &PgCluster, mut emitted: Emitted, scenario: &str) {
    emit_soon(db, &mut emitted, 20, scenario);
    let mut c = Collector::new(&kafka.bootstrap, &[(TOPIC, 3)]);
    c.until_all(&emitted, DEADLINE);
    c.until_end(&[(TOPIC, 3)], DEADLINE);
    check(&emitted, &c.records).assert_ok(scenario, 0);
}

/// A mock Kafka cluster and a cluster with database `shop` and no extension anywhere, just
/// restarted: the relay that the launcher starts in every database at a server start has
/// looked at shop, found no extension, and is held before it acts on that.
fn restarted_with_shop_held() -> (MockKafka, PgCluster, PgCluster) {
    let (kafka, mut pg) = cluster();
    pg.sql("CREATE DATABASE shop");
    let shop = PgCluster::attach(&pg, "shop");
    pg.arm_hook(&hook(HOLD, "shop"));
    pg.pg_ctl_stop("fast");
    pg.pg_ctl_start();
    wait_until("shop's relay to find no extension", DEADLINE, || pg.hook_file_exists(&hook(HELD, "shop")));
    (kafka, pg, shop)
}

/// The relay that found no extension is held while CREATE EXTENSION runs and commits: it
/// must stay for it (the request came in after it read the request count), not exit.
#[test]
fn a_relay_that_found_no_extension_stays_for_the_create_extension_that_follows() {
    let (kafka, pg, shop) = restarted_with_shop_held();
    shop.sql("CREATE EXTENSION outbox_ext");
    pg.disarm_hook(&hook(HOLD, "shop"));
    assert!(eventually(RELAY_COMES, || shop.relay_has_slot()), "no relay in shop: {}", pg.log());
    delivers(&kafka, &shop, Emitted::default(), "relay looked before CREATE EXTENSION");
}

/// The interleaving that lost the relay before issue 18, in a database the launcher has
/// already looked at (so that nothing but the request can bring a relay): CREATE EXTENSION
/// asks for a relay from inside its transaction, and that relay looks before the transaction
/// commits, so it finds nothing. It must wait for that transaction instead of leaving.
#[test]
fn a_create_extension_that_commits_after_its_relay_looked_gets_its_relay() {
    let (kafka, pg, shop) = restarted_with_shop_held();
    pg.disarm_hook(&hook(HOLD, "shop"));
    wait_until("the start-up relay to leave shop", DEADLINE, || {
        !pg.hook_file_exists(&hook(HELD, "shop"))
            && pg.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox_ext relay' AND datname = 'shop'") == "0"
    });
    pg.arm_hook(&hook(HOLD, "shop"));
    let mut creating = shop.session();
    creating.send("BEGIN; CREATE EXTENSION outbox_ext;");
    wait_until("the requested relay to look", DEADLINE, || pg.hook_file_exists(&hook(HELD, "shop")));
    creating.send("COMMIT;");
    creating.finish();
    pg.disarm_hook(&hook(HOLD, "shop"));
    assert!(eventually(RELAY_COMES, || shop.relay_has_slot()), "no relay in shop: {}", pg.log());
    delivers(&kafka, &shop, Emitted::default(), "CREATE EXTENSION committed after its relay looked");
}

/// Two threads that keep both cores busy until dropped, as other work on the machine would.
struct CpuLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start(threads: usize) -> CpuLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The deployment the race hit: a migration creates the extension as soon as the server
/// accepts connections, in a database the launcher's start-up relay is looking at that moment.
/// 50 times, with both cores busy beside it, every database has its relay and slot within 10 s.
#[test]
fn fifty_starts_each_followed_at_once_by_create_extension_under_load() {
    let mut pg = PgCluster::init(&[]);
    let _load = CpuLoad::start(2);
    let mut without_relay = Vec::new();
    // Databases of earlier rounds, dropped once their relay has retired the slot.
    let mut retiring: Vec<String> = Vec::new();
    for round in 0..50 {
        let name = format!("boot{round}");
        pg.sql(&format!("CREATE DATABASE {name}"));
        pg.pg_ctl_stop("fast");
        pg.pg_ctl_start();
        let db = PgCluster::attach(&pg, &name);
        db.sql("CREATE EXTENSION outbox_ext");
        if !eventually(RELAY_COMES, || db.relay_has_slot()) {
            without_relay.push(format!("{name}: {}", db.sql("SELECT row(s.*)::text FROM outbox.status() s")));
        }
        db.sql("DROP EXTENSION outbox_ext");
        retiring.push(name);
        retiring.retain(|old| {
            let slots = pg.sql(&format!(
                "SELECT count(*) FROM pg_replication_slots s JOIN pg_database d ON d.oid = s.datoid WHERE d.datname = '{old}'"
            ));
            slots != "0" || pg.try_sql(&format!("DROP DATABASE {old} WITH (FORCE)")).is_err()
        });
    }
    assert!(without_relay.is_empty(), "databases without a relay 10 s after CREATE EXTENSION: {without_relay:#?}\n{}", pg.log());
}

/// DROP EXTENSION and CREATE EXTENSION back to back, 20 times, with events of each
/// installation waiting: every time the relay stays (or comes back) for the new installation,
/// emit works again within 10 s, and every event of every installation is delivered once.
#[test]
fn drop_and_create_extension_back_to_back_twenty_times() {
    let (kafka, pg) = cluster();
    pg.create_extension();
    let mut emitted = Emitted::default();
    for round in 0..20 {
        emit_soon(&pg, &mut emitted, 10, &format!("round {round}"));
        pg.sql("DROP EXTENSION outbox_ext;\nCREATE EXTENSION outbox_ext;");
    }
    wait_until("the relay to serve the last installation", RELAY_COMES, || pg.relay_has_slot());
    delivers(&kafka, &pg, emitted, "20 × DROP and CREATE EXTENSION");
}

/// The safety net: a relay that leaves its database while the database has a slot of ours
/// (here a test hook makes it leave as if its request had been lost) is started again by the
/// launcher's next scan of pg_database, at most 10 s later. Events emitted meanwhile wait in
/// WAL and are delivered.
#[test]
fn a_database_whose_relay_was_lost_gets_one_back_within_a_scan() {
    let (kafka, pg) = cluster();
    pg.create_extension();
    pg.wait_for_state("streaming", DEADLINE);
    pg.arm_hook(&hook(ABANDON, "postgres"));
    let pid = pg.worker_pid().expect("the relay runs");
    pg.sql(&format!("SELECT pg_terminate_backend({pid})"));
    // Started again (it was still wanted), this relay leaves and clears what it was wanted for.
    wait_until("the restarted relay to abandon the database", DEADLINE, || {
        pg.log().contains("abandoning its database for a test") && pg.worker_pid().is_none()
    });
    pg.disarm_hook(&hook(ABANDON, "postgres"));
    let mut emitted = Emitted::default();
    emit_soon(&pg, &mut emitted, 20, "while the relay is away");
    wait_until("the launcher to start a relay again", Duration::from_secs(30), || pg.relay_has_slot());
    assert!(pg.log().contains("has a replication slot of outbox_ext but no relay"), "{}", pg.log());
    delivers(&kafka, &pg, emitted, "relay lost, found by the launcher's scan");
}
