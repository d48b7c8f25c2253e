//! What sealing a record costs on this CPU, natively (callgrind cannot say: valgrind hides the
//! SHA extensions, so it runs SHA-256's portable code). Seals bench/emit_literal.sql's event
//! over and over and prints the time per call of `event::seal` and of `event::encode` (the
//! record alone, as before authentication).
//!
//!     cargo run --release -p outbox_core --example seal_cost

use outbox_core::auth::RecordKey;
use outbox_core::event::{self, EmitArgs, EmitLimits, PayloadArg};
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let payload = r#"{"customer": "c1", "amount": 42.5, "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}], "note": "abcdefghijklmnopqrstuvwxyz0123456789"}"#;
    let args = EmitArgs {
        aggregatetype: Some("order"),
        aggregateid: Some("o-1"),
        event_type: Some("OrderCreated"),
        payload: PayloadArg::Json(Some(payload)),
        headers: None,
        trace: Default::default(),
    };
    let limits = EmitLimits {
        max_payload_bytes: 1_000_000,
        max_record_bytes: 1_000_000,
        topic_template: "outbox.event.{aggregatetype}",
        record_format: outbox_core::routing::RecordFormat::Plain,
        cloudevents_source: "/outbox_ext/bench",
    };
    let ev = event::validate(args, limits).unwrap();
    let key = RecordKey::new(&[7; 32]);
    let id = [1u8; 16];
    const N: u32 = 1_000_000;
    for round in 0..3 {
        let t = Instant::now();
        for i in 0..N {
            black_box(event::encode(black_box(&id), black_box(&ev)));
            black_box(i);
        }
        let encode = t.elapsed().as_nanos() as f64 / N as f64;
        let t = Instant::now();
        for i in 0..N {
            black_box(event::seal(black_box(&key), i, black_box(&id), black_box(&ev)));
        }
        let seal = t.elapsed().as_nanos() as f64 / N as f64;
        println!(
            "round {round}: encode {encode:.0} ns, seal {seal:.0} ns: the tag costs {:.0} ns per event ({} bytes of record)",
            seal - encode,
            event::encode(&id, &ev).len()
        );
    }
}
