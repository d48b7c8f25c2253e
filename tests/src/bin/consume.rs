//! outbox-consume: prints the records of some topics (topic, partition, key, headers, value).
//!
//! Usage: outbox-consume BOOTSTRAP COUNT TIMEOUT_SECS TOPIC[:PARTITIONS]...
//! Exits 0 once COUNT records were printed, 1 if TIMEOUT_SECS passed first.

use outbox_tests::Collector;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: outbox-consume BOOTSTRAP COUNT TIMEOUT_SECS TOPIC[:PARTITIONS]...");
        std::process::exit(2);
    }
    let count: usize = args[1].parse().expect("COUNT");
    let timeout = Duration::from_secs(args[2].parse().expect("TIMEOUT_SECS"));
    let topics: Vec<(String, i32)> = args[3..]
        .iter()
        .map(|t| match t.split_once(':') {
            Some((n, p)) => (n.to_string(), p.parse().expect("partitions")),
            None => (t.clone(), 3),
        })
        .collect();
    let refs: Vec<(&str, i32)> = topics.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    let mut c = Collector::new(&args[0], &refs);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.until_count(count, timeout)));
    for r in &c.records {
        println!("topic={} partition={} offset={} key={}", r.topic, r.partition, r.offset, r.key.as_deref().unwrap_or(""));
        for (k, v) in &r.headers {
            println!("    header {k}: {v}");
        }
        println!("    value: {}", r.value.as_deref().unwrap_or(""));
    }
    if result.is_err() {
        std::process::exit(1);
    }
}
