//! The API types: the contract with users, scripts and other controllers.

// `printcolumn(... type_ = "integer" ...)` repeats by design in the derive attributes.
#![allow(clippy::duplicated_attributes)]

pub mod conditions;
pub mod names;
pub mod reasons;
pub mod references;
mod staging_store;
mod template_cache;
mod template_cache_claim;

pub use staging_store::*;
pub use template_cache::*;
pub use template_cache_claim::*;

use kube::CustomResourceExt;

/// The CRDs as one multi-document YAML stream, the content of `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in [
        TemplateCache::crd(),
        TemplateCacheClaim::crd(),
        StagingStore::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/` is what users and the Helm chart install: it must be exactly what the types say.
    #[test]
    fn crds_folder_matches_the_rust_types() {
        let committed = include_str!("../../../crds/templatecache.io.yaml");
        let generated = crds_yaml().expect("render CRDs");
        assert!(
            committed == generated,
            "crds/templatecache.io.yaml is stale: run `make crds` and commit the result"
        );
    }

    /// Helm installs CRDs only from the chart's own `crds/` folder, so it carries a copy.
    #[test]
    fn the_charts_crds_are_the_same_as_crds_folder() {
        let chart =
            include_str!("../../../charts/templatecache-operator/crds/templatecache.io.yaml");
        assert!(
            chart == include_str!("../../../crds/templatecache.io.yaml"),
            "charts/templatecache-operator/crds/ is stale: run `make crds` and commit the result"
        );
    }
}
