-- outbox.emit(): written by hand for its argument names, the NULL default of headers, and its
-- grants (none to PUBLIC). The C function is emit_wrapper in src/emit.rs.
CREATE FUNCTION emit(
    aggregatetype text,
    aggregateid text,
    "type" text,
    payload jsonb,
    headers jsonb DEFAULT NULL
) RETURNS uuid
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'emit_wrapper';
REVOKE ALL ON FUNCTION emit(text, text, text, jsonb, jsonb) FROM PUBLIC;
COMMENT ON FUNCTION emit(text, text, text, jsonb, jsonb) IS
    'Records an event in the current transaction; the relay publishes it to Kafka once the transaction commits.';
