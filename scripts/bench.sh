#!/usr/bin/env bash
# `make bench`: writer overhead, drain rate and its ceiling, latency, worker memory, and what
# authenticating records costs emit, in one run
# against a scratch cluster of PostgreSQL $PG (default 15; `make bench PG=18`) and the local dev
# broker. Prints a table and writes it to bench/results/. Not part of `make test`. About 10
# minutes after the build.
#
#   BENCH_SECONDS   pgbench duration per writer script and round (default 6)
#   BENCH_ROUNDS    rounds of the writer comparison with the relay paused (default 3)
#   BENCH_STREAMING_ROUNDS  rounds with the relay streaming (default 1)
#   BENCH_EVENTS    backlog size for the drain measurement (default 1000000)
#   BENCH_ONLY=limits  only the drain's limits (section 2: D, N, K, R), for quick iterations
#   BENCH_ONLY=drain   only R and K (about 1 minute)
#   BENCH_ONLY=latency only commit → acknowledgement at 10,000 events/s, with a streaming standby
#                   on 17 and later
#   BENCH_KAFKA_PROPERTIES  outbox.kafka_properties for the relay, and the same for K
#   BENCH_CONF     more postgresql.conf lines for the scratch cluster
#   BENCH_DRAIN_WRITERS  sessions emitting the backlog at once (default 1: its transactions
#                   follow each other in WAL, so that D, N and R decode the same layout; 2
#                   interleaves two 50,000-event transactions, which the reorder buffer holds
#                   together)
#   BENCH_PERF=1    profile the relay while it drains (perf record -e cpu-clock, DWARF call
#                   graphs) and add where each microsecond of an event goes (`make bench-drain-profile`)
#   BENCH_PERF_EVENT  perf's event instead of cpu-clock (sched:sched_switch: where each thread
#                   sleeps; the breakdown is then meaningless)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

SECONDS_PER_RUN=${BENCH_SECONDS:-6}
ROUNDS=${BENCH_ROUNDS:-3}
STREAMING_ROUNDS=${BENCH_STREAMING_ROUNDS:-1}
BACKLOG=${BENCH_EVENTS:-1000000}
ONLY=${BENCH_ONLY:-}
DRAIN_WRITERS=${BENCH_DRAIN_WRITERS:-1}
SHARED=${SHARED_BENCH:-../shared/bench}
DIR=${BENCH_DIR:-/tmp/outbox-bench}
PORT=${BENCH_PORT:-55433}
OUT=bench/results/$(date -u +%Y%m%d-%H%M%S)-pg$PG.md
mkdir -p bench/results

echo "==> building (release) and installing"
install_extension --release >/dev/null
cargo build -q --release -p outbox_tests --bins
BIN="$CARGO_TARGET_DIR/release"

cleanup() {
    [ -f "$DIR/standby/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/standby" -m immediate -w stop >/dev/null 2>&1 || true
    [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null || true
}
trap cleanup EXIT
rm -rf "$DIR" && mkdir -p "$DIR" && cp "$SHARED"/*.sql bench/*.sql "$DIR"/
is_root && chown -R postgres:postgres "$DIR"

start_dev_broker "$BIN" "$DIR" outbox.event.order:3 outbox.event.bench:3 outbox.event.latency:3

start_scratch_cluster "$DIR" "$PORT" <<CONF
shared_buffers = '512MB'
max_wal_size = '8GB'
outbox.bootstrap_servers = '$BOOTSTRAP'
outbox.kafka_properties = '${BENCH_KAFKA_PROPERTIES:-}'
${BENCH_CONF:-}
CONF

sql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -U postgres -h "$DIR" -p "$PORT" -d postgres -c "$1"; }
status() { sql "SELECT $1 FROM outbox.status()"; }
set_conf() { sql "ALTER SYSTEM SET $1 = '$2'" && sql "SELECT pg_reload_conf()" >/dev/null; }
wait_state() { for _ in $(seq 600); do [ "$(status state)" = "$1" ] && return 0; sleep 0.1; done; echo "relay never reached $1" >&2; return 1; }
pgb() { as_pg "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -n "$@" postgres 2>&1; }
worker_mem() { # RssAnon and VmHWM of the relay, in MB
    local pid; pid=$(status worker_pid)
    awk '/^RssAnon|^VmHWM/ {printf "%s=%.1f ", $1, $2/1024}' "/proc/$pid/status"
}
anon_mb() { awk '/^RssAnon/ {printf "%.1f", $2/1024}' "/proc/$(status worker_pid)/status"; }

# ---------------------------------------------------------------- latency, used by section 3
# Each load runs twice. Without a consumer: commit → acknowledgement from the relay's own
# histogram, with only Postgres, the relay and the broker on the machine, as in production
# where consumers run elsewhere. With the consumer (outbox-latency, which polls the broker
# every millisecond on the same 2 cores): emit → receipt per event, and the relay's figure
# again, to show what the consumer's CPU does to it.
ack_quantiles() { # → "txns=… ack_p50_ms=… ack_p99_ms=… ack_p999_ms=…" since the ack0 snapshot
    sql "WITH d AS (SELECT a.le_ms, a.transactions - b.transactions AS n FROM outbox.ack_latency() a JOIN ack0 b USING (le_ms)),
             t AS (SELECT max(n) AS total FROM d)
        SELECT 'txns=' || total || ' ack_p50_ms=' || (SELECT min(le_ms) FROM d WHERE n >= 0.5 * total)
            || ' ack_p99_ms=' || (SELECT min(le_ms) FROM d WHERE n >= 0.99 * total)
            || ' ack_p999_ms=' || (SELECT min(le_ms) FROM d WHERE n >= 0.999 * total) FROM t"
}
latency() { # rate script events-per-transaction consumer(yes|no)
    local rate=$1 script=$2 per=$3 consumer=$4
    local count=$((rate * 20)) out="$DIR/latency.out" lpid=
    if [ "$consumer" = yes ]; then
        "$BIN/outbox-latency" "$BOOTSTRAP" outbox.event.latency 3 "$count" 60 >"$out" &
        lpid=$!
        for _ in $(seq 100); do grep -q ready "$out" 2>/dev/null && break; sleep 0.1; done
    fi
    local mem_samples="$DIR/mem.$rate"; : >"$mem_samples"
    ( for _ in $(seq 40); do anon_mb >>"$mem_samples"; echo >>"$mem_samples"; sleep 0.5; done ) &
    local mpid=$!
    sql "DROP TABLE IF EXISTS ack0; CREATE TABLE ack0 AS SELECT * FROM outbox.ack_latency()"
    local txns
    txns=$(pgb -c 4 -j 2 -T 20 -R $((rate / per)) -f "$DIR/$script" | awk '/transactions actually processed/ {print $NF}')
    kill "$mpid" 2>/dev/null || true
    if [ -n "$lpid" ]; then wait "$lpid"; LAT[$rate]=$(tail -1 "$out"); else MEM[$rate]=$(sort -n "$mem_samples" | tail -1); fi
    # The histogram counts a transaction once all its events are acknowledged: wait for all.
    for _ in $(seq 100); do
        ACK[$rate,$consumer]=$(ack_quantiles)
        [ "$(field "${ACK[$rate,$consumer]}" txns)" = "$txns" ] && break
        sleep 0.1
    done
}
declare -A LAT MEM ACK
field() { echo "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k {print $2}'; }
# With a streaming standby (PostgreSQL 17 and later): its physical slot in
# synchronized_standby_slots, so the relay publishes nothing before the standby has it. The
# relay waits for the standby's confirmations as walsenders do (a condition variable), and this
# row is what that wait adds to commit → acknowledgement at 10,000 events/s.
standby_latency() {
    echo "==> latency at 10,000 events/s with a streaming standby in synchronized_standby_slots"
    standby_dir=$DIR/standby
    as_pg "$PG_BIN/pg_basebackup" -h "$DIR" -p "$PORT" -U postgres -D "$standby_dir" -R -C -S bench_standby -X stream -c fast
    printf "port = %s\n" $((PORT + 1)) >> "$standby_dir/postgresql.conf"
    as_pg "$PG_BIN/pg_ctl" -D "$standby_dir" -l "$DIR/standby.log" -w start >/dev/null
    for _ in $(seq 300); do
        [ "$(sql "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" = 1 ] && break
        sleep 0.1
    done
    set_conf synchronized_standby_slots bench_standby
    latency 10000 latency5.sql 5 standby
    sql "ALTER SYSTEM RESET synchronized_standby_slots" && sql "SELECT pg_reload_conf()" >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$standby_dir" -m fast -w stop >/dev/null
    sql "SELECT pg_drop_replication_slot('bench_standby')" >/dev/null
}

sql "CREATE EXTENSION outbox_ext" && sql "$(cat "$DIR/schema.sql")"
wait_state streaming
idle_mem=$(anon_mb)

# BENCH_ONLY=latency: commit → acknowledgement at 10,000 events/s, and with a streaming standby
# on 17 and later (section 3's rows without a consumer), for quick iterations.
if [ "$ONLY" = latency ]; then
    set_conf wal_writer_delay 10ms
    latency 10000 latency5.sql 5 no
    [ "$PG" -lt 17 ] || standby_latency
    for c in no standby; do
        [ -n "${ACK[10000,$c]:-}" ] && echo "10000 events/s, ${c/no/no standby}: ${ACK[10000,$c]}"
    done
    exit 0
fi

# ---------------------------------------------------------------- 1. writer overhead
# Two modes. "paused": the relay waits (unconfigured, with an event pending), so no WAL is
# decoded: the cost inside the writer's transaction alone, as in ../shared/bench. "streaming":
# the relay decodes all WAL and produces every event to the dev broker, which runs on the same
# 2 cores: the whole system on one small machine.
declare -A TPS RUN_TPS
declare -A ROUNDS_OF=([paused]=$ROUNDS [streaming]=$STREAMING_ROUNDS [unsealed]=$ROUNDS)
SCRIPTS=(business_only table_outbox table_outbox_insert_delete raw_logical_message emit emit_literal)
# Every round runs each script once, back to back, so that the ratios taken within a round
# compare runs seconds apart; the report gives the median of those per-round ratios.
writer_round() { # mode [scripts...] (default: all of SCRIPTS)
    local rounds=${ROUNDS_OF[$1]} scripts=("${@:2}")
    [ ${#scripts[@]} -gt 0 ] || scripts=("${SCRIPTS[@]}")
    for sync in on off; do
        set_conf synchronous_commit "$sync"
        for round in $(seq "$rounds"); do
            for s in "${scripts[@]}"; do
                sql "CHECKPOINT"
                t=$(pgb -c 4 -j 2 -T "$SECONDS_PER_RUN" -f "$DIR/$s.sql" | awk '/^tps/ {print $3}')
                RUN_TPS[$1,$sync,$round,$s]=$t
                TPS[$1,$sync,$s]=$(echo "${TPS[$1,$sync,$s]:-0} + $t / $rounds" | bc -l)
                printf "    %-9s sync=%-3s round %d %-28s %8.0f tps\n" "$1" "$sync" "$round" "$s" "$t"
            done
        done
    done
    set_conf synchronous_commit on
}
if [ -z "$ONLY" ]; then
echo "==> writer overhead: pgbench -c 4 -j 2 -T $SECONDS_PER_RUN, $ROUNDS rounds relay paused, $STREAMING_ROUNDS streaming"
set_conf outbox.bootstrap_servers ''
wait_state unconfigured
sql "SELECT outbox.emit('order', 'pause', 'Pause', '{}')" >/dev/null
writer_round paused
set_conf outbox.bootstrap_servers "$BOOTSTRAP"
wait_state streaming
writer_round streaming
fi

# ---------------------------------------------------------------- 2. the drain and its limits
# Four figures on the same kind of backlog (BACKLOG events of ~200 bytes over 1000 keys, in
# transactions of 50,000, emitted with the relay unconfigured and then released):
#   R  the relay's drain to the dev broker, as released;
#   K  the producer's ceiling: R's records read back (the newest the dev broker keeps) and produced
#      again, byte for byte and cycled to BACKLOG, with
#      the relay's producer settings by a standalone process (outbox-producer-limit);
#   N  the relay's ceiling: the same worker with each record acknowledged at once instead of
#      produced (outbox.bench_sink = instant, feature bench_sinks);
#   D  the decode floor: the same worker dropping each message unopened (bench_sink = drop).
# N and D run in section 5, after the latency, since they need another build.
# drain LABEL: emits the backlog with the relay unconfigured, then releases it and times the
# delivery. Sets DRAIN_RATE, DRAIN_SECS, DRAIN_PEAK, DRAIN_WAL and DRAIN_CPU for LABEL.
declare -A DRAIN_RATE DRAIN_SECS DRAIN_PEAK DRAIN_WAL DRAIN_CPU
# Where the CPU goes while a limit runs: a snapshot is "busy total relay broker" in clock ticks
# (the machine's busy and all ticks from /proc/stat, the CPU time of the relay and of the
# broker processes from /proc/PID/stat); cpu_since turns one into "busy=<cores busy>
# relay=<µs per event> broker=<µs per event>" over EVENTS events.
TICK=$(getconf CLK_TCK)
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_snapshot() { # relay-pid
    echo "$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat) $(proc_ticks "$1") $(proc_ticks "$BROKER_PID")"
}
cpu_since() { # snapshot relay-pid events
    local b0 t0 r0 k0 b1 t1 r1 k1
    read -r b0 t0 r0 k0 <<<"$1"
    read -r b1 t1 r1 k1 <<<"$(cpu_snapshot "$2")"
    awk -v b="$((b1 - b0))" -v t="$((t1 - t0))" -v r="$((r1 - r0))" -v k="$((k1 - k0))" -v n="$3" -v hz="$TICK" -v cores="$(nproc)" \
        'BEGIN {printf "busy=%.2f relay=%.2f broker=%.2f", cores * b / t, r / hz / n * 1e6, k / hz / n * 1e6}'
}
drain() {
    local label=$1 per_txn=50000 from lo hi half writers start
    set_conf outbox.bootstrap_servers ''
    wait_state unconfigured
    start=$(date +%s.%N)
    for ((from = 0; from < BACKLOG; from += per_txn * DRAIN_WRITERS)); do
        writers=()
        for ((half = 0; half < DRAIN_WRITERS; half++)); do
            lo=$((from + half * per_txn)); hi=$((lo + per_txn - 1)); [ $hi -ge $BACKLOG ] && hi=$((BACKLOG - 1))
            [ $lo -lt $BACKLOG ] || continue
            sql "SELECT count(outbox.emit('bench', 'agg-' || (i % 1000), 'Tick', jsonb_build_object('seq', i, 'pad', repeat('x', ${PAD:-170})))) FROM generate_series($lo, $hi) AS i" >/dev/null &
            writers+=($!)
        done
        wait "${writers[@]}"
    done
    local emit_secs backlog_bytes delivered0 peak d t0
    emit_secs=$(echo "$(date +%s.%N) - $start" | bc -l)
    backlog_bytes=$(status pending_bytes)
    delivered0=$(status events_delivered)
    perf_start "$label"
    local relay cpu0 key kb _ peak_kb=0
    relay=$(status worker_pid)
    # Every 50 ms until the backlog is delivered: the count from one psql session kept open and
    # RssAnon read by bash itself, so that the bench takes next to no CPU from the drain.
    coproc POLL { psql -X -A -t -q -U postgres -h "$DIR" -p "$PORT" -d postgres; }
    cpu0=$(cpu_snapshot "$relay")
    set_conf outbox.bootstrap_servers "$BOOTSTRAP"
    t0=$EPOCHREALTIME
    while :; do
        echo "SELECT events_delivered FROM outbox.status();" >&"${POLL[1]}"
        read -r d <&"${POLL[0]}"
        while read -r key kb _; do
            [ "$key" = RssAnon: ] && { [ "$kb" -gt "$peak_kb" ] && peak_kb=$kb; break; }
        done <"/proc/$relay/status"
        [ $((d - delivered0)) -ge "$BACKLOG" ] && break
        sleep 0.05
    done
    DRAIN_SECS[$label]=$(echo "$EPOCHREALTIME - $t0" | bc -l)
    DRAIN_CPU[$label]=$(cpu_since "$cpu0" "$relay" "$BACKLOG")
    exec {POLL[1]}>&-
    wait "$POLL_PID" || true
    peak=$(echo "$peak_kb / 1024" | bc -l | xargs printf %.1f)
    perf_stop
    DRAIN_RATE[$label]=$(echo "$BACKLOG / ${DRAIN_SECS[$label]}" | bc -l)
    DRAIN_PEAK[$label]=$peak
    DRAIN_WAL[$label]=$backlog_bytes
    printf "    %s: emitted in %.1f s, WAL backlog %s bytes; drained in %.2f s = %.0f events/s; peak RssAnon %.1f MB\n" \
        "$label" "$emit_secs" "$backlog_bytes" "${DRAIN_SECS[$label]}" "${DRAIN_RATE[$label]}" "$peak"
}
# With BENCH_PERF: samples the relay's CPU from the release to the end of the drain.
PERF_PID=
perf_start() {
    [ -n "${BENCH_PERF:-}" ] || return 0
    perf record -q -e ${BENCH_PERF_EVENT:-cpu-clock} -F 2999 --call-graph dwarf,8192 -p "$(status worker_pid)" -o "$DIR/perf.$1.data" >/dev/null 2>&1 &
    PERF_PID=$!
    for _ in $(seq 100); do [ -s "$DIR/perf.$1.data" ] && break; sleep 0.05; done # attached
}
perf_stop() {
    [ -n "$PERF_PID" ] || return 0
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true; PERF_PID=
}
# restart_with [FEATURES [STATE]]: stops the cluster, installs the release build (with
# FEATURES), starts, and waits for the relay's STATE (default streaming).
restart_with() {
    as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
    install_extension --release ${1:+--features "$1"} >"$DIR/install.log" 2>&1 || { cat "$DIR/install.log"; exit 1; }
    as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
    wait_state "${2:-streaming}"
}
echo "==> drain R: $BACKLOG events of ~200 bytes over 1000 keys, emitted with the relay unconfigured"
drain R
peak_drain=${DRAIN_PEAK[R]}
payload_mb=$(sql "SELECT sum(length(jsonb_build_object('seq', i, 'pad', repeat('x', ${PAD:-170}))::text)) / 1e6 FROM generate_series(0, $BACKLOG - 1) i")
drain_mbs=$(echo "$payload_mb / ${DRAIN_SECS[R]}" | bc -l)
echo "==> producer ceiling K: R's records produced again by outbox-producer-limit"
cpu0=$(cpu_snapshot "$(status worker_pid)")
K_LINE=$("$BIN/outbox-producer-limit" "$BOOTSTRAP" outbox.event.bench 3 "$BACKLOG" "${BENCH_KAFKA_PROPERTIES:-}")
# The producer's own CPU is in its line; the relay idles meanwhile.
DRAIN_CPU[K]=$(cpu_since "$cpu0" "$(status worker_pid)" "$BACKLOG" | sed "s/relay=[^ ]*/producer=$(echo "$K_LINE" | tr ' ' '\n' | awk -F= '$1 == "cpu_us_per_event" {print $2}')/")
echo "    K: $K_LINE"
DRAIN_RATE[K]=$(echo "$K_LINE" | tr ' ' '\n' | awk -F= '$1 == "rate" {print $2}')
DRAIN_SECS[K]=$(echo "$K_LINE" | tr ' ' '\n' | awk -F= '$1 == "seconds" {print $2}')

if [ -z "$ONLY" ]; then
# ---------------------------------------------------------------- 3. latency
echo "==> latency at 2,000 and 10,000 events/s (20 s each, without and with a consumer)"
set_conf synchronous_commit on
set_conf wal_writer_delay 10ms
for consumer in no yes; do
    latency 2000 latency.sql 1 "$consumer"
    latency 10000 latency5.sql 5 "$consumer"
done
streaming_mem=${MEM[10000]}

[ "$PG" -lt 17 ] || standby_latency
fi

# ---------------------------------------------------------------- 5. the drain's other limits
# N and D: the same backlog and worker, built with feature bench_sinks. Restarts the server.
if [ "$ONLY" = drain ]; then
    printf "R %.0f events/s (%s), K %.0f events/s (%s): R ÷ K = %.2f; peak RssAnon of R %s MB\n" "${DRAIN_RATE[R]}" "${DRAIN_CPU[R]}" \
        "${DRAIN_RATE[K]}" "${DRAIN_CPU[K]}" "$(echo "${DRAIN_RATE[R]} / ${DRAIN_RATE[K]}" | bc -l)" "${DRAIN_PEAK[R]}"
    exit 0
fi
echo "==> relay ceiling N (bench_sink = instant) and decode floor D (bench_sink = drop)"
restart_with bench_sinks
set_conf outbox.bench_sink instant
drain N
set_conf outbox.bench_sink drop
drain D
set_conf outbox.bench_sink kafka
limit_rate=$(echo "r = ${DRAIN_RATE[N]}; if (${DRAIN_RATE[K]} < r) r = ${DRAIN_RATE[K]}; r" | bc -l)
drain_vs_limit=$(echo "${DRAIN_RATE[R]} / $limit_rate" | bc -l)

# ---------------------------------------------------------------- 6. what authentication costs
# emit_literal against raw_logical_message with the relay paused, as in section 1, with emit
# built with feature unsealed_emit: the same validation and checks, the record written without
# its key lookup and tag, as before records were authenticated. The relay is paused at a
# sealed event emitted before the restart, so it decodes nothing during the runs.
if [ -z "$ONLY" ]; then
echo "==> authentication cost: emit built without sealing (unsealed_emit), relay paused"
set_conf outbox.bootstrap_servers ''
wait_state unconfigured
sql "SELECT outbox.emit('order', 'pause', 'Pause', '{}')" >/dev/null
restart_with unsealed_emit unconfigured
writer_round unsealed raw_logical_message emit_literal
set_conf outbox.bootstrap_servers "$BOOTSTRAP"
fi
restart_with

# ---------------------------------------------------------------- report
ratio() { echo "${TPS[$1,$2,$3]} / ${TPS[$1,$2,$4]}" | bc -l; }
# "median (min–max)" of the per-round ratios $3 ÷ $4 in mode $1, sync $2
round_ratios() {
    local r
    for r in $(seq "${ROUNDS_OF[$1]}"); do
        echo "${RUN_TPS[$1,$2,$r,$3]} / ${RUN_TPS[$1,$2,$r,$4]}" | bc -l
    done | sort -g | awk '{v[NR] = $1} END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        if (NR > 1) printf "%.3f (%.2f–%.2f)", m, v[1], v[NR]; else printf "%.3f", m }'
}
target_row() { # label numerator denominator
    printf "| %s | %s | %s | %s | %s |\n" "$1" "$(round_ratios paused on "$2" "$3")" "$(round_ratios paused off "$2" "$3")" \
        "$(round_ratios streaming on "$2" "$3")" "$(round_ratios streaming off "$2" "$3")"
}
{
echo "# outbox_ext benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); PostgreSQL $(sql 'SHOW server_version'); the relay produces to the dev broker (librdkafka mock cluster, 3 brokers) on loopback."
echo
echo "## Limits: the drain against what bounds it (one backlog shape, one run)"
echo
echo "$BACKLOG events (%s MB of payload) per run, in transactions of 50,000 emitted by $DRAIN_WRITERS session(s) at a time with the relay unconfigured, then released; R, N and D time the relay from release to the last acknowledgement it counted, K times a standalone producer from its first record to its last acknowledgement." | sed "s/%s/$(printf %.0f "$payload_mb")/"
echo
echo "| figure | what runs | events/s | seconds | WAL backlog | peak RssAnon | cores busy (of $(nproc)) | CPU µs per event: relay (K: producer) | broker |"
echo "|---|---|---|---|---|---|---|---|---|"
limit_row() { # label what
    local c=${DRAIN_CPU[$1]}
    printf "| %s | %s | %.0f | %.2f | %s | %s | %s | %s | %s |\n" "$1" "$2" "${DRAIN_RATE[$1]}" "${DRAIN_SECS[$1]}" "${DRAIN_WAL[$1]:-—}" "${DRAIN_PEAK[$1]:+${DRAIN_PEAK[$1]} MB}" \
        "$(field "$c" busy)" "$(field "$c" relay)$(field "$c" producer)" "$(field "$c" broker)"
}
limit_row D "decode floor: the worker decodes and drops each message unopened"
limit_row N "relay ceiling: decode, open, route, track; each record acknowledged at once"
limit_row K "producer ceiling: R's records produced again by a standalone librdkafka producer"
limit_row R "the relay's drain to the dev broker"
echo
rat() { echo "$1 / $2" | bc -l | xargs printf %.2f; }
printf "N ÷ D = **%s** (our own code on top of PostgreSQL's decoding), R ÷ N = **%s**, R ÷ K = **%s**, R ÷ min(N, K) = **%s**.\n" \
    "$(rat "${DRAIN_RATE[N]}" "${DRAIN_RATE[D]}")" "$(rat "${DRAIN_RATE[R]}" "${DRAIN_RATE[N]}")" \
    "$(rat "${DRAIN_RATE[R]}" "${DRAIN_RATE[K]}")" "$(rat "${DRAIN_RATE[R]}" "$limit_rate")"
echo
printf "R drained %.1f MB/s of payload.\n" "$drain_mbs"
echo
if [ -z "$ONLY" ]; then
echo "## 1. Writer overhead (pgbench -c 4 -j 2, ${SECONDS_PER_RUN} s per run; mean tps of $ROUNDS rounds paused, $STREAMING_ROUNDS streaming)"
for mode in paused streaming; do
    echo
    echo "Relay $mode:"
    echo
    echo "| script | sync on tps | ratio to business_only | sync off tps | ratio to business_only |"
    echo "|---|---|---|---|---|"
    for s in "${SCRIPTS[@]}"; do
        printf "| %s | %.0f | %.2f | %.0f | %.2f |\n" "$s" "${TPS[$mode,on,$s]}" "$(ratio $mode on "$s" business_only)" "${TPS[$mode,off,$s]}" "$(ratio $mode off "$s" business_only)"
    done
done
echo
echo "Median of the per-round ratios (lowest–highest round):"
echo
printf "| target | relay paused, sync on | paused, sync off | streaming, sync on | streaming, sync off |\n|---|---|---|---|---|\n"
target_row "emit_literal ÷ raw_logical_message (≥ 0.95)" emit_literal raw_logical_message
target_row "emit ÷ raw_logical_message" emit raw_logical_message
target_row "emit ÷ table_outbox (≥ 1.20 sync off)" emit table_outbox
target_row "emit ÷ table_outbox_insert_delete" emit table_outbox_insert_delete
target_row "raw_logical_message ÷ table_outbox (the floor of any WAL-message outbox)" raw_logical_message table_outbox
echo
echo "What authenticating records costs (section 6): emit_literal ÷ raw_logical_message, relay paused, median of the per-round ratios, with emit as released (sealed: key lookup and HMAC-SHA256 tag) and built with \`unsealed_emit\` (as before authentication):"
echo
printf "| emit | sync on | sync off |\n|---|---|---|\n"
printf "| sealed (section 1) | %s | %s |\n" "$(round_ratios paused on emit_literal raw_logical_message)" "$(round_ratios paused off emit_literal raw_logical_message)"
printf "| unsealed | %s | %s |\n" "$(round_ratios unsealed on emit_literal raw_logical_message)" "$(round_ratios unsealed off emit_literal raw_logical_message)"
printf "| sealed ÷ unsealed (mean tps ratios) | %.3f | %.3f |\n" \
    "$(echo "$(ratio paused on emit_literal raw_logical_message) / $(ratio unsealed on emit_literal raw_logical_message)" | bc -l)" \
    "$(echo "$(ratio paused off emit_literal raw_logical_message) / $(ratio unsealed off emit_literal raw_logical_message)" | bc -l)"
echo
echo "## 3. Latency (20 s of steady load; synchronous_commit=on, wal_writer_delay=10ms, producer linger.ms=1)"
echo
echo "commit → Kafka acknowledgement, per transaction, from the relay's histogram \`outbox.ack_latency()\` (bucket upper bounds, at most 10% above the true value):"
echo
echo "| load | consumer on the same 2 cores | transactions | p50 | p99 | p99.9 |"
echo "|---|---|---|---|---|---|"
for r in 2000 10000; do
    for c in no yes; do
        a=${ACK[$r,$c]}
        printf "| %s events/s | %s | %s | ≤ %s ms | ≤ %s ms | ≤ %s ms |\n" "$r" "$c" "$(field "$a" txns)" "$(field "$a" ack_p50_ms)" "$(field "$a" ack_p99_ms)" "$(field "$a" ack_p999_ms)"
    done
done
if [ -n "${ACK[10000,standby]:-}" ]; then
    a=${ACK[10000,standby]}
    printf "| 10000 events/s, a streaming standby in synchronized_standby_slots (target p99 ≤ 10 ms) | no | %s | ≤ %s ms | ≤ %s ms | ≤ %s ms |\n" "$(field "$a" txns)" "$(field "$a" ack_p50_ms)" "$(field "$a" ack_p99_ms)" "$(field "$a" ack_p999_ms)"
fi
echo
echo "emit → consumer receipt, per event, measured by a consumer (\`outbox-latency\`) from a µs clock in the payload; commit → receipt from the record timestamp (the commit time, ms resolution):"
echo
echo "| load | emit→receipt p50 | p99 | p99.9 | commit→receipt p50 | p99 |"
echo "|---|---|---|---|---|---|"
for r in 2000 10000; do
    l=${LAT[$r]}
    printf "| %s events/s | %s ms | %s ms | %s ms | %s ms | %s ms |\n" "$r" "$(field "$l" emit_p50_ms)" "$(field "$l" emit_p99_ms)" "$(field "$l" emit_p999_ms)" "$(field "$l" commit_p50_ms)" "$(field "$l" commit_p99_ms)"
done
echo
echo "Received: 2k run $(field "${LAT[2000]}" received), 10k run $(field "${LAT[10000]}" received) events."
echo
echo "## 4. Worker memory (RssAnon: the worker's private memory, excluding shared buffers)"
echo
echo "| phase | RssAnon |"
echo "|---|---|"
echo "| idle | $idle_mem MB |"
echo "| streaming 10k events/s, no consumer (peak of samples) | $streaming_mem MB |"
echo "| draining the $BACKLOG backlog (peak of samples) | $peak_drain MB |"
fi
echo
if [ -n "${BENCH_PERF:-}" ]; then
    echo "## Where each microsecond of an event goes (perf record -e cpu-clock while draining; perf's own cost included)"
    echo
    for l in R N D; do python3 scripts/drain_profile.py "$DIR/perf.$l.data" "$BACKLOG" "$l"; echo; done
fi
echo "drain_vs_limit=$(printf %.2f "$drain_vs_limit")"
echo "peak_drain_rss_mb=$(printf %.1f "$peak_drain")"
} | tee "$OUT"
echo "(written to $OUT)"

# ---------------------------------------------------------------- several databases
[ -z "$ONLY" ] || exit 0
cleanup
BENCH_BUILT=1 BENCH_OUT="${OUT%.md}-databases.md" bash scripts/bench-databases.sh
