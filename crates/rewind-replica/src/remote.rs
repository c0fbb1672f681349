//! The object store behind a replica URL, with a blocking API: every call runs on the remote's
//! own small runtime and is bounded by a timeout, so that a store that hangs (radosgw does when
//! its cluster is full) turns into an error rather than a stuck thread.
//!
//! `s3://BUCKET/PREFIX` takes endpoint, keys, region and allow-http from the usual `AWS_*`
//! environment variables, as S3 tools do; `file:///DIR` is a local or network directory
//! ([`crate::directory`], written to durably).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, PutPayload, RetryConfig};

use crate::directory::Directory;
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
    backend: Backend,
    /// Taken only by `drop`.
    runtime: Option<tokio::runtime::Runtime>,
    timeout: Duration,
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Without waiting for a blocking file call that timed out and still hangs (a dead
        // network mount): it holds nothing the next store or remote needs.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

enum Backend {
    Objects(Arc<dyn ObjectStore>),
    /// Blocking file I/O, run on the runtime's blocking threads.
    Directory(Arc<Directory>),
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish_non_exhaustive()
    }
}

/// What a request to either backend failed with.
enum Failure {
    NotFound,
    Other(String),
}

impl From<object_store::Error> for Failure {
    fn from(error: object_store::Error) -> Self {
        match error {
            object_store::Error::NotFound { .. } => Self::NotFound,
            other => Self::Other(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::NotFound => Self::NotFound,
            _ => Self::Other(error.to_string()),
        }
    }
}

/// Awaits `request` for at most `timeout`, naming the operation and key in any error.
async fn bounded<T, E: Into<Failure>>(
    timeout: Duration,
    operation: &'static str,
    key: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => match e.into() {
            Failure::NotFound => Err(Error::Missing { key: key.to_string() }),
            Failure::Other(reason) => Err(Error::Request { operation, key: key.to_string(), reason }),
        },
        Err(_) => Err(Error::Timeout { operation, key: key.to_string(), seconds: timeout.as_secs() }),
    }
}

/// Runs `io` on the directory for `key`, on the runtime's blocking threads.
async fn in_directory<T: Send + 'static>(
    directory: &Arc<Directory>,
    key: &str,
    io: impl FnOnce(&Directory, &str) -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let (directory, key) = (Arc::clone(directory), key.to_string());
    tokio::task::spawn_blocking(move || io(&directory, &key)).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
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
        let backend = match parsed.scheme() {
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
                Backend::Objects(match prefix.is_empty() {
                    true => Arc::new(s3),
                    false => Arc::new(PrefixStore::new(s3, prefix)),
                })
            }
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(bad_url(url, "a file URL names a local directory: file:///DIR"));
                }
                let dir = parsed.to_file_path().map_err(|()| bad_url(url, "not a local path"))?;
                let directory = Directory::open(dir.clone()).map_err(|e| Error::Store {
                    url: url.to_string(),
                    reason: format!("creating {}: {e}", dir.display()),
                })?;
                Backend::Directory(Arc::new(directory))
            }
            other => {
                return Err(bad_url(url, format!("unknown scheme {other:?}; use s3://BUCKET/PREFIX or file:///DIR")))
            }
        };
        Self::with_backend(url, backend, timeout)
    }

    /// A remote over any object store (tests use the in-memory one).
    pub fn with_store(url: &str, store: Arc<dyn ObjectStore>, timeout: Duration) -> Result<Self> {
        Self::with_backend(url, Backend::Objects(store), timeout)
    }

    fn with_backend(url: &str, backend: Backend, timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Store { url: url.to_string(), reason: format!("starting the I/O runtime: {e}") })?;
        Ok(Self { url: url.to_string(), backend, runtime: Some(runtime), timeout })
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.as_ref().expect("the runtime is taken only by drop").block_on(future)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn put_async(&self, key: &str, bytes: Bytes) -> Result<()> {
        let timeout = self.timeout;
        match &self.backend {
            Backend::Objects(store) => {
                let path = ObjectPath::from(key);
                bounded(timeout, "uploading", key, store.put(&path, PutPayload::from(bytes))).await.map(|_| ())
            }
            Backend::Directory(directory) => {
                let put = in_directory(directory, key, move |directory, key| directory.put(key, &bytes));
                bounded(timeout, "uploading", key, put).await
            }
        }
    }

    async fn get_async(&self, key: &str) -> Result<Bytes> {
        let timeout = self.timeout;
        match &self.backend {
            Backend::Objects(store) => {
                let path = ObjectPath::from(key);
                bounded(timeout, "downloading", key, async { store.get(&path).await?.bytes().await }).await
            }
            Backend::Directory(directory) => {
                let read = in_directory(directory, key, |directory, key| directory.get(key).map(Bytes::from));
                bounded(timeout, "downloading", key, read).await
            }
        }
    }

    pub fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.block_on(self.put_async(key, Bytes::from(data)))
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
        self.block_on(async {
            let mut uploads = futures::stream::iter(objects.map(|object| async move {
                let (key, bytes) = object?;
                let len = bytes.len() as u64;
                self.put_async(&key, bytes).await?;
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
        self.block_on(self.get_async(key))
    }

    /// Downloads `keys` a few at a time, handing each to `each` in the order given, until
    /// `each` returns false.
    pub fn get_each(&self, keys: &[String], mut each: impl FnMut(&str, Bytes) -> Result<bool>) -> Result<()> {
        self.block_on(async {
            let mut downloads =
                futures::stream::iter(keys.iter().map(|key| async move { (key, self.get_async(key).await) }))
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
        let timeout = self.timeout;
        self.block_on(async {
            match &self.backend {
                Backend::Objects(store) => {
                    let path = ObjectPath::from(prefix);
                    let listing = store
                        .list(Some(&path))
                        .map_ok(|meta| Listed { key: meta.location.to_string(), size: meta.size });
                    bounded(timeout, "listing", prefix, listing.try_collect::<Vec<_>>()).await
                }
                Backend::Directory(directory) => {
                    let listing = in_directory(directory, prefix, |directory, prefix| directory.list(prefix));
                    bounded(timeout, "listing", prefix, listing).await
                }
            }
        })
    }

    /// Deletes `key`; one already gone is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        let timeout = self.timeout;
        let deleted = self.block_on(async {
            match &self.backend {
                Backend::Objects(store) => {
                    bounded(timeout, "deleting", key, store.delete(&ObjectPath::from(key))).await
                }
                Backend::Directory(directory) => {
                    let deletion = in_directory(directory, key, |directory, key| directory.delete(key));
                    bounded(timeout, "deleting", key, deletion).await
                }
            }
        });
        match deleted {
            Err(Error::Missing { .. }) => Ok(()),
            other => other,
        }
    }
}
