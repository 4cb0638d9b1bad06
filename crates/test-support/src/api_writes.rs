//! Write requests as the API server itself counts them (`apiserver_request_total`), so every way
//! a benchmark compares is counted the same, whoever sent the writes: consumers, the operator,
//! the benchmark playing a Job.

use kube::Client;

/// Verbs that change state.
const WRITE_VERBS: [&str; 5] = ["POST", "PATCH", "PUT", "DELETE", "APPLY"];

/// Write requests the API server has served so far, to any resource (`resources` empty) or to
/// the named resources only (plural names, e.g. `templatecaches`).
pub async fn served(client: &Client, resources: &[&str]) -> f64 {
    let request = http::Request::get("/metrics")
        .body(vec![])
        .expect("request");
    let text = client
        .request_text(request)
        .await
        .expect("API server /metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            WRITE_VERBS
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter(|l| {
            resources.is_empty()
                || resources
                    .iter()
                    .any(|r| l.contains(&format!("resource=\"{r}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
