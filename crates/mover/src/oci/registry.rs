//! Talking to an OCI registry: the client, its credentials, and the manifests that lead from a
//! reference to the one blob to stage.
//!
//! A tag is read once: the manifest fetched by tag is hashed, and from then on everything is
//! addressed by that digest (the platform manifest of an index, every blob request, every retry
//! of this attempt and, through `status.resolvedDigest`, every later attempt). So a tag moved
//! while a copy runs cannot change or splice what is staged.

use std::collections::BTreeMap;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::CopyError;
use crate::address::AddressPolicy;
use crate::address::proxy::CheckedProxy;
use crate::stall::StallLimit;
use crate::transfer::hex;

/// The annotation ORAS puts on each layer with the file's name.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// The platform chosen from an index when it has more than one manifest: what KubeVirt nodes
/// and model servers mostly run.
const PLATFORM: (&str, &str) = ("linux", "amd64");

/// Manifest media types we accept: OCI and Docker, images and indexes.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// One repository of one registry, with the credentials for it.
pub struct Registry {
    client: Client,
    /// Every connection `client` makes goes through this proxy, which applies the mover's
    /// internal-address rule (and stops with the registry).
    proxy: CheckedProxy,
    auth: RegistryAuth,
    /// The reference as the user wrote it, for messages (it holds no credentials).
    pub display: String,
    reference: Reference,
    /// How long the registry may send nothing before the attempt fails.
    pub stall: StallLimit,
}

/// The image manifest the copy pulls, addressed by digest.
pub struct Pinned {
    /// The digest of what the reference named (the index, when it is one): what a tag resolved to.
    pub digest: String,
    pub manifest: OciImageManifest,
    /// `registry/repository@<image manifest digest>`: the address of every blob request.
    pub image: Reference,
}

impl Registry {
    /// A client for `reference`, over plain HTTP when `plain_http` (a registry the operator was
    /// told is served without TLS), with the credentials of the pull secret in the environment,
    /// reaching only the addresses `policy` allows.
    pub async fn open(
        reference: &str,
        plain_http: bool,
        policy: AddressPolicy,
        stall: StallLimit,
    ) -> Result<Self, CopyError> {
        let parsed = Reference::try_from(reference).map_err(|e| {
            CopyError::InvalidArguments(format!("--oci-reference {reference}: {e}"))
        })?;
        let auth = credentials_for(parsed.resolve_registry())?;
        let proxy = CheckedProxy::start(std::sync::Arc::new(policy))
            .await
            .map_err(|e| {
                CopyError::Source(
                    reference.to_owned(),
                    format!("no address-checking proxy: {e}"),
                )
            })?;
        Ok(Self {
            client: registry_client(plain_http, &proxy.url, stall),
            proxy,
            auth,
            display: reference.to_owned(),
            reference: parsed,
            stall,
        })
    }

    /// Reads the manifest the reference names (by `pinned_digest` when a previous attempt
    /// already resolved the tag), and, for an index, the manifest of the platform to use.
    pub async fn pin(&self, pinned_digest: Option<&str>) -> Result<Pinned, CopyError> {
        let digest = pinned_digest
            .map(str::to_owned)
            .or_else(|| self.reference.digest().map(str::to_owned));
        let top = match &digest {
            Some(digest) => self.at(digest),
            None => self.reference.clone(),
        };
        let (manifest, top_digest) = self.manifest(&top, digest.as_deref()).await?;
        let (manifest, image) = match manifest {
            OciManifest::Image(manifest) => (manifest, self.at(&top_digest)),
            OciManifest::ImageIndex(index) => {
                let entry = choose_platform(&self.display, &index.manifests)?;
                let image = self.at(&entry.digest);
                match self.manifest(&image, Some(&entry.digest)).await?.0 {
                    OciManifest::Image(manifest) => (manifest, image),
                    OciManifest::ImageIndex(_) => {
                        return Err(CopyError::Source(
                            self.display.clone(),
                            "an index points to another index; expected an image manifest".into(),
                        ));
                    }
                }
            }
        };
        Ok(Pinned {
            digest: top_digest,
            manifest,
            image,
        })
    }

    /// The manifest at `reference` and the SHA-256 of its bytes, checked against `expected`.
    async fn manifest(
        &self,
        reference: &Reference,
        expected: Option<&str>,
    ) -> Result<(OciManifest, String), CopyError> {
        let (body, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, MANIFEST_TYPES)
            .await
            .map_err(|e| self.error(e))?;
        let digest = format!("sha256:{}", hex(&Sha256::digest(&body)));
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(CopyError::DigestMismatch {
                what: format!("the manifest of {}", self.display),
                expected: expected.to_owned(),
                actual: digest,
            });
        }
        let manifest = serde_json::from_slice(&body).map_err(|e| {
            CopyError::Source(self.display.clone(), format!("unreadable manifest: {e}"))
        })?;
        Ok((manifest, digest))
    }

    /// The blob `layer` from byte `offset` on, as a stream of chunks.
    pub async fn blob_from(
        &self,
        image: &Reference,
        layer: &OciDescriptor,
        offset: u64,
    ) -> Result<BlobStream, CopyError> {
        let response = self
            .client
            .pull_blob_stream_partial(image, layer, offset, None)
            .await
            .map_err(|e| self.error(e))?;
        Ok(match response {
            oci_client::client::BlobResponse::Partial(stream) => BlobStream {
                stream,
                starts_at: offset,
            },
            // The registry ignored the range: the stream starts at byte 0 again.
            oci_client::client::BlobResponse::Full(stream) => BlobStream {
                stream,
                starts_at: 0,
            },
        })
    }

    fn at(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.reference.registry().to_owned(),
            self.reference.repository().to_owned(),
            digest.to_owned(),
        )
    }

    /// The registry's answer as one of our errors: refused credentials and missing manifests
    /// or blobs get their own kinds, since they are what users get wrong.
    pub fn error(&self, error: OciDistributionError) -> CopyError {
        // The proxy refused a destination: whatever the client made of its 403 or failed
        // tunnel, the refusal is what happened.
        if let Some(refused) = self.proxy.refusal() {
            return CopyError::AddressRefused(refused);
        }
        let display = self.display.clone();
        match &error {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => CopyError::AuthRefused(display),
            OciDistributionError::ImageManifestNotFoundError(_) => CopyError::NotFound(display),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    CopyError::AuthRefused(display)
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    CopyError::NotFound(display)
                } else {
                    CopyError::Source(display, crate::one_line(&error.to_string()))
                }
            }
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => CopyError::AuthRefused(display),
            OciDistributionError::ServerError { code: 404, .. } => CopyError::NotFound(display),
            _ => CopyError::Source(display, crate::one_line(&error.to_string())),
        }
    }
}

/// A blob response and the byte of the blob it starts at.
pub struct BlobStream {
    pub stream: oci_client::client::SizedStream,
    pub starts_at: u64,
}

/// Every connection to a registry is made by the client built here, and only here. oci-client
/// builds its own reqwest client from `ClientConfig`, which takes no resolver, redirect policy
/// or connector: so the client is given the mover's address-checking proxy (`proxy_url`) for
/// both schemes and nothing else, and every destination (registry, token realm, blob redirect,
/// foreign-layer URL) is judged there.
fn registry_client(plain_http: bool, proxy_url: &str, stall: StallLimit) -> Client {
    // reqwest is built without a crypto provider of its own; use ring, as kube does. Installing
    // twice is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: if plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        // Timeouts for a stalled peer, not for a large body: the body is streamed. Blob reads
        // are also bounded by the fetch itself, which names the stall (see `fetch`).
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(stall.0),
        // Indexes are resolved by `choose_platform`, never by the client's guess.
        platform_resolver: None,
        https_proxy: Some(proxy_url.to_owned()),
        http_proxy: Some(proxy_url.to_owned()),
        no_proxy: None,
        ..ClientConfig::default()
    })
}

/// The one manifest of an index, or its `linux/amd64` one.
fn choose_platform<'a>(
    display: &str,
    entries: &'a [ImageIndexEntry],
) -> Result<&'a ImageIndexEntry, CopyError> {
    if let [only] = entries {
        return Ok(only);
    }
    let platform_of = |e: &ImageIndexEntry| {
        e.platform
            .as_ref()
            .map(|p| (p.os.to_string(), p.architecture.to_string()))
    };
    entries
        .iter()
        .find(|e| platform_of(e).is_some_and(|(os, arch)| os == PLATFORM.0 && arch == PLATFORM.1))
        .ok_or_else(|| CopyError::NoMatchingPlatform {
            reference: display.to_owned(),
            wanted: format!("{}/{}", PLATFORM.0, PLATFORM.1),
            offered: entries
                .iter()
                .map(|e| {
                    platform_of(e)
                        .map_or_else(|| "unknown".to_owned(), |(os, arch)| format!("{os}/{arch}"))
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The credentials for `registry` in the pull secret, anonymous when there is none for it.
fn credentials_for(registry: &str) -> Result<RegistryAuth, CopyError> {
    let Some(config) = std::env::var(crate::env::OCI_DOCKER_CONFIG)
        .ok()
        .filter(|v| !v.is_empty())
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    let unreadable = |why: &str| {
        CopyError::InvalidArguments(format!(
            "the pull secret's .dockerconfigjson is not readable: {why}"
        ))
    };
    let config: DockerConfig =
        serde_json::from_str(&config).map_err(|_| unreadable("not a docker config JSON"))?;
    let Some(entry) = config
        .auths
        .iter()
        .find(|(key, _)| registry_of_key(key) == registry)
        .map(|(_, entry)| entry)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
    }
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| unreadable("an auth entry is not base64 of user:password"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| unreadable("an auth entry is not base64 of user:password"))?;
        return Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()));
    }
    if let Some(token) = &entry.registrytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    Ok(RegistryAuth::Anonymous)
}

/// `https://registry.example/v1/` and `registry.example` name the same registry in a docker
/// config.
fn registry_of_key(key: &str) -> &str {
    let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    without_scheme.split('/').next().unwrap_or_default()
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_keys_name_their_registry_with_or_without_scheme() {
        assert_eq!(
            registry_of_key("https://index.docker.io/v1/"),
            "index.docker.io"
        );
        assert_eq!(registry_of_key("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(
            registry_of_key("http://reg.example:5000"),
            "reg.example:5000"
        );
    }

    fn entry(platform: Option<(&str, &str)>) -> ImageIndexEntry {
        serde_json::from_value(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", "0".repeat(64)),
            "size": 1,
            "platform": platform.map(|(os, arch)| serde_json::json!({"os": os, "architecture": arch})),
        }))
        .expect("entry")
    }

    #[test]
    fn an_index_gives_its_only_manifest_or_its_linux_amd64_one() {
        let only = [entry(Some(("linux", "arm64")))];
        assert!(choose_platform("r", &only).is_ok());
        let two = [
            entry(Some(("linux", "arm64"))),
            entry(Some(("linux", "amd64"))),
        ];
        assert!(std::ptr::eq(
            choose_platform("r", &two).expect("amd64"),
            &two[1]
        ));
        let none = [
            entry(Some(("linux", "arm64"))),
            entry(Some(("windows", "amd64"))),
        ];
        let error = choose_platform("r", &none)
            .expect_err("no linux/amd64")
            .to_string();
        assert!(error.contains("linux/arm64, windows/amd64"), "{error}");
    }
}
