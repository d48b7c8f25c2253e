#!/usr/bin/env bash
# `make monitoring-picture`: renders the Grafana dashboard's queries from real data, for the
# README. Grafana is not packaged for Debian 12 (nor on PyPI or npm), so the same PromQL as
# monitoring/grafana-dashboard.json's panels is drawn by Prometheus' own graph page, in headless
# Chromium. The data: a scratch cluster of PostgreSQL $PG (default 15) with two relayed
# databases under a steady emit load, the dev broker frozen (SIGSTOP) for 40 s in the middle,
# one forged message; Debian's postgres_exporter with monitoring/postgres_exporter.yml as a role
# without privileges, and Prometheus scraping it every second. About 5 minutes.
#   PICTURE    output file (default docs/monitoring/prometheus-panels.png)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

OUT=${PICTURE:-docs/monitoring/prometheus-panels.png}
DIR=${PICTURE_DIR:-/tmp/outbox-picture}
PORT=${PICTURE_PORT:-55434}
EXPORTER_PORT=9487
PROMETHEUS_PORT=9490
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROMIUM" ] || { echo "chromium is missing (apt-get install chromium)" >&2; exit 1; }

echo "==> building and installing"
install_extension --release >/dev/null
cargo build -q --release -p outbox_tests --bins
BIN="$CARGO_TARGET_DIR/release"

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${BROKER_PID:-}" ] && { kill -CONT "$BROKER_PID"; kill "$BROKER_PID"; } 2>/dev/null || true
    [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
rm -rf "$DIR" && mkdir -p "$DIR" && { is_root && chown postgres:postgres "$DIR" || true; }

start_dev_broker "$BIN" "$DIR" outbox.event.order:3 outbox.event.invoice:3
start_scratch_cluster "$DIR" "$PORT" <<CONF
outbox.bootstrap_servers = '$BOOTSTRAP'
CONF
sql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -U postgres -h "$DIR" -p "$PORT" -d "$1" -c "$2"; }
sql postgres "CREATE DATABASE shop"
sql postgres "CREATE DATABASE billing"
for db in shop billing; do sql "$db" "CREATE EXTENSION outbox_ext"; done
sql shop "CREATE ROLE outbox_monitor LOGIN"
for db in shop billing; do
    for _ in $(seq 100); do [ "$(sql "$db" "SELECT state FROM outbox.status()")" = streaming ] && break; sleep 0.1; done
done

DATA_SOURCE_NAME="host=$DIR port=$PORT user=outbox_monitor dbname=shop sslmode=disable" \
    prometheus-postgres-exporter --extend.query-path=monitoring/postgres_exporter.yml \
    --web.listen-address=127.0.0.1:$EXPORTER_PORT --log.level=error \
    --disable-default-metrics --disable-settings-metrics --no-collector.bgwriter --no-collector.database &
PIDS+=($!)
cat > "$DIR/prometheus.yml" <<YML
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ['$PWD/monitoring/alerts.yml']
scrape_configs:
  - job_name: outbox
    static_configs: [{targets: ['127.0.0.1:$EXPORTER_PORT']}]
YML
prometheus --config.file="$DIR/prometheus.yml" --storage.tsdb.path="$DIR/tsdb" \
    --web.listen-address=127.0.0.1:$PROMETHEUS_PORT --log.level=error &
PIDS+=($!)

# Load: shop at about 400 transactions/s of 5 events, billing at about 100 of 2.
cat > "$DIR/shop.sql" <<'SQL'
SELECT outbox.emit('order', 'o-' || (random() * 1000)::int, 'OrderPlaced', '{"total": 42}') FROM generate_series(1, 5);
SQL
cat > "$DIR/billing.sql" <<'SQL'
SELECT outbox.emit('invoice', 'i-' || (random() * 1000)::int, 'InvoiceIssued', '{"amount": 7}') FROM generate_series(1, 2);
SQL
is_root && chown postgres:postgres "$DIR"/*.sql
load() { # database script rate seconds
    as_pg "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n -c 2 -j 1 -R "$3" -T "$4" -f "$DIR/$2" "$1" >/dev/null 2>&1 &
    PIDS+=($!)
}
echo "==> 4 minutes of load; Kafka frozen from 1:30 to 2:10"
load shop shop.sql 400 240
load billing billing.sql 100 240
sleep 90
kill -STOP "$BROKER_PID"
sleep 40
kill -CONT "$BROKER_PID"
# A message under the prefix that emit did not write: counted as rejected, never published.
sql billing "SELECT pg_logical_emit_message(true, 'outbox_ext', '\\x01'::bytea)" >/dev/null
sleep 115

# The dashboard's panels, each as a Prometheus graph page over the same 5 minutes, stacked
# into one picture (Pillow, from PyPI, next to the test suite's Python packages).
PYDIR=${OUTBOX_PYTHONPATH:-$HOME/.cache/outbox_ext/python}
PYTHONPATH="$PYDIR" python3 -c 'import PIL' 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$PYDIR" 'Pillow==11.1.0'
urlencode() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
# The state panel, a state timeline per relay in Grafana, is drawn as the number of relays in
# each state (Prometheus' graph page has no timeline); the others are the dashboard's queries.
panels=(
    'count by (state) (outbox_relay_state == 1)'
    'sum by (database) (rate(outbox_relay_events_delivered_total[1m]))'
    'max by (database) (outbox_relay_pending_bytes)'
    'histogram_quantile(0.99, sum by (database, le) (rate(outbox_ack_latency_seconds_bucket[1m])))'
    'sum by (database) (increase(outbox_relay_rejected_records_total[5m]) + increase(outbox_relay_dead_lettered_total[5m]))'
)
end=$(urlencode "$(date -u '+%Y-%m-%d %H:%M:%S')")
shots=()
for i in "${!panels[@]}"; do
    url="http://127.0.0.1:$PROMETHEUS_PORT/graph?g0.expr=$(urlencode "${panels[$i]}")&g0.tab=0&g0.range_input=5m&g0.end_input=$end&g0.stacked=0&g0.show_exemplars=0"
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1000 \
        --virtual-time-budget=15000 --screenshot="$DIR/panel-$i.png" "$url" 2>/dev/null
    shots+=("$DIR/panel-$i.png")
done
mkdir -p "$(dirname "$OUT")"
PYTHONPATH="$PYDIR" python3 - "$OUT" "${shots[@]}" <<'PY'
import sys
from PIL import Image
out, shots = sys.argv[1], [Image.open(p).convert("RGB") for p in sys.argv[2:]]
from PIL import ImageChops
def content(s):
    """The page below Prometheus' 56-pixel navigation bar, down to its last non-white row."""
    s = s.crop((0, 56, s.width, s.height))
    box = ImageChops.difference(s, Image.new("RGB", s.size, "white")).getbbox()
    return s.crop((0, 0, s.width, min(s.height, (box[3] if box else s.height) + 12)))
shots = [content(s) for s in shots]
picture = Image.new("RGB", (max(s.width for s in shots), sum(s.height for s in shots)), "white")
y = 0
for s in shots:
    picture.paste(s, (0, y))
    y += s.height
picture.save(out, optimize=True)
PY
echo "==> $OUT ($(stat -c %s "$OUT") bytes): the panels of monitoring/grafana-dashboard.json, drawn by Prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}')"
