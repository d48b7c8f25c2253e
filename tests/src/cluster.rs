//! A throw-away PostgreSQL cluster in a temporary directory, run as the `postgres` user when
//! the tests run as root (Postgres refuses to run as root).

use std::path::{Path, PathBuf};
use crate::SpawnGuarded;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The `pg_config` of the PostgreSQL under test: `OUTBOX_PG_CONFIG` (scripts/test.sh sets it for
/// each version), or Debian's PostgreSQL 15.
fn pg_config() -> PathBuf {
    std::env::var_os("OUTBOX_PG_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin/pg_config"))
}

fn pg_config_value(flag: &str) -> String {
    let out = check("pg_config", Command::new(pg_config()).arg(flag).guarded_output().expect("pg_config runs"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Where the server programs (initdb, pg_ctl, postgres, pg_basebackup) of that version live.
pub fn pg_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| PathBuf::from(pg_config_value("--bindir"))).clone()
}

/// The major version under test (15, 16, 17 or 18).
pub fn pg_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        // "PostgreSQL 17.9" or "PostgreSQL 15.20 (Debian ...)"
        let version = pg_config_value("--version");
        version
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the major version from \"{version}\""))
    })
}

/// Copies `script` (an extension script of an earlier release, from tests/fixtures) into the
/// server's extension directory, so that `CREATE EXTENSION ... VERSION` can install it.
pub fn install_extension_script(script: &Path) {
    let dir = PathBuf::from(pg_config_value("--sharedir")).join("extension");
    let target = dir.join(script.file_name().expect("a file"));
    let mut cp = if is_root() { Command::new("cp") } else { let mut c = Command::new("sudo"); c.arg("cp"); c };
    check("copy the extension script", cp.arg(script).arg(&target).guarded_output().unwrap());
}

fn is_root() -> bool {
    Command::new("id").arg("-u").guarded_output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Runs a server binary as the cluster's owner.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn check(what: &str, out: Output) -> Output {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A new, empty directory for a cluster (owned by the cluster's owner) and a port for it.
fn scratch_dir() -> (PathBuf, u16) {
    if NEXT_PORT.load(Ordering::Relaxed) == 0 {
        let base = 20000 + (std::process::id() % 2000) as u16 * 10;
        let _ = NEXT_PORT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
    }
    let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("outbox-pg-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        check("chown", Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).guarded_output().unwrap());
    }
    (dir, port)
}

/// The postgresql.conf lines that keep a cluster in `dir` to itself: a Unix socket there on
/// `port`, no TCP.
fn listen_here(dir: &Path, port: u16) -> String {
    format!("\nlisten_addresses = ''\nport = {port}\nunix_socket_directories = '{}'\n", dir.display())
}

/// Appends `lines` to a configuration file of the data directory `data`.
fn append_conf(data: &Path, file: &str, lines: &str) {
    let path = data.join(file);
    let mut existing = std::fs::read_to_string(&path).unwrap();
    existing.push_str(lines);
    std::fs::write(&path, existing).unwrap();
}

pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
    pub database: String,
    stopped: bool,
    /// Only the handle that made the cluster stops and removes it on drop.
    owner: bool,
}

impl PgCluster {
    /// initdb, configure for outbox_ext (preloaded, wal_level=logical), start, and create the
    /// extension in database `postgres`. `settings` are extra postgresql.conf lines.
    pub fn start(settings: &[(&str, &str)]) -> PgCluster {
        let cluster = PgCluster::init(settings);
        cluster.create_extension();
        cluster
    }

    /// CREATE EXTENSION, then waits (as an application would, on outbox.status()) until the
    /// relay has made its slot, if this is the database it relays.
    pub fn create_extension(&self) {
        self.sql("CREATE EXTENSION outbox_ext");
        crate::wait_until("the relay to make its slot", crate::DEADLINE, || {
            self.sql(
                "SELECT confirmed_lsn IS NOT NULL FROM outbox.status()",
            ) == "t"
        });
    }

    /// Like `start`, without creating the extension. `settings` come last in
    /// postgresql.conf, so they override the defaults (for example wal_level).
    pub fn init(settings: &[(&str, &str)]) -> PgCluster {
        let (dir, port) = scratch_dir();
        let data = dir.join("data");
        check(
            "initdb",
            as_owner(&pg_bin().join("initdb"))
                .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "-D"])
                .arg(&data)
                .guarded_output()
                .unwrap(),
        );
        let mut conf = format!(
            "shared_preload_libraries = 'outbox_ext'\nwal_level = logical\n\
             max_prepared_transactions = 10\nfsync = off\nmax_wal_senders = 4\nmax_replication_slots = 8\n\
             log_line_prefix = '%m [%p] '\n"
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        append_conf(&data, "postgresql.conf", &(listen_here(&dir, port) + &conf));
        let mut cluster = PgCluster { dir, port, database: "postgres".into(), stopped: true, owner: true };
        cluster.pg_ctl_start();
        cluster
    }

    /// A streaming standby of `primary`, started: `pg_basebackup -R` over a new physical slot
    /// `slot` (so the primary keeps the WAL the standby needs, and `synchronized_standby_slots`
    /// can name it), with `hot_standby_feedback` and, on 17 and later, `sync_replication_slots`
    /// on, so that it keeps a copy of the relay's failover slot. `primary_conninfo` names a
    /// database, as slot synchronisation needs. `settings` are extra postgresql.conf lines.
    pub fn standby_of(primary: &PgCluster, slot: &str, settings: &[(&str, &str)]) -> PgCluster {
        let (dir, port) = scratch_dir();
        let data = dir.join("data");
        let conninfo = format!("host={} port={} user=postgres dbname=postgres", primary.dir.display(), primary.port);
        check(
            "pg_basebackup",
            as_owner(&pg_bin().join("pg_basebackup"))
                .args(["-R", "-X", "stream", "-C", "-S", slot, "-c", "fast", "-d"])
                .arg(&conninfo)
                .arg("-D")
                .arg(&data)
                .guarded_output()
                .unwrap(),
        );
        let mut conf = listen_here(&dir, port) + "hot_standby_feedback = on\n";
        if pg_major() >= 17 {
            conf.push_str("sync_replication_slots = on\n");
        }
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{v}'\n"));
        }
        append_conf(&data, "postgresql.conf", &conf);
        // After what pg_basebackup -R wrote, so that these win.
        append_conf(
            &data,
            "postgresql.auto.conf",
            &format!("primary_conninfo = '{conninfo} application_name=standby'\nprimary_slot_name = '{slot}'\n"),
        );
        let mut cluster = PgCluster { dir, port, database: "postgres".into(), stopped: true, owner: true };
        cluster.pg_ctl_start();
        cluster
    }

    /// Appends lines to postgresql.conf (later lines win); they apply at the next start or
    /// reload.
    pub fn configure(&self, lines: &str) {
        append_conf(&self.data_dir(), "postgresql.conf", &format!("\n{lines}\n"));
    }

    /// `pg_ctl promote`, waiting until the server accepts writes.
    pub fn promote(&self) {
        self.pg_ctl("promote", &[]);
    }

    /// The PID of a standby's WAL receiver, if it runs.
    pub fn wal_receiver_pid(&self) -> Option<i32> {
        self.try_sql("SELECT pid FROM pg_stat_wal_receiver").ok()?.parse().ok()
    }

    /// Another handle on the same running cluster, for `database`. Dropping it leaves the
    /// cluster alone.
    pub fn attach(cluster: &PgCluster, database: &str) -> PgCluster {
        PgCluster {
            dir: cluster.dir.clone(),
            port: cluster.port,
            database: database.into(),
            stopped: false,
            owner: false,
        }
    }

    /// Emits `count` events of `aggregatetype` in one transaction, seq `from..from+count` over
    /// `keys` keys named `{prefix}{seq % keys}`; commits (or rolls back) and returns
    /// (id, key) in emit order.
    pub fn emit_batch(
        &self,
        aggregatetype: &str,
        prefix: &str,
        keys: i64,
        from: i64,
        count: i64,
        commit: bool,
    ) -> Vec<(String, String)> {
        let end = if commit { "COMMIT" } else { "ROLLBACK" };
        let select = crate::load::select_ids(aggregatetype, prefix, keys, from, from + count - 1);
        crate::load::parse_ids(&self.sql(&format!("BEGIN;\n{select}\n{end};")))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pg_ctl_start(&mut self) {
        let log = self.log_path();
        self.pg_ctl("start", &["-l".as_ref(), log.as_os_str()]);
        self.stopped = false;
    }

    /// `mode` is smart, fast or immediate.
    pub fn pg_ctl_stop(&mut self, mode: &str) {
        self.pg_ctl("stop", &["-m".as_ref(), mode.as_ref()]);
        self.stopped = true;
    }

    /// `pg_ctl ACTION` with `options` on this cluster as its owner, waiting up to 60 s for the
    /// action to complete; panics if it fails.
    fn pg_ctl(&self, action: &str, options: &[&std::ffi::OsStr]) {
        check(
            &format!("pg_ctl {action}"),
            as_owner(&pg_bin().join("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(self.data_dir())
                .args(options)
                .arg(action)
                .guarded_output()
                .unwrap(),
        );
    }

    /// Runs a psql script (statements in their own transactions unless the script says
    /// otherwise). Returns stdout (unaligned, tuples only) or stderr.
    fn psql(&self, script: &str) -> Output {
        use std::io::Write;
        let mut child = self.psql_process();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// psql on this database, reading SQL from a pipe: unaligned, tuples only, stops at the
    /// first error.
    fn psql_process(&self) -> std::process::Child {
        Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(&self.database)
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .guarded_spawn()
            .expect("psql runs")
    }

    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = self.psql(sql);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs SQL and panics (with the server log) on error.
    pub fn sql(&self, sql: &str) -> String {
        match self.try_sql(sql) {
            Ok(s) => s,
            Err(e) => panic!("SQL failed: {sql}\n{e}\n--- server log ---\n{}", self.log()),
        }
    }

    /// Runs SQL expecting an error; returns `SQLSTATE: message` of the first error.
    pub fn sql_error(&self, sql: &str) -> String {
        let out = self.psql(&format!("\\set VERBOSITY verbose\n{sql}"));
        assert!(!out.status.success(), "expected an error from: {sql}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // "psql:<stdin>:2: ERROR:  22004: message"
        err.lines()
            .find_map(|l| l.split_once("ERROR:  ").map(|(_, rest)| rest.to_string()))
            .unwrap_or(err)
    }

    /// Changes a setting with ALTER SYSTEM and reloads.
    pub fn set(&self, name: &str, value: &str) {
        self.sql(&format!("ALTER SYSTEM SET {name} = '{value}'"));
        self.sql("SELECT pg_reload_conf()");
    }

    /// One column of `outbox.status()`, as text ('' for NULL).
    pub fn status(&self, column: &str) -> String {
        self.sql(&format!("SELECT coalesce({column}::text, '') FROM outbox.status()"))
    }

    /// Waits until the relay reports `state`.
    pub fn wait_for_state(&self, state: &str, timeout: Duration) {
        crate::wait_until(&format!("relay state {state}"), timeout, || self.status("state") == state);
    }

    /// Sends a signal (by name: STOP, CONT, KILL, TERM) to a server process.
    pub fn signal(&self, pid: i32, signal: &str) {
        check("kill", Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).guarded_output().unwrap());
    }

    /// The relay worker's PID, if it runs.
    pub fn worker_pid(&self) -> Option<i32> {
        self.status("worker_pid").parse().ok()
    }

    /// Whether this database's relay runs and has made its slot (its confirmed position).
    pub fn relay_has_slot(&self) -> bool {
        self.try_sql("SELECT worker_pid IS NOT NULL AND confirmed_lsn IS NOT NULL FROM outbox.status()")
            == Ok("t".into())
    }

    /// Arms a test hook of the relay (src/relay/test_hooks.rs, in the build `make test`
    /// installs): creates `file` in the data directory.
    pub fn arm_hook(&self, file: &str) {
        std::fs::write(self.data_dir().join(file), b"").unwrap();
    }

    pub fn disarm_hook(&self, file: &str) {
        std::fs::remove_file(self.data_dir().join(file)).unwrap();
    }

    /// Whether `file` exists in the data directory (a relay shows where a hook holds it so).
    pub fn hook_file_exists(&self, file: &str) -> bool {
        self.data_dir().join(file).exists()
    }
}

/// An open psql session, for transactions that stay open across other events.
pub struct Session {
    child: std::process::Child,
}

impl Session {
    /// Sends SQL; it runs as soon as psql reads it.
    pub fn send(&mut self, sql: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(sql.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Ends the session and returns its output.
    pub fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        assert!(out.status.success(), "psql session failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl PgCluster {
    /// Starts a psql session that runs what `Session::send` gives it.
    pub fn session(&self) -> Session {
        Session { child: self.psql_process() }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        if !self.stopped {
            let _ = as_owner(&pg_bin().join("pg_ctl"))
                .args(["-w", "-m", "immediate", "-D"])
                .arg(self.data_dir())
                .arg("stop")
                .guarded_output();
        }
        if std::env::var_os("OUTBOX_KEEP_CLUSTERS").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
