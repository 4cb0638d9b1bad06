//! Runs a Job's process as the Job's ServiceAccount, as a kubelet would: a token from the
//! TokenRequest API for that account, in a kubeconfig of its own, so the data mover has exactly
//! the rights the chart grants the copy Jobs and no more.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{AuthInfo, Context, Kubeconfig, NamedAuthInfo, NamedContext};
use kube::{Api, Client};

/// A kubeconfig file for `account` in `namespace`; removed when dropped.
pub struct AccountKubeconfig {
    path: PathBuf,
}

impl AccountKubeconfig {
    /// Issues a token through `client` and writes it with the server of `own` (the caller's
    /// kubeconfig) to a file named after `unique`.
    // The executor binds its tokens to Pods (`issue_for`); tests/helm_chart.rs issues this
    // one for the operator's own account.
    #[allow(dead_code)]
    pub async fn issue(
        client: &Client,
        own: Kubeconfig,
        namespace: &str,
        account: &str,
        unique: &str,
    ) -> Result<Self, String> {
        Self::issue_for(client, own, namespace, account, None, unique).await
    }

    /// As [`Self::issue`], with a token bound to `pod` (name, uid) as the kubelet's are: the API
    /// server then puts the Pod's name in the requests' user info, which the chart's
    /// admission policy on cache status checks.
    pub async fn issue_for(
        client: &Client,
        own: Kubeconfig,
        namespace: &str,
        account: &str,
        pod: Option<(&str, &str)>,
        unique: &str,
    ) -> Result<Self, String> {
        let token = token_for(client, namespace, account, pod).await?;
        let user = format!("system:serviceaccount:{namespace}:{account}");
        let config = with_token(own, &user, token)?;
        let path = std::env::temp_dir().join(format!("templatecache-{unique}.kubeconfig"));
        let yaml = serde_yaml::to_string(&config).map_err(|e| e.to_string())?;
        std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AccountKubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn token_for(
    client: &Client,
    namespace: &str,
    account: &str,
    pod: Option<(&str, &str)>,
) -> Result<String, String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let bound_object_ref = pod.map(|(name, uid)| BoundObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        name: Some(name.to_owned()),
        uid: Some(uid.to_owned()),
    });
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            bound_object_ref,
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = accounts
        .create_token_request(account, &Default::default(), &request)
        .await
        .map_err(|e| format!("requesting a token for ServiceAccount {namespace}/{account}: {e}"))?;
    issued
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| format!("no token issued for ServiceAccount {namespace}/{account}"))
}

/// The executor's own kubeconfig (same server and CA) with `token` as the only user.
fn with_token(own: Kubeconfig, user: &str, token: String) -> Result<Kubeconfig, String> {
    let current = own
        .current_context
        .clone()
        .ok_or("the kubeconfig has no current context")?;
    let cluster = own
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .ok_or("the kubeconfig's current context names no cluster")?;
    Ok(Kubeconfig {
        clusters: own
            .clusters
            .into_iter()
            .filter(|c| c.name == cluster)
            .collect(),
        auth_infos: vec![NamedAuthInfo {
            name: user.to_owned(),
            auth_info: Some(AuthInfo {
                token: Some(token.into()),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: user.to_owned(),
            context: Some(Context {
                cluster,
                user: Some(user.to_owned()),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        current_context: Some(user.to_owned()),
        ..Default::default()
    })
}
