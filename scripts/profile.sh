#!/usr/bin/env bash
# `make bench-profile`: where the writer's CPU goes, counted by callgrind (instructions are
# deterministic, unlike tps on a shared machine). Each writer script of `make bench` runs as
# 200 and then 1,200 transactions in single-user mode (`postgres --single`); the difference
# divided by 1,000 is the cost of one transaction, without start-up. No client protocol is
# involved, so this is the server's work alone. About 2 minutes. PROFILE_FEATURES=unsealed_emit
# profiles emit as it was before records were authenticated (see Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

SHARED=${SHARED_BENCH:-../shared/bench}
DIR=${PROFILE_DIR:-/tmp/outbox-profile}
PORT=${PROFILE_PORT:-55434}
SCRIPTS=(business_only table_outbox table_outbox_insert_delete raw_logical_message emit emit_literal)
# Functions whose inclusive cost per transaction is shown for the emit scripts.
FUNCTIONS=(jsonb_in emit_wrapper jsonb_out LogLogicalMessage expand_function_arguments make_op pg_logical_emit_message_text XLogInsert heap_insert btinsert)

command -v valgrind >/dev/null || { apt-get install -y -qq valgrind >/dev/null || sudo apt-get install -y -qq valgrind >/dev/null; }
echo "==> building (release) and installing"
install_extension --release ${PROFILE_FEATURES:+--features "$PROFILE_FEATURES"} >"$DIR.install.log" 2>&1 || { cat "$DIR.install.log"; exit 1; }

stop() { [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true; }
trap stop EXIT
rm -rf "$DIR" && mkdir -p "$DIR" && cp "$SHARED"/*.sql bench/*.sql "$DIR"/
is_root && chown -R postgres:postgres "$DIR"
start_scratch_cluster "$DIR" "$PORT" </dev/null
sql() { psql -X -A -t -q -v ON_ERROR_STOP=1 -U postgres -h "$DIR" -p "$PORT" -d postgres -c "$1"; }
sql "CREATE EXTENSION outbox_ext" && sql "$(cat "$DIR/schema.sql")"
for _ in $(seq 100); do [ "$(sql "SELECT count(*) FROM pg_replication_slots")" = 1 ] && break; sleep 0.1; done
stop

# Runs script $1 $2 times under callgrind; leaves the profile in $DIR/cg.$1.$2.
profile() {
    local input="$DIR/in.$1.$2"
    for _ in $(seq "$2"); do sed -e 's/:client_id/1/g' -e '/^--/d' -e '/^\\/d' "$DIR/$1.sql"; done >"$input"
    is_root && chown postgres "$input"
    as_pg valgrind --tool=callgrind --callgrind-out-file="$DIR/cg.$1.$2" \
        "$PG_BIN/postgres" --single -D "$DIR/data" -c synchronous_commit=off postgres <"$input" >/dev/null 2>"$DIR/cg.$1.$2.log"
}
total() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
inclusive() { # profile function -> instructions
    callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
        awk -v f="$2" '!done { for (i = 1; i <= NF; i++) if ($i ~ (":" f "$")) { gsub(",", "", $1); print $1; done = 1 } }'
}

declare -A PER_TXN
echo "| script | instructions per transaction | ÷ business_only |"
echo "|---|---|---|"
for s in "${SCRIPTS[@]}"; do
    profile "$s" 200
    profile "$s" 1200
    PER_TXN[$s]=$(( ($(total "$DIR/cg.$s.1200") - $(total "$DIR/cg.$s.200")) / 1000 ))
    printf "| %s | %d | %.2f |\n" "$s" "${PER_TXN[$s]}" "$(echo "${PER_TXN[$s]} / ${PER_TXN[business_only]}" | bc -l)"
done
echo
echo "| instructions per transaction, inclusive | emit | emit_literal | raw_logical_message |"
echo "|---|---|---|---|"
for f in "${FUNCTIONS[@]}"; do
    row="| $f"
    for s in emit emit_literal raw_logical_message; do
        a=$(inclusive "$DIR/cg.$s.200" "$f"); b=$(inclusive "$DIR/cg.$s.1200" "$f")
        row="$row | $(( (${b:-0} - ${a:-0}) / 1000 ))"
    done
    echo "$row |"
done
