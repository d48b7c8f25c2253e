//! Which partition a keyed record goes to: Kafka's default partitioner, as the Java client
//! and librdkafka's `murmur2_random` compute it, `(murmur2(key) & 0x7fffffff) % partitions`.
//! The relay needs it to know an event's partition before producing it (the exactly-once
//! rule reads that partition's tail first; see docs/research/issue19-exactly-once.md).

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): MurmurHash2, seed
/// 0x9747b28c, the key's bytes read as little-endian 32-bit words.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a record with `key` in a topic of `partitions` partitions (at least 1).
pub fn for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Java client's results, as librdkafka's own unit test lists them (rdmurmur2.c).
    #[test]
    fn murmur2_is_the_java_clients() {
        let cases: [(&str, u32); 11] = [
            ("kafka", 0xd067_cf64),
            ("giberish123456789", 0x8f55_2b0c),
            ("1234", 0x9fc9_7b14),
            ("234", 0xe7c0_09ca),
            ("34", 0x8739_30da),
            ("4", 0x5a4b_5ca1),
            ("PreAmbleWillBeRemoved,ThePrePartThatIs", 0x7842_4f1c),
            ("reAmbleWillBeRemoved,ThePrePartThatIs", 0x4a62_b377),
            ("eAmbleWillBeRemoved,ThePrePartThatIs", 0xe0e4_e09e),
            ("AmbleWillBeRemoved,ThePrePartThatIs", 0x62b8_b43f),
            ("", 0x106e_08d9),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()), expected, "{key:?}");
        }
    }

    #[test]
    fn partitions_are_the_positive_hash_modulo_the_count() {
        // 0xd067cf64 & 0x7fffffff = 1348956004
        assert_eq!(for_key(b"kafka", 3), 1_348_956_004 % 3);
        assert_eq!(for_key(b"kafka", 1), 0);
        for n in 1..50 {
            assert!(for_key(format!("key-{n}").as_bytes(), 7) < 7);
        }
    }
}
