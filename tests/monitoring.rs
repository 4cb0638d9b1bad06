//! What the chart ships for monitoring: the PrometheusRule passes `promtool check rules` and its
//! unit tests (`charts/templatecache-operator/tests/alerts_test.yaml`, run by `promtool test
//! rules`), every alert has a test that fires it, and every metric an alert or a Grafana panel
//! queries is one a running operator exports on `/metrics`.

use templatecache_test_support as support;

use std::collections::BTreeSet;
use std::time::Duration;

use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use support::eventually;
use support::operator::OperatorProcess;
use support::rig::Rig;
use support::tools::{helm_offline, promtool, run};
use templatecache_api::StagingStore;

const CHART: &str = "charts/templatecache-operator";
const UNIT_TESTS: &str = "charts/templatecache-operator/tests/alerts_test.yaml";

/// The chart rendered as release "templatecache" in "templatecache-system" (the names the unit
/// tests' series carry), one JSON value per object.
fn render(values: &[&str]) -> Vec<serde_json::Value> {
    let mut command = helm_offline();
    command.args([
        "template",
        "templatecache",
        CHART,
        "--namespace",
        "templatecache-system",
    ]);
    command.args(values);
    let rendered = run(command).expect("helm template renders");
    serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("rendered YAML"))
        .filter(|o: &serde_json::Value| !o.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

const BOTH_ON: [&str; 4] = [
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.grafanaDashboard.enabled=true",
];

/// The rules of the rendered PrometheusRule, as a rule file promtool reads.
fn rule_groups(objects: &[serde_json::Value]) -> serde_json::Value {
    let rules = of_kind(objects, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules[0]["spec"].clone()
}

fn alert_names(groups: &serde_json::Value) -> BTreeSet<String> {
    let groups = groups["groups"].as_array().expect("groups");
    let rules = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"));
    rules
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

/// The dashboard the ConfigMap carries to Grafana.
fn dashboard(objects: &[serde_json::Value]) -> serde_json::Value {
    let maps = of_kind(objects, "ConfigMap");
    let map = maps
        .iter()
        .find(|m| m["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("a ConfigMap labelled grafana_dashboard: \"1\"");
    let json = map["data"]["templatecache.json"]
        .as_str()
        .expect("dashboard JSON");
    serde_json::from_str(json).expect("the dashboard is JSON")
}

#[test]
fn monitoring_is_off_by_default_and_the_leader_alert_needs_leader_election() {
    let defaults = render(&[]);
    assert!(of_kind(&defaults, "PrometheusRule").is_empty());
    assert!(of_kind(&defaults, "ConfigMap").is_empty());

    let mut bad = helm_offline();
    bad.args(["template", "t", CHART]);
    bad.args(["--set", "metrics.prometheusRule.copyStalledAfter=soon"]);
    let refused = run(bad).expect_err("a window that is no duration is refused");
    assert!(
        refused.contains("/metrics/prometheusRule/copyStalledAfter"),
        "{refused}"
    );

    let on = rule_groups(&render(&BOTH_ON));
    assert!(alert_names(&on).contains("TemplateCacheNoLeader"));
    let mut single = BOTH_ON.to_vec();
    single.extend([
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "replicaCount=1",
    ]);
    let without = alert_names(&rule_groups(&render(&single)));
    assert!(
        !without.contains("TemplateCacheNoLeader") && !without.is_empty(),
        "without leader election no replica is ever leader: {without:?}"
    );
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let groups = rule_groups(&render(&BOTH_ON));
    let dir = support::repo_root().join("target/monitoring");
    std::fs::create_dir_all(&dir).expect("target/monitoring");
    let rules = dir.join("rules.yaml");
    std::fs::write(&rules, serde_yaml::to_string(&groups).expect("YAML")).expect("write rules");
    let tests = dir.join("alerts_test.yaml");
    std::fs::copy(support::repo_root().join(UNIT_TESTS), &tests).expect("copy unit tests");

    let alerts = alert_names(&groups);
    let mut check = promtool();
    check.args(["check", "rules"]).arg(&rules);
    let checked = run(check).unwrap_or_else(|e| panic!("promtool check rules: {e}"));
    println!("{checked}");
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );

    let mut test = promtool();
    test.args(["test", "rules"]).arg(&tests);
    let tested = run(test).unwrap_or_else(|e| panic!("promtool test rules: {e}"));
    println!("{tested}");

    // Every alert is shown to fire at least once; a rule no test fires would pass vacuously.
    let unit: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&tests).expect("read unit tests"))
            .expect("unit tests are YAML");
    let fired: BTreeSet<String> = unit["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(fired, alerts, "alerts with a test that fires them");
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_one_the_operator_exports() {
    let objects = render(&BOTH_ON);
    let groups = rule_groups(&objects);
    let rule_exprs: Vec<String> = groups["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["expr"].as_str().expect("expr").to_owned())
        .collect();
    let panel_exprs = dashboard_queries(&dashboard(&objects));

    // A labelled family shows up on /metrics only once it has a sample, so the operator is
    // made to reconcile and to fail: the API server refuses the copy Job of an invalid
    // ServiceAccount name, which is a reconcile error, timed like every reconcile.
    let rig = Rig::builder("monitoring").store("1Gi").start().await;
    let (ns, store) = (&rig.ns, rig.store());
    let refused = ["--job-service-account", "Not_A_Name"];
    let operator = OperatorProcess::start("monitoring", &ns.name, &store.name, &refused);
    let source = json!({"source": {"http": {"url": "http://127.0.0.1:9/none.img"}}});
    ns.create_cache("refused-job", source).await;
    // The store's gauges come from the store controller's own first look, which may come after
    // the first reconcile error: the scrape must have both.
    let scrape = eventually(
        "a scrape with a reconcile error from the leader and the store's gauges",
        Duration::from_secs(30),
        || async {
            let scrape = operator.metrics().await;
            (scrape.contains("templatecache_reconcile_errors_total{")
                && scrape.contains("templatecache_leader 1")
                && scrape.contains("templatecache_store_evictable_bytes{"))
            .then_some(scrape)
        },
    )
    .await;
    let exported = exported_names(&scrape);
    for family in [
        "reconcile_errors_total{",
        "reconcile_duration_seconds_bucket{",
        "leader 1",
    ] {
        assert!(
            scrape.contains(&format!("templatecache_{family}")),
            "no templatecache_{family} on /metrics after 30 s:\n{scrape}"
        );
    }

    for (what, exprs) in [("alert", &rule_exprs), ("panel", &panel_exprs)] {
        let mut queried = BTreeSet::new();
        for expr in exprs {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "the {what} query {expr} reads no metric");
            for name in &names {
                assert!(
                    exported.contains(name),
                    "the {what} query {expr} reads {name}, which the operator does not export: {exported:?}"
                );
            }
            queried.extend(names);
        }
        println!("{what}s query {queried:?}");
    }
    // The panels the dashboard exists for: caches by phase, store usage against its watermark
    // and what eviction can free, copies and their bytes, references, reconcile errors and
    // latency, the leader.
    let panels: BTreeSet<String> = panel_exprs.iter().flat_map(|e| metric_names(e)).collect();
    for name in [
        "templatecache_caches",
        "templatecache_store_used_bytes",
        "templatecache_store_high_watermark_bytes",
        "templatecache_store_evictable_bytes",
        "templatecache_copies_failed_total",
        "templatecache_bytes_copied_total",
        "templatecache_references_held",
        "templatecache_reconcile_errors_total",
        "templatecache_reconcile_duration_seconds_bucket",
        "templatecache_leader",
    ] {
        assert!(panels.contains(name), "no panel shows {name}");
    }
}

#[tokio::test]
async fn a_deleted_store_leaves_the_metrics() {
    let rig = Rig::builder("store-metrics").store("1Gi").start().await;
    let (ns, store) = (&rig.ns, rig.store());
    let operator = OperatorProcess::start("store-metrics", &ns.name, &store.name, &[]);
    // An operator limited to a namespace looks only at stores it has a cache in.
    let source = json!({"source": {"http": {"url": "http://127.0.0.1:9/none.img"}}});
    ns.create_cache("in-the-store", source).await;
    let series = format!("store=\"{}\"", store.name);
    let exported = |present: bool| {
        let (operator, series) = (&operator, &series);
        move || async move { (operator.metrics().await.contains(series) == present).then_some(()) }
    };
    eventually(
        "the store's gauges",
        Duration::from_secs(30),
        exported(true),
    )
    .await;

    Api::<StagingStore>::all(ns.client.clone())
        .delete(&store.name, &DeleteParams::default())
        .await
        .expect("delete the store");
    eventually(
        "no gauge of the deleted store",
        Duration::from_secs(30),
        exported(false),
    )
    .await;
}

/// Every PromQL query of the dashboard: its panels' targets and its variables'
/// `label_values(<metric>, <label>)` queries (as the metric selector they read).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("a target's expr").to_owned())
        .collect();
    assert!(queries.len() >= 10, "{} panel queries", queries.len());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    for v in variables.iter().filter(|v| v["type"] == "query") {
        let query = v["query"]["query"].as_str().expect("variable query");
        let args = query
            .strip_prefix("label_values(")
            .unwrap_or_else(|| panic!("variable query {query} is label_values(...)"));
        let (selector, _label) = args.rsplit_once(',').expect("label_values(metric, label)");
        queries.push(selector.to_owned());
    }
    queries
}

/// Names of the series `/metrics` has or will have: every sample's name, and for each `# TYPE`
/// the names its samples take (a counter's `_total`, a histogram's `_bucket`, `_sum`, `_count`),
/// since a labelled family shows no sample before its first observation.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut words = declared.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                panic!("malformed {line}");
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The words of PromQL that open a grouping clause (`by (x)`, `on (y)`): not metrics either.
const PROMQL_GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other words of PromQL that are not metrics: operators, modifiers, and the aggregations,
/// which may be followed by their grouping clause (`sum by (x) (...)`) rather than by `(`.
const PROMQL_KEYWORDS: [&str; 20] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
];

/// The metric names a PromQL expression reads: identifiers outside label matchers, ranges,
/// strings and grouping clauses that are neither a function, an aggregation nor a keyword.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |from: usize, close: char| {
        (from..chars.len())
            .find(|&j| chars[j] == close)
            .map_or(chars.len(), |j| j + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' || c == '\'' {
            i = skip_to(i + 1, c);
        } else if c.is_ascii_digit() || c == '$' {
            // Numbers, durations, Grafana variables.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._$".contains(chars[i]))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let lower = word.to_lowercase();
            let keyword = PROMQL_KEYWORDS.contains(&lower.as_str())
                || PROMQL_GROUPING.contains(&lower.as_str());
            if PROMQL_GROUPING.contains(&word.as_str()) && next == Some(&'(') {
                let open = (i..chars.len()).find(|&j| chars[j] == '(').expect("(");
                i = skip_to(open + 1, ')');
            } else if next != Some(&'(') && !keyword {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn the_promql_reader_finds_the_metrics_and_only_them() {
    let expr = r#"histogram_quantile(0.99, sum by (controller, le) (rate(a_bucket{job=~"$job", x="y z"}[$__rate_interval])))
        / on (pod) group_left(node) b_total offset 5m > 0.1 unless absent(c) or sum(d) without (pod) * 1e3"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(names, ["a_bucket", "b_total", "c", "d"]);
    let exported = exported_names(
        "# TYPE x counter\n# TYPE h histogram\n# TYPE g gauge\ng 1\nh_bucket{le=\"1\"} 0\n\
         # TYPE a counter\n# TYPE b counter\n# TYPE c counter\n# TYPE d counter\n# EOF\n",
    );
    assert!(exported.contains("x_total") && exported.contains("h_count") && exported.contains("g"));
    assert!(!exported.contains("x"), "a counter's samples end in _total");
}
