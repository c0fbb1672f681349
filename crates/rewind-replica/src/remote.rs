//! The object store behind a replica URL, with a blocking API: every call runs on the remote's
//! own small runtime and is bounded by a timeout, so that a store that hangs (radosgw does when
//! its cluster is full) turns into an error rather than a stuck thread.
//!
//! `s3://BUCKET/PREFIX` takes endpoint, keys, region and allow-http from the usual `AWS_*`
//! environment variables, as S3 tools do; `file:///DIR` is a local or network directory.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, PutPayload, RetryConfig};

use crate::error::{Error, Result};

/// The longest any one request may take, retries included. An object is at most a few MiB.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Downloads in flight at once during a recovery.
const PARALLEL_DOWNLOADS: usize = 4;
/// Uploads in flight at once while shipping a backlog.
pub const PARALLEL_UPLOADS: usize = 4;

/// One object's key (relative to the replica's prefix) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// A replica's object store: a bucket and prefix, or a directory.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Awaits `request` for at most `timeout`, naming the operation and key in any error.
async fn bounded<T>(
    timeout: Duration,
    operation: &'static str,
    key: &str,
    request: impl std::future::Future<Output = object_store::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(object_store::Error::NotFound { .. })) => Err(Error::Missing { key: key.to_string() }),
        Ok(Err(e)) => Err(Error::Request { operation, key: key.to_string(), reason: e.to_string() }),
        Err(_) => Err(Error::Timeout { operation, key: key.to_string(), seconds: timeout.as_secs() }),
    }
}

fn bad_url(url: &str, reason: impl Into<String>) -> Error {
    Error::BadUrl { url: url.to_string(), reason: reason.into() }
}

impl Remote {
    /// Opens the store a URL names (no request is made yet).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with_timeout(url, DEFAULT_REQUEST_TIMEOUT)
    }

    /// [`open`](Self::open) with another bound on each request.
    pub fn open_with_timeout(url: &str, timeout: Duration) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| bad_url(url, e.to_string()))?;
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" => {
                let bucket = parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| bad_url(url, "no bucket"))?;
                let retry = RetryConfig { backoff: BackoffConfig::default(), max_retries: 3, retry_timeout: timeout };
                // Set key by key: `with_client_options` would drop what the environment set
                // (AWS_ALLOW_HTTP among them).
                let connect_timeout = timeout.min(Duration::from_secs(5));
                let mut s3 = AmazonS3Builder::from_env();
                if std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_none() {
                    // Every object carries CRC32C checksums that its readers check, so the
                    // signature's SHA-256 of each body (computed here and again by the
                    // gateway) buys nothing but CPU: under load it took 40% of the shipper's
                    // time and much of radosgw's. AWS_UNSIGNED_PAYLOAD=false signs them.
                    s3 = s3.with_unsigned_payload(true);
                }
                let s3 = s3
                    .with_bucket_name(bucket)
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        format!("{}ms", timeout.as_millis()),
                    )
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                        format!("{}ms", connect_timeout.as_millis()),
                    )
                    .with_retry(retry)
                    .build()
                    .map_err(|e| Error::Store { url: url.to_string(), reason: e.to_string() })?;
                let prefix = parsed.path().trim_matches('/');
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix))
                }
            }
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(bad_url(url, "a file URL names a local directory: file:///DIR"));
                }
                let dir = parsed.to_file_path().map_err(|()| bad_url(url, "not a local path"))?;
                std::fs::create_dir_all(&dir).map_err(|e| Error::Store {
                    url: url.to_string(),
                    reason: format!("creating {}: {e}", dir.display()),
                })?;
                let local = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| Error::Store { url: url.to_string(), reason: e.to_string() })?;
                Arc::new(local)
            }
            other => {
                return Err(bad_url(url, format!("unknown scheme {other:?}; use s3://BUCKET/PREFIX or file:///DIR")))
            }
        };
        Self::with_store(url, store, timeout)
    }

    /// A remote over any object store (tests use the in-memory one).
    pub fn with_store(url: &str, store: Arc<dyn ObjectStore>, timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Store { url: url.to_string(), reason: format!("starting the I/O runtime: {e}") })?;
        Ok(Self { url: url.to_string(), store, runtime, timeout })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs one request with the timeout.
    fn call<T>(
        &self,
        operation: &'static str,
        key: &str,
        request: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        self.runtime.block_on(bounded(self.timeout, operation, key, request))
    }

    pub fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let path = ObjectPath::from(key);
        self.call("uploading", key, self.store.put(&path, PutPayload::from(data))).map(|_| ())
    }

    /// Uploads `objects` (key and bytes, or an error that ends the uploads), a few at a time:
    /// the next object is taken from the iterator (which may read it from a disk) only when an
    /// upload slot is free, so reading overlaps uploading and at most a few objects are held.
    /// `each` hears of every one stored.
    pub fn put_each(
        &self,
        objects: impl Iterator<Item = Result<(String, Bytes)>>,
        mut each: impl FnMut(&str, u64),
    ) -> Result<()> {
        let timeout = self.timeout;
        self.runtime.block_on(async {
            let mut uploads = futures::stream::iter(objects.map(|object| async move {
                let (key, bytes) = object?;
                let len = bytes.len() as u64;
                let path = ObjectPath::from(key.as_str());
                bounded(timeout, "uploading", &key, self.store.put(&path, PutPayload::from(bytes))).await?;
                Ok::<_, Error>((key, len))
            }))
            .buffer_unordered(PARALLEL_UPLOADS);
            while let Some(stored) = uploads.next().await {
                let (key, len) = stored?;
                each(&key, len);
            }
            Ok(())
        })
    }

    pub fn get(&self, key: &str) -> Result<Bytes> {
        let path = ObjectPath::from(key);
        self.call("downloading", key, async { self.store.get(&path).await?.bytes().await })
    }

    /// Downloads `keys` a few at a time, handing each to `each` in the order given, until
    /// `each` returns false.
    pub fn get_each(&self, keys: &[String], mut each: impl FnMut(&str, Bytes) -> Result<bool>) -> Result<()> {
        let timeout = self.timeout;
        self.runtime.block_on(async {
            let mut downloads = futures::stream::iter(keys.iter().map(|key| async move {
                let path = ObjectPath::from(key.as_str());
                let request = async { self.store.get(&path).await?.bytes().await };
                (key, bounded(timeout, "downloading", key, request).await)
            }))
            .buffered(PARALLEL_DOWNLOADS);
            while let Some((key, result)) = downloads.next().await {
                if !each(key, result?)? {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Every object under `prefix` (a folder such as `journal/`).
    pub fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let path = ObjectPath::from(prefix);
        let listing =
            self.store.list(Some(&path)).map_ok(|meta| Listed { key: meta.location.to_string(), size: meta.size });
        self.call("listing", prefix, listing.try_collect::<Vec<_>>())
    }

    /// Deletes `key`; one already gone is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        let path = ObjectPath::from(key);
        match self.call("deleting", key, self.store.delete(&path)) {
            Err(Error::Missing { .. }) => Ok(()),
            other => other,
        }
    }
}
