//! librdkafka's produce call, for the producing thread (`relay/produce.rs`).
//!
//! rdkafka's `BaseProducer::send` copies the topic's name into a new `CString` for every
//! record, and librdkafka then looks the topic up by that name under its client lock; its
//! `OwnedHeaders` takes each header's name as `&str`. This call takes a topic handle made once
//! per topic and header names as bytes, so that a record costs librdkafka's own work and nothing
//! more: the producing thread is what bounds a drain (BENCHMARKS.md, "Limits").
//!
//! No Postgres code runs here, and none of it needs the main thread. The bench's producer
//! ceiling (`tests/src/bin/producer_limit.rs`) includes this file, so that it produces the way
//! the relay does; it must depend on nothing but `rdkafka`.

use rdkafka::bindings as rd;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A topic of producer `'p`, looked up once: librdkafka's `rd_kafka_topic_t`.
pub struct TopicHandle<'p> {
    handle: NonNull<rd::rd_kafka_topic_t>,
    /// Destroyed before its producer: a handle borrows it.
    producer: PhantomData<&'p ()>,
}

impl<'p> TopicHandle<'p> {
    /// The handle of topic `name` (None if the name holds a NUL). The topic need not exist.
    pub fn new<C: ProducerContext>(producer: &'p BaseProducer<C>, name: &str) -> Option<TopicHandle<'p>> {
        let name = CString::new(name).ok()?;
        // SAFETY: the client is alive for 'p; librdkafka copies the name, and a NULL
        // configuration gives the topic the producer's defaults, as a lookup by name does.
        let handle = unsafe { rd::rd_kafka_topic_new(producer.client().native_ptr(), name.as_ptr(), std::ptr::null_mut()) };
        Some(TopicHandle { handle: NonNull::new(handle)?, producer: PhantomData })
    }
}

impl Drop for TopicHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: made by rd_kafka_topic_new, destroyed once, while its producer is alive.
        unsafe { rd::rd_kafka_topic_destroy(self.handle.as_ptr()) }
    }
}

/// One record to produce; librdkafka copies every byte of it.
pub struct Record<'a, H> {
    /// None: the partition librdkafka's partitioner picks.
    pub partition: Option<i32>,
    pub key: &'a [u8],
    /// None: a tombstone (a null value).
    pub value: Option<&'a [u8]>,
    /// Each header's name and value.
    pub headers: H,
    pub timestamp_ms: i64,
    /// Comes back with the record's delivery report (rdkafka's `DeliveryOpaque` of `usize`).
    pub opaque: usize,
}

/// Hands `record` to `producer`'s queue for `topic`, as `BaseProducer::send` does with
/// `RD_KAFKA_MSG_F_COPY`. The error is librdkafka's (`QueueFull`: serve delivery reports and
/// try again).
pub fn produce<'a, 'p, C, H>(producer: &'p BaseProducer<C>, topic: &TopicHandle<'p>, record: Record<'a, H>) -> Result<(), RDKafkaErrorCode>
where
    C: ProducerContext<DeliveryOpaque = usize>,
    H: ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
{
    // SAFETY: librdkafka copies each name and value (their lengths are given, so neither need
    // end in NUL); the list is ours until producev takes it.
    let headers = unsafe {
        let list = rd::rd_kafka_headers_new(record.headers.len());
        for (name, value) in record.headers {
            rd::rd_kafka_header_add(
                list,
                name.as_ptr().cast(),
                name.len() as isize,
                value.as_ptr().cast::<c_void>(),
                value.len() as isize,
            );
        }
        list
    };
    let (value, value_len) = record.value.map_or((std::ptr::null_mut(), 0), |v| (v.as_ptr() as *mut c_void, v.len()));
    // SAFETY: the variadic arguments come in (type, value...) pairs as librdkafka's
    // rd_kafka_producev documents, ended by RD_KAFKA_VTYPE_END; RD_KAFKA_MSG_F_COPY copies key
    // and value before the call returns; the topic handle and the client are alive.
    let error = unsafe {
        rd::rd_kafka_producev(
            producer.client().native_ptr(),
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_RKT,
            topic.handle.as_ptr(),
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_PARTITION,
            record.partition.unwrap_or(-1) /* RD_KAFKA_PARTITION_UA */,
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_MSGFLAGS,
            rd::RD_KAFKA_MSG_F_COPY,
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE,
            value,
            value_len,
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_KEY,
            record.key.as_ptr() as *const c_void,
            record.key.len(),
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_OPAQUE,
            record.opaque as *mut c_void,
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TIMESTAMP,
            record.timestamp_ms,
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADERS,
            headers,
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_END,
        )
    };
    if error == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        // SAFETY: on failure the list is still ours.
        unsafe { rd::rd_kafka_headers_destroy(headers) };
        Err(error.into())
    }
}

extern "C" {
    /// glibc's.
    fn mallopt(param: i32, value: i32) -> i32;
}

/// Turns glibc's fastbins off for this process (`mallopt(M_MXFAST, 0)`), before librdkafka
/// starts. For every record librdkafka allocates a few small blocks on the producing thread
/// (the header list and one per header) and frees them there by the thousand at each delivery
/// report; parked in fastbins, they were merged again by `malloc_consolidate` at every larger
/// allocation (2.3% of the relay's CPU while draining). Without fastbins a freed block goes to
/// the thread's cache or is merged at once. The relay's drain: 2.26 → 2.17 µs of CPU per event
/// (BENCHMARKS.md). Only the relay's process calls this, and the bench's producer ceiling.
pub fn without_fastbins() {
    const M_MXFAST: i32 = 1;
    // SAFETY: mallopt takes the arena lock; with M_MXFAST it first merges what the fastbins
    // hold, so no block is lost.
    unsafe { mallopt(M_MXFAST, 0) };
}
