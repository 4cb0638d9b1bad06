//! A real S3-compatible server on the tests' source address ([`super::source_ip`]): versitygw (built from its Go module by
//! `hack/s3/build.sh`) over a temporary folder. Objects are uploaded through the S3 API itself.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::process::{Child, Command};

use super::tools::{built, serve_source};

pub const ACCESS_KEY: &str = "templatecache-test";
pub const SECRET_KEY: &str = "templatecache-test-secret";
pub const BUCKET: &str = "templates";

/// A running server; killed when dropped.
pub struct S3Server {
    pub endpoint: String,
    _dir: tempfile::TempDir,
    _child: Child,
}

impl S3Server {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("S3 folder");
        std::fs::create_dir(dir.path().join(BUCKET)).expect("bucket folder");
        let (child, addr) = serve_source("versitygw", |addr| {
            let mut command = Command::new(built("s3"));
            command
                .args(["--access", ACCESS_KEY, "--secret", SECRET_KEY])
                .arg("--port")
                .arg(addr.to_string())
                .arg("posix")
                .arg(dir.path());
            command
        })
        .await;
        Self {
            endpoint: format!("http://{addr}"),
            _dir: dir,
            _child: child,
        }
    }

    /// Uploads `bytes` as `key` through the S3 API.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) {
        let store: Arc<dyn ObjectStore> = Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_bucket_name(BUCKET)
                .with_region("us-east-1")
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()
                .expect("S3 client"),
        );
        store
            .put(&Path::from(key), bytes.into())
            .await
            .expect("upload object");
    }
}
