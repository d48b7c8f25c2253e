//! What an operator meets first: the extension refuses to run on a server that is not set up
//! for it, emit is not for everyone, and the Kafka properties stay hidden.

use outbox_tests::{pg_major, Collector, MockKafka, PgCluster, DEADLINE};

#[test]
fn create_extension_requires_preloading() {
    let pg = PgCluster::init(&[("shared_preload_libraries", "")]);
    let err = pg.sql_error("CREATE EXTENSION outbox_ext");
    assert!(err.starts_with("55000"), "{err}");
    assert!(err.contains("shared_preload_libraries"), "{err}");
}

#[test]
fn create_extension_requires_wal_level_logical() {
    let pg = PgCluster::init(&[("wal_level", "replica")]);
    let err = pg.sql_error("CREATE EXTENSION outbox_ext");
    assert!(err.starts_with("55000"), "{err}");
    assert!(err.contains("wal_level"), "{err}");
}

#[test]
fn a_template_gets_no_relay_and_settings_of_0_1_0_are_only_warned_about() {
    // 0.1.0's settings still start the server; the launcher says they do nothing now.
    let pg = PgCluster::start(&[("outbox.database", "app"), ("outbox.slot_name", "mine")]);
    pg.wait_for_state("unconfigured", DEADLINE);
    outbox_tests::wait_until("the launcher's warning", DEADLINE, || {
        pg.log().contains("outbox.database is no longer used") && pg.log().contains("outbox.slot_name is no longer used")
    });
    // A relay in a template would block CREATE DATABASE from it: templates get none, and emit
    // there says that no slot would read the event.
    pg.sql("CREATE DATABASE tmpl IS_TEMPLATE true");
    let tmpl = PgCluster::attach(&pg, "tmpl");
    tmpl.sql("CREATE EXTENSION outbox_ext");
    let err = tmpl.sql_error("SELECT outbox.emit('a', 'b', 'c', '{}')");
    assert!(err.starts_with("55000"), "{err}");
    assert!(err.contains("has no relay replication slot"), "{err}");
    pg.sql("CREATE DATABASE copy TEMPLATE tmpl");
}

#[test]
fn emit_needs_a_grant_and_kafka_properties_stay_hidden() {
    let kafka = MockKafka::start(1);
    let pg = PgCluster::start(&[
        ("outbox.bootstrap_servers", &kafka.bootstrap),
        ("outbox.kafka_properties", "client.id=not-for-app-eyes"),
    ]);
    pg.wait_for_state("streaming", DEADLINE);
    pg.sql("CREATE ROLE app LOGIN; CREATE ROLE granted LOGIN;");
    pg.sql("GRANT EXECUTE ON FUNCTION outbox.emit(text, text, text, jsonb, jsonb) TO granted");

    let as_app = |sql: &str| pg.sql_error(&format!("SET ROLE app;\n{sql}"));
    assert!(as_app("SELECT outbox.emit('a', 'b', 'c', '{}')").starts_with("42501"));
    assert!(as_app("SHOW outbox.kafka_properties").starts_with("42501"));
    assert!(as_app("SELECT current_setting('outbox.kafka_properties')").starts_with("42501"));
    let visible = pg.sql(
        "SET ROLE app;
         SELECT count(*) FROM pg_settings WHERE name = 'outbox.kafka_properties' AND setting LIKE '%not-for-app%';",
    );
    assert_eq!(visible, "0");
    let status = pg.sql("SET ROLE app; SELECT row(s.*)::text FROM outbox.status() s;");
    assert!(!status.contains("not-for-app"), "{status}");
    let show_all = pg.sql("SET ROLE app; SHOW ALL;");
    assert!(!show_all.contains("not-for-app"));
    // With the grant, emit works.
    let id = pg.sql("SET ROLE granted; SELECT outbox.emit('a', 'b', 'c', '{}');");
    assert_eq!(id.lines().last().unwrap().len(), 36);
    // A superuser sees the value.
    assert_eq!(pg.sql("SHOW outbox.kafka_properties"), "client.id=not-for-app-eyes");

    // Reloads, a rejected entry and a rebuilt producer: no log line and no status shows a value.
    pg.set("outbox.kafka_properties", "client.id=x;sasl.password=hunter2-secret");
    pg.wait_for_state("streaming", DEADLINE);
    pg.set("outbox.kafka_properties", "client.id=x;not.a.property=hunter2-secret");
    pg.wait_for_state("config_error", DEADLINE);
    let error = pg.status("last_error");
    assert!(error.contains("entry 2") && !error.contains("hunter2"), "{error}");
    pg.set("outbox.kafka_properties", "client.id=x;linger.ms=5;sasl.password=hunter2-secret");
    pg.wait_for_state("streaming", DEADLINE);
    let log = pg.log();
    assert!(log.contains("configuration reloaded"), "the reloads are in the log");
    for secret in ["not-for-app", "hunter2"] {
        assert!(!log.contains(secret), "the server log shows kafka_properties ({secret})");
    }
}

/// Some releases (15.20 and 18.6 among the tested ones) load output plugins only from
/// `output_plugin_libraries`; others (16.2, 17.9) have no such setting. Either way the relay
/// decodes with its own library, and the server's list stays as the operator set it.
#[test]
fn the_relay_decodes_whatever_output_plugin_libraries_allows() {
    let kafka = MockKafka::start(1);
    kafka.create_topic("outbox.event.plugin", 1);
    let mut pg = PgCluster::start(&[("outbox.bootstrap_servers", &kafka.bootstrap)]);
    let present = pg.sql("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'") == "1";
    eprintln!("[output_plugin_libraries] PostgreSQL {}: {}", pg_major(), if present { "present" } else { "absent" });
    if present {
        // The strictest list that still lets the server's own replication work.
        pg.sql("ALTER SYSTEM SET output_plugin_libraries = 'pgoutput'");
        pg.pg_ctl_stop("fast");
        pg.pg_ctl_start();
    }
    pg.wait_for_state("streaming", DEADLINE);
    let id = pg.sql("SELECT outbox.emit('plugin', 'p-1', 'Probe', '{}')");
    let mut c = Collector::new(&kafka.bootstrap, &[("outbox.event.plugin", 1)]);
    c.until("the event", DEADLINE, |r| r.iter().any(|r| r.header("id") == Some(id.as_str())));
    if present {
        assert_eq!(pg.sql("SHOW output_plugin_libraries"), "pgoutput", "sessions keep the server's list");
        let err = pg.sql_error("SELECT pg_create_logical_replication_slot('by_hand', 'outbox_ext')");
        assert!(err.contains("may not be used as an output plugin"), "{err}");
    }
}

/// On 17 and later the relay's slot is a failover slot (standbys with sync_replication_slots
/// copy it), unless `outbox.failover_slot` is off; 15 and 16 have no failover slots.
/// `outbox.status()` says which.
#[test]
fn the_slot_is_a_failover_slot_where_postgresql_has_them() {
    let failover = |pg: &PgCluster| {
        let catalog = pg.sql(
            "SELECT coalesce((to_jsonb(s) ->> 'failover')::boolean, false) FROM pg_replication_slots s WHERE plugin = 'outbox_ext' AND database = current_database()",
        );
        assert_eq!(pg.sql("SELECT slot_failover FROM outbox.status()"), catalog, "status() agrees with pg_replication_slots");
        catalog
    };
    let has_failover_slots = pg_major() >= 17;
    let pg = PgCluster::start(&[]);
    assert_eq!(failover(&pg), if has_failover_slots { "t" } else { "f" });
    if has_failover_slots {
        let off = PgCluster::start(&[("outbox.failover_slot", "off")]);
        assert_eq!(failover(&off), "f");
    }
}
