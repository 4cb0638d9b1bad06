//! The HTTP client every source is read with (object_store's `HttpConnector` hook, for HTTP and
//! S3 alike), with the [`AddressPolicy`] applied at each point where an address becomes known:
//!
//! 1. every request object_store sends: its scheme, and its host when that is an IP literal
//!    (literals are never resolved, so step 3 would not see them);
//! 2. every redirect hop, before it is followed: the same checks on the new URL, and no hop from
//!    https to plain http;
//! 3. every name, as it is resolved at connect time: internal addresses are dropped from the
//!    answer, so a name that resolves (or rebinds) to one is never connected to;
//! 4. every connection, once made and before a request is written on it: its peer address and
//!    port, the address actually connected to.
//!
//! A refusal is not retried (it would be refused again) and reaches the copy's error unchanged.
//! No proxy is used: a proxy would connect on the mover's behalf, out of the checks' sight.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderMap;
use hyper_util::client::legacy::connect::{Connection, HttpInfo};
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

use super::{AddressPolicy, AddressRefused};

/// Redirects followed per request: enough for a CDN's and a bucket's hops, few enough that a
/// loop ends quickly.
const MAX_REDIRECTS: usize = 10;

/// Builds the mover's checked HTTP client for object_store.
///
/// The client is built here rather than from object_store's `ClientOptions`, whose builder
/// cannot take a resolver, a redirect policy or a connector layer: the options object_store
/// passes are ignored, and the settings that matter are this struct's.
#[derive(Debug, Clone)]
pub struct GuardedConnector {
    pub policy: Arc<AddressPolicy>,
    /// Sent with every request (the Authorization header of an HTTP source); reqwest drops
    /// it on a redirect to another host.
    pub default_headers: HeaderMap,
    pub connect_timeout: Duration,
}

impl HttpConnector for GuardedConnector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        let policy = self.policy.clone();
        let client = reqwest::Client::builder()
            .user_agent(concat!("templatecache/", env!("CARGO_PKG_VERSION")))
            .default_headers(self.default_headers.clone())
            .connect_timeout(self.connect_timeout)
            // A compressed body would not have the Content-Length the copy reserves room for.
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver {
                policy: policy.clone(),
            }))
            .redirect(redirect::Policy::custom({
                let policy = policy.clone();
                move |attempt| match check_redirect(&policy, attempt.previous(), attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }))
            .connector_layer(PeerCheckLayer { policy })
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "templatecache",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(GuardedClient {
            client,
            policy: self.policy.clone(),
        }))
    }
}

/// A redirect hop to `next`, after the URLs in `previous` (the last one answered with the
/// redirect), checked before it is followed.
fn check_redirect(
    policy: &AddressPolicy,
    previous: &[url::Url],
    next: &url::Url,
) -> Result<(), AddressRefused> {
    let url = next.to_string();
    if previous.len() >= MAX_REDIRECTS {
        let limit = MAX_REDIRECTS;
        return Err(AddressRefused::TooManyRedirects { url, limit });
    }
    // A hop from https to plain http would carry the rest of the copy, and any header reqwest
    // keeps on a same-host hop, where anyone on the path can read and change it.
    let leaves_tls = previous.last().is_some_and(|from| from.scheme() == "https");
    let reason = if leaves_tls && next.scheme() == "http" {
        Err(AddressRefused::Downgrade)
    } else {
        check_url(policy, next)
    };
    reason.map_err(|reason| AddressRefused::Redirect {
        url,
        reason: Box::new(reason),
    })
}

/// Scheme, and IP-literal host with its port, of a URL about to be requested.
fn check_url(policy: &AddressPolicy, url: &url::Url) -> Result<(), AddressRefused> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(AddressRefused::Scheme {
            url: url.to_string(),
        });
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.into(),
        Some(url::Host::Ipv6(ip)) => ip.into(),
        // Names are checked as they are resolved and once connected.
        _ => return Ok(()),
    };
    policy.check(SocketAddr::new(ip, port))
}

/// object_store's view of the client: requests are checked before they are sent, and a
/// refusal found anywhere in an error's causes becomes a final, not retried, error.
#[derive(Debug)]
struct GuardedClient {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
}

#[async_trait::async_trait]
impl HttpService for GuardedClient {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let url = url::Url::parse(&request.uri().to_string())
            .map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
        check_url(&self.policy, &url).map_err(|r| HttpError::new(HttpErrorKind::Unknown, r))?;
        HttpService::call(&self.client, request)
            .await
            .map_err(|error| match refusal_in(&error) {
                Some(refused) => HttpError::new(HttpErrorKind::Unknown, refused),
                None => error,
            })
    }
}

/// The [`AddressRefused`] among `error`'s causes, if any.
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<AddressRefused> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(refused) = current.downcast_ref::<AddressRefused>() {
            return Some(refused.clone());
        }
        cause = current.source();
    }
    None
}

/// Resolves names with the system resolver and keeps only the addresses the policy allows.
struct CheckedResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| policy.may_connect_to(a.ip()).is_ok())
                .collect();
            if allowed.is_empty() && !resolved.is_empty() {
                let addresses = resolved
                    .iter()
                    .map(|a| {
                        let class = policy.may_connect_to(a.ip()).err();
                        let class = class.map(|c| c.to_string()).unwrap_or_default();
                        format!("{} is {class}", a.ip())
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(AddressRefused::AllResolvedInternal { host, addresses }.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Wraps reqwest's connector: a connection whose peer the policy refuses is dropped before
/// anything is written on it.
#[derive(Clone)]
struct PeerCheckLayer {
    policy: Arc<AddressPolicy>,
}

impl<S> tower_layer::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerCheck {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
struct PeerCheck<S> {
    inner: S,
    policy: Arc<AddressPolicy>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, Target> tower_service::Service<Target> for PeerCheck<S>
where
    S: tower_service::Service<Target, Error = BoxError>,
    S::Response: Connection + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let connecting = self.inner.call(target);
        let policy = self.policy.clone();
        Box::pin(async move {
            let connection = connecting.await?;
            let mut extras = http::Extensions::new();
            connection.connected().get_extras(&mut extras);
            let peer = extras
                .get::<HttpInfo>()
                .map(HttpInfo::remote_addr)
                .ok_or(AddressRefused::UnknownPeer)?;
            policy.check(peer)?;
            Ok(connection)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::test_server;
    use object_store::ObjectStoreExt;
    use object_store::http::HttpBuilder;

    async fn head(url: &str, allowed: &str) -> Result<u64, AddressRefused> {
        let connector = GuardedConnector {
            policy: Arc::new(AddressPolicy::new(vec![allowed.parse().expect("entry")])),
            default_headers: HeaderMap::new(),
            connect_timeout: Duration::from_secs(5),
        };
        let store = HttpBuilder::new()
            .with_url(url)
            .with_client_options(ClientOptions::new().with_allow_http(true))
            .with_http_connector(connector)
            .build()
            .expect("store");
        store
            .head(&"f".into())
            .await
            .map(|meta| meta.size)
            .map_err(|e| refusal_in(&e).unwrap_or_else(|| panic!("not a refusal: {e}")))
    }

    #[tokio::test]
    async fn a_name_resolving_to_an_allowed_address_on_another_port_is_refused_once_connected() {
        let (addr, reached) = test_server::start().await;
        let by_name = format!("http://localhost:{}", addr.port());
        // The allowlist names the address, but with another port: the resolver cannot tell
        // (it knows no port), the peer check can, before a byte of the request is written.
        let other_port = format!("127.0.0.1:{}", addr.port() + 1);
        let refused = head(&by_name, &other_port).await.expect_err("refused");
        assert_eq!(
            refused,
            AddressRefused::Internal {
                address: addr.to_string(),
                class: crate::address::Internal::Loopback
            }
        );
        assert_eq!(reached.bytes(), 0, "no byte of the request was written");

        let allowed = addr.to_string();
        assert_eq!(head(&by_name, &allowed).await.expect("allowed endpoint"), 3);
        assert_eq!(reached.requests(), 1);
    }

    #[test]
    fn a_redirect_from_https_to_plain_http_is_refused() {
        let policy = AddressPolicy::default();
        let url = |s: &str| url::Url::parse(s).expect("url");
        let refusal = |from: &str, to: &str| {
            check_redirect(&policy, &[url(from)], &url(to))
                .err()
                .map(|refused| refused.to_string())
        };
        let downgrade =
            "redirect to http://cdn.example/a refused: it would leave https for plain http";
        let cases = [
            (
                "https://mirror.example/a",
                "http://cdn.example/a",
                Some(downgrade),
            ),
            ("https://mirror.example/a", "https://cdn.example/a", None),
            ("http://mirror.example/a", "https://cdn.example/a", None),
            ("http://mirror.example/a", "http://cdn.example/a", None),
        ];
        for (from, to, expected) in cases {
            assert_eq!(refusal(from, to).as_deref(), expected, "{from} -> {to}");
        }
    }
}
