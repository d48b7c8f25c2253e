//! A mock Kafka cluster whose brokers are reached through TCP proxies that can hold back what
//! clients send: how a test makes a produce request of a process land after that process died.
//!
//! The mock broker appends a request the moment it reads it (its round-trip delay holds back
//! only the response), so a request sent before a SIGKILL is in the log long before the next
//! relay starts. Here each broker advertises a proxy's port instead of its own. `hold()` makes
//! the connections open at that moment keep what their clients send from then on; `release()`
//! forwards it, although the client may be long gone, exactly as a broker would read a
//! request still in its socket buffer. `hold()` holds every connection, old and new, until
//! `hold_no_new()`; the connections opened by then stay held until `release()`.

use rdkafka::bindings as rdsys;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

/// Which connections hold what their clients send.
#[derive(Default)]
struct Holding {
    next_connection: AtomicU64,
    state: Mutex<HoldState>,
    changed: Condvar,
    /// Bytes held so far.
    held: AtomicU64,
    /// Produce requests (Kafka API key 0) held so far.
    produce_requests: AtomicU64,
}

#[derive(Default, Clone, Copy)]
struct HoldState {
    /// Every connection holds, new ones too.
    all: bool,
    /// Connections numbered below this hold.
    below: u64,
}

impl HoldState {
    fn holds(&self, connection: u64) -> bool {
        self.all || connection < self.below
    }
}

impl Holding {
    fn holds(&self, connection: u64) -> bool {
        self.state.lock().unwrap().holds(connection)
    }

    /// Waits until `connection` no longer holds.
    fn wait_for_release(&self, connection: u64) {
        let mut state = self.state.lock().unwrap();
        while state.holds(connection) {
            state = self.changed.wait(state).unwrap();
        }
    }
}

pub struct ProxiedKafka {
    /// Owns the mock cluster.
    _client: BaseProducer,
    cluster: *mut rdsys::rd_kafka_mock_cluster_t,
    pub bootstrap: String,
    holding: Arc<Holding>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl ProxiedKafka {
    /// A mock cluster of `brokers` brokers, each behind a proxy.
    pub fn start(brokers: i32) -> ProxiedKafka {
        let guard = crate::kafka::one_mock_cluster();
        let client: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .expect("a client with a mock cluster");
        // SAFETY: the client owns the mock cluster and lives as long as `self`.
        let cluster = unsafe { rdsys::rd_kafka_handle_mock_cluster(client.client().native_ptr()) };
        assert!(!cluster.is_null(), "the client has a mock cluster");
        // SAFETY: a valid cluster; the string lives as long as the cluster.
        let bootstrap =
            unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(cluster)) }.to_string_lossy().into_owned();
        let holding = Arc::new(Holding::default());
        for (i, address) in bootstrap.split(',').enumerate() {
            let port = proxy(address.to_string(), holding.clone());
            let host = CString::new("127.0.0.1").unwrap();
            // SAFETY: a valid cluster and broker id (brokers are numbered from 1 in bootstrap order).
            unsafe { rdsys::rd_kafka_mock_broker_set_host_port(cluster, i as i32 + 1, host.as_ptr(), port as i32) };
        }
        ProxiedKafka { _client: client, cluster, bootstrap, holding, _one_at_a_time: guard }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let name = CString::new(topic).unwrap();
        // SAFETY: a valid cluster.
        let err = unsafe { rdsys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1) };
        assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, "topic {topic} created");
    }

    /// From now on, every connection keeps what its client sends.
    pub fn hold(&self) {
        *self.holding.state.lock().unwrap() = HoldState { all: true, below: 0 };
    }

    /// Connections opened from now on pass; those open now keep holding.
    pub fn hold_no_new(&self) {
        let next = self.holding.next_connection.load(Ordering::SeqCst);
        *self.holding.state.lock().unwrap() = HoldState { all: false, below: next };
    }

    /// Bytes held back so far.
    pub fn held_bytes(&self) -> u64 {
        self.holding.held.load(Ordering::SeqCst)
    }

    /// Produce requests held back so far.
    pub fn held_produce_requests(&self) -> u64 {
        self.holding.produce_requests.load(Ordering::SeqCst)
    }

    /// Forwards everything held, and lets it through from now on.
    pub fn release(&self) {
        *self.holding.state.lock().unwrap() = HoldState::default();
        self.holding.changed.notify_all();
    }
}

/// Listens on a new port of 127.0.0.1 and forwards each connection to `upstream`; returns the
/// port.
fn proxy(upstream: String, holding: Arc<Holding>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else { continue };
            let connection = holding.next_connection.fetch_add(1, Ordering::SeqCst);
            let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Both);
            });
            let holding = holding.clone();
            thread::spawn(move || forward(client, server, connection, &holding));
        }
    });
    port
}

/// Client → server, keeping what arrives while the connection holds.
fn forward(mut client: TcpStream, mut server: TcpStream, connection: u64, holding: &Holding) {
    let mut held = Vec::new();
    // Where the next request starts in `held`: each is a 4-byte big-endian size, then the API
    // key (2 bytes) and the rest. Holding starts between requests (the client is idle then).
    let mut next_request = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = client.read(&mut buf).unwrap_or(0);
        if n == 0 {
            // The client is gone (or closed): what it sent still reaches the server.
            holding.wait_for_release(connection);
            // Not shut down: the broker reads the requests and answers into the void.
            let _ = server.write_all(&held);
            return;
        }
        if holding.holds(connection) {
            holding.held.fetch_add(n as u64, Ordering::SeqCst);
            held.extend_from_slice(&buf[..n]);
            while let Some(size) = held.get(next_request..next_request + 4) {
                let end = next_request + 4 + u32::from_be_bytes(size.try_into().unwrap()) as usize;
                if end > held.len() {
                    break;
                }
                if held.get(next_request + 4..next_request + 6) == Some(&[0, 0][..]) {
                    holding.produce_requests.fetch_add(1, Ordering::SeqCst);
                }
                next_request = end;
            }
            continue;
        }
        next_request = 0;
        if server.write_all(&std::mem::take(&mut held)).is_err() || server.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
