-- Dead letters (src/dead_letter.rs): events Kafka refused for good that the dead-letter topic
-- refused too, when outbox.on_permanent_error = dead_letter. The relay inserts them before its
-- slot moves past them; a superuser redelivers them once the cause is fixed. Superusers only:
-- the rows hold event payloads.
CREATE TABLE dead_letter (
    id uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    "type" text NOT NULL,
    payload jsonb,
    headers jsonb NOT NULL,
    topic text NOT NULL,
    error_code integer NOT NULL,
    error text NOT NULL,
    dead_letter_error text,
    committed_at timestamptz NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    payload_binary bytea,
    content_type text,
    CONSTRAINT dead_letter_one_value CHECK (payload IS NULL OR payload_binary IS NULL),
    CONSTRAINT dead_letter_binary_typed CHECK ((payload_binary IS NULL) = (content_type IS NULL))
);
REVOKE ALL ON dead_letter FROM PUBLIC;
COMMENT ON TABLE dead_letter IS
    'Events Kafka refused for good (topic: where they were going; error_code, error: why) that the dead-letter topic refused too (dead_letter_error). The value is payload (emit), payload_binary with content_type (emit_binary), or neither (emit_tombstone). outbox.redeliver() sends them again.';

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
    PERFORM @extschema@._redeliver_event(d.id, d.aggregatetype, d.aggregateid, d."type", d.payload, d.payload_binary, d.content_type, d.headers);
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
        PERFORM @extschema@._redeliver_event(d.id, d.aggregatetype, d.aggregateid, d."type", d.payload, d.payload_binary, d.content_type, d.headers);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION redeliver_all() FROM PUBLIC;
COMMENT ON FUNCTION redeliver_all() IS
    'Sends every dead-lettered event again, in commit order, in the current transaction, and empties outbox.dead_letter; returns how many.';
