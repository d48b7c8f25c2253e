-- The installation's record key: 32 random bytes with which outbox.emit() tags every record, so
-- that the relay publishes only what emit wrote (src/record_key.rs, core/src/auth.rs). Only
-- superusers read it: no privilege for anyone else, and row-level security without a policy,
-- which also hides the row from members of pg_read_all_data. Never change or delete it: the
-- relay could no longer open the events waiting in WAL.
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
