//! Timestamps as RFC 3339 text in UTC: the dead-letter time (milliseconds) and CloudEvents'
//! `ce_time`, the commit time (microseconds, PostgreSQL's precision). The relay formats one
//! per event in CloudEvents mode, so [`Rfc3339Micros`] lives on the stack.

/// `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_utc_ms(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, ms) =
        (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{ms:03}Z")
}

/// A time as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (27 bytes), for years 0 to 9999.
#[derive(Clone, Copy)]
pub struct Rfc3339Micros {
    text: [u8; Rfc3339Micros::LEN],
}

impl Rfc3339Micros {
    /// Its length, whatever the time.
    pub const LEN: usize = 27;

    /// `unix_us` microseconds after 1970-01-01 UTC, clamped to years 0..=9999.
    pub fn new(unix_us: i64) -> Rfc3339Micros {
        // 0000-01-01 and 9999-12-31T23:59:59.999999.
        let unix_us = unix_us.clamp(-62_167_219_200_000_000, 253_402_300_799_999_999);
        let days = unix_us.div_euclid(86_400_000_000);
        let us_of_day = unix_us.rem_euclid(86_400_000_000);
        let (y, m, d) = civil_from_days(days);
        let mut text = *b"0000-00-00T00:00:00.000000Z";
        let mut put = |at: usize, width: usize, mut n: u64| {
            for i in (at..at + width).rev() {
                text[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, y as u64);
        put(5, 2, m as u64);
        put(8, 2, d as u64);
        let s = us_of_day as u64;
        put(11, 2, s / 3_600_000_000);
        put(14, 2, s / 60_000_000 % 60);
        put(17, 2, s / 1_000_000 % 60);
        put(20, 6, s % 1_000_000);
        Rfc3339Micros { text }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        std::str::from_utf8(&self.text).unwrap_or("1970-01-01T00:00:00.000000Z")
    }
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(1_795_519_506_789), "2026-11-24T11:25:06.789Z");
        assert_eq!(rfc3339_utc_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_utc_ms(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn microsecond_times_agree_with_millisecond_ones() {
        for ms in [0i64, 951_782_400_000, 1_795_519_506_789, -1, 4_107_542_400_000, 1_000_000_000_123] {
            let us = Rfc3339Micros::new(ms * 1000 + 456);
            let text = us.as_str();
            assert_eq!(text.len(), Rfc3339Micros::LEN);
            assert_eq!(&text[..23], &rfc3339_utc_ms(ms)[..23], "{ms}");
            assert_eq!(&text[23..], "456Z");
        }
        assert_eq!(Rfc3339Micros::new(i64::MAX).as_str(), "9999-12-31T23:59:59.999999Z");
        assert_eq!(Rfc3339Micros::new(i64::MIN).as_str(), "0000-01-01T00:00:00.000000Z");
    }
}
