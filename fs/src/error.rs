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
    /// A filesystem call refused for the reason its errno gives (EEXIST, ENOTEMPTY...).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
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
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
