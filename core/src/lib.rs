//! The pure-Rust core of outbox_ext. Nothing here touches PostgreSQL or librdkafka, so every
//! rule that matters (what a valid event is, how it is laid out in WAL, which Kafka record it
//! becomes, how far the slot may be confirmed) is unit-tested with plain `cargo test`.
//!
//! The pipeline, and where each step lives:
//!
//! ```text
//! emit ─▶ WAL ─▶ decode ─▶ route ─▶ produce ─▶ confirm
//! event::validate     event::open    routing   (extension)  tracker
//! event::seal         (auth)                                latency
//! (auth)
//! ```

pub mod auth;
pub mod dead_letter;
pub mod error;
pub mod event;
pub mod kafka_settings;
pub mod latency;
pub mod partition;
pub mod routing;
pub mod slot_name;
pub mod tail;
pub mod time;
pub mod trace_context;
pub mod tracker;
pub mod uuid7;

pub use error::OutboxError;
