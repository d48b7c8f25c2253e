-- The relay's record of its slot, and outbox.reset_slot() (see src/relay/slot.rs).
CREATE TABLE relay_slot (
    slot_name name PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- The timeline the server was on when the relay recorded the slot: if the slot goes missing
    -- on a higher one, the server was promoted since, and the relay says so.
    timeline integer DEFAULT ('x' || left(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), 8))::bit(32)::integer
);
REVOKE ALL ON relay_slot FROM PUBLIC;
COMMENT ON TABLE relay_slot IS
    'The replication slot the relay made for this installation. If it goes missing while listed here, the relay stops (slot_error) instead of making a new one: see outbox.reset_slot().';

CREATE FUNCTION reset_slot() RETURNS void
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
REVOKE ALL ON FUNCTION reset_slot() FROM PUBLIC;
COMMENT ON FUNCTION reset_slot() IS
    'After a slot_error for a dropped or invalidated slot: forget the slot (dropping it if invalidated) so that the relay makes a new one. Events the old slot had not delivered are skipped.';
