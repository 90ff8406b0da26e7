//! dsreg, the datasource registry: connector configurations in Postgres, one worker per
//! active datasource, hot reload when a version is published.
//!
//! Map of the crate, in layers: a module uses only modules listed after it (the test below
//! reads every `crate::` path of every module and fails on one that points up):
//! - [`cli`](crate::cli) parses the command line; [`client`] is the CLI's side of the API.
//! - [`app`] wires and runs; [`config`] holds every setting (each layer's own settings types).
//! - [`api`]: the gRPC and HTTP ports.
//! - [`files`]: datasources from YAML files (import, a watched folder, export), written through
//!   the same repositories and checks as the API.
//! - [`harness`]: a connector and transform run on samples, for `dsreg test`.
//! - [`supervisor`]: reconcile, workers, backoff, the batched state writer, lifecycle ops.
//! - [`outbox`]: the LISTEN connection and the outbox reader that never skips an event
//!   committed out of order.
//! - [`connectors`]: the connector trait, the catalog, built-in kinds, sinks.
//! - [`secrets`]: key providers, sealing and opening secrets, rotation and rewrap.
//! - [`transform`]: a version's Rhai script run per record under hard limits; output schema checks.
//! - [`db`]: pool, migrations, the embedded Postgres launcher, the repositories.
//! - [`telemetry`](crate::telemetry): logging, redaction, panics and the Prometheus registry:
//!   a sink the layers above write to, reading none of them.
//! - [`backoff`]: the one retry policy every retrying loop paces itself with.
//! - [`own_thread`]: a runtime on a thread of its own, for what must not wait behind the
//!   shared one (lease renewal, the LISTEN connection, the health checks).
//! - [`domain`]: names and states as types; [`encoding`]: strict percent and hex decoders.

pub mod api;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod connectors;
pub mod db;
pub mod domain;
pub mod encoding;
pub mod files;
pub mod harness;
pub mod outbox;
pub mod own_thread;
pub mod secrets;
pub mod supervisor;
pub mod telemetry;
pub mod transform;

/// mimalloc serves the many small, short-lived allocations of transforms, JSON records and
/// RPCs faster than the system allocator; set here so tests and benchmarks run on it too. The
/// meter around it counts each thread's live bytes for the transforms' memory limit.
#[global_allocator]
static ALLOCATOR: transform::Metered<mimalloc::MiMalloc> = transform::Metered(mimalloc::MiMalloc);

#[cfg(test)]
mod layering {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// The crate's modules, top layer first: each may use only those after it.
    const LAYERS: &[&str] = &[
        "cli",
        "client",
        "app",
        "config",
        "api",
        "files",
        "harness",
        "supervisor",
        "outbox",
        "connectors",
        "secrets",
        "transform",
        "db",
        "telemetry",
        "backoff",
        "encoding",
        "own_thread",
        "domain",
    ];

    /// The top-level modules a source text names through `crate::` paths (`crate::a::b`,
    /// `crate::{a, b::c}`), comments aside.
    fn named_modules(text: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                // `crate::` itself, not the tail of a name like `some_crate::`.
                let path_start =
                    !rest[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
                rest = &rest[at + "crate::".len()..];
                if !path_start {
                    continue;
                }
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .collect(),
                    None => vec![rest],
                };
                for name in names {
                    let name: String = name
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
            }
        }
        found
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn a_module_uses_only_the_layers_below_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut upward = Vec::new();
        let mut seen = BTreeSet::new();
        for file in &files {
            let relative = file.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap().as_os_str();
            let module = first.to_str().unwrap().trim_end_matches(".rs");
            if matches!(module, "lib" | "main") {
                continue;
            }
            seen.insert(module.to_owned());
            let layer = LAYERS
                .iter()
                .position(|m| *m == module)
                .unwrap_or_else(|| panic!("{module} is in no layer: add it to LAYERS"));
            let text = std::fs::read_to_string(file).unwrap();
            for used in named_modules(&text) {
                let Some(used_layer) = LAYERS.iter().position(|m| *m == used) else {
                    continue;
                };
                if used_layer < layer {
                    upward.push(format!("{} uses {used}", relative.display()));
                }
            }
        }
        assert!(upward.is_empty(), "imports pointing up: {upward:#?}");
        let listed: BTreeSet<String> = LAYERS.iter().map(|m| (*m).to_owned()).collect();
        assert_eq!(seen, listed, "LAYERS lists the crate's modules");
    }

    #[test]
    fn paths_are_read_from_single_and_grouped_uses() {
        let text = "use crate::db::Pool;\nuse crate::{api, telemetry::metrics};\n\
                    // crate::cli in a comment\nlet x = crate::outbox::CHANNEL;\n\
                    use other_crate::app;\n";
        let found: Vec<String> = named_modules(text).into_iter().collect();
        assert_eq!(found, ["api", "db", "outbox", "telemetry"]);
    }
}
