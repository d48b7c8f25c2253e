//! outbox-dev-broker: a local Kafka-protocol broker for development and the demo.
//!
//! It is librdkafka's mock cluster: real Kafka protocol on 127.0.0.1, data in memory only,
//! gone when the process exits. It is not Kafka; point outbox.bootstrap_servers at a real
//! cluster for anything but development.
//!
//! Usage: outbox-dev-broker [--brokers N] [--topic NAME:PARTITIONS]... [--bootstrap-file PATH]
//! Prints the bootstrap servers on stdout and runs until killed.

use outbox_tests::MockKafka;
use std::io::Write;

fn main() {
    let mut brokers = 3;
    let mut topics = Vec::new();
    let mut bootstrap_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--brokers" => brokers = args.next().and_then(|v| v.parse().ok()).expect("--brokers N"),
            "--topic" => topics.push(args.next().expect("--topic NAME:PARTITIONS")),
            "--bootstrap-file" => bootstrap_file = args.next(),
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let kafka = MockKafka::start(brokers);
    for t in &topics {
        let (name, partitions) = t.split_once(':').unwrap_or((t, "3"));
        kafka.create_topic(name, partitions.parse().expect("partition count"));
    }
    println!("{}", kafka.bootstrap);
    std::io::stdout().flush().unwrap();
    if let Some(path) = bootstrap_file {
        std::fs::write(path, &kafka.bootstrap).expect("write bootstrap file");
    }
    loop {
        std::thread::park();
    }
}
