//! A real S3-compatible server on loopback: versitygw (built from its Go module by
//! `hack/s3/build.sh`) over a temporary folder. Objects are uploaded through the S3 API itself.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::process::{Child, Command};

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
        let build = std::process::Command::new(super::repo_root().join("hack/s3/build.sh"))
            .output()
            .expect("run hack/s3/build.sh");
        assert!(
            build.status.success(),
            "{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let binary = String::from_utf8(build.stdout)
            .expect("path")
            .trim()
            .to_owned();
        let dir = tempfile::tempdir().expect("S3 folder");
        std::fs::create_dir(dir.path().join(BUCKET)).expect("bucket folder");
        let port = free_port();
        let child = Command::new(binary)
            .args(["--access", ACCESS_KEY, "--secret", SECRET_KEY])
            .arg("--port")
            .arg(format!("127.0.0.1:{port}"))
            .arg("posix")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start versitygw");
        let endpoint = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            endpoint,
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
