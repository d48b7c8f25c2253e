-- outbox_ext 0.1.0 → 0.2.0, run by ALTER EXTENSION outbox_ext UPDATE.
--
-- 0.2.0 builds for PostgreSQL 15, 16, 17 and 18 and ships as packages. Its SQL objects are
-- exactly those of 0.1.0 (tests/e2e/upgrade.rs compares an upgraded database with a fresh
-- installation), so this script has nothing to change: the update only records the new version.
-- Events waiting in WAL are untouched; the new library decodes the same wire format.
\echo Use "ALTER EXTENSION outbox_ext UPDATE" to load this file. \quit
