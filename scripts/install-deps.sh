#!/usr/bin/env bash
# Installs what building and testing outbox_ext needs, skipping whatever is already there:
# Debian packages (PostgreSQL 15 server and headers, a C toolchain and libclang for pgrx and
# librdkafka), cargo-pgrx 0.18.1, and pgrx's configuration for the system PostgreSQL 15.
set -euo pipefail

PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 build-essential pkg-config
          clang libclang-dev libssl-dev zlib1g-dev libzstd-dev sudo python3 bc)

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

if [ "$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx 0.18.1" ]; then
    echo "installing cargo-pgrx 0.18.1 (takes a few minutes)"
    cargo install cargo-pgrx --version 0.18.1 --locked
fi

if ! grep -qs '^pg15 = "/usr/bin/pg_config"' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15=/usr/bin/pg_config
fi
