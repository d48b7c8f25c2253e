#!/usr/bin/env bash
# Runs every test suite and ends with one line: "N passed, M failed".
#   1. outbox_core unit tests (pure Rust, no Postgres)
#   2. cargo pgrx test: emit's validation and settings inside a preloaded server
#   3. integration tests: scratch PG15 clusters + librdkafka mock Kafka clusters
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

log=$(mktemp)
failed_suites=()
run() {
    local name=$1; shift
    echo "==> $name: $*"
    if ! "$@" 2>&1 | tee -a "$log"; then
        failed_suites+=("$name")
    fi
}

run core cargo test -p outbox_core

pgrx_args=(pg15)
if is_root; then
    pgdata=$(mktemp -d /tmp/outbox-pgrx-XXXXXX)
    chown postgres:postgres "$pgdata"
    pgrx_args+=(--runas postgres --pgdata "$pgdata")
fi
run pg_test cargo pgrx test "${pgrx_args[@]}"

# cargo pgrx test installed a build with the test schema; install the plain one.
run install install_extension
run e2e cargo test -p outbox_tests --tests -- --nocapture

passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"
[ -n "${pgdata:-}" ] && rm -rf "$pgdata"
if [ ${#failed_suites[@]} -gt 0 ] && [ "$failed" -eq 0 ]; then
    failed=${#failed_suites[@]}
fi
echo "${failed_suites[*]:+failed suites: ${failed_suites[*]}}"
echo "$passed passed, $failed failed"
[ ${#failed_suites[@]} -eq 0 ]
