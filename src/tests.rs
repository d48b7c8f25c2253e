//! In-database tests (`cargo pgrx test`): emit's validation, ids, privileges and settings, run
//! in a server with the library preloaded (see `pg_test::postgresql_conf_options` in lib.rs).
//! Delivery to Kafka is covered by the integration tests in `tests/`.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use std::time::{Duration, Instant};

    /// Runs `sql` and returns the SQLSTATE it raised ("00000" if none). The failed statement is
    /// rolled back to a savepoint, so a test can go on in the same transaction.
    fn sqlstate_of(sql: &str) -> String {
        // Defined once per session, by whoever calls first: only its owner could replace it,
        // and tests call this after SET ROLE too.
        let defined = Spi::get_one::<bool>("SELECT to_regprocedure('pg_temp.sqlstate_of(text)') IS NOT NULL");
        if defined.unwrap() != Some(true) {
            Spi::run(
                "CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $f$
                 BEGIN EXECUTE q; RETURN '00000'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $f$",
            )
            .unwrap();
        }
        Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    /// The relay worker makes its slot shortly after the extension is created. Read-only: a
    /// query that took a transaction id (as `Spi::get_one` does) would make the slot's creation,
    /// which waits for every transaction with an id, wait for this test.
    fn wait_for_slot() {
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = || crate::catalog_read::one::<bool>("SELECT confirmed_lsn IS NOT NULL FROM outbox.status()");
        while ready().unwrap() != Some(true) {
            assert!(Instant::now() < deadline, "the relay did not create its slot");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[pg_test]
    fn emit_returns_increasing_uuidv7s() {
        wait_for_slot();
        let ids: Vec<String> = (0..100)
            .map(|i| {
                Spi::get_one::<pgrx::Uuid>(&format!(
                    "SELECT outbox.emit('order', 'o-{i}', 'OrderCreated', '{{\"i\": {i}}}')"
                ))
                .unwrap()
                .unwrap()
                .to_string()
            })
            .collect();
        for id in &ids {
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "7", "version 7: {id}");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "RFC 9562 variant: {id}");
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase within a backend");
    }

    #[pg_test]
    fn emit_accepts_named_arguments_and_headers() {
        wait_for_slot();
        let state = sqlstate_of(
            "SELECT outbox.emit(aggregatetype => 'order', aggregateid => 'o-1', type => 'OrderCreated', \
             payload => '[1, 2]', headers => '{\"trace\": \"t-1\"}')",
        );
        assert_eq!(state, "00000");
        // JSON null headers mean no headers, like SQL NULL.
        assert_eq!(sqlstate_of("SELECT outbox.emit('order', 'o-1', 'T', '{}', 'null')"), "00000");
    }

    #[pg_test]
    fn emit_rejects_bad_input_with_sqlstates() {
        wait_for_slot();
        let cases = [
            ("SELECT outbox.emit(NULL, 'k', 't', '{}')", "22004"),
            ("SELECT outbox.emit('a', NULL, 't', '{}')", "22004"),
            ("SELECT outbox.emit('a', 'k', NULL, '{}')", "22004"),
            ("SELECT outbox.emit('a', 'k', 't', NULL)", "22004"),
            ("SELECT outbox.emit('', 'k', 't', '{}')", "22023"),
            ("SELECT outbox.emit('a', '', 't', '{}')", "22023"),
            ("SELECT outbox.emit('a', 'k', '', '{}')", "22023"),
            // Templated topic "outbox.event.<aggregatetype>" must be [A-Za-z0-9._-]{1,249}.
            ("SELECT outbox.emit('white space', 'k', 't', '{}')", "22023"),
            ("SELECT outbox.emit('ordér', 'k', 't', '{}')", "22023"),
            ("SELECT outbox.emit(repeat('a', 237), 'k', 't', '{}')", "22023"),
            ("SELECT outbox.emit('a', 'k', 't', '{}', '[\"x\"]')", "22023"),
            ("SELECT outbox.emit('a', 'k', 't', '{}', '\"x\"')", "22023"),
            ("SELECT outbox.emit('a', 'k', 't', '{}', '{\"n\": 1}')", "22023"),
            ("SELECT outbox.emit('a', 'k', 't', '{}', '{\"o\": {\"x\": \"y\"}}')", "22023"),
            ("SELECT outbox.emit('a', 'k', 't', '{}', '{\"type\": \"forged\"}')", "22023"),
            ("SELECT outbox.emit('a', 'k', 't', jsonb_build_object('x', repeat('y', 1000000)))", "54000"),
        ];
        for (sql, expected) in cases {
            assert_eq!(sqlstate_of(sql), expected, "{sql}");
        }
        // 236 characters make a 249-character topic: still legal.
        assert_eq!(sqlstate_of("SELECT outbox.emit(repeat('a', 236), 'k', 't', '{}')"), "00000");
    }

    #[pg_test]
    fn max_payload_bytes_is_configurable_by_superusers() {
        wait_for_slot();
        Spi::run("SET outbox.max_payload_bytes = 10").unwrap();
        assert_eq!(sqlstate_of("SELECT outbox.emit('a', 'k', 't', '\"0123456789\"')"), "54000");
        assert_eq!(sqlstate_of("SELECT outbox.emit('a', 'k', 't', '\"01234567\"')"), "00000");
        let context = Spi::get_one::<String>(
            "SELECT context FROM pg_settings WHERE name = 'outbox.max_payload_bytes'",
        );
        assert_eq!(context.unwrap().as_deref(), Some("superuser"));
    }

    #[pg_test]
    fn emit_is_not_granted_to_public() {
        let public = Spi::get_one::<bool>(
            "SELECT has_function_privilege('public', 'outbox.emit(text,text,text,jsonb,jsonb)', 'EXECUTE')",
        );
        assert_eq!(public.unwrap(), Some(false));
        Spi::run("CREATE ROLE outbox_test_app").unwrap();
        Spi::run("SET ROLE outbox_test_app").unwrap();
        assert_eq!(sqlstate_of("SELECT outbox.emit('a', 'k', 't', '{}')"), "42501");
        // status() shows no secrets and is open to monitoring roles.
        assert_eq!(sqlstate_of("SELECT * FROM outbox.status()"), "00000");
        assert_eq!(sqlstate_of("SHOW outbox.kafka_properties"), "42501");
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn the_record_key_is_for_superusers_only() {
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.relay_key").unwrap(), Some(1));
        assert_eq!(Spi::get_one::<i32>("SELECT length(key) FROM outbox.relay_key").unwrap(), Some(32));
        sqlstate_of("SELECT 1"); // defines it while still superuser
        Spi::run("CREATE ROLE outbox_test_reader").unwrap();
        Spi::run("GRANT pg_read_all_data TO outbox_test_reader").unwrap();
        Spi::run("SET ROLE outbox_test_reader").unwrap();
        // pg_read_all_data may select, but row-level security without a policy shows no row.
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.relay_key").unwrap(), Some(0));
        assert_eq!(sqlstate_of("SELECT outbox._new_key()"), "42501");
        Spi::run("RESET ROLE").unwrap();
        Spi::run("CREATE ROLE outbox_test_plain").unwrap();
        Spi::run("SET ROLE outbox_test_plain").unwrap();
        assert_eq!(sqlstate_of("SELECT key FROM outbox.relay_key"), "42501");
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn settings_have_their_documented_contexts() {
        let rows = [
            ("outbox.bootstrap_servers", "sighup", ""),
            ("outbox.topic", "sighup", "outbox.event.{aggregatetype}"),
            ("outbox.max_payload_bytes", "superuser", "1000000"),
            ("outbox.max_record_bytes", "sighup", "1000000"),
            ("outbox.max_pending_bytes", "sighup", "0"),
            ("outbox.on_permanent_error", "sighup", "stop"),
            ("outbox.failover_slot", "postmaster", "on"),
            ("outbox.dead_letter_topic", "sighup", "outbox.dead_letter"),
            ("outbox.record_format", "sighup", "plain"),
            ("outbox.cloudevents_source", "sighup", "/outbox_ext/{database}"),
            ("outbox.traceparent", "user", ""),
            ("outbox.tracestate", "user", ""),
        ];
        for (name, context, setting) in rows {
            let got = Spi::get_two_with_args::<String, String>(
                "SELECT context, setting FROM pg_settings WHERE name = $1",
                &[name.into()],
            )
            .unwrap();
            assert_eq!(got, (Some(context.to_string()), Some(setting.to_string())), "{name}");
        }
        // outbox.kafka_properties is hidden (GUC_NO_SHOW_ALL) and superuser-only.
        let listed = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_settings WHERE name = 'outbox.kafka_properties'",
        );
        assert_eq!(listed.unwrap(), Some(0));
        let value = Spi::get_one::<String>("SELECT current_setting('outbox.kafka_properties')");
        assert_eq!(value.unwrap().as_deref(), Some(""));
        // The prefix is reserved: a typo is an error, not a silent placeholder.
        assert_eq!(sqlstate_of("SET outbox.bootstrap_server = 'x'"), "42602");
    }

    #[pg_test]
    fn status_returns_one_row_in_a_documented_state() {
        let state = Spi::get_one::<String>("SELECT state FROM outbox.status()").unwrap().unwrap();
        assert!(
            ["not_installed", "starting", "unconfigured", "streaming", "kafka_unavailable", "delivery_error", "stopped", "config_error", "slot_error", "update_required", "waiting_for_standby"]
                .contains(&state.as_str()),
            "{state}"
        );
        let rows = Spi::get_one::<i64>("SELECT count(*) FROM outbox.status()").unwrap();
        assert_eq!(rows, Some(1));
        // The slot's name is derived from the database's: outbox_<name>_<oid>.
        let derived = Spi::get_one::<String>(
            "SELECT 'outbox_' || datname || '_' || oid FROM pg_database WHERE datname = current_database()",
        );
        let slot = Spi::get_one::<String>("SELECT slot_name FROM outbox.status()");
        assert_eq!(slot.unwrap(), derived.unwrap());
        // outbox.relays() lists this database's relay among every database's.
        let listed = Spi::get_one::<i64>("SELECT count(*) FROM outbox.relays() WHERE database = current_database()");
        assert_eq!(listed.unwrap(), Some(1));
        // ack_latency() is this database's relay's histogram; ack_latency(name) any relay's, and
        // every count 0 for a database without one. relays() has the count and the sum.
        let own = Spi::get_one::<i64>("SELECT count(*) FROM outbox.ack_latency() a JOIN outbox.ack_latency(current_database()) b USING (le_ms) WHERE a.transactions = b.transactions");
        assert_eq!(own.unwrap(), Some(outbox_core::latency::BUCKETS as i64));
        let none = Spi::get_one::<i64>("SELECT max(transactions) FROM outbox.ack_latency('no such database')");
        assert_eq!(none.unwrap(), Some(0));
        let counted = Spi::get_one::<bool>(
            "SELECT acked_transactions = (SELECT max(transactions) FROM outbox.ack_latency()) AND ack_latency_sum_ms >= 0
             FROM outbox.relays() WHERE database = current_database()",
        );
        assert_eq!(counted.unwrap(), Some(true));
    }

    /// A row as the relay stores it when the dead-letter topic refused the event too.
    fn insert_dead_letter(id: &str, payload: &str) {
        Spi::run(&format!(
            "INSERT INTO outbox.dead_letter (id, aggregatetype, aggregateid, type, payload, headers, topic, error_code, error, dead_letter_error, committed_at)
             VALUES ('{id}', 'order', 'o-1', 'OrderCreated', '{payload}', '{{\"trace\": \"t\"}}', 'outbox.event.order', 29,
                     'Broker: Topic authorization failed', 'Broker: Message size too large', now())"
        ))
        .unwrap();
    }

    #[pg_test]
    fn dead_letters_are_redelivered_with_their_id_by_superusers_only() {
        wait_for_slot();
        let id = "01890000-0000-7000-8000-000000000001";
        insert_dead_letter(id, r#"{"n": 1}"#);
        insert_dead_letter("01890000-0000-7000-8000-000000000002", r#"{"n": 2}"#);

        Spi::run("CREATE ROLE outbox_test_writer").unwrap();
        Spi::run("GRANT USAGE ON SCHEMA outbox TO outbox_test_writer").unwrap();
        Spi::run("GRANT EXECUTE ON FUNCTION outbox.emit(text, text, text, jsonb, jsonb) TO outbox_test_writer").unwrap();
        sqlstate_of("SELECT 1");
        Spi::run("SET ROLE outbox_test_writer").unwrap();
        for sql in [
            "SELECT outbox.redeliver('01890000-0000-7000-8000-000000000001')",
            "SELECT outbox.redeliver_all()",
            "SELECT outbox._redeliver_event(gen_random_uuid(), 'a', 'k', 't', '{}', NULL, NULL, '{}')",
            "SELECT outbox.emit_binary('a', 'k', 't', '\\x00')",
            "SELECT outbox.emit_tombstone('a', 'k', 't')",
            "SELECT count(*) FROM outbox.dead_letter",
        ] {
            assert_eq!(sqlstate_of(sql), "42501", "{sql}");
        }
        Spi::run("RESET ROLE").unwrap();

        assert_eq!(Spi::get_one::<bool>(&format!("SELECT outbox.redeliver('{id}')")).unwrap(), Some(true));
        assert_eq!(Spi::get_one::<bool>(&format!("SELECT outbox.redeliver('{id}')")).unwrap(), Some(false));
        assert_eq!(Spi::get_one::<i64>("SELECT outbox.redeliver_all()").unwrap(), Some(1));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.dead_letter").unwrap(), Some(0));

        // Still too large: the redelivery fails in the caller's transaction, and the row stays.
        Spi::run("SET outbox.max_payload_bytes = 10").unwrap();
        insert_dead_letter(id, &format!(r#"{{"pad": "{}"}}"#, "x".repeat(20)));
        assert_eq!(sqlstate_of(&format!("SELECT outbox.redeliver('{id}')")), "54000");
        assert_eq!(sqlstate_of("SELECT outbox.redeliver_all()"), "54000");
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.dead_letter").unwrap(), Some(1));
        Spi::run("RESET outbox.max_payload_bytes").unwrap();
    }
}
