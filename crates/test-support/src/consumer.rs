//! Clients that act as a consumer would in production: a ServiceAccount with only the rights the
//! acquire/release library needs, not the harness's `system:masters` admin. That matters for
//! contention tests: the API server's priority and fairness exempts `system:masters`, so only a
//! real consumer identity sees the request queuing a real cluster applies.

use std::sync::OnceLock;

use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig, NamedAuthInfo};
use kube::{Client, Config};

use super::{ensure_cluster, kubeconfig_path, kubectl};

const NAMESPACE: &str = "templatecache-consumers";
const ACCOUNT: &str = "acquirer";

fn rbac_manifest() -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {ACCOUNT}, namespace: {NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: templatecache-test-consumer}}
rules:
- apiGroups: [templatecache.io]
  resources: [templatecacheclaims]
  verbs: [get, list, watch, create, delete]
- apiGroups: [templatecache.io]
  resources: [templatecaches]
  verbs: [get, list, watch, create, patch]
# The contention benchmark's fair lock plays CloudStack's database row on a ConfigMap.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: templatecache-test-consumer}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: templatecache-test-consumer}}
subjects: [{{kind: ServiceAccount, name: {ACCOUNT}, namespace: {NAMESPACE}}}]
"#
    )
}

/// A bearer token of the consumer ServiceAccount, made once per test binary.
fn consumer_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        ensure_cluster();
        let mut apply = kubectl();
        apply.args(["apply", "-f", "-"]);
        apply.stdin(std::process::Stdio::piped());
        apply.stdout(std::process::Stdio::null());
        let mut child = apply.spawn().expect("kubectl apply consumer RBAC");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rbac_manifest().as_bytes())
            .expect("write manifest");
        assert!(
            child.wait().expect("kubectl").success(),
            "apply consumer RBAC"
        );
        let out = kubectl()
            .args(["create", "token", ACCOUNT, "-n", NAMESPACE, "--duration=2h"])
            .output()
            .expect("kubectl create token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8 token")
            .trim()
            .to_owned()
    })
}

/// A client authenticated as the consumer ServiceAccount, on the calling test's runtime.
pub async fn consumer_client() -> Client {
    let token = consumer_token();
    let mut kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("read kubeconfig");
    kubeconfig.auth_infos = vec![NamedAuthInfo {
        name: "admin".into(),
        auth_info: Some(AuthInfo {
            token: Some(token.to_owned().into()),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("consumer kubeconfig");
    Client::try_from(config).expect("consumer client")
}
