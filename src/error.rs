//! Reports [`outbox_core::OutboxError`] to the client as a Postgres ERROR with its SQLSTATE,
//! message and hint. This is the only place where core errors meet pgrx.

use outbox_core::error::SqlState;
use outbox_core::OutboxError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

fn error_code(state: SqlState) -> PgSqlErrorCode {
    match state {
        SqlState::NullValueNotAllowed => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        SqlState::InvalidParameterValue => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        SqlState::ProgramLimitExceeded => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        SqlState::ObjectNotInPrerequisiteState => {
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
        }
        SqlState::ConfigurationLimitExceeded => PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
    }
}

/// Raises `error` as an ERROR in the caller's transaction. Never returns.
pub fn raise(error: OutboxError) -> ! {
    let mut report =
        ErrorReport::new(error_code(error.sqlstate()), error.to_string(), "outbox_ext");
    if let Some(hint) = error.hint() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Unwraps a core result, raising the error in the caller's transaction.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, OutboxError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(e),
        }
    }
}
