//! Upgrades, as a package upgrade does them: the new library is installed while a database
//! still has the previous version of the extension; then `ALTER EXTENSION outbox_ext UPDATE`.
//! Until the update, emit refuses (its records could not be authenticated) and the relay says
//! what to do; after it, events flow, also those that waited in WAL across a restart, and the
//! upgraded schema is the same as a fresh installation's.

use outbox_tests::{
    check, install_extension_script, wait_until, Collector, Emitted, MockKafka, PgCluster, DEADLINE,
};
use std::path::Path;

/// The first release. Its install script, as it shipped, is tests/fixtures/outbox_ext--0.1.0.sql.
const FIRST_RELEASE: &str = "0.1.0";

/// The release before this one (tests/fixtures/outbox_ext--0.2.0.sql, as it shipped).
const PREVIOUS_RELEASE: &str = "0.2.0";

/// Everything of the extension a user can see or rely on, one line per object: members,
/// function signatures, results, volatility, security, settings, grants, comments and bodies,
/// tables with their row-level security, columns, indexes, constraints and policies, and the
/// schema's grants.
fn schema_of(pg: &PgCluster) -> String {
    pg.sql(
        "SELECT string_agg(line, E'\\n' ORDER BY line) FROM (
             SELECT 'member ' || pg_describe_object(classid, objid, 0) AS line
             FROM pg_depend
             WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
               AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'outbox_ext')
             UNION ALL
             SELECT format('function %s returns %s volatile=%s parallel=%s strict=%s secdef=%s config=%s acl=%s comment=%s body=%s',
                           p.oid::regprocedure, pg_get_function_result(p.oid), p.provolatile, p.proparallel,
                           p.proisstrict, p.prosecdef, p.proconfig, p.proacl, obj_description(p.oid, 'pg_proc'),
                           md5(p.prosrc))
             FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('function %s argument defaults %s', p.oid::regprocedure, pg_get_function_arguments(p.oid))
             FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('relation %s kind=%s acl=%s rls=%s forced=%s comment=%s', c.relname, c.relkind,
                           c.relacl, c.relrowsecurity, c.relforcerowsecurity, obj_description(c.oid, 'pg_class'))
             FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('index %s', pg_get_indexdef(i.indexrelid))
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid))
             FROM pg_constraint WHERE connamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('policy %s', polname) FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
             WHERE c.relnamespace = 'outbox'::regnamespace
             UNION ALL
             SELECT format('column %s.%s %s not_null=%s default=%s', c.relname, a.attname,
                           format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE c.relnamespace = 'outbox'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
             UNION ALL
             SELECT format('schema acl=%s', nspacl) FROM pg_namespace WHERE nspname = 'outbox'
         ) objects",
    )
}

#[test]
fn update_from_the_first_release_authenticates_events_and_matches_a_fresh_install() {
    let topic = "outbox.event.upgrade";
    let kafka = MockKafka::start(3);
    kafka.create_topic(topic, 3);
    install_extension_script(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/outbox_ext--0.1.0.sql"));
    // No Kafka settings yet: events wait in WAL.
    let mut pg = PgCluster::init(&[]);
    pg.sql(&format!("CREATE EXTENSION outbox_ext VERSION '{FIRST_RELEASE}'"));
    // 0.1.0's status() names the slot by outbox.slot_name, which this library ignores: look
    // at the database's slot itself. (A database that 0.1.0's library relayed keeps its slot,
    // recorded in outbox.relay_slot.)
    wait_until("the relay to make its slot", DEADLINE, || {
        pg.sql("SELECT count(*) FROM pg_replication_slots WHERE plugin = 'outbox_ext' AND database = current_database() AND confirmed_flush_lsn IS NOT NULL") == "1"
    });
    assert_eq!(pg.sql("SELECT extversion FROM pg_extension WHERE extname = 'outbox_ext'"), FIRST_RELEASE);
    let current = pg.sql("SELECT default_version FROM pg_available_extensions WHERE name = 'outbox_ext'");
    assert_ne!(current, FIRST_RELEASE, "the build under test must be a later version");

    // The old SQL works with the new library (status() shows what to do), but emit refuses:
    // there is no key to authenticate its records with yet.
    pg.wait_for_state("update_required", DEADLINE);
    assert!(pg.status("last_error").contains("ALTER EXTENSION outbox_ext UPDATE"));
    let err = pg.sql_error("SELECT outbox.emit('upgrade', 'k', 'E', '{}')");
    assert!(err.starts_with("55000") && err.contains("record key"), "{err}");

    pg.sql("ALTER EXTENSION outbox_ext UPDATE");
    assert_eq!(pg.sql("SELECT extversion FROM pg_extension WHERE extname = 'outbox_ext'"), current);
    pg.wait_for_state("unconfigured", DEADLINE);

    // Events wait in WAL, across a restart, and arrive once Kafka is configured.
    let mut emitted = Emitted::default();
    for batch in 0..10 {
        for (id, key) in pg.emit_batch("upgrade", "k", 7, batch * 50, 50, true) {
            emitted.commit(id, key);
        }
    }
    let pending: i64 = pg.status("pending_bytes").parse().unwrap();
    assert!(pending > 0, "events wait in WAL: pending_bytes {pending}");
    pg.pg_ctl_stop("fast");
    pg.pg_ctl_start();

    // What waited arrives, and emit keeps working.
    pg.set("outbox.bootstrap_servers", &kafka.bootstrap);
    pg.wait_for_state("streaming", DEADLINE);
    for (id, key) in pg.emit_batch("upgrade", "k", 7, 500, 50, true) {
        emitted.commit(id, key);
    }
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("ALTER EXTENSION UPDATE, then 500 events pending across a restart", 0);

    // An upgraded database and a fresh installation have the same objects.
    pg.sql("CREATE DATABASE fresh");
    let fresh = PgCluster::attach(&pg, "fresh");
    fresh.sql("CREATE EXTENSION outbox_ext");
    let (upgraded, installed) = (schema_of(&pg), schema_of(&fresh));
    assert!(installed.lines().count() > 20, "the comparison sees the extension's objects:\n{installed}");
    assert_eq!(upgraded, installed, "the upgraded schema differs from a fresh installation");
}

/// From 0.2.0: the new library runs with 0.2.0's SQL (emit works, events are relayed), events
/// wait in WAL across the update, and afterwards they arrive, the new functions work, a dead
/// letter of 0.2.0's table keeps its JSON payload, and the schema is a fresh installation's.
#[test]
fn update_from_the_previous_release_with_events_pending() {
    let topic = "outbox.event.upgrade";
    let kafka = MockKafka::start(3);
    kafka.create_topic(topic, 3);
    install_extension_script(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/outbox_ext--0.2.0.sql"));
    let mut pg = PgCluster::init(&[]);
    pg.sql(&format!("CREATE EXTENSION outbox_ext VERSION '{PREVIOUS_RELEASE}'"));
    pg.wait_for_state("unconfigured", DEADLINE);

    // Events emitted through 0.2.0's SQL wait in WAL (no Kafka yet), also a 0.2.0 dead letter.
    let mut emitted = Emitted::default();
    for batch in 0..4 {
        for (id, key) in pg.emit_batch("upgrade", "k", 7, batch * 50, 50, true) {
            emitted.commit(id, key);
        }
    }
    pg.sql("INSERT INTO outbox.dead_letter (id, aggregatetype, aggregateid, type, payload, headers, topic, error_code, error, committed_at)
            VALUES ('01900000-0000-7000-8000-000000000001', 'upgrade', 'k-dead', 'Dead', '{\"old\": true}', '{}', 'outbox.event.upgrade', 29, 'refused', now())");
    assert!(pg.status("pending_bytes").parse::<i64>().unwrap() > 0);
    pg.sql("ALTER EXTENSION outbox_ext UPDATE");
    assert_ne!(pg.sql("SELECT extversion FROM pg_extension WHERE extname = 'outbox_ext'"), PREVIOUS_RELEASE);
    pg.pg_ctl_stop("fast");
    pg.pg_ctl_start();

    // What waited arrives; the new functions and the old dead letter work.
    pg.set("outbox.bootstrap_servers", &kafka.bootstrap);
    pg.wait_for_state("streaming", DEADLINE);
    let tombstone = pg.sql("SELECT outbox.emit_tombstone('upgrade', 'k0', 'Deleted')");
    emitted.commit(tombstone.clone(), "k0");
    assert_eq!(pg.sql("SELECT outbox.redeliver('01900000-0000-7000-8000-000000000001')"), "t");
    emitted.commit("01900000-0000-7000-8000-000000000001", "k-dead");
    let mut c = Collector::new(&kafka.bootstrap, &[(topic, 3)]);
    c.until_all(&emitted, DEADLINE);
    check(&emitted, &c.records).assert_ok("ALTER EXTENSION UPDATE from 0.2.0 with 200 events pending", 0);
    assert_eq!(c.with_id(&tombstone)[0].raw_value, None);
    assert_eq!(c.with_id("01900000-0000-7000-8000-000000000001")[0].json(), serde_json::json!({"old": true}));

    pg.sql("CREATE DATABASE fresh");
    let fresh = PgCluster::attach(&pg, "fresh");
    fresh.sql("CREATE EXTENSION outbox_ext");
    let (upgraded, installed) = (schema_of(&pg), schema_of(&fresh));
    assert!(installed.contains("emit_tombstone"), "{installed}");
    assert_eq!(upgraded, installed, "the upgraded schema differs from a fresh installation");
}
