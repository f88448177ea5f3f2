//! `s3://bucket/prefix`: the store on S3 or an S3-compatible server (Garage, MinIO, R2...).
//!
//! Refs move by conditional writes (`If-None-Match: *` to create, `If-Match: <etag>` to
//! replace). Some servers accept those headers and ignore them (Garage 2.x), which would turn a
//! compare-and-swap into a blind overwrite. So the first compare-and-swap probes the server
//! once, and on a server that ignores conditions strata refuses to replace an existing ref
//! unless the user declared a single writer ([`StoreOptions::single_writer`]).

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::{check_key, Store, StoreError, StoreErrorKind, StoreOptions, StoreResult, Version};

#[derive(Debug)]
pub struct S3Store {
    url: String,
    client: Client,
    bucket: String,
    /// Key prefix inside the bucket, empty or ending in `/`.
    prefix: String,
    single_writer: bool,
    honors_conditions: OnceCell<bool>,
}

impl S3Store {
    pub async fn open(
        url: &str,
        bucket: &str,
        prefix: &str,
        options: &StoreOptions,
    ) -> StoreResult<S3Store> {
        let region = match &options.region {
            Some(r) => RegionProviderChain::first_try(Region::new(r.clone())),
            None => RegionProviderChain::default_provider(),
        }
        .or_else(Region::new("us-east-1"));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .operation_timeout(Duration::from_secs(120))
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(2)),
            )
            // Some S3-compatible servers reject the SDK's default CRC32 headers.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        let endpoint = options
            .endpoint_url
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .filter(|e| !e.is_empty());
        if let Some(profile) = &options.profile {
            // That profile's credentials and nothing else: the default chain would take keys
            // from the environment (the daemon's own) before the profile, or fall through to
            // the host's role when the profile has none.
            loader = loader.profile_name(profile).credentials_provider(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .profile_name(profile)
                    .build(),
            );
        }
        if let Some((id, secret)) = &options.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id,
                secret,
                None,
                None,
                "strata-options",
            ));
        }
        if let Some(endpoint) = &endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let sdk_config = loader.load().await;
        let s3_config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .force_path_style(endpoint.is_some())
            .build();
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", prefix.trim_matches('/'))
        };
        Ok(S3Store {
            url: url.to_string(),
            client: Client::from_conf(s3_config),
            bucket: bucket.to_string(),
            prefix,
            single_writer: options.single_writer,
            honors_conditions: OnceCell::new(),
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn error<E, R>(&self, op: &'static str, key: &str, err: SdkError<E, R>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static + HttpStatus,
    {
        let status = err.raw_response().map(|r| r.status_code());
        let code = err.as_service_error().and_then(|e| e.code());
        let kind = match status {
            Some(404) if code == Some("NoSuchBucket") => StoreErrorKind::Invalid,
            Some(404) => StoreErrorKind::NotFound,
            Some(401) | Some(403) => StoreErrorKind::Denied,
            Some(400) => StoreErrorKind::Invalid,
            Some(412) | Some(409) => StoreErrorKind::Conflict,
            _ if code == Some("NoSuchKey") => StoreErrorKind::NotFound,
            _ => StoreErrorKind::Io,
        };
        // The server's own words (code and message) when it sent them: the SDK's rendering
        // of a service error is a dump of the whole response.
        let message = match (err.as_service_error(), status) {
            (Some(e), Some(status)) => match (e.code(), e.message()) {
                (Some(code), Some(m)) => format!("HTTP {status} {code}: {m}"),
                (Some(code), None) => format!("HTTP {status} {code}"),
                _ => format!("HTTP {status}"),
            },
            _ => DisplayErrorContext(&err).to_string(),
        };
        StoreError::new(&self.url, op, key, kind, message)
    }

    async fn read_body(&self, key: &str, body: ByteStream) -> StoreResult<Bytes> {
        Ok(join(self.read_pieces(key, body, u64::MAX).await?))
    }

    /// A response body as the pieces it arrived in (none empty). More than `limit` bytes is
    /// an error: a ranged GET answered with more than the range (a server that ignored the
    /// Range header and sent the whole object) is refused before it is all in memory.
    async fn read_pieces(
        &self,
        key: &str,
        mut body: ByteStream,
        limit: u64,
    ) -> StoreResult<Vec<Bytes>> {
        let mut pieces = Vec::new();
        let mut total = 0u64;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| {
                StoreError::new(
                    &self.url,
                    "get",
                    key,
                    StoreErrorKind::Io,
                    format!("reading body: {e}"),
                )
            })?;
            total += piece.len() as u64;
            if total > limit {
                return Err(StoreError::new(
                    &self.url,
                    "get",
                    key,
                    StoreErrorKind::Unsupported,
                    format!("asked for {limit} bytes, the server sent more (it ignores Range)"),
                ));
            }
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
        Ok(pieces)
    }

    /// Calls `each` with every object under `prefix` (its key in this store, and the listing's
    /// entry), page by page.
    async fn each_listed(
        &self,
        prefix: &str,
        mut each: impl FnMut(&str, &aws_sdk_s3::types::Object) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full_key(prefix))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("list", prefix, e))?;
            for obj in page.contents() {
                if let Some(key) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                    each(key, obj)?;
                }
            }
        }
        Ok(())
    }

    /// Probes once whether the server enforces `If-None-Match: *` and `If-Match`: write a
    /// fresh key twice with the first condition, then once with a wrong ETag; an honest
    /// server refuses both later writes.
    async fn honors_conditions(&self) -> StoreResult<bool> {
        self.honors_conditions
            .get_or_try_init(|| async {
                let key = format!(
                    "_strata/probe/{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0)
                );
                let full = self.full_key(&key);
                let put = || {
                    self.client
                        .put_object()
                        .bucket(&self.bucket)
                        .key(&full)
                        .if_none_match("*")
                        .body(ByteStream::from_static(b"probe"))
                        .send()
                };
                // A server that rejects the header outright (501) does not do conditions.
                if let Err(e) = put().await {
                    let err = self.error("probe conditional write", &key, e);
                    if err.message.contains("HTTP 501") {
                        warn_unconditional(&self.url);
                        return Ok(false);
                    }
                    return Err(err);
                }
                let refused = |result: Result<_, _>| match result {
                    Ok(_) => Ok(false),
                    Err(e) => match self.error("probe conditional write", &key, e) {
                        err if err.kind == StoreErrorKind::Conflict => Ok(true),
                        // 501 NotImplemented and friends: the header is not supported.
                        err if err.message.contains("HTTP 501") => Ok(false),
                        err => Err(err),
                    },
                };
                // Both conditions refs rely on: create-only, and replace-if-unchanged (some
                // servers honour one and ignore the other).
                let probed = async {
                    if !refused(put().await)? {
                        return Ok(false);
                    }
                    let replace = self
                        .client
                        .put_object()
                        .bucket(&self.bucket)
                        .key(&full)
                        .if_match("\"strata-probe-not-an-etag\"")
                        .body(ByteStream::from_static(b"probe"))
                        .send()
                        .await;
                    match refused(replace) {
                        // Any other refusal of a wrong ETag (a 400, say) is no promise that
                        // a right one is checked.
                        Err(e) if e.kind != StoreErrorKind::Io => {
                            tracing::warn!(store = %self.url, "If-Match probe: {e}");
                            Ok(false)
                        }
                        other => other,
                    }
                }
                .await;
                let _ = self.delete(&key).await;
                let honored = probed?;
                if !honored {
                    warn_unconditional(&self.url);
                }
                Ok(honored)
            })
            .await
            .copied()
    }
}

fn warn_unconditional(url: &str) {
    tracing::warn!(
        store = %url,
        "store ignores conditional writes; existing refs can only be moved with --single-writer"
    );
}

/// The HTTP status of a raw response, whatever the SDK's response type.
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

#[async_trait]
impl Store for S3Store {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        check_key(&self.url, "get", key)?;
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("get", key, e))?;
        self.read_body(key, resp.body).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        Ok(join(self.get_range_pieces(key, range).await?))
    }

    async fn get_range_pieces(&self, key: &str, range: Range<u64>) -> StoreResult<Vec<Bytes>> {
        check_key(&self.url, "get", key)?;
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            // Asking past the end of an object is an empty read, as with the local store.
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(416) => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(self.error("get", key, e)),
        };
        self.read_pieces(key, resp.body, range.end - range.start)
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        check_key(&self.url, "head", key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(resp) => Ok(Some(resp.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => {
                let err = self.error("head", key, e);
                if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        check_key(&self.url, "put", key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
        Ok(())
    }

    async fn get_versioned(&self, key: &str) -> StoreResult<Option<(Bytes, Version)>> {
        check_key(&self.url, "get", key)?;
        let resp = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let err = self.error("get", key, e);
                return if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                };
            }
        };
        let etag = resp.e_tag().unwrap_or_default().to_string();
        Ok(Some((self.read_body(key, resp.body).await?, Version(etag))))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Version>,
        data: Bytes,
    ) -> StoreResult<Version> {
        check_key(&self.url, "compare-and-swap", key)?;
        let honored = self.honors_conditions().await?;
        if !honored {
            // Without server-side conditions the best we can do is check, then write. That is
            // only safe when nobody else writes, which the user must say.
            let current = self.get_versioned(key).await?.map(|(_, v)| v);
            if current.as_ref() != expected {
                return Err(StoreError::new(
                    &self.url,
                    "compare-and-swap",
                    key,
                    StoreErrorKind::Conflict,
                    format!("expected version {expected:?}, found {current:?}"),
                ));
            }
            if expected.is_some() && !self.single_writer {
                return Err(StoreError::new(
                    &self.url,
                    "compare-and-swap",
                    key,
                    StoreErrorKind::Unsupported,
                    "this store ignores conditional writes (If-Match), so replacing an existing \
                     ref could silently lose a concurrent update; pass --single-writer if only \
                     one writer updates refs in this store",
                ));
            }
        }
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(data));
        if honored {
            req = match expected {
                Some(v) => req.if_match(&v.0),
                None => req.if_none_match("*"),
            };
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.error("compare-and-swap", key, e))?;
        Ok(Version(resp.e_tag().unwrap_or_default().to_string()))
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        self.each_listed(prefix, |key, _| {
            out.push(key.to_string());
            Ok(())
        })
        .await?;
        out.sort();
        Ok(out)
    }

    async fn list_info(&self, prefix: &str) -> StoreResult<Vec<crate::ObjectInfo>> {
        let mut out = Vec::new();
        self.each_listed(prefix, |key, obj| {
            // A listing without a size or time is the server's fault; say so rather than
            // guess (a guessed time could make garbage collection sweep a fresh object).
            let missing = |what| {
                StoreError::new(
                    &self.url,
                    "list",
                    key,
                    StoreErrorKind::Io,
                    format!("the listing gave no {what}"),
                )
            };
            let size = obj.size().ok_or_else(|| missing("size"))?;
            let modified = obj
                .last_modified()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                .ok_or_else(|| missing("time"))?;
            out.push(crate::ObjectInfo {
                key: key.to_string(),
                size: u64::try_from(size).map_err(|_| missing("valid size"))?,
                modified,
            });
            Ok(())
        })
        .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(&self.url, "delete", key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("delete", key, e))?;
        Ok(())
    }
}

/// Pieces of a body in one buffer (a single piece as it is, without a copy).
fn join(mut pieces: Vec<Bytes>) -> Bytes {
    match pieces.len() {
        0 => Bytes::new(),
        1 => pieces.pop().expect("one piece"),
        _ => {
            let mut joined = bytes::BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
            pieces.iter().for_each(|p| joined.extend_from_slice(p));
            joined.freeze()
        }
    }
}
