-- outbox_ext 0.2.0 → 0.3.0, run by ALTER EXTENSION outbox_ext UPDATE. Makes the database's
-- objects those of a fresh 0.3.0 installation (tests/e2e/upgrade.rs compares them):
--
-- * emit_binary() and emit_tombstone(): records with a bytes value or none;
-- * dead_letter keeps either kind: payload may be NULL, payload_binary and content_type are new;
--   _redeliver_event() takes them, and redeliver() and redeliver_all() pass them on;
-- * relays() (over _relays()) gains rejected_records, dead_lettered, acked_transactions and
--   ack_latency_sum_ms, and ack_latency() takes a database (this one by default), so that one
--   connection can export every relay's figures (monitoring/postgres_exporter.yml).
--
-- The 0.3.0 library relays what 0.2.0 wrote (format 2) and runs with 0.2.0's SQL until this
-- has run; only the new functions need it.
\echo Use "ALTER EXTENSION outbox_ext UPDATE" to load this file. \quit

-- outbox.emit_binary(): the value is the bytes, unchanged (Avro or Protobuf in a Schema
-- Registry's framing, for example), typed by content_type. C function: emit_binary_wrapper.
CREATE FUNCTION emit_binary(
    aggregatetype text,
    aggregateid text,
    "type" text,
    payload bytea,
    headers jsonb DEFAULT NULL,
    content_type text DEFAULT 'application/octet-stream'
) RETURNS uuid
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'emit_binary_wrapper';
REVOKE ALL ON FUNCTION emit_binary(text, text, text, bytea, jsonb, text) FROM PUBLIC;
COMMENT ON FUNCTION emit_binary(text, text, text, bytea, jsonb, text) IS
    'Records an event whose Kafka value is payload''s bytes, unchanged, with header content-type = content_type; published once the transaction commits.';

-- outbox.emit_tombstone(): a record with the key and a null value, which deletes the key from
-- a compacted topic. C function: emit_tombstone_wrapper.
CREATE FUNCTION emit_tombstone(
    aggregatetype text,
    aggregateid text,
    "type" text,
    headers jsonb DEFAULT NULL
) RETURNS uuid
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'emit_tombstone_wrapper';
REVOKE ALL ON FUNCTION emit_tombstone(text, text, text, jsonb) FROM PUBLIC;
COMMENT ON FUNCTION emit_tombstone(text, text, text, jsonb) IS
    'Records a tombstone: a Kafka record with key aggregateid and a null value, which deletes the key from a compacted topic; published once the transaction commits.';

ALTER TABLE dead_letter
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN payload_binary bytea,
    ADD COLUMN content_type text,
    ADD CONSTRAINT dead_letter_one_value CHECK (payload IS NULL OR payload_binary IS NULL),
    ADD CONSTRAINT dead_letter_binary_typed CHECK ((payload_binary IS NULL) = (content_type IS NULL));
COMMENT ON TABLE dead_letter IS
    'Events Kafka refused for good (topic: where they were going; error_code, error: why) that the dead-letter topic refused too (dead_letter_error). The value is payload (emit), payload_binary with content_type (emit_binary), or neither (emit_tombstone). outbox.redeliver() sends them again.';

DROP FUNCTION _redeliver_event(uuid, text, text, text, jsonb, jsonb);
CREATE FUNCTION _redeliver_event(
    id uuid,
    aggregatetype text,
    aggregateid text,
    "type" text,
    payload jsonb,
    payload_binary bytea,
    content_type text,
    headers jsonb
) RETURNS uuid
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'redeliver_any_event_wrapper';
REVOKE ALL ON FUNCTION _redeliver_event(uuid, text, text, text, jsonb, bytea, text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION redeliver(event_id uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d @extschema@.dead_letter;
BEGIN
    DELETE FROM @extschema@.dead_letter WHERE id = event_id RETURNING * INTO d;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM @extschema@._redeliver_event(d.id, d.aggregatetype, d.aggregateid, d."type", d.payload, d.payload_binary, d.content_type, d.headers);
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION redeliver(uuid) FROM PUBLIC;
COMMENT ON FUNCTION redeliver(uuid) IS
    'Sends a dead-lettered event again, with its id, in the current transaction, and deletes it from outbox.dead_letter; false if there is no such event.';

CREATE OR REPLACE FUNCTION redeliver_all() RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d @extschema@.dead_letter;
    n bigint := 0;
BEGIN
    FOR d IN SELECT * FROM @extschema@.dead_letter ORDER BY committed_at, id FOR UPDATE LOOP
        DELETE FROM @extschema@.dead_letter WHERE id = d.id;
        PERFORM @extschema@._redeliver_event(d.id, d.aggregatetype, d.aggregateid, d."type", d.payload, d.payload_binary, d.content_type, d.headers);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION redeliver_all() FROM PUBLIC;
COMMENT ON FUNCTION redeliver_all() IS
    'Sends every dead-lettered event again, in commit order, in the current transaction, and empties outbox.dead_letter; returns how many.';

DROP FUNCTION relays();
DROP FUNCTION _relays();
CREATE FUNCTION "_relays"() RETURNS TABLE (
	"database" TEXT,
	"worker_pid" INT,
	"state" TEXT,
	"slot_name" TEXT,
	"events_delivered" bigint,
	"rejected_records" bigint,
	"dead_lettered" bigint,
	"last_error" TEXT,
	"last_delivery_at" timestamp with time zone,
	"acked_transactions" bigint,
	"ack_latency_sum_us" bigint
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'relays_table_wrapper';

CREATE FUNCTION relays(
    OUT database name,
    OUT pid int,
    OUT state text,
    OUT slot name,
    OUT confirmed_lsn pg_lsn,
    OUT pending_bytes bigint,
    OUT events_delivered bigint,
    OUT last_error text,
    OUT last_delivery_at timestamptz,
    OUT rejected_records bigint,
    OUT dead_lettered bigint,
    OUT acked_transactions bigint,
    OUT ack_latency_sum_ms double precision)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.database::name,
           r.worker_pid,
           r.state,
           r.slot_name::name,
           s.confirmed_flush_lsn,
           CASE WHEN s.confirmed_flush_lsn IS NOT NULL AND NOT pg_is_in_recovery()
                THEN greatest(pg_wal_lsn_diff(pg_current_wal_flush_lsn(), s.confirmed_flush_lsn), 0)::bigint
           END,
           r.events_delivered,
           r.last_error,
           r.last_delivery_at,
           r.rejected_records,
           r.dead_lettered,
           r.acked_transactions,
           (r.ack_latency_sum_us / 1000.0)::float8
    FROM @extschema@._relays() r
    LEFT JOIN pg_replication_slots s ON s.slot_name = r.slot_name
    ORDER BY r.database
$$;
COMMENT ON FUNCTION relays() IS
    'Every relay of the cluster, one per database with the extension (and, briefly, per database the launcher is looking at): its worker, state, slot, position, WAL not yet relayed, deliveries, last error, skipped and set-aside events, and its acknowledged transactions with the sum of their commit → acknowledgement latencies (what monitoring/postgres_exporter.yml exports).';

DROP FUNCTION ack_latency();
CREATE FUNCTION "ack_latency"(
	"database" TEXT DEFAULT current_database()
) RETURNS TABLE (
	"le_ms" double precision,
	"transactions" bigint
)
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ack_latency_of_wrapper';
COMMENT ON FUNCTION @extschema@.ack_latency(text) IS
    'Cumulative histogram of commit → Kafka acknowledgement latency per transaction of the relay of a database (this one by default) since the server started: transactions with latency <= le_ms.';
