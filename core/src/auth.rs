//! Record authentication: only `outbox.emit()` writes messages that the relay publishes.
//!
//! PostgreSQL lets every role call `pg_logical_emit_message`, so anyone could write a message
//! under the outbox prefix. `emit` therefore seals each record with a tag: HMAC-SHA256, keyed
//! with the installation's secret (32 random bytes that only superusers can read), over the id
//! of the transaction that writes it and the record. The relay opens each message with the same
//! key and the id of the transaction that committed it, and skips any message that does not
//! verify:
//!
//! * a message forged with `pg_logical_emit_message`, whatever its bytes;
//! * a genuine message copied into another transaction: everything a Kafka consumer sees is in
//!   the record, but the tag is not, and it names the transaction it was made for;
//! * a message of format 1 (before authentication).
//!
//! The key lives in the database (`outbox.relay_key`), so it is the same after a restart, a
//! crash and on a physical standby, which decodes the old primary's WAL after a failover.
//!
//! Message layout (format 2), as [`crate::event::seal`] writes it:
//!
//! ```text
//! u8         format version (2)
//! [u8; 16]   tag: the first 16 bytes of HMAC-SHA256(key, DOMAIN ‖ xid as u32 LE ‖ record)
//! record     the event (see event.rs)
//! ```

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Length of the installation's secret.
pub const KEY_LEN: usize = 32;
/// Length of the tag in each message (128 bits).
pub const TAG_LEN: usize = 16;
/// Separates these tags from any other use of the key.
const DOMAIN: &[u8] = b"outbox_ext record v2";

/// The installation's key, ready to tag and verify. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct RecordKey {
    /// HMAC with the key already absorbed: each tag starts from a copy of it.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey(<hidden>)")
    }
}

impl RecordKey {
    pub fn new(key: &[u8; KEY_LEN]) -> RecordKey {
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
        RecordKey { keyed }
    }

    fn mac(&self, xid: u32, record: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(DOMAIN);
        mac.update(&xid.to_le_bytes());
        mac.update(record);
        mac
    }

    /// The tag of `record` written in transaction `xid`.
    pub fn tag(&self, xid: u32, record: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac(xid, record).finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Whether `tag` is the tag of `record` in transaction `xid` (compared in constant time).
    pub fn verify(&self, xid: u32, record: &[u8], tag: &[u8]) -> bool {
        tag.len() == TAG_LEN && self.mac(xid, record).verify_truncated_left(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_depend_on_key_transaction_and_every_byte() {
        let key = RecordKey::new(&[7; KEY_LEN]);
        let record = b"an event record";
        let tag = key.tag(42, record);
        assert!(key.verify(42, record, &tag));
        // Another transaction, another key, a changed byte, a cut tag: all refused.
        assert!(!key.verify(43, record, &tag));
        assert!(!RecordKey::new(&[8; KEY_LEN]).verify(42, record, &tag));
        let mut changed = *record;
        changed[0] ^= 1;
        assert!(!key.verify(42, &changed, &tag));
        assert!(!key.verify(42, record, &tag[..TAG_LEN - 1]));
        assert!(!key.verify(42, record, &[0; TAG_LEN]));
    }

    #[test]
    fn the_tag_is_hmac_sha256_truncated() {
        // RFC 4231 test case 2, with this module's domain and transaction id prepended to the data.
        let mut data = DOMAIN.to_vec();
        data.extend_from_slice(&9u32.to_le_bytes());
        data.extend_from_slice(b"what do ya want for nothing?");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(&data);
        let full = mac.finalize().into_bytes();
        let mut key = [0u8; KEY_LEN];
        key[..4].copy_from_slice(b"Jefe");
        // HMAC pads short keys with zeros, so "Jefe" and "Jefe" + 28 zero bytes are one key.
        assert_eq!(RecordKey::new(&key).tag(9, b"what do ya want for nothing?"), full[..TAG_LEN]);
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", RecordKey::new(&[0x41; KEY_LEN])), "RecordKey(<hidden>)");
    }
}
