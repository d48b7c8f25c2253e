//! Property-based tests of the `outbox.emit()` path in core: validate → encode → decode → route.
//!
//! The contract: every input is either
//!
//! * accepted, and then the WAL record decodes to byte-for-byte the same aggregatetype,
//!   aggregateid, type, payload and headers, and the Kafka topic and headers derived from it are
//!   what the routing rules say; or
//! * rejected with an [`OutboxError`] whose SQLSTATE is the documented one for the rule that was
//!   broken,
//!
//! and nothing panics. Which inputs must be rejected is decided by an oracle written here from the
//! doc comments (event.rs, routing.rs, error.rs), not by calling the code under test:
//!
//! | rule (doc comment) | error | SQLSTATE |
//! |---|---|---|
//! | aggregatetype, aggregateid, type, payload not SQL NULL | `NullArgument` | 22004 |
//! | aggregatetype, aggregateid, type not empty | `EmptyArgument` | 22023 |
//! | `outbox.topic` with `{aggregatetype}` replaced is a Kafka topic: `[A-Za-z0-9._-]`, 1 to 249 characters, not `.` or `..` | `IllegalTopic` | 22023 |
//! | payload's JSON text at most `outbox.max_payload_bytes` bytes | `PayloadTooLarge` | 54000 |
//! | headers: SQL NULL, JSON `null`, or a JSON object whose values are strings, none named `id`, `type` or `aggregatetype` | `InvalidHeaders` | 22023 |
//! | text arguments at most `u32::MAX` bytes (wire format) | `ArgumentTooLong` | 54000 |
//! | the Kafka record (key, value, headers `id`, `type`, `aggregatetype`, `commit_lsn` and `commit_index` at their longest, and the event's own, sized as librdkafka sizes it) at most `outbox.max_record_bytes` | `RecordTooLarge` | 54000 |
//!
//! The last rule needs 4 GiB inputs, so it is not exercised here; every input generated here is
//! far below it and must therefore never be refused for length.
//!
//! Set `PROPTEST_CASES` to run every property with that many cases instead of the defaults.

use outbox_core::auth::RecordKey;
use outbox_core::error::OutboxError;
use outbox_core::event::{
    self, decode, encode, parse_headers, validate, EmitArgs, EmitLimits, PayloadArg, ValidEvent, Value,
    FORMAT_VERSION, RESERVED_HEADERS,
};
use outbox_core::routing;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::collections::BTreeMap;
use std::fmt::Write as _;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `cases` cases, unless PROPTEST_CASES asks for another number; failures are kept in
/// core/proptest-regressions/fuzz_emit.txt.
fn config(cases: u32) -> ProptestConfig {
    let mut c = if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(cases)
    };
    c.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proptest-regressions/fuzz_emit.txt"
    ))));
    // Shrinking 100k-character inputs can take long; a bounded shrink still gives a small case.
    c.max_shrink_iters = 4096;
    c.max_shrink_time = 20_000;
    c
}

// ---------------------------------------------------------------------------------------------
// The oracle, from the doc comments
// ---------------------------------------------------------------------------------------------

const PLACEHOLDER: &str = "{aggregatetype}";
/// "Header names that outbox_ext sets itself on a Kafka record" (routing.rs table, `plain`).
const RESERVED: [&str; 6] = ["id", "type", "aggregatetype", "commit_lsn", "commit_index", "content-type"];

/// event.rs: header names are refused if reserved, `content-type` in any case, or if they
/// start with `ce_` or `outbox.dead_letter.` in any case.
fn oracle_reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    RESERVED.contains(&name)
        || lower == "content-type"
        || lower.starts_with("ce_")
        || lower.starts_with("outbox.dead_letter.")
}

/// Kafka's rule as documented in routing.rs: `[A-Za-z0-9._-]`, 1 to 249 characters, not `.`
/// or `..`.
fn oracle_topic_is_legal(topic: &str) -> bool {
    let n = topic.chars().count();
    (1..=249).contains(&n)
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

/// The canonical 8-4-4-4-12 lower-case text of a UUID.
fn oracle_hyphenated(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The record layout of the module doc of event.rs, written out independently of `encode`.
fn oracle_wire(id: &[u8; 16], strings: [&str; 4], headers: &[(String, String)]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend_from_slice(id);
    // The kind of value: 0, JSON.
    out.push(0);
    for s in strings {
        put(&mut out, s);
    }
    out.extend_from_slice(&u32::try_from(headers.len()).unwrap().to_le_bytes());
    for (k, v) in headers {
        put(&mut out, k);
        put(&mut out, v);
    }
    out
}

/// A rule of `validate` that an input breaks, with the SQLSTATE error.rs documents for it.
#[derive(Debug, Clone, PartialEq)]
enum Violation {
    Null(&'static str),
    Empty(&'static str),
    Topic(String),
    PayloadTooLarge { size: usize, max: usize },
    Headers,
}

impl Violation {
    fn sqlstate(&self) -> &'static str {
        match self {
            Violation::Null(_) => "22004",
            Violation::Empty(_) | Violation::Topic(_) | Violation::Headers => "22023",
            Violation::PayloadTooLarge { .. } => "54000",
        }
    }

    fn matches(&self, e: &OutboxError) -> bool {
        match (self, e) {
            (Violation::Null(a), OutboxError::NullArgument { argument }) => a == argument,
            (Violation::Empty(a), OutboxError::EmptyArgument { argument }) => a == argument,
            (Violation::Topic(t), OutboxError::IllegalTopic { topic, .. }) => t == topic,
            (
                Violation::PayloadTooLarge { size, max },
                OutboxError::PayloadTooLarge { size: s, max: m },
            ) => size == s && max == m,
            (Violation::Headers, OutboxError::InvalidHeaders { .. }) => true,
            _ => false,
        }
    }
}

/// What the headers argument must lead to.
#[derive(Debug, Clone, PartialEq)]
enum HeadersExpect {
    /// Accepted, with exactly these headers.
    Accept(BTreeMap<String, String>),
    /// Refused with InvalidHeaders.
    Reject,
    /// An object that names a header twice: jsonb never prints one (it keeps the last value),
    /// so the text cannot come from PostgreSQL. Refusing it (InvalidHeaders) is fine; accepting
    /// it must mean the last value, as jsonb would, e.g. `{"k":[[…130 deep…]],"k":"v"}` may be
    /// refused by the parser's nesting limit although its last value for "k" is a string.
    AcceptOrReject(BTreeMap<String, String>),
    /// Arbitrary text the oracle does not classify: either outcome, but a refusal must be
    /// InvalidHeaders and an acceptance must carry no reserved or duplicate names.
    Unknown,
}

/// A JSON value, so that the oracle knows what a generated JSON text means.
#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    /// The number's JSON text, which may be out of f64's range (`1e400`).
    Num(String),
    Str(String),
    Arr(Vec<J>),
    /// Members in text order; names may repeat.
    Obj(Vec<(String, J)>),
}

/// The documented rule for the JSON value of `headers`. A repeated name means its last value,
/// as in jsonb (PostgreSQL never prints a repeated name, but the rule is stated on the value).
fn oracle_headers(value: &J) -> HeadersExpect {
    let members = match value {
        J::Null => return HeadersExpect::Accept(BTreeMap::new()),
        J::Obj(members) => members,
        _ => return HeadersExpect::Reject,
    };
    let mut last: BTreeMap<&str, &J> = BTreeMap::new();
    let mut repeated = false;
    for (k, v) in members {
        repeated |= last.insert(k, v).is_some();
    }
    let mut headers = BTreeMap::new();
    for (k, v) in last {
        if oracle_reserved(k) {
            return HeadersExpect::Reject;
        }
        match v {
            J::Str(s) => {
                headers.insert(k.to_string(), s.clone());
            }
            _ => return HeadersExpect::Reject,
        }
    }
    if repeated {
        HeadersExpect::AcceptOrReject(headers)
    } else {
        HeadersExpect::Accept(headers)
    }
}

// ---------------------------------------------------------------------------------------------
// JSON text
// ---------------------------------------------------------------------------------------------

/// How a JSON text is spelled: escaping every non-ASCII character as `\uXXXX` (surrogate pairs
/// for astral characters), and whitespace between tokens.
#[derive(Debug, Clone, Copy)]
struct Style {
    ascii: bool,
    spaces: bool,
}

fn write_json_str(out: &mut String, s: &str, style: Style) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '/' if style.ascii => out.push_str("\\/"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c if style.ascii && !c.is_ascii() => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(out, "\\u{unit:04X}").unwrap();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(out: &mut String, v: &J, style: Style) {
    let sep = if style.spaces { ", \n\t" } else { "," };
    let colon = if style.spaces { " :\r\n " } else { ":" };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Num(n) => out.push_str(n),
        J::Str(s) => write_json_str(out, s, style),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                write_json(out, item, style);
            }
            out.push(']');
        }
        J::Obj(members) => {
            out.push('{');
            if style.spaces {
                out.push(' ');
            }
            for (i, (k, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                write_json_str(out, k, style);
                out.push_str(colon);
                write_json(out, item, style);
            }
            out.push('}');
        }
    }
}

fn json_text(v: &J, style: Style) -> String {
    let mut out = String::new();
    if style.spaces {
        out.push_str(" \n");
    }
    write_json(&mut out, v, style);
    out
}

/// `depth` nested arrays or objects around a leaf.
fn deep_json(depth: usize, objects: bool) -> String {
    let (open, close) = if objects { ("{\"a\":", "}") } else { ("[", "]") };
    let mut s = String::with_capacity(depth * (open.len() + close.len()) + 4);
    for _ in 0..depth {
        s.push_str(open);
    }
    s.push_str("\"x\"");
    for _ in 0..depth {
        s.push_str(close);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn style() -> impl Strategy<Value = Style> {
    (any::<bool>(), any::<bool>()).prop_map(|(ascii, spaces)| Style { ascii, spaces })
}

/// Any Unicode scalar value, biased towards NUL, control characters, JSON syntax, odd
/// whitespace, combining marks, non-characters, astral characters and the placeholder's braces.
fn odd_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        2 => prop::char::range('\0', '\u{1f}'),
        2 => prop::char::range(' ', '~'),
        2 => prop::sample::select(vec![
            '\0', '\u{7f}', '"', '\\', '/', '{', '}', '[', ']', ':', ',', '.', ' ', '\u{a0}',
            '\u{85}', '\u{feff}', '\u{200b}', '\u{2028}', '\u{2029}', '\u{301}', '\u{fffd}',
            '\u{fffe}', '\u{ffff}', '\u{10ffff}', '\u{e000}', 'é', 'ß', 'İ', '😀', '𝄞',
        ]),
        3 => prop::char::range('a', 'z'),
    ]
}

fn odd_string(max_chars: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(odd_char(), 0..=max_chars).prop_map(String::from_iter)
}

/// Characters Kafka allows in topic names.
fn topic_chars(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._-]{{{min},{max}}}")).unwrap()
}

/// `chunk` repeated up to exactly `n` characters: cheap huge strings of any content.
fn huge_string(max_chars: usize) -> impl Strategy<Value = String> {
    (prop::collection::vec(odd_char(), 1..8), 0..=max_chars)
        .prop_map(|(chunk, n)| chunk.iter().copied().cycle().take(n).collect())
}

/// A text argument of emit: SQL NULL, empty, topic-friendly, or anything.
fn text_arg() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(String::new())),
        12 => topic_chars(1, 40).prop_map(Some),
        8 => odd_string(40).prop_map(Some),
        1 => prop::sample::select(vec![
            ".", "..", "...", PLACEHOLDER, "{aggregatetype", "a{aggregatetype}b",
        ])
        .prop_map(|s| Some(s.to_string())),
        1 => topic_chars(230, 260).prop_map(Some),
        3 => almost_topic().prop_map(Some),
    ]
}

/// The ASCII characters Kafka does not allow in topic names.
fn ascii_non_topic_char() -> impl Strategy<Value = char> {
    prop::sample::select(
        ('\0'..='\u{7f}')
            .filter(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .collect::<Vec<char>>(),
    )
}

/// Topic characters with one other character (mostly ASCII) somewhere among them.
fn almost_topic() -> impl Strategy<Value = String> {
    let other = prop_oneof![3 => ascii_non_topic_char(), 1 => odd_char()];
    (topic_chars(0, 20), other, any::<prop::sample::Index>()).prop_map(|(s, c, at)| {
        let mut chars: Vec<char> = s.chars().collect();
        chars.insert(at.index(chars.len() + 1), c);
        chars.into_iter().collect()
    })
}

/// `outbox.topic`, as the parts between its placeholders: template = parts.join(PLACEHOLDER),
/// and so the topic for an aggregatetype is parts.join(aggregatetype).
fn template_parts() -> impl Strategy<Value = Vec<String>> {
    let fixed = |parts: &[&str]| Just(parts.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    prop_oneof![
        6 => fixed(&["outbox.event.", ""]),
        1 => fixed(&["", ""]),
        1 => fixed(&["all-events"]),
        1 => fixed(&["", ".", ""]),
        1 => fixed(&["."]),
        1 => fixed(&[""]),
        2 => prop::collection::vec(topic_chars(0, 12), 1..4),
        1 => prop::collection::vec(
            proptest::string::string_regex("[a-zA-Z0-9._{} é/-]{0,12}").unwrap(),
            1..4,
        )
        .prop_map(|parts| parts.into_iter().map(without_placeholder).collect()),
    ]
}

/// Breaks up every `{aggregatetype}` in a part of a template (mapping rather than filtering, so
/// that long runs never hit proptest's limit on rejected cases).
fn without_placeholder(mut part: String) -> String {
    while part.contains(PLACEHOLDER) {
        part = part.replace(PLACEHOLDER, "{x}");
    }
    part
}

/// `outbox.max_payload_bytes`, relative to the payload's length or absolute.
#[derive(Debug, Clone, Copy)]
enum MaxPayload {
    Below,
    Exact,
    Above,
    Absolute(usize),
}

impl MaxPayload {
    fn resolve(self, len: usize) -> usize {
        match self {
            MaxPayload::Below => len.saturating_sub(1),
            MaxPayload::Exact => len,
            MaxPayload::Above => len + 1,
            MaxPayload::Absolute(n) => n,
        }
    }
}

fn max_payload() -> impl Strategy<Value = MaxPayload> {
    prop_oneof![
        1 => Just(MaxPayload::Below),
        1 => Just(MaxPayload::Exact),
        1 => Just(MaxPayload::Above),
        1 => (1usize..2000).prop_map(MaxPayload::Absolute),
        4 => Just(MaxPayload::Absolute(1_000_000)),
        1 => Just(MaxPayload::Absolute(1_000_000_000)),
    ]
}

fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() { format!("{f:e}") } else { "1e999".into() }),
        prop::sample::select(vec![
            "0",
            "-0",
            "0.0",
            "-0.0",
            "1e400",
            "-1e400",
            "1e-400",
            "1E+2",
            "4.9e-324",
            "1.7976931348623157e308",
            "123456789012345678901234567890123456789",
            "-9223372036854775809",
            "18446744073709551616",
            "0.1",
        ])
        .prop_map(str::to_string),
    ]
}

/// Any JSON value, with odd strings, names and numbers.
fn json_value() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        json_number().prop_map(J::Num),
        odd_string(16).prop_map(J::Str),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            prop::collection::vec((odd_string(8), inner), 0..6).prop_map(J::Obj),
        ]
    })
}

/// The payload's JSON text. Core never parses it, so non-JSON text is fair game too.
fn payload() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        6 => (json_value(), style()).prop_map(|(v, s)| Some(json_text(&v, s))),
        1 => (1usize..3000, any::<bool>()).prop_map(|(d, o)| Some(deep_json(d, o))),
        1 => odd_string(64).prop_map(Some),
        1 => Just(Some(String::new())),
    ]
}

/// A header name: reserved ones, near misses, a small pool (to make repeats likely), anything.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(RESERVED.to_vec()).prop_map(str::to_string),
        2 => prop::sample::select(vec![
            "ID", "Id", "TYPE", "Type", "AggregateType", "aggregateType", "aggregate_type",
            " id", "id ", "id\0", "\0id", "ïd", "types", "aggregatetypes", "", "Content-Type", "ce_id", "CE_type", "ce", "outbox.dead_letter.x",
        ])
        .prop_map(str::to_string),
        2 => prop::sample::select(vec!["k0", "k1", "k2"]).prop_map(str::to_string),
        4 => odd_string(12),
    ]
}

/// A header value: mostly strings, sometimes any other JSON value.
fn header_value() -> impl Strategy<Value = J> {
    prop_oneof![
        8 => odd_string(24).prop_map(J::Str),
        1 => json_value(),
        1 => (130usize..600, any::<bool>()).prop_map(|(d, o)| {
            // Deeper than serde_json's recursion limit: must be refused, not overflow a stack.
            let mut v = J::Str("x".into());
            for _ in 0..d {
                v = if o { J::Obj(vec![("a".into(), v)]) } else { J::Arr(vec![v]) };
            }
            v
        }),
    ]
}

/// The headers argument: its JSON text (None for SQL NULL) and what it must lead to.
#[derive(Debug, Clone)]
struct HeadersArg {
    text: Option<String>,
    expect: HeadersExpect,
}

fn headers_object(
    members: impl Strategy<Value = Vec<(String, J)>>,
) -> impl Strategy<Value = HeadersArg> {
    (members, style()).prop_map(|(members, style)| {
        let value = J::Obj(members);
        HeadersArg { text: Some(json_text(&value, style)), expect: oracle_headers(&value) }
    })
}

/// JSON texts that are certainly not JSON.
fn invalid_json() -> impl Strategy<Value = String> {
    let valid_object = (prop::collection::vec((odd_string(6), odd_string(6)), 1..4), style())
        .prop_map(|(m, s)| {
            json_text(&J::Obj(m.into_iter().map(|(k, v)| (k, J::Str(v))).collect()), s)
        })
        .boxed();
    prop_oneof![
        // A proper prefix of an object's text lacks its closing brace.
        (valid_object.clone(), any::<prop::sample::Index>()).prop_map(|(t, i)| {
            let mut cut = i.index(t.len());
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t[..cut].to_string()
        }),
        // Anything but whitespace after the value.
        (
            valid_object,
            prop::sample::select(vec!["x", ",", "}", "{}", "]", "\"a\"", "null", "\0", "\u{a0}"]),
        )
            .prop_map(|(t, junk)| format!("{t}{junk}")),
        prop::sample::select(vec![
            "",
            " ",
            "{",
            "}",
            "{'a':'b'}",
            "{\"a\":\"b\",}",
            "{\"a\" \"b\"}",
            "{a:\"b\"}",
            "{\"a\":NaN}",
            "{\"a\":Infinity}",
            "{\"a\":\"b\"} // c",
            "/* c */ {}",
            "{\"\\ud800\":\"x\"}",
            "{\"a\":\"\\udc00\"}",
            "{\"a\":\"\\ud800\\u0041\"}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"\0\"}",
            "{\"a\":\"\n\"}",
            "\u{feff}{}",
            "{\"a\":01}",
            "{\"a\":+1}",
            "{\"a\":.5}",
            "{\"a\":1.}",
            "{\"a\":tru}",
            "nul",
            "{\"a\":\"b\"}}",
        ])
        .prop_map(str::to_string),
    ]
}

fn headers_arg() -> impl Strategy<Value = HeadersArg> {
    let members = prop::collection::vec((header_name(), header_value()), 0..8);
    let string_members =
        prop::collection::vec((header_name(), odd_string(24).prop_map(J::Str)), 0..8);
    prop_oneof![
        3 => Just(HeadersArg { text: None, expect: HeadersExpect::Accept(BTreeMap::new()) }),
        1 => prop::sample::select(vec!["null", " null", "null\n", "\t null \r\n"]).prop_map(|t| {
            HeadersArg { text: Some(t.to_string()), expect: HeadersExpect::Accept(BTreeMap::new()) }
        }),
        4 => headers_object(members),
        4 => headers_object(string_members),
        2 => (json_value(), style()).prop_map(|(v, s)| HeadersArg {
            text: Some(json_text(&v, s)),
            expect: oracle_headers(&v),
        }),
        1 => (2usize..5000, any::<bool>()).prop_map(|(d, o)| HeadersArg {
            // Nested arrays, or objects whose value is an object, up to far beyond serde_json's
            // recursion limit (depth 1 would be the valid `{"a":"x"}`).
            text: Some(deep_json(d, o)),
            expect: HeadersExpect::Reject,
        }),
        2 => invalid_json()
            .prop_map(|t| HeadersArg { text: Some(t), expect: HeadersExpect::Reject }),
        1 => odd_string(24)
            .prop_map(|t| HeadersArg { text: Some(t), expect: HeadersExpect::Unknown }),
    ]
}

/// One call of `outbox.emit()` with its configuration and the id it would get.
#[derive(Debug, Clone)]
struct Emit {
    aggregatetype: Option<String>,
    aggregateid: Option<String>,
    event_type: Option<String>,
    payload: Option<String>,
    headers: HeadersArg,
    template: Vec<String>,
    max_payload: MaxPayload,
    id: [u8; 16],
}

/// What the emit strategies generate, in the order of `Emit`'s fields.
type EmitParts = (
    (Option<String>, Option<String>, Option<String>, Option<String>),
    HeadersArg,
    Vec<String>,
    MaxPayload,
    [u8; 16],
);

impl Emit {
    fn from_parts(
        ((aggregatetype, aggregateid, event_type, payload), headers, template, max_payload, id): EmitParts,
    ) -> Emit {
        Emit { aggregatetype, aggregateid, event_type, payload, headers, template, max_payload, id }
    }
}

fn emit_call() -> impl Strategy<Value = Emit> {
    (
        (text_arg(), text_arg(), text_arg(), payload()),
        headers_arg(),
        template_parts(),
        max_payload(),
        any::<[u8; 16]>(),
    )
        .prop_map(Emit::from_parts)
}

/// Up to `max` headers with distinct odd names and odd string values, sometimes with one
/// reserved name or non-string value among them. Made from a seed rather than from a proptest
/// collection of that many strings, which takes seconds per case in a debug build.
fn many_members(max: usize) -> impl Strategy<Value = Vec<(String, J)>> {
    const PALETTE: &str = "aZ0\0\u{1}\u{1f}\u{7f}\"\\/ é\u{2028}\u{feff}😀\u{10ffff}";
    let palette: Vec<char> = PALETTE.chars().collect();
    (0..=max, any::<u64>(), 0u8..8).prop_map(move |(n, seed, spoil)| {
        let mut state = seed | 1;
        let mut next = move || {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut odd = |len: u64| -> String {
            (0..len).map(|_| palette[(next() % palette.len() as u64) as usize]).collect()
        };
        let mut members: Vec<(String, J)> = (0..n)
            .map(|i| {
                let name = odd(i as u64 % 9);
                // The index before the first ':' keeps the names distinct.
                (format!("{i}:{name}"), J::Str(odd(i as u64 % 13)))
            })
            .collect();
        if n > 0 {
            let at = (seed as usize) % n;
            match spoil {
                0 => members[at].0 = RESERVED[at % RESERVED.len()].to_string(),
                1 => members[at].1 = J::Num("1".into()),
                _ => {}
            }
        }
        members
    })
}

/// Mostly huge inputs: 100k-character strings, 50k-deep payloads, thousands of headers.
fn huge_emit_call() -> impl Strategy<Value = Emit> {
    let huge_text = prop_oneof![
        2 => huge_string(100_000).prop_map(Some),
        1 => topic_chars(1, 30).prop_map(Some),
    ]
    .boxed();
    let huge_aggregatetype = prop_oneof![
        1 => huge_string(100_000).prop_map(Some),
        1 => topic_chars(1, 236).prop_map(Some),
    ];
    let huge_payload = prop_oneof![
        2 => huge_string(100_000).prop_map(|s| {
            let mut t = String::new();
            write_json_str(&mut t, &s, Style { ascii: false, spaces: false });
            Some(t)
        }),
        1 => (10_000usize..50_000, any::<bool>()).prop_map(|(d, o)| Some(deep_json(d, o))),
    ];
    let big_members = prop::collection::vec(
        (
            prop_oneof![3 => huge_string(100_000), 1 => header_name()],
            prop_oneof![3 => huge_string(100_000).prop_map(J::Str), 1 => header_value()],
        ),
        0..4,
    );
    let huge_headers = prop_oneof![
        2 => headers_object(many_members(10_000)),
        2 => headers_object(big_members),
        1 => (10_000usize..100_000, any::<bool>()).prop_map(|(d, o)| HeadersArg {
            text: Some(format!("{{\"k\":{}}}", deep_json(d, o))),
            expect: HeadersExpect::Reject,
        }),
        1 => Just(HeadersArg { text: None, expect: HeadersExpect::Accept(BTreeMap::new()) }),
    ];
    (
        (huge_aggregatetype, huge_text.clone(), huge_text, huge_payload),
        huge_headers,
        prop_oneof![
            2 => template_parts(),
            3 => Just(vec!["all-events".to_string()]),
            1 => Just(vec![String::new(), String::new()]),
        ],
        prop_oneof![
            1 => Just(MaxPayload::Below),
            1 => Just(MaxPayload::Exact),
            4 => Just(MaxPayload::Absolute(1_000_000)),
            1 => Just(MaxPayload::Absolute(1000)),
        ],
        any::<[u8; 16]>(),
    )
        .prop_map(Emit::from_parts)
}

// ---------------------------------------------------------------------------------------------
// The check
// ---------------------------------------------------------------------------------------------

impl Emit {
    fn template(&self) -> String {
        self.template.join(PLACEHOLDER)
    }

    fn expected_topic(&self, aggregatetype: &str) -> String {
        self.template.join(aggregatetype)
    }

    fn max_payload_bytes(&self) -> usize {
        self.max_payload.resolve(self.payload.as_deref().map_or(0, str::len))
    }

    /// Every rule the call breaks, from the documented rules alone.
    fn violations(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        for (name, arg) in [
            ("aggregatetype", &self.aggregatetype),
            ("aggregateid", &self.aggregateid),
            ("type", &self.event_type),
        ] {
            match arg.as_deref() {
                None => v.push(Violation::Null(name)),
                Some("") => v.push(Violation::Empty(name)),
                Some(_) => {}
            }
        }
        match &self.payload {
            None => v.push(Violation::Null("payload")),
            Some(p) if p.len() > self.max_payload_bytes() => {
                v.push(Violation::PayloadTooLarge { size: p.len(), max: self.max_payload_bytes() })
            }
            Some(_) => {}
        }
        if let Some(at) = &self.aggregatetype {
            let topic = self.expected_topic(at);
            if !oracle_topic_is_legal(&topic) {
                v.push(Violation::Topic(topic));
            }
        }
        if self.headers.expect == HeadersExpect::Reject {
            v.push(Violation::Headers);
        }
        v
    }

    /// `validate` on this call's arguments and configuration.
    fn validate(&self, template: &str) -> Result<ValidEvent<'_>, OutboxError> {
        // The record limit has its own property (`the_record_limit_counts_every_part`).
        let limits = EmitLimits {
            max_payload_bytes: self.max_payload_bytes(),
            max_record_bytes: usize::MAX,
            topic_template: template,
            record_format: routing::RecordFormat::Plain,
            cloudevents_source: "/outbox_ext/db",
        };
        let args = EmitArgs {
            aggregatetype: self.aggregatetype.as_deref(),
            aggregateid: self.aggregateid.as_deref(),
            event_type: self.event_type.as_deref(),
            payload: PayloadArg::Json(self.payload.as_deref()),
            headers: self.headers.text.as_deref(),
            trace: Default::default(),
        };
        validate(args, limits)
    }

    fn run(&self) -> Result<(), TestCaseError> {
        let template = self.template();
        let violations = self.violations();
        match self.validate(&template) {
            Err(e) => self.check_rejection(&e, &violations),
            Ok(ev) => {
                prop_assert!(violations.is_empty(), "accepted although it breaks {violations:?}");
                self.check_accepted(&ev, &template)
            }
        }
    }

    fn check_rejection(
        &self,
        e: &OutboxError,
        violations: &[Violation],
    ) -> Result<(), TestCaseError> {
        let code = e.sqlstate().code();
        let message = e.to_string();
        prop_assert!(!message.is_empty());
        prop_assert!(
            !matches!(e, OutboxError::ArgumentTooLong { .. }),
            "no generated argument is anywhere near 4 GiB, yet got {e:?}"
        );
        if let Some(v) = violations.iter().find(|v| v.matches(e)) {
            prop_assert_eq!(code, v.sqlstate(), "{:?} for {:?}", e, v);
        } else if matches!(
            self.headers.expect,
            HeadersExpect::Unknown | HeadersExpect::AcceptOrReject(_)
        ) {
            prop_assert!(
                matches!(e, OutboxError::InvalidHeaders { .. }),
                "unclassified headers {:?}: expected InvalidHeaders or one of {:?}, got {:?}",
                self.headers.text,
                violations,
                e
            );
            prop_assert_eq!(code, "22023");
        } else if violations.is_empty() {
            return Err(TestCaseError::fail(format!("refused a valid call with {e:?} ({code})")));
        } else {
            return Err(TestCaseError::fail(format!(
                "refused with {e:?} ({code}), which is none of the broken rules {violations:?}"
            )));
        }
        match e {
            OutboxError::IllegalTopic { .. } => {
                // error.rs: messages stay readable when the offending value is huge.
                prop_assert!(message.len() < 400, "topic message of {} bytes", message.len());
                prop_assert!(e.hint().is_some());
            }
            OutboxError::PayloadTooLarge { .. } => prop_assert!(e.hint().is_some()),
            _ => {}
        }
        Ok(())
    }

    fn check_accepted(&self, ev: &ValidEvent<'_>, template: &str) -> Result<(), TestCaseError> {
        let aggregatetype = self.aggregatetype.as_deref().unwrap();
        let aggregateid = self.aggregateid.as_deref().unwrap();
        let event_type = self.event_type.as_deref().unwrap();
        let payload = self.payload.as_deref().unwrap();
        prop_assert_eq!(ev.aggregatetype, aggregatetype);
        prop_assert_eq!(ev.aggregateid, aggregateid);
        prop_assert_eq!(ev.event_type, event_type);
        prop_assert_eq!(ev.value, Value::Json(payload));

        // The headers are the documented ones, each name once, none reserved.
        let mut names: Vec<&str> = ev.headers.iter().map(|(k, _)| k.as_str()).collect();
        prop_assert!(
            names.iter().all(|n| !oracle_reserved(n)),
            "reserved name in {:?}",
            ev.headers
        );
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        prop_assert_eq!(names.len(), count, "a header name twice in {:?}", ev.headers);
        match &self.headers.expect {
            HeadersExpect::Accept(expected) | HeadersExpect::AcceptOrReject(expected) => {
                let got: BTreeMap<String, String> = ev.headers.iter().cloned().collect();
                prop_assert_eq!(&got, expected);
            }
            HeadersExpect::Unknown => {}
            HeadersExpect::Reject => unreachable!("checked by the violations"),
        }

        // encode: exactly the documented layout.
        let body = encode(&self.id, ev);
        let expected_body =
            oracle_wire(&self.id, [aggregatetype, aggregateid, event_type, payload], &ev.headers);
        prop_assert!(body == expected_body, "encode differs from the documented layout");
        // seal: the version, a tag, then the same record; it opens with its key and transaction.
        let key = RecordKey::new(&[5; 32]);
        let message = event::seal(&key, 77, &self.id, ev);
        prop_assert_eq!(message[0], FORMAT_VERSION);
        prop_assert!(message[17..] == body[..], "the sealed record differs from encode's");
        prop_assert!(event::open(&key, 77, &message).is_ok());
        prop_assert!(event::open(&key, 78, &message).is_err());

        // decode: byte for byte what went in.
        let back = match decode(&body) {
            Ok(back) => back,
            Err(e) => return Err(TestCaseError::fail(format!("own record does not decode: {e}"))),
        };
        prop_assert_eq!(back.id, self.id);
        prop_assert_eq!(back.aggregatetype.as_bytes(), aggregatetype.as_bytes());
        prop_assert_eq!(back.aggregateid.as_bytes(), aggregateid.as_bytes());
        prop_assert_eq!(back.event_type.as_bytes(), event_type.as_bytes());
        prop_assert_eq!(back.value, Value::Json(payload));
        let back_headers: Vec<(String, String)> =
            back.headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        prop_assert_eq!(&back_headers, &ev.headers);

        // Routing: the topic and the record headers.
        let topic = routing::topic_for(template, back.aggregatetype);
        prop_assert_eq!(&topic, &self.expected_topic(aggregatetype));
        prop_assert!(oracle_topic_is_legal(&topic));
        prop_assert!(routing::check_topic(&topic).is_ok());
        let id_text = routing::id_text(&back);
        prop_assert_eq!(&id_text, &oracle_hyphenated(&self.id));
        let position = routing::PositionText::new(routing::Position { commit_lsn: u64::MAX, commit_index: 0 });
        let record = routing::record_headers(&back, &id_text, &position, &routing::Envelope::Plain);
        let mut expected_record: Vec<(&str, &str)> = vec![
            ("id", &id_text),
            ("type", event_type),
            ("aggregatetype", aggregatetype),
            ("commit_lsn", "18446744073709551615"),
            ("commit_index", "0"),
        ];
        expected_record.extend(ev.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        prop_assert_eq!(record, expected_record);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Single faults: each documented rule, broken alone, gives exactly its error
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Fault {
    Null(usize),
    Empty(usize),
    /// An aggregatetype with one character Kafka does not allow, at some position.
    TopicChar(char, prop::sample::Index),
    /// An aggregatetype that makes the topic one character too long or more.
    TopicLength(usize),
    /// A template without the placeholder that is itself illegal.
    TopicTemplate(String),
    PayloadTooLarge,
    Headers(String),
}

fn fault() -> impl Strategy<Value = Fault> {
    let illegal_char = prop_oneof![ascii_non_topic_char(), odd_char()].prop_map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            '\u{e9}'
        } else {
            c
        }
    });
    let bad_headers = prop_oneof![
        invalid_json(),
        (json_value(), style()).prop_map(|(v, s)| match v {
            J::Obj(_) | J::Null => json_text(&J::Arr(vec![v]), s),
            v => json_text(&v, s),
        }),
        (prop::sample::select(RESERVED.to_vec()), odd_string(8), style()).prop_map(|(k, v, s)| {
            json_text(&J::Obj(vec![("k0".into(), J::Str("v".into())), (k.into(), J::Str(v))]), s)
        }),
        (header_value(), style()).prop_map(|(v, s)| {
            let v = if let J::Str(_) = v { J::Arr(vec![v]) } else { v };
            json_text(&J::Obj(vec![("k".into(), v)]), s)
        }),
    ];
    prop_oneof![
        (0usize..4).prop_map(Fault::Null),
        (0usize..3).prop_map(Fault::Empty),
        (illegal_char, any::<prop::sample::Index>()).prop_map(|(c, i)| Fault::TopicChar(c, i)),
        (0usize..100).prop_map(Fault::TopicLength),
        prop::sample::select(
            [".", "..", "", "a b", "a/b", "ä", "a\0", &"x".repeat(250)]
                .map(str::to_string)
                .to_vec()
        )
        .prop_map(Fault::TopicTemplate),
        Just(Fault::PayloadTooLarge),
        bad_headers.prop_map(Fault::Headers),
    ]
}

/// A call that breaks no rule.
fn valid_call() -> impl Strategy<Value = Emit> {
    let non_empty = prop::collection::vec(odd_char(), 1..=30).prop_map(String::from_iter);
    let text = prop_oneof![topic_chars(1, 30), non_empty].boxed();
    let good_headers = prop_oneof![
        Just(HeadersArg { text: None, expect: HeadersExpect::Accept(BTreeMap::new()) }),
        headers_object(prop::collection::vec(
            (
                header_name().prop_map(|k| if oracle_reserved(&k) {
                    "x".to_string() + &k
                } else {
                    k
                }),
                odd_string(24).prop_map(J::Str),
            ),
            0..6,
        )),
    ];
    (
        topic_chars(1, 30),
        text.clone(),
        text,
        (json_value(), style()).prop_map(|(v, s)| json_text(&v, s)),
        good_headers,
        any::<[u8; 16]>(),
    )
        .prop_map(|(aggregatetype, aggregateid, event_type, payload, headers, id)| Emit {
            aggregatetype: Some(aggregatetype),
            aggregateid: Some(aggregateid),
            event_type: Some(event_type),
            payload: Some(payload),
            headers,
            template: vec!["outbox.event.".into(), String::new()],
            max_payload: MaxPayload::Absolute(1_000_000),
            id,
        })
}

const ARGS: [&str; 4] = ["aggregatetype", "aggregateid", "type", "payload"];

impl Emit {
    fn arg_mut(&mut self, i: usize) -> &mut Option<String> {
        match i {
            0 => &mut self.aggregatetype,
            1 => &mut self.aggregateid,
            2 => &mut self.event_type,
            _ => &mut self.payload,
        }
    }

    /// Breaks one rule; returns the one violation that must be reported.
    fn inject(&mut self, fault: &Fault) -> Violation {
        match fault {
            Fault::Null(i) => {
                *self.arg_mut(*i) = None;
                Violation::Null(ARGS[*i])
            }
            Fault::Empty(i) => {
                *self.arg_mut(*i) = Some(String::new());
                Violation::Empty(ARGS[*i])
            }
            Fault::TopicChar(c, at) => {
                let mut s: Vec<char> = self.aggregatetype.as_deref().unwrap().chars().collect();
                s.insert(at.index(s.len() + 1), *c);
                let s: String = s.into_iter().collect();
                self.aggregatetype = Some(s.clone());
                Violation::Topic(self.expected_topic(&s))
            }
            Fault::TopicLength(extra) => {
                let s = "a".repeat(249 - "outbox.event.".len() + 1 + extra);
                self.aggregatetype = Some(s.clone());
                Violation::Topic(self.expected_topic(&s))
            }
            Fault::TopicTemplate(t) => {
                self.template = vec![t.clone()];
                Violation::Topic(t.clone())
            }
            Fault::PayloadTooLarge => {
                let len = self.payload.as_deref().unwrap().len();
                self.max_payload = MaxPayload::Below;
                Violation::PayloadTooLarge { size: len, max: len - 1 }
            }
            Fault::Headers(text) => {
                self.headers =
                    HeadersArg { text: Some(text.clone()), expect: HeadersExpect::Reject };
                Violation::Headers
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Any call: accepted and faithful, or refused for a documented reason with its SQLSTATE.
    #[test]
    fn emit_accepts_exactly_the_documented_inputs_and_round_trips(call in emit_call()) {
        call.run()?;
    }

    /// Calls that break no rule are all accepted (and round-trip).
    #[test]
    fn valid_calls_are_accepted(call in valid_call()) {
        prop_assert!(call.violations().is_empty(), "{:?}", call.violations());
        call.run()?;
    }

    /// One broken rule on an otherwise valid call gives exactly that rule's error and SQLSTATE.
    #[test]
    fn a_single_broken_rule_gives_exactly_its_error(mut call in valid_call(), fault in fault()) {
        let expected = call.inject(&fault);
        prop_assert_eq!(call.violations(), vec![expected.clone()]);
        match call.validate(&call.template()) {
            Ok(_) => return Err(TestCaseError::fail(format!("accepted despite {expected:?}"))),
            Err(e) => {
                prop_assert!(expected.matches(&e), "expected {:?}, got {:?}", expected, e);
                prop_assert_eq!(e.sqlstate().code(), expected.sqlstate());
            }
        }
    }

    /// parse_headers alone, against the oracle.
    #[test]
    fn headers_follow_the_documented_rule(h in headers_arg()) {
        use HeadersExpect::*;
        let Some(text) = &h.text else { return Ok(()) };
        match (parse_headers(text), &h.expect) {
            (Ok(got), Accept(expected) | AcceptOrReject(expected)) => {
                prop_assert_eq!(got.len(), expected.len(), "repeated names in {:?}", got);
                let got: BTreeMap<String, String> = got.into_iter().collect();
                prop_assert_eq!(&got, expected);
            }
            (Ok(got), Unknown) => {
                prop_assert!(got.iter().all(|(k, _)| !oracle_reserved(k)));
            }
            (Err(e), Reject | Unknown | AcceptOrReject(_)) => {
                prop_assert!(matches!(e, OutboxError::InvalidHeaders { .. }), "{:?}", e);
                prop_assert_eq!(e.sqlstate().code(), "22023");
            }
            (got, expect) => {
                let message = format!("{text:?}: expected {expect:?}, got {got:?}");
                return Err(TestCaseError::fail(message));
            }
        }
    }

    /// decode never panics on bytes that outbox.emit() did not write, accepts exactly what the
    /// documented layout reads as one record (valid UTF-8 included), and whatever it accepts is
    /// the one encoding of what it returns.
    #[test]
    fn decode_never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_decode(&bytes)?;
    }

    /// Nor on damaged records: truncated, extended, or with bytes overwritten.
    #[test]
    fn decode_never_panics_on_damaged_records(
        call in valid_call(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let ev = call.validate(&call.template()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut body = encode(&call.id, &ev);
        for (at, byte, op) in edits {
            let i = at.index(body.len() + 1);
            match op {
                0 => body.truncate(i),
                1 => body.insert(i, byte),
                _ => if i < body.len() { body[i] = byte },
            }
        }
        check_decode(&body)?;
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Huge inputs: 100k-character arguments with NUL and control characters, 50k-deep payloads,
    /// deeply nested header values, thousands of headers.
    #[test]
    fn emit_handles_huge_inputs(call in huge_emit_call()) {
        call.run()?;
    }
}

/// A record as the documented layout reads it.
#[derive(Debug, PartialEq)]
struct Record {
    id: [u8; 16],
    strings: Vec<String>,
    value: OracleValue,
    headers: Vec<(String, String)>,
}

#[derive(Debug, PartialEq)]
enum OracleValue {
    Json(String),
    Tombstone,
    Bytes { content_type: String, data: Vec<u8> },
}

/// What the layout in the module doc of event.rs makes of `body`: `None` unless it is exactly
/// one record whose strings are all UTF-8 and whose kind is 0, 1 or 2. Written independently
/// of `decode`.
fn oracle_read(body: &[u8]) -> Option<Record> {
    fn u32_at(rest: &mut &[u8]) -> Option<u32> {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        *rest = &rest[4..];
        Some(n)
    }
    fn bytes(rest: &mut &[u8]) -> Option<Vec<u8>> {
        let n = u32_at(rest)? as usize;
        let bytes = rest.get(..n)?;
        *rest = &rest[n..];
        Some(bytes.to_vec())
    }
    fn string(rest: &mut &[u8]) -> Option<String> {
        String::from_utf8(bytes(rest)?).ok()
    }
    let mut rest = body;
    let id: [u8; 16] = rest.get(..16)?.try_into().ok()?;
    let kind = *rest.get(16)?;
    rest = &rest[17..];
    let strings = (0..3).map(|_| string(&mut rest)).collect::<Option<Vec<_>>>()?;
    let value = match kind {
        0 => OracleValue::Json(string(&mut rest)?),
        1 => OracleValue::Tombstone,
        2 => {
            let content_type = string(&mut rest)?;
            OracleValue::Bytes { content_type, data: bytes(&mut rest)? }
        }
        _ => return None,
    };
    let count = u32_at(&mut rest)?;
    let mut headers = Vec::new();
    for _ in 0..count {
        headers.push((string(&mut rest)?, string(&mut rest)?));
    }
    rest.is_empty().then_some(Record { id, strings, value, headers })
}

fn check_decode(body: &[u8]) -> Result<(), TestCaseError> {
    let got = decode(body);
    let expected = oracle_read(body);
    match (&got, expected) {
        (Ok(ev), Some(expected)) => {
            let got = Record {
                id: ev.id,
                strings: [ev.aggregatetype, ev.aggregateid, ev.event_type]
                    .map(|s| {
                        String::from_utf8(s.as_bytes().to_vec()).expect("decode gave non-UTF-8")
                    })
                    .to_vec(),
                value: match ev.value {
                    Value::Json(text) => OracleValue::Json(text.to_string()),
                    Value::Tombstone => OracleValue::Tombstone,
                    Value::Bytes { data, content_type } => {
                        OracleValue::Bytes { content_type: content_type.to_string(), data: data.to_vec() }
                    }
                },
                headers: ev.headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            };
            prop_assert_eq!(got, expected);
            prop_assert_eq!(reencode(ev), body);
        }
        (Err(_), None) => {}
        (got, expected) => {
            return Err(TestCaseError::fail(format!(
                "decode gave {got:?}, the documented layout reads {expected:?}"
            )))
        }
    }
    Ok(())
}

fn reencode(ev: &event::EventRef<'_>) -> Vec<u8> {
    let valid = ValidEvent {
        aggregatetype: ev.aggregatetype,
        aggregateid: ev.aggregateid,
        event_type: ev.event_type,
        value: ev.value,
        headers: ev.headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    encode(&ev.id, &valid)
}

// ---------------------------------------------------------------------------------------------
// Fixed cases the properties rest on
// ---------------------------------------------------------------------------------------------

#[test]
fn reserved_header_names_are_the_ones_routing_sets() {
    assert_eq!(RESERVED_HEADERS, RESERVED);
    // A binary value's record has them all.
    let ev = event::EventRef {
        id: [0; 16],
        aggregatetype: "a",
        aggregateid: "b",
        event_type: "c",
        value: Value::Bytes { data: b"", content_type: "a/b" },
        headers: vec![],
    };
    let id = routing::id_text(&ev);
    let position = routing::PositionText::new(routing::Position::default());
    let names: Vec<&str> =
        routing::record_headers(&ev, &id, &position, &routing::Envelope::Plain).into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, RESERVED);
    // In cloudevents mode every header the relay sets is reserved too.
    let envelope = routing::Envelope::CloudEvents { source: "/s", time: outbox_core::time::Rfc3339Micros::new(0) };
    for (name, _) in routing::record_headers(&ev, &id, &position, &envelope) {
        assert!(oracle_reserved(name), "{name}");
    }
}

/// Exhaustively, every ASCII character (and some others) alone, at the start, in the middle and
/// at the end of an aggregatetype, against the documented topic rule.
#[test]
fn every_character_follows_the_topic_rule() {
    let others = ['\u{80}', '\u{a0}', 'é', '\u{feff}', '\u{ffff}', '😀', '\u{10ffff}'];
    for c in ('\0'..='\u{7f}').chain(others) {
        for (prefix, aggregatetype) in [
            ("", format!("{c}")),
            ("", format!("{c}a")),
            ("outbox.event.", format!("a{c}b")),
            ("", format!("a{c}")),
        ] {
            let template = format!("{prefix}{PLACEHOLDER}");
            let topic = format!("{prefix}{aggregatetype}");
            let limits =
                EmitLimits { max_payload_bytes: 100, max_record_bytes: usize::MAX, topic_template: &template, record_format: routing::RecordFormat::Plain, cloudevents_source: "/s" };
            let args = EmitArgs {
                aggregatetype: Some(&aggregatetype),
                aggregateid: Some("id"),
                event_type: Some("t"),
                payload: PayloadArg::Json(Some("{}")),
                headers: None,
                trace: Default::default(),
            };
            let result = validate(args, limits);
            if oracle_topic_is_legal(&topic) {
                assert!(result.is_ok(), "{topic:?}: {result:?}");
            } else {
                let e = result.unwrap_err();
                assert!(Violation::Topic(topic.clone()).matches(&e), "{topic:?}: {e:?}");
                assert_eq!(e.sqlstate().code(), "22023");
            }
        }
    }
}

#[test]
fn the_oracle_topic_rule_agrees_on_the_edges() {
    assert!(oracle_topic_is_legal(&"a".repeat(249)));
    assert!(!oracle_topic_is_legal(&"a".repeat(250)));
    for bad in ["", ".", "..", "a b", "ä", "a\0"] {
        assert!(!oracle_topic_is_legal(bad), "{bad:?}");
    }
    for good in ["...", "a", "-", "_", "a.b-c_D9"] {
        assert!(oracle_topic_is_legal(good), "{good:?}");
    }
}

/// The size librdkafka gives a record (`rd_kafka_msg_max_wire_size`), written from librdkafka's
/// definition: 36 bytes of varint headroom, then key and value, then for each header the
/// zig-zag varints of its name's and value's lengths and the bytes themselves.
fn oracle_record_size(key: &str, value: &str, headers: &[(&str, &str)]) -> usize {
    fn varint(n: usize) -> usize {
        // zig-zag doubles a non-negative length; 7 bits a byte.
        let bits = 64 - ((n as u64) * 2).leading_zeros() as usize;
        bits.div_ceil(7).max(1)
    }
    36 + key.len()
        + value.len()
        + headers.iter().map(|(k, v)| varint(k.len()) + k.len() + varint(v.len()) + v.len()).sum::<usize>()
}

proptest! {
    #![proptest_config(config(256))]

    /// A valid call's record, sized by the oracle, is accepted at exactly `max_record_bytes` and
    /// refused with 54000 one byte below, whichever part makes it large.
    #[test]
    fn the_record_limit_counts_every_part(
        aggregatetype in topic_chars(1, 30),
        aggregateid in prop_oneof![odd_string(40), huge_string(20_000)],
        event_type in prop_oneof![odd_string(40), huge_string(20_000)],
        pad in prop_oneof![odd_string(40), huge_string(20_000)],
        members in prop::collection::vec((topic_chars(1, 20), prop_oneof![odd_string(20), huge_string(20_000)]), 0..4),
    ) {
        prop_assume!(!aggregateid.is_empty() && !event_type.is_empty());
        let mut payload = String::new();
        write_json_str(&mut payload, &pad, Style { ascii: false, spaces: false });
        let mut object = serde_json::Map::new();
        for (k, v) in &members {
            if !oracle_reserved(k) {
                object.insert(k.clone(), serde_json::Value::String(v.clone()));
            }
        }
        let headers_text = serde_json::Value::Object(object.clone()).to_string();
        // The position headers at their longest: the relay only knows them after commit.
        let own: Vec<(&str, &str)> = object.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap())).collect();
        let mut plain = vec![
            ("id", "01234567-89ab-7cde-8f01-23456789abcd"),
            ("type", event_type.as_str()),
            ("aggregatetype", aggregatetype.as_str()),
            ("commit_lsn", "18446744073709551615"),
            ("commit_index", "18446744073709551615"),
        ];
        plain.extend(own.iter().copied());
        // The routing.rs table, `cloudevents`.
        let mut cloudevents = vec![
            ("ce_specversion", "1.0"),
            ("ce_id", "01234567-89ab-7cde-8f01-23456789abcd"),
            ("ce_source", "/outbox_ext/fuzz"),
            ("ce_type", event_type.as_str()),
            ("ce_subject", aggregateid.as_str()),
            ("ce_time", "2026-12-06T09:27:01.123456Z"),
            ("content-type", "application/json"),
            ("ce_aggregatetype", aggregatetype.as_str()),
            ("ce_commitlsn", "18446744073709551615"),
            ("ce_commitindex", "18446744073709551615"),
        ];
        cloudevents.extend(own.iter().copied());
        let sizes = [
            (routing::RecordFormat::Plain, oracle_record_size(&aggregateid, &payload, &plain)),
            (routing::RecordFormat::CloudEvents, oracle_record_size(&aggregateid, &payload, &cloudevents)),
        ];
        let args = EmitArgs {
            aggregatetype: Some(&aggregatetype),
            aggregateid: Some(&aggregateid),
            event_type: Some(&event_type),
            payload: PayloadArg::Json(Some(&payload)),
            headers: Some(&headers_text),
            trace: Default::default(),
        };
        for (record_format, size) in sizes {
            let limits = |max| EmitLimits {
                max_payload_bytes: usize::MAX,
                max_record_bytes: max,
                topic_template: "outbox.event.{aggregatetype}",
                record_format,
                cloudevents_source: "/outbox_ext/fuzz",
            };
            prop_assert!(validate(args, limits(size)).is_ok(), "refused at the limit ({} bytes, {:?})", size, record_format);
            match validate(args, limits(size - 1)) {
                Err(e @ OutboxError::RecordTooLarge { .. }) => {
                    prop_assert_eq!(e.sqlstate().code(), "54000");
                    let OutboxError::RecordTooLarge { size: reported, key, value, headers: h, .. } = e else { unreachable!() };
                    prop_assert_eq!(reported, size);
                    prop_assert_eq!(36 + key + value + h, size);
                }
                other => return Err(TestCaseError::fail(format!("one byte over the limit gave {other:?}"))),
            }
        }
    }
}
