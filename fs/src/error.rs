use std::path::PathBuf;

use cache::ChunkError;
use strata_cache_format::Digest;
use strata_store::StoreError;

use crate::manifest::ManifestError;

/// Errors of the layer side of strata. Each carries the path, key or digest it is about.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer {digest}: {source}")]
    Manifest {
        digest: Digest,
        #[source]
        source: ManifestError,
    },
    #[error("layer {digest} in {store} is unreadable: {reason}")]
    CorruptLayer {
        digest: Digest,
        store: String,
        reason: String,
    },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A signed ref that does not verify (or an unsigned one where signatures are required).
    #[error("{0}")]
    Untrusted(String),
    /// A filesystem call refused for the reason its errno gives (EEXIST, ENOTEMPTY...).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// What was being done when `inner` happened; the kind (and errno) stay `inner`'s.
    #[error("{context}: {inner}")]
    Context {
        context: String,
        inner: Box<FsError>,
    },
}

impl FsError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> FsError {
        FsError::Io {
            path: path.into(),
            source,
        }
    }

    /// The errno a filesystem caller sees for this error. Everything that is not about the
    /// caller's request (store trouble, corrupt data) is EIO.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound(_) => libc::ENOENT,
            FsError::Errno(e) => *e,
            FsError::InvalidInput(_) => libc::EINVAL,
            FsError::Untrusted(_) => libc::EACCES,
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Context { inner, .. } => inner.errno(),
            _ => libc::EIO,
        }
    }

    /// How loudly a server logs this error when it answers a filesystem call with it: a
    /// caller's own mistake (ENOENT, EEXIST, a full quota) is routine; store trouble that a
    /// retry may fix is a warning; corrupt data, or a local disk failing, is an error.
    pub fn level(&self) -> tracing::Level {
        use tracing::Level;
        match self {
            FsError::Context { inner, .. } => inner.level(),
            FsError::Errno(_)
            | FsError::NotFound(_)
            | FsError::InvalidInput(_)
            | FsError::Conflict(_) => Level::DEBUG,
            // Someone may have tampered with the store.
            FsError::Untrusted(_) => Level::WARN,
            // What the request itself asked wrongly, or a limit it ran into, as the upper's
            // own filesystem answered it; anything else there is a disk failing.
            FsError::Io { source, .. } => match source.raw_os_error() {
                Some(
                    libc::ENOSPC
                    | libc::EDQUOT
                    | libc::ENOENT
                    | libc::EEXIST
                    | libc::EINVAL
                    | libc::EOPNOTSUPP
                    | libc::EFBIG
                    | libc::EPERM
                    | libc::EACCES
                    | libc::ENOTEMPTY
                    | libc::EXDEV
                    | libc::ENAMETOOLONG
                    | libc::ENOTDIR
                    | libc::EISDIR
                    | libc::ELOOP
                    | libc::ERANGE
                    | libc::E2BIG
                    | libc::ENODATA,
                ) => Level::DEBUG,
                _ => Level::ERROR,
            },
            FsError::Store(_) => Level::WARN,
            FsError::Chunk(ChunkError::Store { .. } | ChunkError::Timeout { .. }) => Level::WARN,
            FsError::Chunk(_) | FsError::Manifest { .. } | FsError::CorruptLayer { .. } => {
                Level::ERROR
            }
        }
    }

    /// The error under any [`FsError::Context`] layers.
    pub fn root(&self) -> &FsError {
        match self {
            FsError::Context { inner, .. } => inner.root(),
            e => e,
        }
    }
}

/// Says what was being done when an error happened, as `anyhow::Context` does, keeping the
/// error's kind.
pub trait Context<T> {
    fn context(self, context: impl std::fmt::Display) -> FsResult<T>;
    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> FsResult<T>;
}

impl<T, E: Into<FsError>> Context<T> for Result<T, E> {
    fn context(self, context: impl std::fmt::Display) -> FsResult<T> {
        self.map_err(|e| FsError::Context {
            context: context.to_string(),
            inner: Box::new(e.into()),
        })
    }

    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> FsResult<T> {
        self.map_err(|e| FsError::Context {
            context: f().to_string(),
            inner: Box::new(e.into()),
        })
    }
}

pub type FsResult<T> = Result<T, FsError>;
