//! The daemon's errors: a kind a client can match on, and a message a person can act on. Both
//! cross the socket as they are.

use std::fmt;

use cache::ChunkError;
use serde::{Deserialize, Serialize};
use strata_fs::FsError;
use strata_store::{StoreError, StoreErrorKind};

/// What kind of failure, for a program to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A dataset, tag, volume, mount or kept upper that does not exist.
    NotFound,
    /// A compare-and-swap lost, or a volume commit clashed with a newer one (its changes are
    /// kept in the store as a conflict).
    Conflict,
    /// The store did not answer, or answered with an error; trying later may work.
    StoreUnavailable,
    /// Something is in the way: the mountpoint is already mounted, a commit is under way.
    Busy,
    /// The caller, or the daemon's credentials, may not do this.
    Permission,
    /// The request itself is wrong (a bad name, a relative mountpoint, conflicting options).
    BadRequest,
    /// The client and the daemon speak different versions of the protocol.
    UnsupportedVersion,
    /// Anything else: a local disk error, corrupt data, a bug. The message says which.
    Internal,
    /// A kind this client does not know (sent by a newer daemon).
    #[serde(other)]
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::StoreUnavailable => "store unavailable",
            ErrorKind::Busy => "busy",
            ErrorKind::Permission => "permission denied",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::UnsupportedVersion => "unsupported protocol version",
            ErrorKind::Internal => "internal error",
            ErrorKind::Other => "error",
        })
    }
}

/// An error of the daemon, as its library callers and its socket clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    pub kind: ErrorKind,
    pub message: String,
}

pub type DaemonResult<T> = Result<T, DaemonError>;

impl DaemonError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> DaemonError {
        DaemonError {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> DaemonError {
        DaemonError::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> DaemonError {
        DaemonError::new(ErrorKind::NotFound, message)
    }

    pub fn busy(message: impl Into<String>) -> DaemonError {
        DaemonError::new(ErrorKind::Busy, message)
    }

    pub fn internal(message: impl Into<String>) -> DaemonError {
        DaemonError::new(ErrorKind::Internal, message)
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(self, context: impl fmt::Display) -> DaemonError {
        DaemonError {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }
}

fn store_kind(kind: StoreErrorKind) -> ErrorKind {
    match kind {
        StoreErrorKind::NotFound => ErrorKind::NotFound,
        StoreErrorKind::Conflict => ErrorKind::Conflict,
        StoreErrorKind::Unsupported | StoreErrorKind::Invalid => ErrorKind::BadRequest,
        StoreErrorKind::Denied => ErrorKind::Permission,
        StoreErrorKind::Io => ErrorKind::StoreUnavailable,
    }
}

fn errno_kind(errno: i32) -> ErrorKind {
    match errno {
        libc::ENOENT => ErrorKind::NotFound,
        libc::EACCES | libc::EPERM => ErrorKind::Permission,
        libc::EBUSY | libc::EEXIST | libc::ENOTEMPTY => ErrorKind::Busy,
        libc::EINVAL | libc::ENOTDIR | libc::ENAMETOOLONG => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    }
}

impl From<FsError> for DaemonError {
    fn from(e: FsError) -> DaemonError {
        let kind = match e.root() {
            FsError::Store(s) => store_kind(s.kind),
            FsError::Chunk(ChunkError::Store { source, .. }) => store_kind(source.kind),
            FsError::Chunk(ChunkError::Timeout { .. }) => ErrorKind::StoreUnavailable,
            FsError::NotFound(_) => ErrorKind::NotFound,
            FsError::Conflict(_) => ErrorKind::Conflict,
            FsError::InvalidInput(_) => ErrorKind::BadRequest,
            FsError::Untrusted(_) => ErrorKind::Permission,
            FsError::Errno(n) => errno_kind(*n),
            // By errno, or by kind for an error rebuilt with a message (an unmount's EBUSY
            // with its hint, say).
            FsError::Io { source, .. } => io_kind(source),
            _ => ErrorKind::Internal,
        };
        DaemonError::new(kind, e.to_string())
    }
}

impl From<StoreError> for DaemonError {
    fn from(e: StoreError) -> DaemonError {
        DaemonError::new(store_kind(e.kind), e.to_string())
    }
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as Io;
    match (e.raw_os_error(), e.kind()) {
        (Some(n), _) => errno_kind(n),
        (None, Io::NotFound) => ErrorKind::NotFound,
        (None, Io::PermissionDenied) => ErrorKind::Permission,
        (None, Io::ResourceBusy | Io::AlreadyExists) => ErrorKind::Busy,
        (None, Io::InvalidInput) => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    }
}

impl From<std::io::Error> for DaemonError {
    fn from(e: std::io::Error) -> DaemonError {
        DaemonError::new(io_kind(&e), e.to_string())
    }
}

/// Adds what was being done to an error, keeping its kind (as `anyhow::Context` does).
pub trait Context<T> {
    fn context(self, context: impl fmt::Display) -> DaemonResult<T>;
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> DaemonResult<T>;
}

impl<T, E: Into<DaemonError>> Context<T> for Result<T, E> {
    fn context(self, context: impl fmt::Display) -> DaemonResult<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> DaemonResult<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_survive_context_and_the_wire() {
        let e: DaemonError = FsError::NotFound("dataset x:v1".into()).into();
        let e = Err::<(), _>(e).context("mounting /mnt").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "mounting /mnt: dataset x:v1");
        let wire = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<DaemonError>(&wire).unwrap(), e);

        let wrapped = strata_fs::error::Context::context(
            Err::<(), _>(FsError::Errno(libc::EBUSY)),
            "committing",
        )
        .unwrap_err();
        assert_eq!(DaemonError::from(wrapped).kind, ErrorKind::Busy);
        // An unmount's EBUSY, rebuilt with a hint (no errno left): still busy, so that
        // `strata run` asks again.
        let busy = FsError::io(
            "/mnt",
            std::io::Error::new(std::io::ErrorKind::ResourceBusy, "unmount: busy (hint)"),
        );
        assert_eq!(DaemonError::from(busy).kind, ErrorKind::Busy);
        let unknown: DaemonError =
            serde_json::from_str(r#"{"kind":"quota_exceeded","message":"m"}"#).unwrap();
        assert_eq!(unknown.kind, ErrorKind::Other);
    }
}
