#!/usr/bin/env bash
# `make bench-databases` (also the last part of `make bench`): the cost of one relay per
# database, against a scratch cluster of PostgreSQL $PG with BENCH_DATABASES databases (default
# 10) that have the extension, and the local dev broker:
#
#   1. the CPU that all relays and the launcher use together while idle, over BENCH_IDLE_SECONDS
#      (default 60), as a share of one core;
#   2. the memory of an idle relay (RssAnon: its own; VmRSS also counts shared memory it touched);
#   3. draining a backlog of BENCH_EVENTS events (default 1000000) from one database, against
#      the same number split over 4 databases draining at once.
#
# Prints a table and appends it to bench/results/. About 3 minutes after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

N=${BENCH_DATABASES:-10}
IDLE=${BENCH_IDLE_SECONDS:-60}
EVENTS=${BENCH_EVENTS:-1000000}
DIR=${BENCH_DIR:-/tmp/outbox-bench-databases}
PORT=${BENCH_PORT:-55434}
OUT=${BENCH_OUT:-bench/results/$(date -u +%Y%m%d-%H%M%S)-pg$PG-databases.md}
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

start_dev_broker "$BIN" "$DIR" outbox.event.bench:3

start_scratch_cluster "$DIR" "$PORT" <<CONF
shared_buffers = '512MB'
max_wal_size = '8GB'
max_worker_processes = $((N + 8))
max_replication_slots = $((N + 4))
outbox.bootstrap_servers = '$BOOTSTRAP'
CONF

sql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -U postgres -h "$DIR" -p "$PORT" -d "$1" -c "$2"; }
set_conf() { sql postgres "ALTER SYSTEM SET $1 = '$2'" && sql postgres "SELECT pg_reload_conf()" >/dev/null; }
# Waits until `outbox.relays()` (read in db1) has N rows matching the condition $1.
wait_relays() {
    for _ in $(seq 1200); do
        [ "$(sql db1 "SELECT count(*) FROM outbox.relays() WHERE $1")" = "$N" ] && return 0
        sleep 0.1
    done
    echo "the relays never got to: $1" >&2; sql db1 "SELECT * FROM outbox.relays()" >&2; return 1
}
delivered() { sql db1 "SELECT coalesce(sum(events_delivered), 0) FROM outbox.relays() WHERE database IN ($1)"; }

echo "==> $N databases with the extension"
for i in $(seq "$N"); do
    sql postgres "CREATE DATABASE db$i"
    sql "db$i" "CREATE EXTENSION outbox_ext"
done
wait_relays "state = 'streaming'"

# ---------------------------------------------------------------- 1. idle CPU, 2. idle memory
# An idle relay naps 10 ms after a second without work; the measurement starts after that.
sleep 5
pids=$(sql db1 "SELECT string_agg(pid::text, ' ') FROM (SELECT pid FROM outbox.relays() UNION ALL
                SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox_ext launcher') p")
ticks() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
hz=$(getconf CLK_TCK)
echo "==> idle CPU of $N relays and the launcher over ${IDLE}s"
t0=$(ticks); s0=$(date +%s.%N)
sleep "$IDLE"
t1=$(ticks); s1=$(date +%s.%N)
idle_cpu=$(echo "($t1 - $t0) / $hz / ($s1 - $s0) * 100" | bc -l)
relay_pids=$(sql db1 "SELECT string_agg(pid::text, ' ') FROM outbox.relays()")
anon=(); rss=()
for p in $relay_pids; do
    anon+=("$(awk '/^RssAnon/ {printf "%.1f", $2/1024}' "/proc/$p/status")")
    rss+=("$(awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$p/status")")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
anon_med=$(median "${anon[@]}"); anon_max=$(printf '%s\n' "${anon[@]}" | sort -n | tail -1)
rss_med=$(median "${rss[@]}")

# ---------------------------------------------------------------- 3. drain: 1 × EVENTS vs 4 × EVENTS/4
# drain DBS...: with Kafka unconfigured, emits EVENTS split over the databases (two writer
# sessions each), then configures Kafka and times until every event is acknowledged.
drain() {
    local dbs=("$@") per=$((EVENTS / $#)) list before t0 t1 db lo
    list=$(printf "'%s'," "${dbs[@]}"); list=${list%,}
    set_conf outbox.bootstrap_servers ''
    wait_relays "state IN ('unconfigured')"
    local writers=()
    for db in "${dbs[@]}"; do
        for lo in $(seq 0 50000 $((per - 1))); do
            sql "$db" "SELECT count(outbox.emit('bench', 'agg-' || (i % 1000), 'Tick', jsonb_build_object('seq', i, 'pad', repeat('x', 170)))) FROM generate_series($lo, $((lo + 49999 < per - 1 ? lo + 49999 : per - 1))) AS i" >/dev/null &
            writers+=($!)
            if [ ${#writers[@]} -ge 4 ]; then wait "${writers[@]}"; writers=(); fi
        done
    done
    [ ${#writers[@]} -eq 0 ] || wait "${writers[@]}"
    before=$(delivered "$list")
    set_conf outbox.bootstrap_servers "$BOOTSTRAP"
    t0=$(date +%s.%N)
    while [ $(( $(delivered "$list") - before )) -lt "$EVENTS" ]; do sleep 0.05; done
    t1=$(date +%s.%N)
    echo "$(echo "$EVENTS / ($t1 - $t0)" | bc -l) $(echo "$t1 - $t0" | bc -l)"
}
echo "==> drain: $EVENTS events from 1 database"
read -r one_rate one_secs < <(drain db1)
echo "==> drain: $((EVENTS / 4)) events each from 4 databases at once"
read -r four_rate four_secs < <(drain db1 db2 db3 db4)

{
    echo "## Several databases: $N relays, PostgreSQL $("$PG_CONFIG" --version | cut -d' ' -f2), $(date -u +%Y-%m-%d)"
    echo
    echo "| measure | value |"
    echo "|---|---|"
    printf "| idle CPU of %d relays and the launcher, over %ds | %.2f%% of one core |\n" "$N" "$IDLE" "$idle_cpu"
    printf "| idle relay RssAnon (median, max of %d) | %s MB, %s MB |\n" "$N" "$anon_med" "$anon_max"
    printf "| idle relay VmRSS (median; counts shared memory it touched) | %s MB |\n" "$rss_med"
    printf "| drain, 1 database × %d events | %.0f events/s (%.1f s) |\n" "$EVENTS" "$one_rate" "$one_secs"
    printf "| drain, 4 databases × %d events at once | %.0f events/s (%.1f s) |\n" "$((EVENTS / 4))" "$four_rate" "$four_secs"
    printf "| 4 databases ÷ 1 database | %.2f |\n" "$(echo "$four_rate / $one_rate" | bc -l)"
} | tee "$OUT"
