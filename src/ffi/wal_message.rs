//! emit's side of the pipeline: its `jsonb` arguments as text, and the WAL record it writes.

use super::{compat, guarded};
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::datum::FromDatum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable,
};
use std::ffi::{c_void, CStr};

/// Writes `body` as a transactional logical-decoding message under the outbox prefix, in the
/// caller's (sub)transaction. Returns the message's LSN.
pub fn log_event_message(body: &[u8]) -> u64 {
    static PREFIX: &CStr = c"outbox_ext";
    debug_assert_eq!(PREFIX.to_str().unwrap(), outbox_core::event::MESSAGE_PREFIX);
    // SAFETY: emit is a SQL function, so this runs in a backend inside a transaction; pg_guard
    // turns an ERROR into a Rust panic that pgrx reports.
    unsafe { guarded(|| compat::log_transactional_message(PREFIX, body)) }
}

/// A `jsonb` argument as its JSON text, exactly as `jsonb_out` prints it.
pub struct JsonbText(pub String);

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: pgrx only builds this type from a jsonb argument (see SqlTranslatable below),
        // so `datum` is a valid, possibly toasted, jsonb; jsonb_out detoasts it and returns a
        // palloc'd NUL-terminated string, which we copy and free.
        unsafe {
            let text = pgrx::direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)])
                .expect("jsonb_out never returns NULL");
            let owned = String::from_utf8_lossy(text.to_bytes()).into_owned();
            pg_sys::pfree(text.as_ptr() as *mut c_void);
            Some(JsonbText(owned))
        }
    }
}

// SAFETY: unboxing goes through from_polymorphic_datum above, which handles NULL.
unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: pgrx calls this only for a non-NULL jsonb argument.
        unsafe {
            arg.unbox_arg_using_from_datum()
                .unwrap_or_else(|| panic!("argument {index} must not be null"))
        }
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above; NULL becomes Nullable::Null.
        unsafe { arg.unbox_arg_using_from_datum().into() }
    }
}

// SAFETY: the SQL type named here is the one `from_polymorphic_datum` expects.
unsafe impl SqlTranslatable for JsonbText {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(JsonbText);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}
