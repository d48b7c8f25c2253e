#!/usr/bin/env bash
# The demo behind `make demo`: builds and installs outbox_ext, starts a local Kafka-protocol
# dev broker and a scratch PostgreSQL cluster (15, or PG=16|17|18) configured for outbox_ext,
# emits events from SQL and from a trigger, and prints them as a Kafka consumer reads them.
#
# The dev broker is librdkafka's mock cluster (tests/src/bin/dev_broker.rs): it speaks the
# Kafka protocol on 127.0.0.1 and keeps everything in memory. It is for development only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DEMO_DIR=${DEMO_DIR:-/tmp/outbox-demo}
PORT=${DEMO_PORT:-54329}

echo "==> building and installing outbox_ext"
install_extension --release >/dev/null
echo "==> building the dev broker and consumer"
cargo build -q -p outbox_tests --bins
BIN="$CARGO_TARGET_DIR/debug"

cleanup() {
    [ -f "$DEMO_DIR/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$DEMO_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null || true
}
trap cleanup EXIT

rm -rf "$DEMO_DIR" && mkdir -p "$DEMO_DIR"
is_root && chown postgres:postgres "$DEMO_DIR"

echo "==> starting the dev broker (3 mock brokers, in memory)"
start_dev_broker "$BIN" "$DEMO_DIR" outbox.event.order:3 outbox.event.customer:3
echo "    bootstrap servers: $BOOTSTRAP"

echo "==> starting PostgreSQL $("$PG_CONFIG" --version | cut -d" " -f2) in $DEMO_DIR (port $PORT)"
start_scratch_cluster "$DEMO_DIR" "$PORT" <<CONF
outbox.bootstrap_servers = '$BOOTSTRAP'
CONF

psql_demo() { psql -X -q -v ON_ERROR_STOP=1 -U postgres -h "$DEMO_DIR" -p "$PORT" -d postgres "$@"; }

psql_demo -c "CREATE EXTENSION outbox_ext"
for _ in $(seq 300); do
    [ "$(psql_demo -At -c "SELECT state FROM outbox.status()")" = streaming ] && break
    sleep 0.1
done

echo "==> emitting events"
psql_demo -e <<'SQL'
-- From SQL, in the caller's transaction:
BEGIN;
SELECT outbox.emit('customer', 'c-1', 'CustomerRegistered',
                   '{"name": "Ada", "email": "ada@example.com"}',
                   '{"traceparent": "00-4bf92f3577b34da6-00f067aa0ba902b7-01"}');
COMMIT;

-- Rolled back: never published.
BEGIN;
SELECT outbox.emit('customer', 'c-2', 'CustomerRegistered', '{"name": "Nobody"}');
ROLLBACK;

-- From a trigger on a business table:
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric(10,2));
CREATE FUNCTION orders_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM outbox.emit('order', NEW.id::text, 'OrderCreated', to_jsonb(NEW));
  RETURN NEW;
END $$;
CREATE TRIGGER orders_outbox AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION orders_outbox();
INSERT INTO orders VALUES (1001, 'c-1', 42.50), (1002, 'c-1', 7.25);
SQL

echo "==> consuming from Kafka"
"$BIN/outbox-consume" "$BOOTSTRAP" 3 60 outbox.event.customer:3 outbox.event.order:3

echo "==> outbox.status()"
psql_demo -x -c "SELECT * FROM outbox.status()"
