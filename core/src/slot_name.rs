//! The name of a database's replication slot: `outbox_<database>_<oid>`.
//!
//! Slot names may hold lower-case ASCII letters, digits and underscores, at most 63 bytes.
//! The database's name is folded into that alphabet (upper-case letters lowered, every other
//! byte `_`) and cut so that the oid, which makes the name unique in the cluster, always fits.
//! The relay records the name it made in `outbox.relay_slot` and keeps using it, so renaming
//! the database later does not orphan the slot.

/// PostgreSQL's limit on a slot name (NAMEDATALEN - 1).
pub const MAX_LEN: usize = 63;
const PREFIX: &str = "outbox_";

/// The slot name for database `name` with oid `oid`.
pub fn for_database(name: &str, oid: u32) -> String {
    let suffix = format!("_{oid}");
    let room = MAX_LEN - PREFIX.len() - suffix.len();
    let folded: String = name
        .bytes()
        .take(room)
        .map(|b| if b.is_ascii_alphanumeric() { b.to_ascii_lowercase() as char } else { '_' })
        .collect();
    format!("{PREFIX}{folded}{suffix}")
}

/// Whether PostgreSQL accepts `name` as a slot name.
pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_read_as_themselves() {
        assert_eq!(for_database("orders", 16384), "outbox_orders_16384");
        assert_eq!(for_database("postgres", 5), "outbox_postgres_5");
    }

    #[test]
    fn any_database_name_gives_a_valid_unique_slot_name() {
        let long = "Ä".repeat(40) + "Billing-EU west";
        for (name, oid) in [("Billing-EU", 1u32), ("my db", 2), ("日本語", 3), (long.as_str(), u32::MAX), ("", 4), ("a\"b'c", 5)] {
            let slot = for_database(name, oid);
            assert!(is_valid(&slot), "{name:?} gave {slot:?}");
            assert!(slot.ends_with(&format!("_{oid}")), "{slot} keeps the oid");
        }
        assert_eq!(for_database("Billing-EU", 1), "outbox_billing_eu_1");
        // Two names that fold alike differ by their oid.
        assert_ne!(for_database("a-b", 10), for_database("a_b", 11));
        assert_eq!(for_database(&long, u32::MAX).len(), MAX_LEN);
    }

    #[test]
    fn validity_follows_postgres_rules() {
        assert!(is_valid("outbox_ext"));
        assert!(!is_valid("Outbox"));
        assert!(!is_valid(""));
        assert!(!is_valid(&"a".repeat(64)));
    }
}
