//! The error type every Vectorflow library returns.

use crate::time::Timestamp;

/// Result alias used across the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, named so a caller can react (and so the
/// gRPC layer can map each kind to one status code).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value, column or argument that does not fit the schema or the request.
    #[error("field `{field}`: {problem}")]
    Field { field: String, problem: String },
    /// A malformed request argument that is not a field of the collection.
    #[error("invalid argument `{argument}`: {problem}")]
    InvalidArgument { argument: String, problem: String },
    /// A filter expression that does not parse or does not fit the schema.
    #[error("filter expression at position {position}: {problem}")]
    Expression { position: usize, problem: String },
    /// A SQL statement that does not parse, plan or run.
    #[error("sql: {0}")]
    Sql(String),
    /// A schema that cannot be created.
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    #[error("collection `{0}` not found")]
    CollectionNotFound(String),
    #[error("collection `{0}` already exists")]
    CollectionExists(String),
    #[error("alias `{0}` not found")]
    AliasNotFound(String),
    /// A read `as_of` a time whose history has been compacted away.
    #[error("as_of {as_of} is before the retention horizon {horizon}: history older than the retention window is gone")]
    OutsideRetention { as_of: Timestamp, horizon: Timestamp },
    /// A read `as_of` a time that has not happened yet.
    #[error("timestamp {as_of} (as_of or guarantee_ts) is in the future (now is {now})")]
    FutureTimestamp { as_of: Timestamp, now: Timestamp },
    /// A read that could not complete before its deadline.
    #[error("timed out after {0:?} waiting for the dataflow")]
    Timeout(std::time::Duration),
    /// The engine is shutting down or its workers have stopped.
    #[error("engine is shut down")]
    Shutdown,
    /// A request over a configured limit (answer size, concurrency, memory):
    /// `limit` names the setting, `problem` what went over it.
    #[error("{limit}: {problem}")]
    ResourceExhausted { limit: String, problem: String },
    /// The caller went away or its deadline passed: the work was stopped.
    #[error("the request was cancelled")]
    Cancelled,
    /// A collection stopped after an internal error while applying a change;
    /// it serves nothing until a restart replays it from its checkpoint.
    #[error("collection `{collection}` is stopped: {cause}")]
    CollectionFailed { collection: String, cause: String },
    /// A bug or a broken invariant inside a component (DataFusion's
    /// `Internal`, a panicked task): not the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
    /// The write-ahead log or another durable store failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A service the engine depends on (the Kafka brokers) cannot be
    /// reached now; retrying later may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A change sent to a server that only reads (a read replica): the
    /// message says where changes go instead.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// Bytes on disk or on the wire that do not decode.
    #[error("corrupt data in {location}: {problem}")]
    Corrupt { location: String, problem: String },
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// An error of the same class and message, for an error only borrowed
    /// (DataFusion shares one error between the partitions that saw it).
    /// Arrow and IO errors keep their message and their IO kind.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Field { field, problem } => Error::Field { field: field.clone(), problem: problem.clone() },
            Error::InvalidArgument { argument, problem } => {
                Error::InvalidArgument { argument: argument.clone(), problem: problem.clone() }
            }
            Error::Expression { position, problem } => {
                Error::Expression { position: *position, problem: problem.clone() }
            }
            Error::Sql(message) => Error::Sql(message.clone()),
            Error::InvalidSchema(message) => Error::InvalidSchema(message.clone()),
            Error::CollectionNotFound(name) => Error::CollectionNotFound(name.clone()),
            Error::CollectionExists(name) => Error::CollectionExists(name.clone()),
            Error::AliasNotFound(name) => Error::AliasNotFound(name.clone()),
            Error::OutsideRetention { as_of, horizon } => Error::OutsideRetention { as_of: *as_of, horizon: *horizon },
            Error::FutureTimestamp { as_of, now } => Error::FutureTimestamp { as_of: *as_of, now: *now },
            Error::Timeout(after) => Error::Timeout(*after),
            Error::Shutdown => Error::Shutdown,
            Error::ResourceExhausted { limit, problem } => {
                Error::ResourceExhausted { limit: limit.clone(), problem: problem.clone() }
            }
            Error::Cancelled => Error::Cancelled,
            Error::CollectionFailed { collection, cause } => {
                Error::CollectionFailed { collection: collection.clone(), cause: cause.clone() }
            }
            Error::Internal(message) => Error::Internal(message.clone()),
            Error::Storage(message) => Error::Storage(message.clone()),
            Error::Unavailable(message) => Error::Unavailable(message.clone()),
            Error::ReadOnly(message) => Error::ReadOnly(message.clone()),
            Error::Corrupt { location, problem } => {
                Error::Corrupt { location: location.clone(), problem: problem.clone() }
            }
            Error::Arrow(error) => Error::Internal(format!("arrow: {error}")),
            Error::Io(error) => Error::Io(std::io::Error::new(error.kind(), error.to_string())),
        }
    }

    /// Shorthand for [`Error::Field`].
    pub fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Field { field: field.into(), problem: problem.into() }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn argument(argument: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::InvalidArgument { argument: argument.into(), problem: problem.into() }
    }

    /// Shorthand for [`Error::ResourceExhausted`].
    pub fn exhausted(limit: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::ResourceExhausted { limit: limit.into(), problem: problem.into() }
    }

    /// Shorthand for [`Error::Storage`].
    pub fn storage(err: impl std::fmt::Display) -> Self {
        Error::Storage(err.to_string())
    }
}
