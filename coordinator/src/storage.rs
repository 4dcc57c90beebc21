//! Object storage behind one trait: content-addressed keys (`chunks/ab/abcdef…`,
//! `indexes/…`), a filesystem backend by default and an S3-compatible one ([`S3Store`],
//! aws-sdk-s3) for production, which can also hand out presigned download URLs.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata as _, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;

use crate::config::S3Config;

/// Kinds of stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A chunk object.
    Chunk,
    /// A chunk index.
    Index,
}

impl ObjectKind {
    /// Name in keys and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chunk => "chunk",
            Self::Index => "index",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Chunk => "chunks",
            Self::Index => "indexes",
        }
    }
}

/// The key of an object: `chunks/ab/abcdef…`.
pub fn object_key(kind: ObjectKind, id_hex: &str) -> String {
    format!("{}/{}/{}", kind.dir(), &id_hex[..2.min(id_hex.len())], id_hex)
}

/// A stored object, possibly a byte range of it.
#[derive(Debug)]
pub struct Fetched {
    /// Bytes returned.
    pub bytes: Vec<u8>,
    /// Full object size.
    pub total: u64,
}

/// Object storage.
#[allow(async_fn_in_trait)]
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores `bytes` under `key` atomically (readers see all or nothing).
    fn put(&self, key: &str, bytes: Vec<u8>) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Reads `key`, optionally a byte range `[start, end)`. `Ok(None)` when missing.
    fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> impl std::future::Future<Output = io::Result<Option<Fetched>>> + Send;
}

/// Objects as files under a directory; writes go to a temp file, fsync, rename.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root` (created if missing).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }
}

impl ObjectStore for FsStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> io::Result<()> {
        let path = self.root.join(key);
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().ok_or_else(|| io::Error::other("object key has no parent"))?;
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), rand_suffix()));
            {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &path)?;
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> io::Result<Option<Fetched>> {
        let path = self.root.join(key);
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let total = bytes.len() as u64;
                let bytes = match range {
                    Some((start, end)) => bytes[start.min(total) as usize..end.min(total) as usize].to_vec(),
                    None => bytes,
                };
                Ok(Some(Fetched { bytes, total }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn rand_suffix() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// Time to set up a TCP (and TLS) connection to the object store before giving up.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-operation limit per attempt: objects are chunks (kilobytes to a few MiB) and
/// indexes, so a minute means the store is stuck, not slow.
const S3_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The S3 store cannot be set up from its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3SetupError {
    /// No static credentials were given.
    #[error(
        "S3 storage needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (storage.access_key_id, storage.secret_access_key)"
    )]
    MissingCredentials,
    /// The store refused the credentials (HTTP 401/403 on the bucket).
    #[error(
        "S3 refused access to bucket {bucket:?} at {endpoint} (HTTP {status}): check AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY, and that the key may s3:ListBucket, s3:GetObject and s3:PutObject on the bucket"
    )]
    AccessDenied {
        /// The bucket.
        bucket: String,
        /// The endpoint asked.
        endpoint: String,
        /// HTTP status answered.
        status: u16,
    },
    /// The bucket does not exist.
    #[error(
        "S3 bucket {bucket:?} does not exist at {endpoint}; create it first (the coordinator never creates buckets)"
    )]
    NoSuchBucket {
        /// The bucket.
        bucket: String,
        /// The endpoint asked.
        endpoint: String,
    },
    /// The store could not be asked (connection refused, TLS, timeout, unexpected answer).
    #[error("S3 bucket {bucket:?} at {endpoint} cannot be reached: {source}")]
    Unreachable {
        /// The bucket.
        bucket: String,
        /// The endpoint asked.
        endpoint: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Objects in an S3-compatible bucket (AWS S3, MinIO, Garage, R2, s3s…), signed with static
/// credentials. With a custom endpoint, requests use path-style addressing.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// For messages: the configured endpoint, or "AWS S3 (<region>)".
    endpoint: String,
    /// Empty, or ends with `/`.
    prefix: String,
}

impl S3Store {
    /// A client for `config`'s bucket. Makes no request: a wrong bucket or key shows on first use.
    ///
    /// # Errors
    /// [`S3SetupError::MissingCredentials`].
    pub fn new(config: &S3Config) -> Result<Self, S3SetupError> {
        use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
        use aws_smithy_http_client::tls;

        let (Some(key_id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) else {
            return Err(S3SetupError::MissingCredentials);
        };
        let credentials = Credentials::new(
            key_id,
            secret.expose(),
            config.session_token.as_ref().map(|t| t.expose().to_owned()),
            None,
            "flotilla-config",
        );
        // Built explicitly (rustls on ring, plain http too) instead of the SDK's default client,
        // which would compile aws-lc.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(S3_CONNECT_TIMEOUT)
            .operation_attempt_timeout(S3_ATTEMPT_TIMEOUT)
            .build();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(config.region().to_owned()))
            .credentials_provider(credentials)
            .timeout_config(timeouts)
            // Objects are content-addressed and verified against their ids on upload and on
            // the device; the SDK's default CRC trailers (aws-chunked uploads) are refused by
            // several S3-compatible stores, so checksums are sent only where S3 requires them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint).force_path_style(true);
        }
        let prefix = config.prefix.trim_matches('/');
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            endpoint: config.endpoint.clone().unwrap_or_else(|| format!("AWS S3 ({})", config.region())),
            prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
        })
    }

    /// Asks the store whether the bucket exists and the credentials are accepted (one
    /// HeadBucket request), so a misconfiguration stops start-up with a message that names
    /// it instead of failing every upload later.
    ///
    /// # Errors
    /// [`S3SetupError::AccessDenied`], [`S3SetupError::NoSuchBucket`] or
    /// [`S3SetupError::Unreachable`].
    pub async fn check(&self) -> Result<(), S3SetupError> {
        let (bucket, endpoint) = (self.bucket.clone(), self.endpoint.clone());
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            // HEAD answers have no body, so the status is all there is to go on.
            Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
                Some(status @ (401 | 403)) => Err(S3SetupError::AccessDenied { bucket, endpoint, status }),
                Some(404) => Err(S3SetupError::NoSuchBucket { bucket, endpoint }),
                _ => Err(S3SetupError::Unreachable { bucket, endpoint, source: s3_error(e) }),
            },
        }
    }

    /// The SDK client, for what the store itself does not do (creating a bucket in a test).
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The bucket's key for an object key (`object_key`), with the configured prefix.
    pub fn bucket_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A URL that GETs `key` without credentials until `ttl` has passed.
    ///
    /// # Errors
    /// `ttl` is over 7 days, or signing failed.
    pub async fn presigned_get(&self, key: &str, ttl: Duration) -> io::Result<String> {
        let presigning = PresigningConfig::expires_in(ttl).map_err(io::Error::other)?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.bucket_key(key))
            .presigned(presigning)
            .await
            .map_err(s3_error)?;
        Ok(request.uri().to_owned())
    }

    /// The object's size, `None` when it does not exist.
    async fn size(&self, bucket_key: &str) -> io::Result<Option<u64>> {
        match self.client.head_object().bucket(&self.bucket).key(bucket_key).send().await {
            Ok(head) => Ok(Some(head.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if matches!(e.as_service_error(), Some(HeadObjectError::NotFound(_))) => Ok(None),
            Err(e) => Err(s3_error(e)),
        }
    }
}

/// An SDK error with its whole chain of causes (the SDK's `Display` is only the top one).
fn s3_error<E, R>(e: SdkError<E, R>) -> io::Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    io::Error::other(DisplayErrorContext(e).to_string())
}

/// The `Range` header for `[start, end)`; `end == u64::MAX` means "to the end".
fn range_header(start: u64, end: u64) -> String {
    if end == u64::MAX { format!("bytes={start}-") } else { format!("bytes={start}-{}", end - 1) }
}

/// The full size from a `Content-Range: bytes a-b/total` value.
fn content_range_total(v: &str) -> Option<u64> {
    v.rsplit_once('/')?.1.trim().parse().ok()
}

impl ObjectStore for S3Store {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> io::Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.bucket_key(key))
            .content_type("application/octet-stream")
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(s3_error)?;
        Ok(())
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> io::Result<Option<Fetched>> {
        let bucket_key = self.bucket_key(key);
        // An empty range cannot be expressed in a Range header; the caller only needs the size.
        if let Some((start, end)) = range
            && end <= start
        {
            return Ok(self.size(&bucket_key).await?.map(|total| Fetched { bytes: Vec::new(), total }));
        }
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&bucket_key)
            .set_range(range.map(|(start, end)| range_header(start, end)));
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if matches!(e.as_service_error(), Some(GetObjectError::NoSuchKey(_))) => return Ok(None),
            // A range that starts past the end: report the size, the caller answers 416.
            Err(e)
                if e.code() == Some("InvalidRange") || e.raw_response().is_some_and(|r| r.status().as_u16() == 416) =>
            {
                return Ok(self.size(&bucket_key).await?.map(|total| Fetched { bytes: Vec::new(), total }));
            }
            Err(e) => return Err(s3_error(e)),
        };
        let ranged_total = out.content_range().and_then(content_range_total);
        let length = out.content_length();
        let bytes = out.body.collect().await.map_err(io::Error::other)?.into_bytes().to_vec();
        Ok(Some(match (range, ranged_total) {
            (Some(_), Some(total)) => Fetched { bytes, total },
            // A store that ignored the Range header sent the whole object: cut it here.
            (Some((start, end)), None) => {
                let total = bytes.len() as u64;
                let bytes = bytes[start.min(total) as usize..end.min(total) as usize].to_vec();
                Fetched { bytes, total }
            }
            (None, _) => {
                let total = length.map_or(bytes.len() as u64, |l| l.max(0) as u64);
                Fetched { bytes, total }
            }
        }))
    }
}

/// The configured store (an enum rather than a trait object: the trait's futures are `Send`
/// generics, and there are few backends).
#[derive(Debug, Clone)]
pub enum Storage {
    /// Filesystem.
    Fs(FsStore),
    /// S3-compatible bucket.
    S3(S3Store),
}

impl Storage {
    /// A URL that GETs `key` directly from the store until `ttl` has passed; `None` when the
    /// store has no such URLs (filesystem).
    ///
    /// # Errors
    /// Signing failed (or `ttl` is over 7 days).
    pub async fn presigned_get(&self, key: &str, ttl: Duration) -> io::Result<Option<String>> {
        match self {
            Self::Fs(_) => Ok(None),
            Self::S3(s) => s.presigned_get(key, ttl).await.map(Some),
        }
    }
}

impl ObjectStore for Storage {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Self::Fs(s) => s.put(key, bytes).await,
            Self::S3(s) => s.put(key, bytes).await,
        }
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> io::Result<Option<Fetched>> {
        match self {
            Self::Fs(s) => s.get(key, range).await,
            Self::S3(s) => s.get(key, range).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

    #[test]
    fn keys_fan_out_by_the_first_byte() {
        assert_eq!(object_key(ObjectKind::Chunk, ID), format!("chunks/ab/{ID}"));
        assert_eq!(object_key(ObjectKind::Index, ID), format!("indexes/ab/{ID}"));
    }

    #[test]
    fn s3_keys_carry_the_prefix_once() {
        let store = |prefix: &str| {
            S3Store::new(&S3Config {
                bucket: "b".into(),
                endpoint: Some("http://127.0.0.1:9".into()),
                prefix: prefix.into(),
                access_key_id: Some("k".into()),
                secret_access_key: Some(crate::config::Secret::new("s")),
                ..S3Config::default()
            })
            .expect("store")
        };
        let key = object_key(ObjectKind::Chunk, ID);
        assert_eq!(store("").bucket_key(&key), format!("chunks/ab/{ID}"));
        assert_eq!(store("/fleet/a/").bucket_key(&key), format!("fleet/a/chunks/ab/{ID}"));
        assert_eq!(store("fleet").bucket_key(&key), format!("fleet/chunks/ab/{ID}"));
    }

    #[test]
    fn s3_needs_credentials() {
        let err = S3Store::new(&S3Config { bucket: "b".into(), ..S3Config::default() });
        assert!(matches!(err, Err(S3SetupError::MissingCredentials)));
    }

    #[test]
    fn ranges_become_inclusive_headers() {
        assert_eq!(range_header(0, 10), "bytes=0-9");
        assert_eq!(range_header(5, u64::MAX), "bytes=5-");
        assert_eq!(content_range_total("bytes 0-9/1234"), Some(1234));
        assert_eq!(content_range_total("bytes */1234"), Some(1234));
        assert_eq!(content_range_total("bytes 0-9/*"), None);
    }
}
