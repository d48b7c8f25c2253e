#!/usr/bin/env bash
# `make bench-restart`: what reading the partitions' tails costs a restart after a crash, with
# outbox.exactly_once on and off in one run, against a scratch cluster of PostgreSQL $PG and the
# local dev broker. BENCH_TOPICS topics (default 100) of 3 partitions hold a backlog of
# BENCH_EVENTS events (default 300000); the relay is SIGKILLed once a quarter of it was
# acknowledged, and the time from the kill until the slot is confirmed through the backlog is
# measured, with the relay's own log of each partition it read. Prints a table and writes it to
# bench/results/. About 2 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

TOPICS=${BENCH_TOPICS:-100}
EVENTS=${BENCH_EVENTS:-300000}
DIR=${BENCH_DIR:-/tmp/outbox-bench-restart}
PORT=${BENCH_PORT:-55435}
OUT=${BENCH_OUT:-bench/results/$(date -u +%Y%m%d-%H%M%S)-pg$PG-restart.md}
mkdir -p bench/results

if [ -z "${BENCH_BUILT:-}" ]; then
    echo "==> building (release) and installing"
    install_extension --release >/dev/null
    cargo build -q --release -p outbox_tests --bins
fi
BIN="$CARGO_TARGET_DIR/release"

cleanup() {
    [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null || true
}
trap cleanup EXIT
rm -rf "$DIR" && mkdir -p "$DIR"
is_root && chown -R postgres:postgres "$DIR"

topics=()
for i in $(seq "$TOPICS"); do topics+=("outbox.event.t$i:3"); done
start_dev_broker "$BIN" "$DIR" "${topics[@]}"

start_scratch_cluster "$DIR" "$PORT" <<CONF
shared_buffers = '512MB'
max_wal_size = '8GB'
log_min_messages = debug1
outbox.bootstrap_servers = '$BOOTSTRAP'
CONF

sql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -U postgres -h "$DIR" -p "$PORT" -d postgres -c "$1"; }
set_conf() { sql "ALTER SYSTEM SET $1 = '$2'" && sql "SELECT pg_reload_conf()" >/dev/null; }
# Waits (up to 5 minutes) until the query $1 returns t, through the server's restart.
wait_for() {
    for _ in $(seq 3000); do
        [ "$(sql "$1" 2>/dev/null || true)" = "t" ] && return 0
        sleep 0.1
    done
    echo "never true: $1" >&2; return 1
}
sql "CREATE EXTENSION outbox_ext"
wait_for "SELECT state = 'streaming' FROM outbox.status()"

declare -A RESTART READS READ_MS READ_MAX SKIPPED FIRST_READ
# round MODE: the backlog, a kill half-way, and the restart, with outbox.exactly_once = MODE.
round() {
    local mode=$1
    set_conf outbox.exactly_once "$mode"
    set_conf outbox.bootstrap_servers ''
    wait_for "SELECT state = 'unconfigured' FROM outbox.status()"
    for ((from = 0; from < EVENTS; from += 10000)); do
        sql "SELECT count(outbox.emit('t' || (i % $TOPICS + 1), 'k' || (i % 1000), 'E', jsonb_build_object('i', i, 'pad', repeat('x', 100))))
             FROM generate_series($from, least($from + 9999, $EVENTS - 1)) i" >/dev/null
    done
    set_conf outbox.bootstrap_servers "$BOOTSTRAP"
    wait_for "SELECT events_delivered >= $((EVENTS / 4)) FROM outbox.status()"
    local pid log_from
    pid=$(sql "SELECT worker_pid FROM outbox.status()")
    log_from=$(wc -l < "$DIR/server.log")
    kill -9 "$pid"
    local t0 t1
    t0=$(date +%s.%N)
    wait_for "SELECT worker_pid IS NOT NULL AND pending_bytes < 8192 FROM outbox.status()"
    t1=$(date +%s.%N)
    RESTART[$mode]=$(echo "$t1 - $t0" | bc -l)
    # How long after the kill the new relay read its first tail: how late a request of the
    # killed one may reach the broker and still be found (the window a duplicate can come in).
    local first_read
    first_read=$(tail -n +"$log_from" "$DIR/server.log" | grep -m1 'outbox_ext relay: read [0-9]* records' | awk '{print $1" "$2" "$3}' || true)
    FIRST_READ[$mode]=$([ -n "$first_read" ] && echo "$(date -d "$first_read" +%s.%N) - $t0" | bc -l || echo "")
    local reads
    reads=$(tail -n +"$log_from" "$DIR/server.log" | grep -o 'read [0-9]* records of [^ ]* \[[0-9]*\] in [0-9]* ms[^:]*: [0-9]* of them' || true)
    READS[$mode]=$(echo -n "$reads" | grep -c . || true)
    # A topic's partitions are read together: one time per topic.
    local per_topic
    per_topic=$(echo "$reads" | sed -nE 's/.* of ([^ ]*) \[[0-9]+\] in ([0-9]+) ms.*/\1 \2/p' | sort -u -k1,1)
    READ_MS[$mode]=$(echo "$per_topic" | awk '{s += $2} END {print s + 0}')
    READ_MAX[$mode]=$(echo "$per_topic" | awk '{print $2}' | sort -n | tail -1)
    SKIPPED[$mode]=$(echo "$reads" | sed -nE 's/.*: ([0-9]+) of them/\1/p' | awk '{s += $1} END {print s + 0}')
    printf "    exactly_once=%s: kill → confirmed %.2f s; kill → first tail read %s s; %s partitions read in %s ms (longest topic %s ms); %s events found already delivered\n" \
        "$mode" "${RESTART[$mode]}" "${FIRST_READ[$mode]:-–}" "${READS[$mode]}" "${READ_MS[$mode]}" "${READ_MAX[$mode]:-0}" "${SKIPPED[$mode]}"
}

echo "==> $EVENTS events over $TOPICS topics × 3 partitions; SIGKILL a quarter of the way; restart"
round off
round on

{
    echo "## Restart after a crash: $TOPICS topics × 3 partitions, PostgreSQL $("$PG_CONFIG" --version | awk '{print $2}'), $(date -u +%F)"
    echo
    echo "| outbox.exactly_once | kill → slot confirmed through the backlog | partitions read | time reading them (sum, longest topic) | events found already in Kafka |"
    echo "|---|---|---|---|---|"
    for mode in off on; do
        printf "| %s | %.2f s | %s | %s ms, %s ms | %s |\n" "$mode" "${RESTART[$mode]}" "${READS[$mode]}" "${READ_MS[$mode]}" "${READ_MAX[$mode]:-0}" "${SKIPPED[$mode]}"
    done
    printf "\nRestart with exactly once ÷ without: %.2f. The first tail was read %.2f s after the kill: a produce request of the killed relay that reached the broker later than that would be a duplicate.\n" \
        "$(echo "${RESTART[on]} / ${RESTART[off]}" | bc -l)" "${FIRST_READ[on]:-0}"
} | tee "$OUT"
echo "(written to $OUT)"
