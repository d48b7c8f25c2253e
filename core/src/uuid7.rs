//! UUIDv7 (RFC 9562) event ids, made at emit time.
//!
//! Layout: 48 bits of Unix milliseconds, version 7, a 12-bit counter (`rand_a`, RFC 9562
//! §6.2 method 1) and 62 random bits. Within one backend the ids strictly increase, even when
//! many are made in the same millisecond or the clock steps back, so they sort in emit order.

/// Makes UUIDv7s for one backend. The random part comes from a SplitMix64 stream seeded once
/// from a strong random source by the caller (the extension seeds it from `pg_strong_random`).
#[derive(Debug, Clone)]
pub struct Uuid7Generator {
    state: u64,
    last_ms: u64,
    counter: u16,
}

const COUNTER_MAX: u16 = 0x0FFF;

impl Uuid7Generator {
    pub fn new(seed: u64) -> Self {
        Uuid7Generator { state: seed, last_ms: 0, counter: 0 }
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64: fast, full period, good enough for the random tail of an id that is
        // already unique by (time, counter) within a backend.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next id for the wall-clock time `now_ms` (Unix milliseconds).
    pub fn generate(&mut self, now_ms: u64) -> [u8; 16] {
        if now_ms > self.last_ms {
            self.last_ms = now_ms;
            // Start each millisecond at a random counter in the lower half, leaving room to
            // count up before borrowing the next millisecond.
            self.counter = (self.next_random() as u16) & 0x07FF;
        } else if self.counter < COUNTER_MAX {
            self.counter += 1;
        } else {
            // 4096 ids in one millisecond (or the clock went back): borrow the next one.
            self.last_ms += 1;
            self.counter = 0;
        }
        let ms = self.last_ms & 0xFFFF_FFFF_FFFF;
        let rand_b = self.next_random();
        let mut id = [0u8; 16];
        id[0..6].copy_from_slice(&ms.to_be_bytes()[2..8]);
        id[6] = 0x70 | ((self.counter >> 8) as u8 & 0x0F);
        id[7] = self.counter as u8;
        id[8..16].copy_from_slice(&rand_b.to_be_bytes());
        id[8] = 0x80 | (id[8] & 0x3F);
        id
    }
}

/// The canonical 8-4-4-4-12 text form, as the Kafka `id` header carries it.
pub fn to_hyphenated(id: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, b) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0x0F) as usize] as char);
    }
    s
}

/// The 16 bytes of a hyphenated UUID (as [`to_hyphenated`] writes it, either case).
pub fn parse_hyphenated(text: &[u8]) -> Option<[u8; 16]> {
    if text.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibbles = 0;
    for (i, &c) in text.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let v = (c as char).to_digit(16)? as u8;
        out[nibbles / 2] |= if nibbles % 2 == 0 { v << 4 } else { v };
        nibbles += 1;
    }
    Some(out)
}

/// The Unix milliseconds stored in a UUIDv7.
pub fn unix_ms(id: &[u8; 16]) -> u64 {
    let mut b = [0u8; 8];
    b[2..8].copy_from_slice(&id[0..6]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_variant_and_time_are_set() {
        let mut g = Uuid7Generator::new(42);
        let id = g.generate(1_700_000_000_123);
        assert_eq!(id[6] >> 4, 7);
        assert_eq!(id[8] >> 6, 0b10);
        assert_eq!(unix_ms(&id), 1_700_000_000_123);
        let s = to_hyphenated(&id);
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "7");
    }

    #[test]
    fn ids_strictly_increase_within_a_millisecond_and_when_the_clock_goes_back() {
        let mut g = Uuid7Generator::new(7);
        let mut last = g.generate(1000);
        for i in 0..20_000u64 {
            // Same millisecond for a long run, then a clock step backwards.
            let now = if i < 10_000 { 1000 } else { 900 };
            let id = g.generate(now);
            assert!(id > last, "id {} not after {}", to_hyphenated(&id), to_hyphenated(&last));
            last = id;
        }
    }

    #[test]
    fn different_seeds_give_different_ids() {
        let a = Uuid7Generator::new(1).generate(5);
        let b = Uuid7Generator::new(2).generate(5);
        assert_ne!(a, b);
    }

    #[test]
    fn uuids_round_trip_and_nothing_else_parses() {
        let mut g = Uuid7Generator::new(7);
        for _ in 0..100 {
            let id = g.generate(1_700_000_000_000);
            let text = to_hyphenated(&id);
            assert_eq!(parse_hyphenated(text.as_bytes()), Some(id));
            assert_eq!(parse_hyphenated(text.to_uppercase().as_bytes()), Some(id));
        }
        for bad in ["", "0190b4d2-6a4f-7c1e-8f00-00000000000", "0190b4d2x6a4f-7c1e-8f00-000000000000", "0190b4d2-6a4f-7c1e-8f00-00000000000g"] {
            assert_eq!(parse_hyphenated(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
