//! Read-only queries for the relay's own checks (is the extension there, which key, what does
//! `pg_replication_slots` say). pgrx's `Spi::get_one` and `get_two` run their query as an
//! update, which assigns the transaction an id: the relay's once-a-second check whether the
//! extension still exists then cost a transaction id, a commit record and a WAL flush every
//! second, idle or not. These run as selects, so a read stays a read.

use pgrx::datum::{FromDatum, IntoDatum};
use pgrx::spi::{Spi, SpiResult};

/// The first column of the first row (None for NULL or no row).
pub fn one<A: FromDatum + IntoDatum>(query: &str) -> SpiResult<Option<A>> {
    Spi::connect(|client| {
        let rows = client.select(query, Some(1), &[])?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one()
    })
}

/// The first two columns of the first row (None for NULL or no row).
pub fn two<A: FromDatum + IntoDatum, B: FromDatum + IntoDatum>(query: &str) -> SpiResult<(Option<A>, Option<B>)> {
    Spi::connect(|client| {
        let rows = client.select(query, Some(1), &[])?;
        if rows.is_empty() {
            return Ok((None, None));
        }
        rows.first().get_two()
    })
}
