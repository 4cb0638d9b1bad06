//! A namespace user of the hostile-tenant tests: a ServiceAccount with rules of its own and a
//! client with its token, and a template a tenant serves.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, Resource};
use serde_json::{Value, json};

use super::http_server::HttpServer;
use super::kubectl;
use super::node::restricted_container;
use super::rig::{random_bytes, sha256};

/// `kubectl <args>`, failing the test with kubectl's answer; its trimmed stdout.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl().args(args).output().expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A ServiceAccount with `rules` in its own Role, and a client authenticated with a token of
/// it (bound to `pod`, name and uid, when given: `kubectl create token --bound-object-kind Pod`).
pub async fn account(ns: &str, name: &str, rules: &[&[&str]]) {
    kubectl_ok(&["-n", ns, "create", "serviceaccount", name]);
    for (i, rule) in rules.iter().enumerate() {
        let role = format!("{name}-{i}");
        let mut args = vec!["-n", ns, "create", "role", &role];
        args.extend_from_slice(rule);
        kubectl_ok(&args);
        let subject = format!("--serviceaccount={ns}:{name}");
        kubectl_ok(&[
            "-n",
            ns,
            "create",
            "rolebinding",
            &role,
            "--role",
            &role,
            &subject,
        ]);
    }
}

/// A client with a token of `account` (bound to `pod` when given).
pub async fn client_as(ns: &str, account: &str, pod: Option<&Pod>) -> Client {
    let mut args = vec![
        "-n".to_owned(),
        ns.to_owned(),
        "create".into(),
        "token".into(),
    ];
    args.push(account.to_owned());
    if let Some(pod) = pod {
        args.extend(["--bound-object-kind".into(), "Pod".into()]);
        args.push(format!(
            "--bound-object-name={}",
            pod.metadata.name.clone().unwrap_or_default()
        ));
        args.push(format!(
            "--bound-object-uid={}",
            pod.metadata.uid.clone().unwrap_or_default()
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let token = kubectl_ok(&args);
    let kubeconfig = Kubeconfig::read_from(super::kubeconfig_path()).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    config.auth_info = AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Client::try_from(config).expect("client")
}

/// A 1 MiB template named `name` on `server`, and a cache spec for it.
pub fn template(server: &HttpServer, name: &str) -> (Vec<u8>, Value) {
    let mut bytes = random_bytes(1 << 20);
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    server.put(name, &bytes);
    let spec = json!({"source": {"http": {"url": server.url(name)}}, "checksum": sha256(&bytes)});
    (bytes, spec)
}

/// A Job as a namespace user may write it: one restricted Pod of the consumer image that exits
/// 0, so the Job controller completes it. "Controlled" by `owner` when given:
/// ownerReferences are anyone's to write. Needs the node ([`super::jobs_on_node`]).
pub fn completing_job<K: Resource<DynamicType = ()>>(name: &str, owner: Option<&K>) -> Job {
    let (_, images) =
        super::jobs_on_node().expect("a Job that runs needs the node: make test-node");
    let owners: Vec<Value> = owner
        .into_iter()
        .map(|o| {
            json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()),
                   "name": o.meta().name, "uid": o.meta().uid, "controller": true})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "ownerReferences": owners},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "m", "image": images.consumer.pinned(), "command": ["sh", "-c", "exit 0"],
                            "securityContext": restricted_container()}]}}}
    }))
    .expect("job")
}
