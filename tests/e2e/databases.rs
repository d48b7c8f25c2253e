//! Several databases in one cluster, each with the extension and so with its own relay and
//! slot. The topic template is `{database}.{aggregatetype}`, so each database's events have
//! topics of their own, and the checker judges each database against its topic alone: an event
//! of another database on it would count as a phantom.

use outbox_tests::{check, holds_for, wait_until, Collector, Emitted, Load, LoadShape, MockKafka, PgCluster, DEADLINE};
use std::time::Duration;

const TEMPLATE: &str = "{database}.{aggregatetype}";

/// A mock Kafka cluster with a topic per database, and a cluster (with no extension in
/// `postgres`) whose databases `names` have the extension, their relays streaming.
fn cluster(names: &[&str], extra: &[(&str, &str)]) -> (MockKafka, PgCluster, Vec<PgCluster>) {
    let kafka = MockKafka::start(3);
    for name in names {
        kafka.create_topic(&topic(name), 3);
    }
    let mut settings = vec![("outbox.bootstrap_servers", kafka.bootstrap.as_str()), ("outbox.topic", TEMPLATE)];
    settings.extend_from_slice(extra);
    let pg = PgCluster::init(&settings);
    let dbs = names.iter().map(|name| add_database(&pg, name)).collect();
    (kafka, pg, dbs)
}

/// CREATE DATABASE and CREATE EXTENSION, waiting until its relay has made its slot.
fn add_database(pg: &PgCluster, name: &str) -> PgCluster {
    pg.sql(&format!("CREATE DATABASE {name}"));
    let db = PgCluster::attach(pg, name);
    db.create_extension();
    db.wait_for_state("streaming", DEADLINE);
    db
}

fn topic(database: &str) -> String {
    format!("{database}.order")
}

/// The relays as `outbox.relays()` lists them, one `database state` line each.
fn relays(db: &PgCluster) -> String {
    db.sql("SELECT string_agg(database || ' ' || state, ',' ORDER BY database) FROM outbox.relays()")
}

/// Reads each database's topic to its end and checks it against what was emitted there.
fn check_each(kafka: &MockKafka, work: &[(&str, Emitted)], scenario: &str, max_duplicates: usize) {
    for (name, emitted) in work {
        let topic = topic(name);
        let mut c = Collector::new(&kafka.bootstrap, &[(topic.as_str(), 3)]);
        c.until_all(emitted, DEADLINE);
        c.until_end(&[(topic.as_str(), 3)], DEADLINE);
        assert!(c.records.iter().all(|r| r.topic == topic));
        check(emitted, &c.records).assert_ok(&format!("{scenario}: database {name}"), max_duplicates);
    }
}

#[test]
fn four_databases_stream_to_their_own_topics_while_others_come_and_go() {
    let names = ["shop1", "shop2", "shop3", "shop4"];
    let (kafka, pg, dbs) = cluster(&names, &[]);
    kafka.create_topic(&topic("shop5"), 3);
    let shape = LoadShape { writers: 1, batch: 20, rollback_every: 5, ..LoadShape::default() };
    let mut loads: Vec<Load> = dbs.iter().map(|db| Load::start(db, "order", shape)).collect();
    for load in &loads {
        load.wait_for_committed(500);
    }

    // Every database sees every relay, and so does a role that is not a superuser.
    let all = "shop1 streaming,shop2 streaming,shop3 streaming,shop4 streaming";
    for db in &dbs {
        assert_eq!(relays(db), all, "outbox.relays() in {}", db.database);
    }
    pg.sql("CREATE ROLE monitor LOGIN");
    pg.set("outbox.kafka_properties", "client.id=x;sasl.password=hunter2-secret");
    let seen = dbs[0].sql("SET ROLE monitor; SELECT string_agg(r::text, E'\\n') FROM outbox.relays() r");
    assert_eq!(seen.lines().count(), 4, "{seen}");
    assert!(!seen.contains("hunter2"), "relays() shows a secret: {seen}");
    for (db, name) in dbs.iter().zip(names) {
        let slot = db.status("slot_name");
        assert!(slot.starts_with(&format!("outbox_{name}_")), "{slot}");
        assert!(seen.contains(&slot), "{seen} lists {slot}");
    }

    // A fifth database joins while the others stream: its relay starts on CREATE EXTENSION.
    let shop5 = add_database(&pg, "shop5");
    loads.push(Load::start(&shop5, "order", shape));
    loads[4].wait_for_committed(200);

    // One leaves while the others stream: its relay delivers what was committed, drops its
    // slot and exits, and emit there is gone with the extension.
    let shop4 = loads.remove(3).stop();
    dbs[3].sql("DROP EXTENSION outbox_ext");
    wait_until("shop4's relay to retire", DEADLINE, || !relays(&dbs[0]).contains("shop4"));
    assert_eq!(dbs[3].sql("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"), "0");

    // The others streamed throughout, and still do.
    let before: Vec<usize> = loads.iter().map(Load::committed).collect();
    for (load, n) in loads.iter().zip(&before) {
        load.wait_for_committed(n + 200);
    }
    assert_eq!(relays(&dbs[0]), "shop1 streaming,shop2 streaming,shop3 streaming,shop5 streaming");
    let mut work = vec![("shop4", shop4)];
    for (name, load) in ["shop1", "shop2", "shop3", "shop5"].into_iter().zip(loads) {
        work.push((name, load.stop()));
    }
    check_each(&kafka, &work, "4 databases, one created and one dropped on the way", 0);
}

#[test]
fn every_relay_comes_back_after_a_clean_restart_and_a_crash() {
    let names = ["app1", "app2", "app3", "app4"];
    let (kafka, mut pg, dbs) = cluster(&names, &[]);
    let mut work: Vec<(&str, Emitted)> = names.iter().map(|n| (*n, Emitted::default())).collect();
    let mut next = 0;
    // A backlog in every database, so that every relay is delivering when the server stops.
    let mut backlog = |dbs: &[PgCluster], work: &mut Vec<(&str, Emitted)>| {
        for (db, (_, emitted)) in dbs.iter().zip(work.iter_mut()) {
            for (id, key) in db.emit_batch("order", "k", 10, next, 5000, true) {
                emitted.commit(id, key);
            }
        }
        next += 5000;
    };
    for mode in ["fast", "immediate"] {
        backlog(&dbs, &mut work);
        wait_until("every relay to deliver", DEADLINE, || {
            dbs[0].sql("SELECT count(*) FROM outbox.relays() WHERE events_delivered > 0") == "4"
        });
        pg.pg_ctl_stop(mode);
        pg.pg_ctl_start();
        wait_until("every relay to stream again", DEADLINE, || {
            dbs[0].try_sql("SELECT count(*) FROM outbox.relays() WHERE state = 'streaming' AND pid IS NOT NULL")
                == Ok("4".into())
        });
    }
    backlog(&dbs, &mut work);
    // What was delivered but not yet confirmed before the crash is found in Kafka, not sent again.
    check_each(&kafka, &work, "clean restart, then pg_ctl stop -m immediate", 0);
}

/// With a template without `{database}`, the relays of two databases write the same topic,
/// interleaved in each partition. Each relay finds its own records there after a crash, and
/// another database's records never make it skip one of its own events.
#[test]
fn two_databases_sharing_a_topic_lose_nothing_and_duplicate_nothing_across_a_crash() {
    const SHARED: &str = "shared.order";
    let names = ["crm1", "crm2"];
    let (kafka, mut pg, dbs) = cluster(&[], &[("outbox.topic", "shared.{aggregatetype}")]);
    kafka.create_topic(SHARED, 3);
    let dbs: Vec<PgCluster> = dbs.into_iter().chain(names.iter().map(|n| add_database(&pg, n))).collect();
    let mut work: Vec<(&str, Emitted)> = names.iter().map(|n| (*n, Emitted::default())).collect();
    for round in 0..2 {
        // Both databases commit a backlog at once, so their records interleave.
        std::thread::scope(|scope| {
            for (db, (_, emitted)) in dbs.iter().zip(work.iter_mut()) {
                scope.spawn(move || {
                    for (id, key) in db.emit_batch("order", "k", 10, round * 8000, 8000, true) {
                        emitted.commit(id, key);
                    }
                });
            }
        });
        wait_until("both relays to deliver", DEADLINE, || {
            dbs[0].sql("SELECT count(*) FROM outbox.relays() WHERE events_delivered > 0") == "2"
        });
        pg.pg_ctl_stop("immediate");
        pg.pg_ctl_start();
        wait_until("both relays to stream again", DEADLINE, || {
            dbs[0].try_sql("SELECT count(*) FROM outbox.relays() WHERE state = 'streaming' AND pid IS NOT NULL")
                == Ok("2".into())
        });
    }
    let mut c = Collector::new(&kafka.bootstrap, &[(SHARED, 3)]);
    for (_, emitted) in &work {
        c.until_all(emitted, DEADLINE);
    }
    c.until_end(&[(SHARED, 3)], DEADLINE);
    // Each database is judged on its own records; a record of neither counts as a phantom.
    for (i, (name, emitted)) in work.iter().enumerate() {
        let other = &work[1 - i].1;
        let theirs: std::collections::HashSet<&str> = other.committed.iter().map(|(id, _)| id.as_str()).collect();
        let mine: Vec<outbox_tests::Record> =
            c.records.iter().filter(|r| !r.header("id").is_some_and(|id| theirs.contains(id))).cloned().collect();
        check(emitted, &mine).assert_ok(&format!("shared topic, 2 crashes: database {name}"), 0);
    }
}

#[test]
fn a_relay_stopped_on_a_delivery_error_leaves_the_others_delivering() {
    let names = ["ok1", "ok2", "stuck"];
    let (kafka, _pg, dbs) = cluster(&names, &[]);
    let shape = LoadShape { writers: 1, batch: 20, ..LoadShape::default() };
    kafka.cluster.topic_error(&topic("stuck"), rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).unwrap();
    let loads: Vec<Load> = dbs.iter().map(|db| Load::start(db, "order", shape)).collect();
    dbs[2].wait_for_state("delivery_error", DEADLINE);
    let before: Vec<usize> = loads.iter().map(Load::committed).collect();
    for (load, n) in loads.iter().zip(&before).take(2) {
        load.wait_for_committed(n + 500);
    }
    holds_for("the other relays streaming", Duration::from_secs(2), || {
        relays(&dbs[0]) == "ok1 streaming,ok2 streaming,stuck delivery_error"
    });
    // The operator grants access and resumes that relay alone.
    kafka.cluster.topic_error(&topic("stuck"), rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).unwrap();
    assert_eq!(dbs[2].sql("SELECT outbox.resume()"), "t");
    let mut work = Vec::new();
    for (name, load) in names.into_iter().zip(loads) {
        work.push((name, load.stop()));
    }
    check_each(&kafka, &work, "one relay in delivery_error", 0);
}

/// The window between CREATE EXTENSION's commit and the slot's creation is held open by the
/// relay's test hook (src/relay/test_hooks.rs). (A transaction with an id does not hold it
/// reliably: on 16.2 a new slot can start from a snapshot another relay's decoding saved at the
/// same WAL position, without waiting for running transactions.) A crash in that window loses
/// nothing: the launcher looks at every database after the restart, and the relay makes the
/// slot then.
#[test]
fn a_crash_between_create_extension_and_the_slot_loses_nothing() {
    const HOLD: &str = "outbox_test_hold.before_slot_creation.late";
    let (kafka, mut pg, _dbs) = cluster(&["first"], &[]);
    kafka.create_topic(&topic("late"), 3);
    pg.sql("CREATE DATABASE late");
    let late = PgCluster::attach(&pg, "late");
    pg.arm_hook(HOLD);
    late.sql("CREATE EXTENSION outbox_ext");
    wait_until("late's relay to be about to make its slot", DEADLINE, || {
        pg.hook_file_exists("outbox_test_held.before_slot_creation.late")
    });
    assert_eq!(late.sql("SELECT state FROM outbox.relays() WHERE database = 'late'"), "starting");
    let err = late.sql_error("SELECT outbox.emit('order', 'k', 'E', '{}')");
    assert!(err.starts_with("55000"), "emit before the slot exists: {err}");
    assert_eq!(late.sql("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"), "0");
    pg.pg_ctl_stop("immediate");
    pg.disarm_hook(HOLD);
    pg.pg_ctl_start();
    late.wait_for_state("streaming", DEADLINE);
    let mut emitted = Emitted::default();
    for (id, key) in late.emit_batch("order", "k", 10, 0, 100, true) {
        emitted.commit(id, key);
    }
    check_each(&kafka, &[("late", emitted)], "crash before the slot", 0);
}
