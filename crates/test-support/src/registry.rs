//! A real OCI registry on the tests' source address ([`super::source_ip`]): the CNCF distribution registry (built from its Go module by
//! `hack/registry/build.sh`) over a temporary folder, behind htpasswd basic auth. Content is
//! pushed with the `oras` CLI (`hack/oras/build.sh`): ORAS artifacts with `oras push`, and
//! containerDisks and indexes as blobs plus manifests written here, since `oras push` would
//! title every layer.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use super::rig::sha256;
use super::tools::{built, run, serve_source};

pub const USER: &str = "puller";
pub const PASSWORD: &str = "registry-test-password";

/// A running registry; killed when dropped.
pub struct Registry {
    /// `<address>:<port>`, the registry part of references.
    pub host: String,
    /// Before `dir`: fields drop in order, and the registry goes before its storage.
    _child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl Registry {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("registry folder");
        let htpasswd = dir.path().join("htpasswd");
        let hash = bcrypt::hash(PASSWORD, 5).expect("bcrypt");
        std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).expect("htpasswd");
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        let (child, addr) = serve_source("the registry", |addr| {
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\n\
                     http: {{addr: {addr}}}\n\
                     auth: {{htpasswd: {{realm: templatecache-test, path: {}}}}}\n",
                    storage.display(),
                    htpasswd.display()
                ),
            )
            .expect("registry config");
            let mut command = tokio::process::Command::new(built("registry"));
            command
                .arg("serve")
                .arg(&config)
                .env("OTEL_TRACES_EXPORTER", "none");
            command
        })
        .await;
        Self {
            host: addr.to_string(),
            _child: child,
            dir,
        }
    }

    /// `oras <args>` against this registry with its credentials, over plain HTTP.
    fn oras(&self, args: &[&str], cwd: &Path) -> String {
        let mut command = Command::new(built("oras"));
        command
            .current_dir(cwd)
            .env("HOME", self.dir.path())
            .args(args)
            .args(["--plain-http", "-u", USER, "-p", PASSWORD]);
        run(command).unwrap_or_else(|e| panic!("oras {args:?}: {e}"))
    }

    /// Pushes `files` as an ORAS artifact (one layer each, titled with its name) to
    /// `<repository>:<tag>`; returns the manifest digest.
    pub fn push_artifact(&self, repository: &str, tag: &str, files: &[(&str, &[u8])]) -> String {
        let work = tempfile::tempdir().expect("push folder");
        let mut args = vec![];
        for (name, bytes) in files {
            std::fs::write(work.path().join(name), bytes).expect("artifact file");
            args.push(name.to_string());
        }
        let reference = format!("{}/{repository}:{tag}", self.host);
        let mut all = vec![
            "push",
            reference.as_str(),
            "--artifact-type",
            "application/vnd.templatecache.test",
        ];
        all.extend(args.iter().map(String::as_str));
        self.oras(&all, work.path());
        self.oras(&["resolve", &reference], work.path())
            .trim()
            .to_owned()
    }

    /// Pushes a containerDisk, as KubeVirt builds them: one gzip tar layer holding
    /// `disk/<name>` for each file, for linux/amd64; returns the manifest digest.
    pub fn push_container_disk(
        &self,
        repository: &str,
        tag: &str,
        files: &[(&str, &[u8])],
    ) -> String {
        let manifest = self.container_disk_manifest(repository, files, "amd64");
        self.push_manifest(
            repository,
            tag,
            &manifest,
            "application/vnd.oci.image.manifest.v1+json",
        )
    }

    /// Pushes an index of containerDisks, one per architecture in `architectures` (all linux);
    /// returns the index digest.
    pub fn push_index(
        &self,
        repository: &str,
        tag: &str,
        architectures: &[&str],
        disk: &[u8],
    ) -> String {
        let manifests: Vec<Value> = architectures
            .iter()
            .map(|arch| {
                let manifest =
                    self.container_disk_manifest(repository, &[("disk.img", disk)], arch);
                let digest = self.push_manifest(
                    repository,
                    &format!("only-{arch}"),
                    &manifest,
                    "application/vnd.oci.image.manifest.v1+json",
                );
                json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                       "size": manifest.len(), "platform": {"os": "linux", "architecture": arch}})
            })
            .collect();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .expect("index");
        self.push_manifest(
            repository,
            tag,
            &index,
            "application/vnd.oci.image.index.v1+json",
        )
    }

    /// The manifest of a one-layer containerDisk image, its blobs pushed.
    fn container_disk_manifest(
        &self,
        repository: &str,
        files: &[(&str, &[u8])],
        arch: &str,
    ) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, bytes) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o440);
            header.set_uid(107);
            header.set_gid(107);
            header.set_cksum();
            tar.append_data(&mut header, format!("disk/{name}"), *bytes)
                .expect("tar entry");
        }
        let tar = tar.into_inner().expect("tar");
        self.image_manifest(repository, &tar, arch)
    }

    /// Pushes a containerDisk-shaped image whose one gzip layer is `tar`, as a hostile or broken
    /// image would be; returns the manifest digest.
    pub fn push_tar_image(&self, repository: &str, tag: &str, tar: &[u8]) -> String {
        let manifest = self.image_manifest(repository, tar, "amd64");
        self.push_manifest(
            repository,
            tag,
            &manifest,
            "application/vnd.oci.image.manifest.v1+json",
        )
    }

    /// The manifest of an image whose one layer is `tar`, gzipped; its blobs pushed.
    fn image_manifest(&self, repository: &str, tar: &[u8], arch: &str) -> Vec<u8> {
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gzip, tar).expect("gzip");
        let layer = gzip.finish().expect("gzip");
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        }))
        .expect("config");
        self.push_blob(repository, &layer);
        self.push_blob(repository, &config);
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha256(&layer), "size": layer.len()}],
        }))
        .expect("manifest")
    }

    fn push_blob(&self, repository: &str, bytes: &[u8]) {
        let work = tempfile::tempdir().expect("blob folder");
        std::fs::write(work.path().join("blob"), bytes).expect("blob file");
        let reference = format!("{}/{repository}@{}", self.host, sha256(bytes));
        self.oras(&["blob", "push", &reference, "blob"], work.path());
    }

    fn push_manifest(
        &self,
        repository: &str,
        tag: &str,
        manifest: &[u8],
        media_type: &str,
    ) -> String {
        let work = tempfile::tempdir().expect("manifest folder");
        std::fs::write(work.path().join("manifest.json"), manifest).expect("manifest file");
        let reference = format!("{}/{repository}:{tag}", self.host);
        self.oras(
            &[
                "manifest",
                "push",
                &reference,
                "manifest.json",
                "--media-type",
                media_type,
            ],
            work.path(),
        );
        sha256(manifest)
    }

    /// Replaces the stored bytes of blob `digest` with as many other bytes, as a corrupted or
    /// tampered store would serve them under the same digest.
    pub fn corrupt_blob(&self, digest: &str) {
        let hex = digest.trim_start_matches("sha256:");
        let data: PathBuf = self
            .dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut bytes = std::fs::read(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
        for byte in bytes.iter_mut().take(4096) {
            *byte ^= 0xff;
        }
        std::fs::write(&data, bytes).expect("corrupt blob");
    }

    /// The digest of the only layer of the manifest at `<repository>@<digest>`.
    pub fn layer_of(&self, repository: &str, manifest_digest: &str) -> String {
        let work = tempfile::tempdir().expect("fetch folder");
        let reference = format!("{}/{repository}@{manifest_digest}", self.host);
        let manifest: Value =
            serde_json::from_str(&self.oras(&["manifest", "fetch", &reference], work.path()))
                .expect("manifest JSON");
        manifest["layers"][0]["digest"]
            .as_str()
            .expect("layer digest")
            .to_owned()
    }

    /// A `kubernetes.io/dockerconfigjson` Secret body for this registry with `password`.
    pub fn pull_secret(&self, name: &str, password: &str) -> Value {
        self.pull_secret_as(name, password, &self.host)
    }

    /// The same, for the registry reached as `host` (through a proxy, say).
    pub fn pull_secret_as(&self, name: &str, password: &str, host: &str) -> Value {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
        let config = json!({"auths": {host: {"auth": auth}}});
        json!({
            "metadata": {"name": name},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": config.to_string()},
        })
    }
}
