//! Where a template comes from: an `object_store` client and the object's path, built from the
//! copy Job's arguments and the credentials in its environment.

use std::sync::Arc;

use base64::Engine;
use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectMeta, RetryConfig};
use object_store::{ObjectStore, ObjectStoreExt};

use crate::address::AddressPolicy;
use crate::address::guard::GuardedConnector;
use crate::env::{
    HTTP_PASSWORD, HTTP_TOKEN, HTTP_USERNAME, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY,
    S3_SESSION_TOKEN,
};
use crate::stall::StallLimit;
use crate::{CopyArgs, CopyError};

/// A readable object.
pub struct Source {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    /// For messages: the URL or `s3://bucket/key`, never credentials.
    pub display: String,
    /// How long the source may send nothing before the attempt fails.
    pub stall: StallLimit,
}

impl Source {
    /// The object as a HEAD request sees it: its size (what the copy asks its store to
    /// reserve) and the version (ETag, S3 versionId) a parallel download pins its parts to.
    pub async fn head(&self) -> Result<ObjectMeta, CopyError> {
        self.stall
            .wait(&self.display, 0, self.store.head(&self.path))
            .await?
            .map_err(|e| CopyError::from_source(&self.display, e))
    }
}

/// Builds the source the arguments name.
pub fn open(args: &CopyArgs) -> Result<Source, CopyError> {
    let policy = Arc::new(AddressPolicy::new(args.allow_internal_address.clone()));
    let (store, path, display) = match (&args.http_url, &args.s3_bucket, &args.s3_key) {
        (Some(url), None, None) => open_http(url, policy)?,
        (None, Some(bucket), Some(key)) => open_s3(args, bucket, key, policy)?,
        _ => {
            return Err(CopyError::InvalidArguments(
                "give either --http-url, or --s3-bucket with --s3-key".into(),
            ));
        }
    };
    Ok(Source {
        store,
        path,
        display,
        stall: StallLimit::from_seconds(args.stall_seconds),
    })
}

/// Timeout to connect to a stalled peer; none for a large body, which is streamed.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout_disabled()
        .with_allow_http(true)
}

/// Every source is read through this client: the internal-address rule is applied to every
/// request, redirect, resolved name and connection (see `address::guard`).
fn connector(policy: Arc<AddressPolicy>, default_headers: HeaderMap) -> GuardedConnector {
    GuardedConnector {
        policy,
        default_headers,
        connect_timeout: CONNECT_TIMEOUT,
    }
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(60),
        ..RetryConfig::default()
    }
}

/// A source's client, its object's path, and its name for messages.
type Opened = (Arc<dyn ObjectStore>, Path, String);

fn open_http(url: &str, policy: Arc<AddressPolicy>) -> Result<Opened, CopyError> {
    let parsed = url::Url::parse(url)
        .map_err(|e| CopyError::InvalidArguments(format!("--http-url {url}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CopyError::InvalidArguments(format!(
            "--http-url {url}: only http and https are supported"
        )));
    }
    let base = parsed[..url::Position::BeforePath].to_owned();
    let path = Path::from_url_path(parsed.path())
        .map_err(|e| CopyError::InvalidArguments(format!("--http-url {url}: {e}")))?;
    let mut headers = HeaderMap::new();
    if let Some(header) = http_authorization()? {
        headers.insert(AUTHORIZATION, header);
    }
    let store = HttpBuilder::new()
        .with_url(base)
        .with_client_options(client_options())
        .with_http_connector(connector(policy, headers))
        .with_retry(retry_config())
        .build()
        .map_err(|e| CopyError::InvalidArguments(format!("--http-url {url}: {e}")))?;
    let mut display = parsed.clone();
    let _ = display.set_password(None);
    let _ = display.set_username("");
    Ok((Arc::new(store), path, display.to_string()))
}

/// `Bearer <token>` or `Basic <user:password>` from the environment, when given.
fn http_authorization() -> Result<Option<HeaderValue>, CopyError> {
    let env = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
    let value = if let Some(token) = env(HTTP_TOKEN) {
        format!("Bearer {token}")
    } else if let Some(user) = env(HTTP_USERNAME) {
        let pair = format!("{user}:{}", env(HTTP_PASSWORD).unwrap_or_default());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    } else {
        return Ok(None);
    };
    let mut header = HeaderValue::from_str(&value).map_err(|_| {
        CopyError::InvalidArguments(
            "the credentials Secret holds characters a header cannot carry".into(),
        )
    })?;
    header.set_sensitive(true);
    Ok(Some(header))
}

fn open_s3(
    args: &CopyArgs,
    bucket: &str,
    key: &str,
    policy: Arc<AddressPolicy>,
) -> Result<Opened, CopyError> {
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(args.s3_region.as_deref().unwrap_or("us-east-1"))
        .with_virtual_hosted_style_request(args.s3_virtual_host)
        .with_client_options(client_options())
        .with_http_connector(connector(policy, HeaderMap::new()))
        .with_retry(retry_config());
    if let Some(endpoint) = &args.s3_endpoint {
        builder = builder.with_endpoint(endpoint).with_allow_http(true);
    }
    match (
        std::env::var(S3_ACCESS_KEY_ID)
            .ok()
            .filter(|v| !v.is_empty()),
        std::env::var(S3_SECRET_ACCESS_KEY)
            .ok()
            .filter(|v| !v.is_empty()),
    ) {
        (Some(id), Some(secret)) => {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Ok(token) = std::env::var(S3_SESSION_TOKEN)
                && !token.is_empty()
            {
                builder = builder.with_token(token);
            }
        }
        _ => builder = builder.with_skip_signature(true),
    }
    let store = builder
        .build()
        .map_err(|e| CopyError::InvalidArguments(format!("s3://{bucket}/{key}: {e}")))?;
    let path = Path::parse(key)
        .map_err(|e| CopyError::InvalidArguments(format!("--s3-key {key}: {e}")))?;
    Ok((Arc::new(store), path, format!("s3://{bucket}/{key}")))
}
