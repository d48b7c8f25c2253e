//! Events follow their transaction: committed ones arrive, rolled-back ones never do, whether
//! rolled back whole, to a savepoint, or as a prepared transaction. Triggers can emit.

use outbox_tests::{streaming_relay, Collector, MockKafka, PgCluster, Record, DEADLINE};
use std::collections::HashSet;

fn setup(topic: &str) -> (MockKafka, PgCluster, Collector) {
    let (kafka, pg) = streaming_relay(&[topic], &[]);
    let c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    (kafka, pg, c)
}

fn types(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.header("type").unwrap_or_default().to_string()).collect()
}

/// Emits a final marker on the same key (hence the same partition) and consumes until it
/// arrives: everything committed before it has arrived by then, in the same partition order.
fn until_marker(pg: &PgCluster, c: &mut Collector, aggregatetype: &str, key: &str) {
    pg.sql(&format!("SELECT outbox.emit('{aggregatetype}', '{key}', 'Marker', '{{}}')"));
    c.until("the marker", DEADLINE, |r| r.iter().any(|r| r.header("type") == Some("Marker")));
}

#[test]
fn rollback_and_savepoint_rollback_discard_exactly_their_events() {
    let (_kafka, pg, mut c) = setup("outbox.event.tx");
    pg.sql(
        "BEGIN;
         SELECT outbox.emit('tx', 'k', 'RolledBack', '{}');
         ROLLBACK;

         BEGIN;
         SELECT outbox.emit('tx', 'k', 'Kept1', '{}');
         SAVEPOINT a;
         SELECT outbox.emit('tx', 'k', 'UndoneAtA', '{}');
         SAVEPOINT b;
         SELECT outbox.emit('tx', 'k', 'UndoneWithA', '{}');
         ROLLBACK TO SAVEPOINT a;
         SELECT outbox.emit('tx', 'k', 'Kept2', '{}');
         SAVEPOINT c;
         SELECT outbox.emit('tx', 'k', 'KeptReleased', '{}');
         RELEASE SAVEPOINT c;
         COMMIT;",
    );
    let err = pg.sql_error(
        "BEGIN;
         SELECT outbox.emit('tx', 'k', 'AbortedWithError', '{}');
         SELECT 1/0;",
    );
    assert!(err.starts_with("22012"), "{err}");
    until_marker(&pg, &mut c, "tx", "k");
    assert_eq!(types(&c.records), ["Kept1", "Kept2", "KeptReleased", "Marker"]);
}

#[test]
fn plpgsql_exception_blocks_roll_back_their_events() {
    let (_kafka, pg, mut c) = setup("outbox.event.plpgsql");
    pg.sql(
        "DO $$
         BEGIN
           PERFORM outbox.emit('plpgsql', 'k', 'Before', '{}');
           BEGIN
             PERFORM outbox.emit('plpgsql', 'k', 'InsideFailedBlock', '{}');
             PERFORM 1/0;
           EXCEPTION WHEN division_by_zero THEN
             PERFORM outbox.emit('plpgsql', 'k', 'InHandler', '{}');
           END;
         END $$;",
    );
    until_marker(&pg, &mut c, "plpgsql", "k");
    assert_eq!(types(&c.records), ["Before", "InHandler", "Marker"]);
}

#[test]
fn two_phase_commit_publishes_on_commit_prepared_only() {
    let (_kafka, pg, mut c) = setup("outbox.event.twopc");
    pg.sql(
        "BEGIN;
         SELECT outbox.emit('twopc', 'k', 'Prepared1', '{}');
         PREPARE TRANSACTION 'p1';
         BEGIN;
         SELECT outbox.emit('twopc', 'k', 'Prepared2', '{}');
         PREPARE TRANSACTION 'p2';",
    );
    // Nothing of a prepared transaction is published before it commits: a marker committed
    // after the prepare arrives alone.
    until_marker(&pg, &mut c, "twopc", "k");
    assert_eq!(types(&c.records), ["Marker"]);
    pg.sql("COMMIT PREPARED 'p1'");
    pg.sql("ROLLBACK PREPARED 'p2'");
    pg.sql("SELECT outbox.emit('twopc', 'k', 'After', '{}')");
    c.until("the last event", DEADLINE, |r| r.iter().any(|r| r.header("type") == Some("After")));
    assert_eq!(types(&c.records), ["Marker", "Prepared1", "After"]);
}

#[test]
fn after_insert_trigger_emits_the_new_row() {
    let (_kafka, pg, mut c) = setup("outbox.event.order");
    pg.sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(10,2));
         CREATE FUNCTION orders_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM outbox.emit('order', NEW.id::text, 'OrderCreated', to_jsonb(NEW));
           RETURN NEW;
         END $$;
         CREATE TRIGGER orders_outbox AFTER INSERT ON orders
           FOR EACH ROW EXECUTE FUNCTION orders_outbox();
         INSERT INTO orders VALUES (1, 'alice', 10.50), (2, 'bob', 20.00);
         BEGIN;
         INSERT INTO orders VALUES (3, 'carol', 30.00);
         ROLLBACK;",
    );
    c.until_count(2, DEADLINE);
    let mut by_id: Vec<(String, serde_json::Value)> =
        c.records.iter().map(|r| (r.key.clone().unwrap(), r.json())).collect();
    by_id.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(by_id[0].0, "1");
    assert_eq!(by_id[0].1, serde_json::json!({"id": 1, "customer": "alice", "amount": 10.50}));
    assert_eq!(by_id[1].1, serde_json::json!({"id": 2, "customer": "bob", "amount": 20.00}));
    assert!(c.records.iter().all(|r| r.topic == "outbox.event.order" && r.header("type") == Some("OrderCreated")));
    // The rolled-back insert's event never arrives.
    until_marker(&pg, &mut c, "order", "3");
    let keys: Vec<_> = c.records.iter().map(|r| r.key.clone().unwrap()).collect();
    assert_eq!(keys.iter().filter(|k| *k == "3").count(), 1, "only the marker for key 3: {keys:?}");
}

#[test]
fn rejected_emits_raise_sqlstates_and_write_nothing() {
    let (_kafka, pg, mut c) = setup("outbox.event.bad");
    let cases = [
        ("SELECT outbox.emit(NULL, 'k', 't', '{}')", "22004"),
        ("SELECT outbox.emit('bad', NULL, 't', '{}')", "22004"),
        ("SELECT outbox.emit('bad', 'k', NULL, '{}')", "22004"),
        ("SELECT outbox.emit('bad', 'k', 't', NULL)", "22004"),
        ("SELECT outbox.emit('', 'k', 't', '{}')", "22023"),
        ("SELECT outbox.emit('bad', '', 't', '{}')", "22023"),
        ("SELECT outbox.emit('bad type', 'k', 't', '{}')", "22023"),
        ("SELECT outbox.emit('bad/x', 'k', 't', '{}')", "22023"),
        ("SELECT outbox.emit(repeat('x', 240), 'k', 't', '{}')", "22023"),
        ("SELECT outbox.emit('bad', 'k', 't', '{}', '[]')", "22023"),
        ("SELECT outbox.emit('bad', 'k', 't', '{}', '{\"a\": 1}')", "22023"),
        ("SELECT outbox.emit('bad', 'k', 't', '{}', '{\"id\": \"forged\"}')", "22023"),
        ("SELECT outbox.emit('bad', 'k', 't', jsonb_build_object('x', repeat('y', 1000000)))", "54000"),
    ];
    for (sql, state) in cases {
        let err = pg.sql_error(sql);
        assert!(err.starts_with(state), "{sql}: expected {state}, got {err}");
    }
    // Errors inside a transaction leave the rest of it untouched when caught by a savepoint.
    pg.sql(
        "BEGIN;
         SELECT outbox.emit('bad', 'k', 'Good1', '{}');
         SAVEPOINT s;
         ROLLBACK TO SAVEPOINT s;
         COMMIT;",
    );
    until_marker(&pg, &mut c, "bad", "k");
    assert_eq!(types(&c.records), ["Good1", "Marker"]);
}

#[test]
fn concurrent_writers_lose_nothing() {
    let (_kafka, pg, mut c) = setup("outbox.event.conc");
    // Four writers in parallel, each with committed and rolled-back transactions.
    std::thread::scope(|scope| {
        for w in 0..4 {
            let pg = &pg;
            scope.spawn(move || {
                let script = (0..50)
                    .map(|i| {
                        let (end, kept) = if i % 5 == 4 { ("ROLLBACK", false) } else { ("COMMIT", true) };
                        format!(
                            "BEGIN; SELECT outbox.emit('conc', 'w{w}', 'E', jsonb_build_object('w', {w}, 'i', {i}, 'kept', {kept})); {end};"
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                pg.sql(&script);
            });
        }
    });
    c.until_count(4 * 40, DEADLINE);
    let mut seen = HashSet::new();
    for (key, records) in c.by_key() {
        let is: Vec<i64> = records.iter().map(|r| r.json()["i"].as_i64().unwrap()).collect();
        assert!(is.windows(2).all(|w| w[0] < w[1]), "{key}: {is:?}");
        for r in records {
            assert_eq!(r.json()["kept"], serde_json::json!(true), "rolled back event arrived");
            seen.insert((key.clone(), r.json()["i"].as_i64().unwrap()));
        }
    }
    assert_eq!(seen.len(), 160);
}
