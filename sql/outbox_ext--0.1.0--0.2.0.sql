-- outbox_ext 0.1.0 → 0.2.0, run by ALTER EXTENSION outbox_ext UPDATE. Makes the database's
-- objects those of a fresh 0.2.0 installation (tests/e2e/upgrade.rs compares them):
--
-- * records are authenticated: the installation's key (relay_key, made here) and _new_key();
-- * status() gains rejected_records, dead_lettered and delivery_guarantee, from _relay_state(), which replaces
--   _relay_status(); relays() and _relays() list the relays of every database;
-- * dead letters: the table dead_letter, redeliver(), redeliver_all() and _redeliver_event();
-- * relay_slot gains timeline (NULL for the slot 0.1.0 recorded), and reset_slot() drops a slot
--   invalidated for any reason.
--
-- Until this has run, the 0.2.0 library refuses emit (55000) and the relay waits in state
-- update_required: events of format 1, written by 0.1.0, are not relayed (drain before
-- upgrading, see the README).
\echo Use "ALTER EXTENSION outbox_ext UPDATE" to load this file. \quit

DROP FUNCTION status();
DROP FUNCTION _relay_status();

CREATE FUNCTION "_relay_state"() RETURNS TABLE (
	"worker_pid" INT,
	"state" TEXT,
	"events_delivered" bigint,
	"rejected_records" bigint,
	"dead_lettered" bigint,
	"last_error" TEXT,
	"last_error_at" timestamp with time zone,
	"last_delivery_at" timestamp with time zone,
	"slot_name" TEXT,
	"delivery_guarantee" TEXT
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'relay_state_wrapper';

CREATE FUNCTION "_relays"() RETURNS TABLE (
	"database" TEXT,
	"worker_pid" INT,
	"state" TEXT,
	"slot_name" TEXT,
	"events_delivered" bigint,
	"last_error" TEXT,
	"last_delivery_at" timestamp with time zone
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'relays_state_wrapper';

CREATE FUNCTION status(
    OUT worker_pid int,
    OUT state text,
    OUT slot_name text,
    OUT slot_failover boolean,
    OUT confirmed_lsn pg_lsn,
    OUT pending_bytes bigint,
    OUT events_delivered bigint,
    OUT rejected_records bigint,
    OUT dead_lettered bigint,
    OUT last_error text,
    OUT last_error_at timestamptz,
    OUT last_delivery_at timestamptz,
    OUT delivery_guarantee text)
RETURNS record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.worker_pid,
           r.state,
           coalesce(r.slot_name, s.slot_name),
           -- pg_replication_slots.failover exists from 17 on; 15 and 16 have no failover slots.
           CASE WHEN s.slot_name IS NOT NULL THEN coalesce((to_jsonb(s) ->> 'failover')::boolean, false) END,
           s.confirmed_flush_lsn,
           CASE WHEN s.confirmed_flush_lsn IS NOT NULL AND NOT pg_is_in_recovery()
                THEN greatest(pg_wal_lsn_diff(pg_current_wal_flush_lsn(), s.confirmed_flush_lsn), 0)::bigint
           END,
           r.events_delivered,
           r.rejected_records,
           r.dead_lettered,
           r.last_error,
           r.last_error_at,
           r.last_delivery_at,
           r.delivery_guarantee
    FROM @extschema@._relay_state() r
    LEFT JOIN pg_replication_slots s
           ON s.slot_name = r.slot_name
           OR (r.slot_name IS NULL AND s.plugin = 'outbox_ext' AND s.database = current_database())
$$;
COMMENT ON FUNCTION status() IS
    'This database''s outbox relay: worker, state, slot position, WAL not yet relayed (pending_bytes), deliveries, messages skipped because emit did not write them (rejected_records), events Kafka refused for good that were set aside (dead_lettered), the last error, and the delivery guarantee in force (exactly once, or at least once and why).';

CREATE FUNCTION relays(
    OUT database name,
    OUT pid int,
    OUT state text,
    OUT slot name,
    OUT confirmed_lsn pg_lsn,
    OUT pending_bytes bigint,
    OUT events_delivered bigint,
    OUT last_error text,
    OUT last_delivery_at timestamptz)
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
           r.last_delivery_at
    FROM @extschema@._relays() r
    LEFT JOIN pg_replication_slots s ON s.slot_name = r.slot_name
    ORDER BY r.database
$$;
COMMENT ON FUNCTION relays() IS
    'Every relay of the cluster, one per database with the extension (and, briefly, per database the launcher is looking at): its worker, state, slot, position, WAL not yet relayed, deliveries and last error.';

COMMENT ON FUNCTION ack_latency() IS
    'Cumulative histogram of commit → Kafka acknowledgement latency per transaction of this database''s relay since the server started: transactions with latency <= le_ms.';

CREATE FUNCTION "_new_key"() RETURNS bytea
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'new_key_wrapper';

CREATE TABLE relay_key (
    key bytea NOT NULL CHECK (length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX relay_key_one_row ON relay_key ((true));
REVOKE ALL ON relay_key FROM PUBLIC;
ALTER TABLE relay_key ENABLE ROW LEVEL SECURITY;
ALTER TABLE relay_key FORCE ROW LEVEL SECURITY;
COMMENT ON TABLE relay_key IS
    'The key with which outbox.emit() authenticates records for the relay. Superusers only; never change or delete it.';
INSERT INTO relay_key (key) SELECT @extschema@._new_key();
REVOKE ALL ON FUNCTION @extschema@._new_key() FROM PUBLIC;

CREATE TABLE dead_letter (
    id uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    "type" text NOT NULL,
    payload jsonb NOT NULL,
    headers jsonb NOT NULL,
    topic text NOT NULL,
    error_code integer NOT NULL,
    error text NOT NULL,
    dead_letter_error text,
    committed_at timestamptz NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON dead_letter FROM PUBLIC;
COMMENT ON TABLE dead_letter IS
    'Events Kafka refused for good (topic: where they were going; error_code, error: why) that the dead-letter topic refused too (dead_letter_error). outbox.redeliver() sends them again.';

CREATE FUNCTION _redeliver_event(
    id uuid,
    aggregatetype text,
    aggregateid text,
    "type" text,
    payload jsonb,
    headers jsonb
) RETURNS uuid
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'redeliver_event_wrapper';
REVOKE ALL ON FUNCTION _redeliver_event(uuid, text, text, text, jsonb, jsonb) FROM PUBLIC;

CREATE FUNCTION redeliver(event_id uuid) RETURNS boolean
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
    PERFORM @extschema@._redeliver_event(d.id, d.aggregatetype, d.aggregateid, d."type", d.payload, d.headers);
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION redeliver(uuid) FROM PUBLIC;
COMMENT ON FUNCTION redeliver(uuid) IS
    'Sends a dead-lettered event again, with its id, in the current transaction, and deletes it from outbox.dead_letter; false if there is no such event.';

CREATE FUNCTION redeliver_all() RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d @extschema@.dead_letter;
    n bigint := 0;
BEGIN
    FOR d IN SELECT * FROM @extschema@.dead_letter ORDER BY committed_at, id FOR UPDATE LOOP
        DELETE FROM @extschema@.dead_letter WHERE id = d.id;
        PERFORM @extschema@._redeliver_event(d.id, d.aggregatetype, d.aggregateid, d."type", d.payload, d.headers);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION redeliver_all() FROM PUBLIC;
COMMENT ON FUNCTION redeliver_all() IS
    'Sends every dead-lettered event again, in commit order, in the current transaction, and empties outbox.dead_letter; returns how many.';

ALTER TABLE relay_slot ADD COLUMN timeline integer;
ALTER TABLE relay_slot ALTER COLUMN timeline SET DEFAULT ('x' || left(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), 8))::bit(32)::integer;

CREATE OR REPLACE FUNCTION reset_slot() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    slot text;
    relay_state text;
BEGIN
    SELECT st.slot_name, st.state INTO slot, relay_state FROM @extschema@.status() st;
    IF relay_state IS DISTINCT FROM 'slot_error' THEN
        RAISE EXCEPTION 'outbox.reset_slot() only applies while the relay is in state slot_error (it is %)', relay_state
            USING ERRCODE = '55000',
                  HINT = 'It lets the relay make a new slot, which skips every event the old one had not delivered.';
    END IF;
    -- Invalidated: wal_status 'lost' (WAL removed), or, where the version has the columns,
    -- conflicting (16) or an invalidation_reason (17 and later; idle_timeout in 18).
    PERFORM pg_drop_replication_slot(s.slot_name)
    FROM pg_replication_slots s
    WHERE s.slot_name = slot AND s.plugin = 'outbox_ext' AND NOT s.active
      AND (s.wal_status = 'lost' OR to_jsonb(s) ->> 'invalidation_reason' IS NOT NULL
           OR coalesce((to_jsonb(s) ->> 'conflicting')::boolean, false));
    DELETE FROM @extschema@.relay_slot WHERE slot_name = slot;
END
$$;
