#!/usr/bin/env bash
# `make test`: every suite on every supported PostgreSQL (PG=NN for one version). Prints the
# counts per version, then one line: "N passed, M failed".
#
#   1. outbox_core unit tests (pure Rust, no Postgres), once; and the monitoring files' checks
#      (scripts/monitoring-check.sh: promtool, the Grafana dashboard's structure), once
#   2. per version, cargo pgrx test pgNN: emit's validation and settings in a preloaded server
#   3. per version, integration tests: scratch clusters of that version + librdkafka mock Kafka
#      clusters. Every version runs delivery, transactions, lifecycle, recovery (worker kills,
#      pg_ctl stop -m immediate), setup, upgrade and record_formats (with the CloudEvents SDK that
#      install-deps.sh puts in ~/.cache/outbox_ext/python); the long fault suites (faults, wal_safety)
#      and monitoring (Debian's postgres_exporter and Prometheus against the relays) run on the
#      newest version only, to keep CI within its time (E2E_FULL=1: on every version).
#   4. with PACKAGE_TEST=1 (as .ci/run does, as root): builds the PostgreSQL 15 package, installs
#      it with dpkg into the system's PostgreSQL 15 in place of the cargo build, and runs the
#      emit → Kafka record test against that installation; then removes the package.
set -uo pipefail
cd "$(dirname "$0")/.."
requested=${PG_VERSIONS:-${PG:-}}   # before common.sh, which selects PG=15 by default
. scripts/common.sh

read -r -a VERSIONS <<<"${requested:-${SUPPORTED_PG_VERSIONS[*]}}"
NEWEST=${SUPPORTED_PG_VERSIONS[-1]}
E2E_EVERY_VERSION=(delivery transactions lifecycle recovery setup upgrade forgery dead_letters failover databases launcher record_formats)
E2E_NEWEST_ONLY=(faults wal_safety monitoring)

logdir=$(mktemp -d)
failed_suites=()
# run NAME COMMAND...: runs a suite, keeping its output in $logdir/NAME.log.
run() {
    local name=$1; shift
    echo "==> $name: $*"
    if ! "$@" 2>&1 | tee "$logdir/$name.log"; then
        failed_suites+=("$name")
    fi
}
# counts FILE...: "passed failed" summed over cargo's "test result:" lines.
counts() {
    cat "$@" 2>/dev/null | grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' |
        awk '{p+=$4; f+=$6} END {print p+0, f+0}'
}

for v in "${VERSIONS[@]}"; do
    check_pg_version "$v" || exit 2
    fetch_pg "$v" || exit 2
done

run core cargo test -p outbox_core
run monitoring bash scripts/monitoring-check.sh

for v in "${VERSIONS[@]}"; do
    use_pg "$v"
    echo "==> PostgreSQL $v: $("$PG_CONFIG" --version)"
    pgrx_args=("pg$v")
    pgdata=
    if is_root; then
        pgdata=$(mktemp -d /tmp/outbox-pgrx-XXXXXX)
        chown postgres:postgres "$pgdata"
        pgrx_args+=(--runas postgres --pgdata "$pgdata")
    fi
    run "pg$v-pg_test" cargo pgrx test "${pgrx_args[@]}"
    [ -n "$pgdata" ] && rm -rf "$pgdata"

    # cargo pgrx test installed a build with the test schema; install the one the end-to-end
    # suites test: the product plus the relay's test hooks, inert unless a test arms them
    # (src/relay/test_hooks.rs). The package test below runs the product build alone.
    run "pg$v-install" install_extension --features test_hooks
    suites=("${E2E_EVERY_VERSION[@]}")
    if [ "$v" = "$NEWEST" ] || [ -n "${E2E_FULL:-}" ]; then
        suites+=("${E2E_NEWEST_ONLY[@]}")
    fi
    tests=()
    for s in "${suites[@]}"; do tests+=(--test "$s"); done
    run "pg$v-e2e" env OUTBOX_PG_CONFIG="$PG_CONFIG" cargo test --no-fail-fast -p outbox_tests "${tests[@]}" -- --nocapture
done

# The package, installed by dpkg alone: no cargo-installed file may remain in its place.
package_test() {
    local deb
    PG_VERSIONS=15 bash scripts/package.sh || return 1
    deb=$(ls packages/postgresql-15-outbox-ext_*_amd64.deb) || return 1
    rm -f /usr/lib/postgresql/15/lib/outbox_ext.so /usr/share/postgresql/15/extension/outbox_ext*
    dpkg -i "$deb" || return 1
    dpkg -S /usr/lib/postgresql/15/lib/outbox_ext.so /usr/share/postgresql/15/extension/outbox_ext.control || return 1
    dpkg --verify postgresql-15-outbox-ext || return 1
    local status=0
    OUTBOX_PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config \
        cargo test -p outbox_tests --test delivery record_has_topic_key_value_headers_and_commit_timestamp -- --nocapture || status=1
    dpkg --verify postgresql-15-outbox-ext || status=1
    dpkg -r postgresql-15-outbox-ext >/dev/null || status=1
    return $status
}
if [ -n "${PACKAGE_TEST:-}" ]; then
    run package package_test
fi

echo
echo "==> results"
read -r p f < <(counts "$logdir/core.log")
printf '%-16s %4d passed, %d failed\n' "core" "$p" "$f"
read -r p f < <(counts "$logdir/monitoring.log")
printf '%-16s %4d passed, %d failed (promtool check and test rules, the dashboard)\n' "monitoring" "$p" "$f"
for v in "${VERSIONS[@]}"; do
    read -r tp tf < <(counts "$logdir/pg$v-pg_test.log")
    read -r ep ef < <(counts "$logdir/pg$v-e2e.log")
    printf '%-16s %4d passed, %d failed (pg_test %d/%d, e2e %d/%d)\n' "PostgreSQL $v" \
        $((tp + ep)) $((tf + ef)) "$tp" $((tp + tf)) "$ep" $((ep + ef))
done

if [ -n "${PACKAGE_TEST:-}" ]; then
    read -r kp kf < <(counts "$logdir/package.log")
    printf '%-16s %4d passed, %d failed (emit → Kafka against the dpkg-installed 15 package)\n' "package" "$kp" "$kf"
fi

read -r passed failed < <(counts "$logdir"/*.log)
rm -rf "$logdir"
if [ ${#failed_suites[@]} -gt 0 ] && [ "$failed" -eq 0 ]; then
    failed=${#failed_suites[@]}
fi
echo "${failed_suites[*]:+failed suites: ${failed_suites[*]}}"
echo "$passed passed, $failed failed"
[ ${#failed_suites[@]} -eq 0 ]
