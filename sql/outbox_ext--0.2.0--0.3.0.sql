-- outbox_ext 0.2.0 → 0.3.0, run by ALTER EXTENSION outbox_ext UPDATE. Makes the database's
-- objects those of a fresh 0.3.0 installation (tests/e2e/upgrade.rs compares them):
--
-- * emit_binary() and emit_tombstone(): records with a bytes value or none;
-- * dead_letter keeps either kind: payload may be NULL, payload_binary and content_type are new;
--   _redeliver_event() takes them, and redeliver() and redeliver_all() pass them on.
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
