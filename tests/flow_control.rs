//! API Priority and Fairness (`charts/templatecache-operator/files/flowcontrol.yaml`): the
//! operator's requests have a priority level of their own, matched before the schema every
//! tenant's writes to caches fall in, and that schema makes one flow per namespace. So a tenant
//! with many ServiceAccounts neither slows the operator's reference commits nor crowds out the
//! other namespaces.
//!
//! Which schema a request fell in is what the API server itself says on every answer (the
//! `X-Kubernetes-PF-FlowSchema-UID` header), for a request made as the operator's account and
//! as a tenant's (impersonated by the admin).

use templatecache_test_support as support;

use std::time::Duration;

use k8s_openapi::api::flowcontrol::v1::FlowSchema;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::Value;
use support::tools::{helm_offline, run};
use support::{eventually, rig::Rig};

const FILE: &str = "charts/templatecache-operator/files/flowcontrol.yaml";
const OPERATOR_SCHEMA: &str = "templatecache-operator";
const TENANTS_SCHEMA: &str = "templatecache-references";
/// The operator's account in the file: the README's install (release `templatecache` in
/// `templatecache-system`).
const OPERATOR: &str = "system:serviceaccount:templatecache-system:templatecache";

fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
        .filter(|o: &Value| !o.is_null())
        .collect()
}

#[test]
fn the_chart_renders_the_file_with_its_releases_operator_account() {
    let file = std::fs::read_to_string(support::repo_root().join(FILE)).expect("the file");
    let mut expected = objects(&file);
    let mut template = helm_offline();
    template
        .args(["template", "rel", "charts/templatecache-operator"])
        .args(["--namespace", "ops"])
        .args(["--show-only", "templates/flowcontrol.yaml"]);
    let mut rendered = objects(&run(template).expect("helm template renders"));
    assert_eq!(rendered.len(), 4, "two priority levels and their schemas");
    for object in &mut rendered {
        let labels = object["metadata"]
            .as_object_mut()
            .and_then(|m| m.remove("labels"));
        assert_eq!(
            labels.expect("labelled")["app.kubernetes.io/instance"],
            "rel"
        );
    }
    for object in &mut expected {
        if object["metadata"]["name"] == OPERATOR_SCHEMA && object["kind"] == "FlowSchema" {
            object["spec"]["rules"][0]["subjects"] = serde_json::json!([{"kind": "ServiceAccount",
                "serviceAccount": {"namespace": "ops", "name": "rel-templatecache"}}]);
        }
        let same = rendered.iter().find(|r| {
            r["kind"] == object["kind"] && r["metadata"]["name"] == object["metadata"]["name"]
        });
        assert_eq!(same, Some(&*object), "the chart renders the file's object");
    }
}

/// A client that makes its requests as `user` in `groups` (the admin impersonating them).
async fn client_as(user: &str, groups: &[&str]) -> Client {
    let kubeconfig = Kubeconfig::read_from(support::kubeconfig_path()).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| (*g).to_owned()).collect());
    Client::try_from(config).expect("client")
}

/// The uid of the FlowSchema a dry-run patch of a cache by `client` was classified in. The
/// answer may be a refusal (the impersonated accounts have no rights here): the API server
/// classifies a request before it authorizes it, and says so on every answer.
async fn schema_of_a_cache_write(client: &Client, namespace: &str) -> Option<String> {
    let request = http::Request::patch(format!(
        "/apis/templatecache.io/v1alpha1/namespaces/{namespace}/templatecaches/any?dryRun=All"
    ))
    .header("content-type", "application/merge-patch+json")
    .body(b"{\"metadata\":{\"labels\":{\"a\":\"b\"}}}".to_vec().into())
    .expect("request");
    let response = client.send(request).await.ok()?;
    let uid = response.headers().get("x-kubernetes-pf-flowschema-uid")?;
    uid.to_str().ok().map(str::to_owned)
}

async fn schema_uid(api: &Api<FlowSchema>, name: &str) -> (String, FlowSchema) {
    let schema = api.get(name).await.expect("the FlowSchema is applied");
    (schema.metadata.uid.clone().expect("uid"), schema)
}

#[tokio::test]
async fn the_operators_requests_come_before_the_tenants_who_are_one_flow_per_namespace() {
    // The rig's control plane has the file applied, as the README applies it (no Helm).
    let rig = Rig::namespace("flow").await;
    let ns = &rig.ns;
    let schemas: Api<FlowSchema> = Api::all(ns.client.clone());
    let (operator_uid, operator) = schema_uid(&schemas, OPERATOR_SCHEMA).await;
    let (tenants_uid, tenants) = schema_uid(&schemas, TENANTS_SCHEMA).await;
    let tenant_account = format!("system:serviceaccount:{}:tenant", ns.name);
    let cases = [
        (OPERATOR, &operator_uid, OPERATOR_SCHEMA),
        (tenant_account.as_str(), &tenants_uid, TENANTS_SCHEMA),
    ];
    for (user, expected, schema) in cases {
        let client = client_as(user, &["system:serviceaccounts", "system:authenticated"]).await;
        // The API server takes up a new FlowSchema a moment after it is applied.
        eventually(
            &format!("a cache write by {user} is in FlowSchema {schema}"),
            Duration::from_secs(30),
            || async {
                let seen = schema_of_a_cache_write(&client, &ns.name).await;
                match seen {
                    Some(uid) if &uid == expected => Ok(()),
                    other => Err(format!("FlowSchema uid {other:?}")),
                }
            },
        )
        .await;
    }
    // What makes it so: matched first, seats of its own, one flow per namespace.
    let precedence = |s: &FlowSchema| s.spec.matching_precedence.unwrap_or(i32::MAX);
    assert!(
        precedence(&operator) < precedence(&tenants),
        "the operator's schema is matched first"
    );
    assert_ne!(
        operator.spec.priority_level_configuration.name,
        tenants.spec.priority_level_configuration.name,
        "the operator has seats of its own"
    );
    let distinguisher = tenants.spec.distinguisher_method.map(|d| d.type_);
    assert_eq!(distinguisher.as_deref(), Some("ByNamespace"));
}
