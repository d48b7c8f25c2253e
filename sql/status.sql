-- outbox.status() over this database's relay (_relay_state, src/status.rs) and its slot, and
-- outbox.relays() over every database's (_relays); comments and grants of the other status and
-- operator functions.
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

COMMENT ON FUNCTION @extschema@.ack_latency(text) IS
    'Cumulative histogram of commit → Kafka acknowledgement latency per transaction of the relay of a database (this one by default) since the server started: transactions with latency <= le_ms.';

REVOKE ALL ON FUNCTION @extschema@.resume() FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.resume() IS
    'Makes a relay that stopped on a permanent delivery error (state delivery_error) try again from its slot.';
