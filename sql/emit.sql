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
