//! W3C Trace Context (https://www.w3.org/TR/trace-context/), captured when an event is emitted.
//!
//! The application sets `outbox.traceparent` (and optionally `outbox.tracestate`) for its
//! transaction, or passes `traceparent`/`tracestate` in `emit`'s headers; the record carries
//! them as the headers `traceparent` and `tracestate`, which OpenTelemetry's Kafka
//! instrumentations read. Both are checked here, so nothing malformed is ever published.

/// The header names, the same as the HTTP headers (lower case).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// What `traceparent` must look like, for messages.
pub const TRACEPARENT_FORM: &str =
    "00-<32 lower-case hex digits, not all zero>-<16 lower-case hex digits, not all zero>-<2 lower-case hex digits>";

/// W3C's limit on `tracestate` list members.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Checks a `traceparent` value of version 00 (the only version defined; a receiver cannot
/// tell what a later one means, so it is refused rather than passed on unchecked).
pub fn check_traceparent(value: &str) -> Result<(), String> {
    let b = value.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |s: &[u8]| s.iter().all(|&c| c == b'0');
    if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return Err(format!("expected {TRACEPARENT_FORM}"));
    }
    let (version, trace_id, parent_id, flags) = (&b[0..2], &b[3..35], &b[36..52], &b[53..55]);
    if !(hex(version) && hex(trace_id) && hex(parent_id) && hex(flags)) {
        return Err(format!("expected {TRACEPARENT_FORM}"));
    }
    if version != b"00" {
        return Err(format!("only version 00 is supported; expected {TRACEPARENT_FORM}"));
    }
    if zero(trace_id) {
        return Err("the trace id is all zeros, which W3C Trace Context forbids".into());
    }
    if zero(parent_id) {
        return Err("the parent id is all zeros, which W3C Trace Context forbids".into());
    }
    Ok(())
}

/// Checks a `tracestate` value: 1 to 32 comma-separated `key=value` members (empty members
/// and spaces around them are allowed), keys `[a-z0-9][a-z0-9_-*/]{0,255}` or
/// `tenant@system`, values of 1 to 256 printable ASCII characters other than `,` and `=`, not
/// ending in a space. Each key at most once.
pub fn check_tracestate(value: &str) -> Result<(), String> {
    let mut keys = Vec::new();
    for member in value.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let Some((key, val)) = member.split_once('=') else {
            return Err(format!("member \"{}\" is not key=value", shorten(member)));
        };
        check_key(key).map_err(|why| format!("key \"{}\": {why}", shorten(key)))?;
        let printable = |c: u8| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=';
        if val.is_empty() || val.len() > 256 || !val.bytes().all(printable) || val.ends_with(' ') {
            return Err(format!(
                "the value of \"{}\" must be 1 to 256 printable ASCII characters other than ',' and '=', not ending in a space",
                shorten(key)
            ));
        }
        if keys.contains(&key) {
            return Err(format!("key \"{}\" appears twice", shorten(key)));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("it has no key=value member".into());
    }
    if keys.len() > MAX_TRACESTATE_MEMBERS {
        return Err(format!("it has {} members, more than {MAX_TRACESTATE_MEMBERS}", keys.len()));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), &'static str> {
    let tail = |c: u8| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/');
    let simple = |k: &str, first: fn(u8) -> bool, max: usize| {
        let b = k.as_bytes();
        !b.is_empty() && b.len() <= max && first(b[0]) && b[1..].iter().all(|&c| tail(c))
    };
    let letter_or_digit = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = match key.split_once('@') {
        None => simple(key, letter_or_digit, 256),
        Some((tenant, system)) => simple(tenant, letter_or_digit, 241) && simple(system, |c| c.is_ascii_lowercase(), 14),
    };
    if ok {
        Ok(())
    } else {
        Err("keys are lower-case letters, digits and _-*/, starting with a letter or digit (or tenant@system)")
    }
}

fn shorten(s: &str) -> String {
    if s.len() <= 40 {
        return s.to_string();
    }
    let mut end = 40;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_follows_w3c() {
        assert_eq!(check_traceparent(GOOD), Ok(()));
        assert_eq!(check_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"), Ok(()));
        for bad in [
            "",
            "00-ab",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert!(check_traceparent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tracestate_follows_w3c() {
        for good in ["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "a@b=x", " k=v , ,l=w", "k=v w"] {
            assert_eq!(check_tracestate(good), Ok(()), "{good:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        for bad in [
            "".to_string(),
            ",".to_string(),
            "novalue".to_string(),
            "K=v".to_string(),
            "k=".to_string(),
            "k=v=w".to_string(),
            "k=v,k=w".to_string(),
            "k=é".to_string(),
            "@b=v".to_string(),
            "a@1=v".to_string(),
            many.join(","),
            format!("k={}", "v".repeat(257)),
        ] {
            assert!(check_tracestate(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_tracestate(&many[..32].join(",")), Ok(()));
    }
}
