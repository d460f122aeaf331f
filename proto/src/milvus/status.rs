//! Errors as Milvus reports them: in-band in `common.Status`, with Milvus's
//! numeric `code` and the legacy `error_code`, so pymilvus raises
//! `MilvusException` with our message instead of retrying a gRPC error.

use vectorflow_core::Error;

use super::pb::common::{ErrorCode, Status};

/// Milvus's error codes (its `merr` package) that clients react to.
pub mod code {
    /// Retried by pymilvus with backoff: what a write refused under backpressure gets.
    pub const RATE_LIMIT: i32 = 8;
    pub const QUOTA_EXCEEDED: i32 = 9;
    pub const SERVICE_INTERNAL: i32 = 5;
    pub const SERVICE_UNAVAILABLE: i32 = 2;
    /// `has_collection` answers false on this code.
    pub const COLLECTION_NOT_FOUND: i32 = 100;
    pub const COLLECTION_NOT_LOADED: i32 = 101;
    pub const COLLECTION_ILLEGAL_SCHEMA: i32 = 105;
    pub const ALIAS_NOT_FOUND: i32 = 1600;
    /// `list_indexes` answers `[]` on this code.
    pub const INDEX_NOT_FOUND: i32 = 700;
    pub const INDEX_NOT_SUPPORTED: i32 = 701;
    pub const DATABASE_NOT_FOUND: i32 = 800;
    pub const PARAMETER_INVALID: i32 = 1100;
    pub const TIMEOUT: i32 = 10;
    pub const UNEXPECTED: i32 = 65535;
}

/// The engine's limits that refuse a write only while it catches up.
const BACKPRESSURE_LIMITS: &[&str] = &["max_apply_lag_ms", "max_index_backlog_rows"];

/// A success.
pub fn ok() -> Status {
    Status { error_code: ErrorCode::Success as i32, code: 0, ..Default::default() }
}

/// A failure with Milvus's `code` and legacy `error_code`, and our message.
pub fn failure(code: i32, legacy: ErrorCode, reason: impl Into<String>) -> Status {
    let reason = crate::capped(reason.into());
    Status { error_code: legacy as i32, code, reason: reason.clone(), detail: reason, ..Default::default() }
}

/// The status for an engine error.
pub fn from_error(error: &Error) -> Status {
    let (code_value, legacy) = match error {
        Error::Field { .. } | Error::InvalidArgument { .. } | Error::Expression { .. } | Error::Sql(_) => {
            (code::PARAMETER_INVALID, ErrorCode::IllegalArgument)
        }
        Error::InvalidSchema(_) => (code::COLLECTION_ILLEGAL_SCHEMA, ErrorCode::IllegalArgument),
        Error::CollectionNotFound(_) => (code::COLLECTION_NOT_FOUND, ErrorCode::CollectionNotExists),
        Error::CollectionExists(_) => (code::PARAMETER_INVALID, ErrorCode::IllegalCollectionName),
        Error::AliasNotFound(_) => (code::ALIAS_NOT_FOUND, ErrorCode::IllegalArgument),
        Error::OutsideRetention { .. } | Error::FutureTimestamp { .. } => {
            (code::PARAMETER_INVALID, ErrorCode::IllegalArgument)
        }
        Error::Timeout(_) | Error::Cancelled => (code::TIMEOUT, ErrorCode::UnexpectedError),
        // Write backpressure passes: pymilvus retries a rate limit with
        // backoff. Every other limit fails the same way each time, so
        // retrying it for minutes would only hide the message.
        Error::ResourceExhausted { limit, .. } if BACKPRESSURE_LIMITS.contains(&limit.as_str()) => {
            (code::RATE_LIMIT, ErrorCode::RateLimit)
        }
        Error::ResourceExhausted { .. } => (code::PARAMETER_INVALID, ErrorCode::IllegalArgument),
        Error::Unavailable(_) | Error::Shutdown => (code::SERVICE_UNAVAILABLE, ErrorCode::NotReadyServe),
        // Not retried: a replica stays one, the message names the primary's role.
        Error::ReadOnly(_) => (code::PARAMETER_INVALID, ErrorCode::IllegalArgument),
        Error::CollectionFailed { .. }
        | Error::Internal(_)
        | Error::Storage(_)
        | Error::Corrupt { .. }
        | Error::Arrow(_)
        | Error::Io(_) => (code::SERVICE_INTERNAL, ErrorCode::UnexpectedError),
    };
    failure(code_value, legacy, error.to_string())
}

/// An argument the Milvus layer itself refuses (names the argument).
pub fn invalid(argument: &str, problem: impl std::fmt::Display) -> Status {
    from_error(&Error::argument(argument, problem.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_pymilvus_reacts_to() {
        let missing = from_error(&Error::CollectionNotFound("c".into()));
        assert_eq!((missing.code, missing.error_code), (100, ErrorCode::CollectionNotExists as i32));
        assert!(missing.reason.contains("`c` not found"));
        let refused = from_error(&Error::exhausted("max_apply_lag_ms", "behind"));
        assert_eq!((refused.code, refused.error_code), (8, ErrorCode::RateLimit as i32));
        let too_many = from_error(&Error::exhausted("max_query_rows", "give a limit"));
        assert_eq!(too_many.code, code::PARAMETER_INVALID, "a fixed limit is not retried");
        let bad = from_error(&Error::field("v", "dim 3, expected 8"));
        assert_eq!(bad.code, code::PARAMETER_INVALID);
        assert!(bad.reason.contains("field `v`"));
        assert_eq!(ok().code, 0);
    }

    #[test]
    fn long_reasons_are_capped() {
        let long = from_error(&Error::argument("filter", "x".repeat(100_000)));
        assert!(long.reason.len() <= crate::MAX_STATUS_MESSAGE);
    }
}
