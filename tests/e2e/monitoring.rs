//! Monitoring with the tools operators run: Debian's `prometheus-postgres-exporter` (0.11.1)
//! with `monitoring/postgres_exporter.yml`, connected as a role without privileges to one
//! database of a cluster with two relayed databases, and Debian's Prometheus (2.42) with
//! `monitoring/alerts.yml`. The scrape must equal `outbox.relays()`, count delivered events
//! exactly, show no secret, and the not-streaming alert must go pending while Kafka is down
//! and clear once it is back. (The rules' own cases are `promtool test rules`, run by
//! scripts/monitoring-check.sh.)

use outbox_tests::{wait_until, MockKafka, PgCluster, DEADLINE};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const EXPORTER: &str = "/usr/bin/prometheus-postgres-exporter";
const PROMETHEUS: &str = "/usr/bin/prometheus";
const SECRET: &str = "Hunter2-TopSecret-Value";

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when the test ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from 127.0.0.1:`port`: the body, or None if nothing answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string()).or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

/// A scrape in the text format: the outbox_ samples as (name, labels, value).
struct Scrape {
    text: String,
    samples: Vec<(String, Vec<(String, String)>, f64)>,
}

impl Scrape {
    fn of(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| l.starts_with("outbox_"))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (name, labels) = match series.split_once('{') {
                    None => (series, ""),
                    Some((name, rest)) => (name, rest.strip_suffix('}')?),
                };
                let labels = labels
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| {
                        let (k, v) = p.split_once("=\"")?;
                        Some((k.to_string(), v.trim_end_matches('"').to_string()))
                    })
                    .collect();
                Some((name.to_string(), labels, value.parse().ok()?))
            })
            .collect();
        Scrape { text, samples }
    }

    /// The value of the one sample of `name` that has `labels` (and perhaps others, such as the
    /// exporter's own `server`).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, ls, _)| n == name && labels.iter().all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, _, v)| *v)
            .collect();
        assert!(matching.len() <= 1, "{name} {labels:?} matches {} samples", matching.len());
        matching.first().copied()
    }
}

struct Exporter {
    port: u16,
    _process: Process,
}

impl Exporter {
    /// The exporter with the project's file, as role `role` on database `postgres` of `pg`.
    fn start(pg: &PgCluster, role: &str) -> Exporter {
        assert!(Path::new(EXPORTER).exists(), "{EXPORTER} is missing: scripts/install-deps.sh installs Debian's prometheus-postgres-exporter");
        let port = free_port();
        let dsn = format!("host={} port={} user={role} dbname=postgres sslmode=disable", pg.dir.display(), pg.port);
        let child = Command::new(EXPORTER)
            .arg(format!("--extend.query-path={}", monitoring_dir().join("postgres_exporter.yml").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // Only the project's queries: the default metrics and collectors need pg_monitor,
            // which this role does not have (and 0.11.1's bgwriter collector predates 17).
            .args(["--disable-default-metrics", "--disable-settings-metrics", "--no-collector.bgwriter", "--no-collector.database"])
            .arg("--log.level=warn")
            .env("DATA_SOURCE_NAME", dsn)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the exporter starts");
        let exporter = Exporter { port, _process: Process(child) };
        wait_until("the exporter to answer with outbox metrics", DEADLINE, || {
            exporter.try_scrape().is_some_and(|s| s.text.contains("outbox_relay_state"))
        });
        exporter
    }

    fn try_scrape(&self) -> Option<Scrape> {
        http_get(self.port, "/metrics").map(Scrape::of)
    }

    fn scrape(&self) -> Scrape {
        self.try_scrape().expect("the exporter answers")
    }
}

/// outbox.relays() of `database`, as text columns by name.
fn relay_row(pg: &PgCluster, database: &str) -> HashMap<String, String> {
    let json = pg.sql(&format!("SELECT row_to_json(r) FROM outbox.relays() r WHERE database = '{database}'"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), if v.is_string() { v.as_str().unwrap().to_string() } else { v.to_string() }))
        .collect()
}

fn emit(pg: &PgCluster, aggregatetype: &str, n: usize) {
    pg.sql(&format!(
        "SELECT count(outbox.emit('{aggregatetype}', 'k' || i, 'Metered', '{{}}')) FROM generate_series(1, {n}) i"
    ));
}

#[test]
fn the_exporter_shows_every_relay_as_relays_does_and_prometheus_alerts_on_an_outage() {
    let kafka = MockKafka::start(3);
    kafka.create_topic("outbox.event.shop", 3);
    kafka.create_topic("outbox.event.billing", 3);
    // A secret in the producer settings (ignored by librdkafka without SASL): no scrape may show it.
    let props = format!("sasl.username=monitor;sasl.password={SECRET}");
    let pg = PgCluster::start(&[("outbox.bootstrap_servers", &kafka.bootstrap), ("outbox.kafka_properties", &props)]);
    pg.wait_for_state("streaming", DEADLINE);
    pg.sql("CREATE DATABASE billing");
    let billing = PgCluster::attach(&pg, "billing");
    billing.create_extension();
    billing.wait_for_state("streaming", DEADLINE);
    // The monitoring role: LOGIN and nothing else (CREATE EXTENSION granted USAGE on the schema,
    // and relays() and ack_latency() to PUBLIC).
    pg.sql("CREATE ROLE outbox_monitor LOGIN");
    assert_eq!(pg.sql("SELECT rolsuper OR rolcreaterole OR pg_has_role('outbox_monitor', 'pg_monitor', 'member') FROM pg_roles WHERE rolname = 'outbox_monitor'"), "f");
    let exporter = Exporter::start(&pg, "outbox_monitor");

    // Every metric, for both databases, equal to outbox.relays() once the relays are idle.
    emit(&pg, "shop", 30);
    emit(&billing, "billing", 20);
    for (db, n) in [("postgres", "30"), ("billing", "20")] {
        wait_until(&format!("{db}'s relay to deliver and confirm"), DEADLINE, || {
            let r = relay_row(&pg, db);
            r["events_delivered"] == n && r["pending_bytes"] == "0"
        });
    }
    // relays() just before and just after the scrape: each figure must be one of the two.
    let before: HashMap<&str, HashMap<String, String>> = ["postgres", "billing"].map(|db| (db, relay_row(&pg, db))).into();
    let scrape = exporter.scrape();
    let after: HashMap<&str, HashMap<String, String>> = ["postgres", "billing"].map(|db| (db, relay_row(&pg, db))).into();
    assert!(!scrape.text.contains(SECRET), "the secret is in the scrape");
    for db in ["postgres", "billing"] {
        let r = &after[db];
        let d = [("database", db)];
        for state in ["streaming", "kafka_unavailable", "delivery_error", "config_error", "slot_error", "waiting_for_standby", "unconfigured", "stopped", "starting", "update_required", "not_installed"] {
            let expected = if r["state"] == state { 1.0 } else { 0.0 };
            assert_eq!(scrape.get("outbox_relay_state", &[("database", db), ("state", state)]), Some(expected), "{db} {state}\n{}", scrape.text);
        }
        for (metric, column) in [
            ("outbox_relay_pending_bytes", "pending_bytes"),
            ("outbox_relay_events_delivered_total", "events_delivered"),
            ("outbox_relay_rejected_records_total", "rejected_records"),
            ("outbox_relay_dead_lettered_total", "dead_lettered"),
            ("outbox_ack_latency_seconds_count", "acked_transactions"),
        ] {
            let got = scrape.get(metric, &d);
            let (was, is): (f64, f64) = (before[db][column].parse().unwrap(), r[column].parse().unwrap());
            assert!(got == Some(was) || got == Some(is), "{db}: {metric} {got:?}, relays().{column} {was} then {is}");
        }
        let sum = scrape.get("outbox_ack_latency_seconds_sum", &d).unwrap();
        let relays_sum: f64 = r["ack_latency_sum_ms"].parse().unwrap();
        assert!(relays_sum > 0.0 && (sum - relays_sum / 1000.0).abs() < 1e-9, "{db}: sum {sum} s, relays() {relays_sum} ms");
        let inf = scrape.get("outbox_ack_latency_seconds_bucket", &[("database", db), ("le", "+Inf")]);
        assert_eq!(inf, scrape.get("outbox_ack_latency_seconds_count", &d));
        let age = scrape.get("outbox_relay_last_delivery_age_seconds", &d).unwrap();
        assert!((0.0..120.0).contains(&age), "{db}: last delivery {age} s ago");
        assert_eq!(scrape.get("outbox_relay_missing", &d), Some(0.0));
    }

    // Exactly the events delivered since: 500 more in billing.
    let before = exporter.scrape().get("outbox_relay_events_delivered_total", &[("database", "billing")]).unwrap();
    emit(&billing, "billing", 500);
    wait_until("billing's 500 events to be counted", DEADLINE, || relay_row(&pg, "billing")["events_delivered"] == "520");
    let after = exporter.scrape().get("outbox_relay_events_delivered_total", &[("database", "billing")]).unwrap();
    assert_eq!(after - before, 500.0);

    // Prometheus with the project's rules, scraping every second.
    assert!(Path::new(PROMETHEUS).exists(), "{PROMETHEUS} is missing: scripts/install-deps.sh installs Debian's prometheus");
    let dir = tempdir();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: outbox\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            monitoring_dir().join("alerts.yml").display(),
            exporter.port
        ),
    )
    .unwrap();
    let prometheus_port = free_port();
    let _prometheus = Process(
        Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    let query = |q: &str| -> serde_json::Value {
        let body = http_get(prometheus_port, &format!("/api/v1/query?query={}", url_encode(q))).unwrap_or_default();
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    };
    wait_until("Prometheus to scrape the exporter", DEADLINE, || {
        query("outbox_relay_state{state=\"streaming\"} == 1")["data"]["result"].as_array().is_some_and(|r| r.len() == 2)
    });
    let alert_of = |database: &str| -> Option<String> {
        let body = http_get(prometheus_port, "/api/v1/alerts")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["alerts"].as_array()?.iter().find_map(|a| {
            (a["labels"]["alertname"] == "OutboxRelayNotStreaming" && a["labels"]["database"] == database)
                .then(|| a["state"].as_str().unwrap_or_default().to_string())
        })
    };
    assert_eq!(alert_of("billing"), None, "no alert while streaming");

    // Kafka goes away while events wait: within a minute the alert is pending (or firing).
    for b in 1..=3 {
        kafka.broker_down(b);
    }
    emit(&billing, "billing", 10);
    wait_until("OutboxRelayNotStreaming for billing, pending or firing", Duration::from_secs(60), || {
        alert_of("billing").is_some_and(|s| s == "pending" || s == "firing")
    });
    assert!(!http_get(prometheus_port, "/api/v1/alerts").unwrap_or_default().contains(SECRET));
    // Kafka is back: the events arrive and the alert clears.
    for b in 1..=3 {
        kafka.broker_up(b);
    }
    billing.wait_for_state("streaming", DEADLINE);
    wait_until("the alert to clear", DEADLINE, || alert_of("billing").is_none());
    wait_until("billing's waiting events to be delivered", DEADLINE, || relay_row(&pg, "billing")["events_delivered"] == "530");
    assert!(!exporter.scrape().text.contains(SECRET));
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outbox-monitoring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}
