//! templatecache: a Kubernetes operator that keeps exactly one staging copy of each large
//! template and shares it by reference (the fix for CLOUDSTACK-7539 done the Kubernetes way).
//!
//! - [`api`]: the resource types, the contract.
//! - [`controller`]: one reconciler per resource.
//! - [`client`]: acquire / wait / release for in-cluster controllers written in Rust.
//! - [`copy`]: the data mover a copy Job runs; knows nothing of controllers.

pub mod api;
pub mod client;
pub mod controller;
pub mod copy;
pub mod runtime;

#[cfg(test)]
mod layering {
    use std::path::Path;

    /// The modules each module may import: the layering of the README's layout table. `api` is
    /// the contract everything builds on; the client library, the data mover and the runtime
    /// know nothing of the controllers (the controllers may use all of them).
    const MAY_IMPORT: [(&str, &[&str]); 4] = [
        ("api", &[]),
        ("client", &["api"]),
        ("copy", &["api"]),
        ("runtime", &["api"]),
    ];

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                out.push((path.display().to_string(), text));
            }
        }
    }

    #[test]
    fn no_module_imports_one_above_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut violations = vec![];
        for (module, allowed) in MAY_IMPORT {
            let mut files = vec![];
            sources(&src.join(module), &mut files);
            assert!(!files.is_empty(), "src/{module} has no sources");
            for (path, text) in files {
                for (at, _) in text.match_indices("crate::") {
                    let used: String = text[at + "crate::".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if used != module && !allowed.contains(&used.as_str()) {
                        violations.push(format!("{path} uses crate::{used}"));
                    }
                }
            }
        }
        assert!(violations.is_empty(), "{violations:#?}");
    }
}
