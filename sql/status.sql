-- outbox.status() over the relay's shared-memory state (_relay_state, src/status.rs) and its
-- slot; comments and grants of the other status and operator functions.
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
    OUT last_delivery_at timestamptz)
RETURNS record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.worker_pid,
           r.state,
           current_setting('outbox.slot_name'),
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
           r.last_delivery_at
    FROM @extschema@._relay_state() r
    LEFT JOIN pg_replication_slots s ON s.slot_name = current_setting('outbox.slot_name')
$$;
COMMENT ON FUNCTION status() IS
    'The outbox relay: worker, state, slot position, WAL not yet relayed (pending_bytes), deliveries, messages skipped because emit did not write them (rejected_records), events Kafka refused for good that were set aside (dead_lettered), and the last error.';

COMMENT ON FUNCTION @extschema@.ack_latency() IS
    'Cumulative histogram of commit → Kafka acknowledgement latency per transaction since the server started: transactions with latency <= le_ms.';

REVOKE ALL ON FUNCTION @extschema@.resume() FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.resume() IS
    'Makes a relay that stopped on a permanent delivery error (state delivery_error) try again from its slot.';
