//! Test harness for outbox_ext: a scratch cluster of the PostgreSQL under test (15–18, chosen by
//! `OUTBOX_PG_CONFIG`) with the extension preloaded, an in-process librdkafka mock Kafka
//! cluster, and a consumer that reads back what the relay produced. Every wait has a deadline;
//! nothing sleeps to synchronise.

pub mod checker;
pub mod cluster;
pub mod kafka;
pub mod load;
pub mod proxy;

pub use checker::{check, Emitted, Report};
pub use cluster::{install_extension_script, pg_major, PgCluster};
pub use kafka::{Collector, MockKafka, Record};
pub use load::{Load, LoadShape};
pub use proxy::ProxiedKafka;

use std::process::{Child, Command, Output, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// Child processes start under the read side; the mock cluster's broker_down and broker_up
/// take the write side. A child holds a copy of every descriptor of this process from fork to
/// exec, a mock broker's listening socket included: a broker taken down in that window stays
/// bound, the mock cannot bind its port again, and librdkafka aborts the test process.
static SPAWNING: RwLock<()> = RwLock::new(());

/// `Command::spawn` and `Command::output`, never while a mock broker changes its listener.
pub trait SpawnGuarded {
    fn guarded_spawn(&mut self) -> std::io::Result<Child>;
    fn guarded_output(&mut self) -> std::io::Result<Output>;
}

impl SpawnGuarded for Command {
    fn guarded_spawn(&mut self) -> std::io::Result<Child> {
        let _spawning = SPAWNING.read().unwrap_or_else(|p| p.into_inner());
        self.spawn()
    }

    fn guarded_output(&mut self) -> std::io::Result<Output> {
        let child = self.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).guarded_spawn()?;
        child.wait_with_output()
    }
}

/// Holds off new child processes while the caller changes a mock broker's listener.
pub(crate) fn no_spawning<T>(f: impl FnOnce() -> T) -> T {
    let _exclusive = SPAWNING.write().unwrap_or_else(|p| p.into_inner());
    f()
}

/// How long a test waits for anything before it fails.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A mock Kafka cluster of 3 brokers with `topics` (3 partitions each), and a PostgreSQL
/// cluster whose relay produces to it, already streaming. `extra` are postgresql.conf lines.
pub fn streaming_relay(topics: &[&str], extra: &[(&str, &str)]) -> (MockKafka, PgCluster) {
    let kafka = MockKafka::start(3);
    for t in topics {
        kafka.create_topic(t, 3);
    }
    let mut settings = vec![("outbox.bootstrap_servers", kafka.bootstrap.as_str())];
    settings.extend_from_slice(extra);
    let pg = PgCluster::start(&settings);
    pg.wait_for_state("streaming", DEADLINE);
    (kafka, pg)
}

/// Polls `cond` until it returns true or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    if !eventually(timeout, cond) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `cond` until it returns true (true) or `timeout` passes (false).
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Runs `check` over `duration` and fails if it ever returns false: for invariants that must
/// hold throughout a fault, not for synchronisation.
pub fn holds_for(what: &str, duration: Duration, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        assert!(check(), "{what} stopped holding");
        std::thread::sleep(Duration::from_millis(200));
    }
}
