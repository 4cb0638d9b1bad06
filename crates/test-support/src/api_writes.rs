//! Write requests as the API server itself counts them (`apiserver_request_total`), so every way
//! a benchmark compares is counted the same, whoever sent the writes: consumers, the operator,
//! the benchmark playing a Job.

use std::collections::BTreeMap;

use kube::Client;

/// Verbs that change state.
const WRITE_VERBS: [&str; 5] = ["POST", "PATCH", "PUT", "DELETE", "APPLY"];

/// What a key of [`served_by_kind`] ends with when the API server's priority and fairness
/// refused the request (429): the client tries again, but nothing was written.
pub const REFUSED: &str = " refused (429)";

/// Write requests the API server has served so far, to any resource (`resources` empty) or to
/// the named resources only (plural names, e.g. `templatecaches`); refused ones do not count.
pub async fn served(client: &Client, resources: &[&str]) -> f64 {
    written(&served_by_kind(client, resources).await)
}

/// The writes among counts by kind: all but the refused requests.
pub fn written(by_kind: &BTreeMap<String, f64>) -> f64 {
    by_kind
        .iter()
        .filter(|(kind, _)| !kind.ends_with(REFUSED))
        .map(|(_, n)| n)
        .sum()
}

/// Write requests by verb and resource, keys such as `PATCH templatecacheclaims/status`, and
/// `POST templatecacheclaims refused (429)` for the requests the API server refused.
pub async fn served_by_kind(client: &Client, resources: &[&str]) -> BTreeMap<String, f64> {
    let request = http::Request::get("/metrics")
        .body(vec![])
        .expect("request");
    let text = client
        .request_text(request)
        .await
        .expect("API server /metrics");
    let mut by_kind = BTreeMap::new();
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let verb = label(labels, "verb");
        let resource = label(labels, "resource");
        if !WRITE_VERBS.contains(&verb) || !(resources.is_empty() || resources.contains(&resource))
        {
            continue;
        }
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        let refused = if label(labels, "code") == "429" {
            REFUSED
        } else {
            ""
        };
        let kind = match label(labels, "subresource") {
            "" => format!("{verb} {resource}{refused}"),
            sub => format!("{verb} {resource}/{sub}{refused}"),
        };
        *by_kind.entry(kind).or_insert(0.0) += count;
    }
    by_kind
}

/// The value of label `name` in a metric line's labels (`a="x",b="y"}`), or "".
fn label<'a>(labels: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    labels
        .split(',')
        .find_map(|pair| pair.strip_prefix(&key))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
}

/// Counts served between two readings of [`served_by_kind`], the kinds that moved only.
pub fn since(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(kind, n)| (kind.clone(), n - before.get(kind).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_is_read_by_its_exact_name() {
        let labels = r#"code="201",group="",resource="pods",subresource="status",verb="PATCH"} 3"#;
        assert_eq!(label(labels, "resource"), "pods");
        assert_eq!(label(labels, "subresource"), "status");
        assert_eq!(label(labels, "verb"), "PATCH");
        assert_eq!(label(labels, "scope"), "");
    }
}
