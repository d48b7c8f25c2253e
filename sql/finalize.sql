-- Runs last in CREATE EXTENSION: refuses to install into a server that is not set up for
-- outbox_ext (see src/readiness.rs), and lets every role see the schema's objects.
SELECT @extschema@._assert_ready();
REVOKE ALL ON FUNCTION @extschema@._assert_ready() FROM PUBLIC;
GRANT USAGE ON SCHEMA @extschema@ TO PUBLIC;
