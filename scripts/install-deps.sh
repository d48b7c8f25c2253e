#!/usr/bin/env bash
# Installs what building and testing outbox_ext needs, skipping whatever is already there:
# Debian packages (PostgreSQL 15 server and headers, a C toolchain and libclang for pgrx and
# librdkafka), the PostgreSQL 16, 17 and 18 test fixtures (scripts/postgres.sh), cargo-pgrx
# 0.18.1, pgrx's configuration for all four versions, the official CloudEvents SDK for
# Python, which tests/e2e/record_formats.rs reads records with, and Debian's Prometheus and
# postgres_exporter, which tests/e2e/monitoring.rs runs (PyYAML for the dashboard check).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/postgres.sh

PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 build-essential pkg-config
          clang libclang-dev libssl-dev zlib1g-dev libzstd-dev sudo python3 bc
          prometheus prometheus-postgres-exporter)
command -v pip >/dev/null || PACKAGES+=(python3-pip)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]} (run as root, or install them with sudo apt-get install)" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

for v in "${SUPPORTED_PG_VERSIONS[@]}"; do
    fetch_pg "$v"
done

# Outside the system's Python (Debian marks it externally managed), where the tests look.
CLOUDEVENTS_SDK="${OUTBOX_PYTHONPATH:-$HOME/.cache/outbox_ext/python}"
if ! PYTHONPATH="$CLOUDEVENTS_SDK" python3 -c 'import cloudevents.core.bindings.kafka, yaml' 2>/dev/null; then
    echo "installing the CloudEvents SDK for Python and PyYAML into $CLOUDEVENTS_SDK"
    python3 -m pip install -q --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --target "$CLOUDEVENTS_SDK" 'cloudevents==2.2.0' 'PyYAML==6.0.2'
fi

if [ "$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx 0.18.1" ]; then
    echo "installing cargo-pgrx 0.18.1 (takes a few minutes)"
    cargo install cargo-pgrx --version 0.18.1 --locked
fi

init_args=()
configured=true
for v in "${SUPPORTED_PG_VERSIONS[@]}"; do
    pg_config=$(pg_config_path "$v")
    init_args+=("--pg$v=$pg_config")
    grep -qs "^pg$v = \"$pg_config\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" || configured=false
done
if ! $configured; then
    cargo pgrx init "${init_args[@]}"
fi
