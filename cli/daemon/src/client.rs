//! A client of the daemon's control socket, for the `strata` command and for platforms that
//! drive a daemon from their own programs.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{DaemonError, ErrorKind};
use crate::protocol::{
    decode_reply, encode_request, CommitReply, MountInfo, MountSpec, ReplyError, Request,
    StatsReply,
};

/// What went wrong asking the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket, or it may not be used.
    #[error("cannot reach the strata daemon at {}: {error}{hint}", socket.display())]
    Unreachable {
        socket: PathBuf,
        error: std::io::Error,
        hint: &'static str,
    },
    /// The connection failed half way.
    #[error("talking to the strata daemon at {}: {error}", socket.display())]
    Io {
        socket: PathBuf,
        error: std::io::Error,
    },
    /// The daemon closed the connection without a reply.
    #[error("the daemon closed the connection without a reply (see its log)")]
    NoReply,
    /// The request cannot be written (a path that is not UTF-8).
    #[error("the request cannot be sent: {0}")]
    Encode(String),
    /// The daemon answered with an error, or something that is not an answer.
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

impl ClientError {
    /// The daemon's error, when it answered with one.
    pub fn daemon_error(&self) -> Option<&DaemonError> {
        match self {
            ClientError::Reply(ReplyError::Daemon(e)) => Some(e),
            _ => None,
        }
    }

    /// What kind of failure: the daemon's kind, or the one the client saw.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Reply(ReplyError::Daemon(e)) => e.kind,
            ClientError::Reply(ReplyError::Version { .. }) => ErrorKind::UnsupportedVersion,
            ClientError::Unreachable { error, .. }
                if error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ErrorKind::Permission
            }
            ClientError::Encode(_) => ErrorKind::BadRequest,
            _ => ErrorKind::Internal,
        }
    }
}

/// Talks to the daemon listening on one socket; each call is one connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Mounts what `spec` says; the reply describes the mount.
    pub async fn mount(&self, spec: MountSpec) -> Result<MountInfo, ClientError> {
        self.call(&Request::Mount(spec)).await
    }

    /// Unmounts; a volume mount's reply comes once its changes are committed (or kept, which
    /// `commit_error` says).
    pub async fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<MountInfo, ClientError> {
        let request = Request::Unmount {
            mountpoint: mountpoint.to_path_buf(),
            lazy,
        };
        self.call(&request).await
    }

    /// Commits a volume mount's changes so far; the mount goes on.
    pub async fn commit(&self, mountpoint: &Path) -> Result<CommitReply, ClientError> {
        let request = Request::Commit {
            mountpoint: mountpoint.to_path_buf(),
        };
        self.call(&request).await
    }

    pub async fn mounts(&self) -> Result<Vec<MountInfo>, ClientError> {
        self.call(&Request::Mounts).await
    }

    pub async fn stats(&self) -> Result<StatsReply, ClientError> {
        self.call(&Request::Stats).await
    }

    /// Sends one request and returns the reply's value, or the daemon's error.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<T, ClientError> {
        let line = encode_request(request).map_err(|e| ClientError::Encode(e.to_string()))?;
        let stream = UnixStream::connect(&self.socket).await.map_err(|error| {
            let hint = match error.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    " (is `strata daemon` running? `strata mount --foreground` works without it)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    " (the daemon socket is for root, the platform group and tenants' agents)"
                }
                _ => "",
            };
            ClientError::Unreachable {
                socket: self.socket.clone(),
                error,
                hint,
            }
        })?;
        let io = |error| ClientError::Io {
            socket: self.socket.clone(),
            error,
        };
        let (read, mut write) = stream.into_split();
        write.write_all(&line).await.map_err(io)?;
        let mut reply = String::new();
        BufReader::new(read)
            .read_line(&mut reply)
            .await
            .map_err(io)?;
        if reply.is_empty() {
            return Err(ClientError::NoReply);
        }
        Ok(decode_reply(&reply)?)
    }
}
