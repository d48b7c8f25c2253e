# Shared by the scripts: where builds go and how to run things as the cluster owner.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outbox_ext/target}"
PG_CONFIG=/usr/bin/pg_config
PG_BIN=/usr/lib/postgresql/15/bin

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as the owner of PostgreSQL clusters (postgres when we are root).
as_pg() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

# cargo pgrx install into the system PostgreSQL 15 (sudo when not root).
install_extension() {
    if is_root; then
        cargo pgrx install --pg-config "$PG_CONFIG" "$@"
    else
        cargo pgrx install --sudo --pg-config "$PG_CONFIG" "$@"
    fi
}
