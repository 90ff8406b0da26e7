//! The deployment bundle: `Dockerfile`, `.dockerignore`, `docker-compose.yml` and `deploy/`
//! (collector, Prometheus, Grafana, the development secret and token scripts). Nothing here runs
//! Docker: the files are parsed and checked against each other, the Prometheus config goes
//! through `promtool`, and the development secrets and token go through the registry's own key
//! loading and token verification.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use dsreg::api::grpc::auth::{AuthSettings, Authenticator};
use dsreg::api::grpc::principal::{Role, Tenant};
use dsreg::secrets::{FileKeyProvider, KeyProvider};
use serde_json::Value;

use dsreg::telemetry::metrics::names::{self as registry, Family};

/// The registry's families the dashboard shows, each of them; their names come from the
/// registry's own list, so renaming one there fails the dashboard checks here.
const SHOWN: &[Family] = &[
    registry::DATASOURCE_RECORDS,
    registry::DATASOURCE_ERRORS,
    registry::DATASOURCE_DEAD_LETTERED,
    registry::DATASOURCE_RESTARTS,
    registry::DATASOURCE_WORKER_STATE,
    registry::RELOAD_LATENCY,
    registry::LISTENER_CONNECTED,
    registry::LISTENER_RECONNECTS,
    registry::RPC_REQUESTS,
    registry::RPC_DURATION,
    registry::LEASES_HELD,
    registry::LEASE_MOVES,
];

/// The sample names of [`SHOWN`], as queries name them. The dashboard may query only these.
fn metrics() -> Vec<String> {
    SHOWN.iter().map(Family::sample).collect()
}

/// The metric labels the dashboard groups and filters by (`le` is the histogram buckets').
/// `instance` is the one Prometheus puts on every scraped series.
const LABELS: &[&str] = &["datasource", "state", "method", "le", "instance", "kind"];

/// The services the compose file must run.
const SERVICES: &[&str] = &[
    "postgres",
    "dsreg",
    "otel-collector",
    "jaeger",
    "prometheus",
    "grafana",
];

// --- Reading the files ----------------------------------------------------------------------

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// The one YAML document of the file, read by the registry's own YAML reader (yaml-rust2).
fn yaml(relative: &str) -> Value {
    let mut documents = dsreg::files::yaml::parse(&read(relative)).unwrap_or_else(|e| {
        panic!(
            "{relative} is not valid YAML: line {}: {}",
            e.line, e.message
        )
    });
    assert_eq!(documents.len(), 1, "{relative} holds one YAML document");
    documents.remove(0).value
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
}

/// A service's `environment`, in either the map or the `KEY=value` list form.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), value)
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let item = item.as_str().expect("environment entries are strings");
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn env_var(service: &Value, name: &str) -> String {
    environment(service)
        .remove(name)
        .unwrap_or_else(|| panic!("no {name} in the service's environment"))
}

/// One published port: the host address and port, and the container port.
#[derive(Debug)]
struct Published {
    host_ip: Option<String>,
    host_port: Option<u16>,
    container_port: u16,
}

fn port_number(text: &str) -> u16 {
    text.parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a port number"))
}

/// A service's `ports`, short (`[IP:][HOST:]CONTAINER[/proto]`) or long syntax.
fn published_ports(service: &Value) -> Vec<Published> {
    let Some(ports) = service["ports"].as_array() else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|port| match port {
            Value::Object(long) => Published {
                host_ip: long["host_ip"].as_str().map(str::to_owned),
                host_port: long["published"]
                    .as_str()
                    .map(port_number)
                    .or_else(|| long["published"].as_u64().map(|p| p as u16)),
                container_port: long["target"].as_u64().expect("a long-syntax target") as u16,
            },
            short => {
                let text = match short {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let text = text.split('/').next().unwrap_or_default();
                let parts: Vec<&str> = text.split(':').collect();
                match parts.as_slice() {
                    [container] => Published {
                        host_ip: None,
                        host_port: None,
                        container_port: port_number(container),
                    },
                    [host, container] => Published {
                        host_ip: None,
                        host_port: Some(port_number(host)),
                        container_port: port_number(container),
                    },
                    [ip, host, container] => Published {
                        host_ip: Some((*ip).to_owned()),
                        host_port: Some(port_number(host)),
                        container_port: port_number(container),
                    },
                    _ => panic!("cannot read the port mapping {text:?}"),
                }
            }
        })
        .collect()
}

/// One entry of a service's `volumes`: a bind mount of a host path or a named volume.
#[derive(Debug)]
struct Mount {
    source: String,
    target: String,
    bind: bool,
}

fn mounts(service: &Value) -> Vec<Mount> {
    let Some(volumes) = service["volumes"].as_array() else {
        return Vec::new();
    };
    volumes
        .iter()
        .map(|volume| match volume {
            Value::String(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap_or_default().to_owned();
                let target = parts
                    .next()
                    .unwrap_or_else(|| panic!("the volume {short:?} names no target"))
                    .to_owned();
                let bind = source.starts_with('.') || source.starts_with('/');
                Mount {
                    source,
                    target,
                    bind,
                }
            }
            Value::Object(long) => Mount {
                source: long["source"].as_str().unwrap_or_default().to_owned(),
                target: long["target"].as_str().unwrap_or_default().to_owned(),
                bind: long["type"] == "bind",
            },
            other => panic!("cannot read the volume {other}"),
        })
        .collect()
}

/// Where `service` mounts `source` (a repository path like `./deploy/prometheus.yml`).
fn mount_target(service: &Value, source: &str) -> String {
    mounts(service)
        .into_iter()
        .find(|m| m.source == source)
        .unwrap_or_else(|| panic!("the service does not mount {source}"))
        .target
}

fn port_of(address: &str) -> u16 {
    let (_, port) = address
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{address:?} has no port"));
    port_number(port)
}

/// The Dockerfile's instructions, continuation lines joined and comments dropped, grouped by
/// stage: `(FROM arguments, [(INSTRUCTION, arguments)])`.
fn dockerfile_stages() -> Vec<(String, Vec<(String, String)>)> {
    let text = read("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            current.push_str(continued);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (instruction, arguments) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        instructions.push((
            instruction.to_ascii_uppercase(),
            arguments.trim().to_owned(),
        ));
        current.clear();
    }
    let mut stages: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut preamble = Vec::new();
    for (instruction, arguments) in instructions {
        if instruction == "FROM" {
            stages.push((arguments, Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push((instruction, arguments));
        } else {
            preamble.push(instruction);
        }
    }
    assert!(
        preamble.iter().all(|i| i == "ARG"),
        "only ARG may come before the first FROM, found {preamble:?}"
    );
    stages
}

fn instruction_args<'a>(body: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    body.iter()
        .filter(|(i, _)| i == name)
        .map(|(_, a)| a.as_str())
        .collect()
}

/// Every panel of a Grafana dashboard, those inside rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn panel_exprs(panel: &Value) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["expr"].as_str())
        .collect()
}

/// Every PromQL query in the dashboard: panel targets and template variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = panels(dashboard)
        .into_iter()
        .flat_map(panel_exprs)
        .map(str::to_owned)
        .collect();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        match &variable["query"] {
            Value::String(q) => queries.push(q.clone()),
            Value::Object(q) => {
                queries.extend(q.get("query").and_then(Value::as_str).map(str::to_owned))
            }
            _ => {}
        }
    }
    queries
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/dashboards/dsreg.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/dashboards/dsreg.json is not JSON: {e}"))
}

/// The `dsreg_*` identifiers a query names.
fn dsreg_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && query[i..].starts_with("dsreg_") {
            let end = query[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(query.len(), |n| i + n);
            names.insert(query[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// The listed metric a queried series belongs to: itself, or the histogram whose `_bucket`,
/// `_sum` or `_count` series it is.
fn listed_metric(series: &str) -> Option<String> {
    metrics().into_iter().find(|metric| {
        series == *metric
            || (!metric.ends_with("_total")
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| series.strip_suffix(suffix) == Some(metric.as_str())))
    })
}

/// The label names a query groups by (`by (…)`), filters on (`{label=…}`) or reads
/// (`label_values(metric, label)`).
fn label_names(query: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut add_list = |list: &str| {
        for label in list.split(',') {
            let label = label.trim();
            if !label.is_empty() {
                labels.insert(label.to_owned());
            }
        }
    };
    for (i, _) in query.match_indices("by (") {
        let rest = &query[i + 4..];
        add_list(&rest[..rest.find(')').expect("a closed by (…)")]);
    }
    if let Some(rest) = query.strip_prefix("label_values(") {
        let inside = &rest[..rest.find(')').expect("a closed label_values(…)")];
        add_list(inside.rsplit(',').next().unwrap_or_default());
    }
    for (i, _) in query.match_indices('{') {
        let rest = &query[i + 1..];
        let selector = &rest[..rest.find('}').expect("a closed selector")];
        for matcher in selector.split(',') {
            let name = matcher.split(['=', '!']).next().unwrap_or_default();
            add_list(name);
        }
    }
    labels
}

// --- docker-compose.yml ---------------------------------------------------------------------

#[test]
fn every_compose_service_has_an_image_or_a_build() {
    let compose = compose();
    let services = compose["services"].as_object().expect("a services map");
    for name in SERVICES {
        assert!(services.contains_key(*name), "no {name} service");
    }
    for (name, service) in services {
        let image = service["image"].as_str();
        let build = &service["build"];
        assert!(
            image.is_some() || !build.is_null(),
            "service {name} has neither an image nor a build"
        );
        if build.is_null() {
            let image = image.unwrap_or_default();
            let tag = image.rsplit_once(':').map(|(_, tag)| tag);
            assert!(
                tag.is_some_and(|t| t != "latest" && !t.contains('/')),
                "service {name}: pin the image to a version, not {image:?}"
            );
        }
    }
    let build = &service(&compose, "dsreg")["build"];
    let context = build["context"].as_str().or(build.as_str()).unwrap_or(".");
    let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
    assert_eq!(context, ".", "dsreg is built from the repository");
    assert!(repo_path(dockerfile).is_file(), "{dockerfile} is missing");
}

#[test]
fn dsreg_starts_after_a_healthy_postgres_and_reaches_it_by_service_name() {
    let compose = compose();
    let dsreg = service(&compose, "dsreg");
    let postgres = service(&compose, "postgres");

    assert_eq!(
        dsreg["depends_on"]["postgres"]["condition"], "service_healthy",
        "dsreg waits for postgres to be healthy"
    );
    assert!(
        postgres["healthcheck"]["test"].is_array() || postgres["healthcheck"]["test"].is_string(),
        "postgres has a healthcheck"
    );
    assert!(
        postgres["image"]
            .as_str()
            .unwrap_or_default()
            .starts_with("postgres:15"),
        "postgres runs PostgreSQL 15"
    );
    for dependency in dsreg["depends_on"]
        .as_object()
        .expect("depends_on as a map")
        .keys()
    {
        service(&compose, dependency);
    }

    let url = reqwest::Url::parse(&env_var(dsreg, "DATABASE_URL")).expect("DATABASE_URL is a URL");
    let pg_env = environment(postgres);
    assert_eq!(url.scheme(), "postgres");
    assert_eq!(
        url.host_str(),
        Some("postgres"),
        "DATABASE_URL names the postgres service"
    );
    assert_eq!(url.port().unwrap_or(5432), 5432);
    assert_eq!(
        Some(url.username()),
        pg_env.get("POSTGRES_USER").map(String::as_str)
    );
    assert_eq!(
        url.password(),
        pg_env.get("POSTGRES_PASSWORD").map(String::as_str)
    );
    assert_eq!(
        Some(url.path().trim_start_matches('/')),
        pg_env.get("POSTGRES_DB").map(String::as_str)
    );
}

#[test]
fn the_published_ports_are_the_ones_the_services_listen_on_and_stay_on_localhost() {
    let compose = compose();
    let dsreg = service(&compose, "dsreg");
    let http = env_var(dsreg, "DSREG_HTTP_ADDR");
    let grpc = env_var(dsreg, "DSREG_GRPC_ADDR");
    assert_eq!(
        http, "0.0.0.0:8080",
        "HTTP listens on every interface of the container"
    );
    assert_eq!(
        grpc, "0.0.0.0:50051",
        "gRPC listens on every interface of the container"
    );

    let expected: &[(&str, &[u16])] = &[
        ("dsreg", &[port_of(&http), port_of(&grpc)]),
        ("jaeger", &[16686]),
        ("prometheus", &[9090]),
        ("grafana", &[3000]),
    ];
    for (name, ports) in expected {
        let published = published_ports(service(&compose, name));
        for port in *ports {
            let mapping = published
                .iter()
                .find(|p| p.container_port == *port)
                .unwrap_or_else(|| panic!("{name} does not publish port {port}"));
            assert_eq!(
                mapping.host_port,
                Some(*port),
                "{name} publishes {port} as {port}"
            );
        }
    }
    // The stack runs with development secrets and passwords: nothing is reachable from outside
    // the machine.
    for (name, service) in compose["services"].as_object().unwrap() {
        for port in published_ports(service) {
            assert_eq!(
                port.host_ip.as_deref(),
                Some("127.0.0.1"),
                "{name} publishes {port:?} beyond 127.0.0.1"
            );
        }
    }
}

#[test]
fn every_file_the_compose_file_mounts_exists_in_the_repository() {
    let compose = compose();
    let declared: BTreeSet<&str> = compose["volumes"]
        .as_object()
        .map(|v| v.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let mut binds = 0;
    for (name, service) in compose["services"].as_object().unwrap() {
        for mount in mounts(service) {
            if mount.bind {
                let relative = mount.source.strip_prefix("./").unwrap_or_else(|| {
                    panic!(
                        "{name} mounts {:?}: mount repository paths as ./…",
                        mount.source
                    )
                });
                assert!(
                    repo_path(relative).exists(),
                    "{name} mounts {relative}, which is not in the repository"
                );
                binds += 1;
            } else {
                assert!(
                    declared.contains(mount.source.as_str()),
                    "{name} uses the volume {:?}, which the top-level volumes do not declare",
                    mount.source
                );
            }
        }
    }
    assert!(
        binds >= 5,
        "the collector, Prometheus, Grafana and secrets mounts are checked"
    );
}

// --- Traces -----------------------------------------------------------------------------------

#[test]
fn dsreg_exports_traces_to_the_collector_which_forwards_them_to_jaeger() {
    let compose = compose();
    let dsreg = service(&compose, "dsreg");
    assert_eq!(env_var(dsreg, "OTEL_SERVICE_NAME"), "dsreg");
    let endpoint = reqwest::Url::parse(&env_var(dsreg, "OTEL_EXPORTER_OTLP_ENDPOINT"))
        .expect("OTEL_EXPORTER_OTLP_ENDPOINT is a URL");
    assert_eq!(
        endpoint.as_str().trim_end_matches('/'),
        "http://otel-collector:4317"
    );

    let collector_service = service(&compose, "otel-collector");
    let command = collector_service["command"].to_string();
    let config_path = mount_target(collector_service, "./deploy/otel-collector.yaml");
    assert!(
        command.contains(&format!("--config={config_path}")),
        "the collector runs with the mounted config {config_path}: {command}"
    );

    let collector = yaml("deploy/otel-collector.yaml");
    let grpc = &collector["receivers"]["otlp"]["protocols"]["grpc"];
    assert!(grpc.is_object(), "the otlp receiver takes gRPC");
    assert_eq!(
        port_of(
            grpc["endpoint"]
                .as_str()
                .expect("an explicit gRPC endpoint")
        ),
        endpoint.port().unwrap(),
        "dsreg sends to the port the collector listens on"
    );
    assert!(
        grpc["endpoint"].as_str().unwrap().starts_with("0.0.0.0:"),
        "the receiver listens beyond the collector's own container"
    );

    let jaeger_exporter = &collector["exporters"]["otlp/jaeger"];
    assert_eq!(jaeger_exporter["endpoint"], "jaeger:4317");
    assert_eq!(jaeger_exporter["tls"]["insecure"], true);
    let jaeger = service(&compose, "jaeger");
    assert!(
        jaeger["image"]
            .as_str()
            .unwrap_or_default()
            .starts_with("jaegertracing/all-in-one:")
    );
    assert_eq!(env_var(jaeger, "COLLECTOR_OTLP_ENABLED"), "true");
}

#[test]
fn the_collector_config_has_a_traces_pipeline_built_from_defined_components() {
    let collector = yaml("deploy/otel-collector.yaml");
    let traces = &collector["service"]["pipelines"]["traces"];
    assert!(traces.is_object(), "a traces pipeline");
    for section in ["receivers", "processors", "exporters"] {
        let used = traces[section]
            .as_array()
            .unwrap_or_else(|| panic!("the traces pipeline lists its {section}"));
        assert!(!used.is_empty(), "the traces pipeline has {section}");
        for component in used {
            let id = component.as_str().expect("component ids are strings");
            assert!(
                collector[section].get(id).is_some(),
                "the traces pipeline uses {section} {id}, which is not defined"
            );
        }
    }
    for extension in collector["service"]["extensions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let id = extension.as_str().unwrap();
        assert!(
            collector["extensions"].get(id).is_some(),
            "extension {id} is not defined"
        );
    }

    let protocols = &collector["receivers"]["otlp"]["protocols"];
    assert!(
        protocols["grpc"].is_object() && protocols["http"].is_object(),
        "OTLP over gRPC and HTTP"
    );
    let processors = traces["processors"].as_array().unwrap();
    assert!(processors.iter().any(|p| p == "batch"), "spans are batched");
    let exporters = traces["exporters"].as_array().unwrap();
    for exporter in ["otlp/jaeger", "debug"] {
        assert!(
            exporters.iter().any(|e| e == exporter),
            "traces go to {exporter}"
        );
    }
}

// --- Metrics ----------------------------------------------------------------------------------

#[test]
fn the_prometheus_config_passes_promtool_and_scrapes_dsreg() {
    let path = repo_path("deploy/prometheus.yml");
    let output = Command::new("promtool")
        .args(["check", "config"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running promtool: {e}; install it (Debian: apt-get install --no-install-recommends prometheus)"
            )
        });
    assert!(
        output.status.success(),
        "promtool check config failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let compose = compose();
    let prometheus_service = service(&compose, "prometheus");
    let config_path = mount_target(prometheus_service, "./deploy/prometheus.yml");
    assert!(
        prometheus_service["command"]
            .to_string()
            .contains(&format!("--config.file={config_path}")),
        "Prometheus runs with the mounted config {config_path}"
    );

    let http_port = port_of(&env_var(service(&compose, "dsreg"), "DSREG_HTTP_ADDR"));
    let target = format!("dsreg:{http_port}");
    let config = yaml("deploy/prometheus.yml");
    let job = config["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .find(|job| {
            job["static_configs"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["targets"].as_array().into_iter().flatten())
                .any(|t| t == target.as_str())
        })
        .unwrap_or_else(|| panic!("no scrape job targets {target}"));
    assert_eq!(
        job["metrics_path"].as_str().unwrap_or("/metrics"),
        "/metrics"
    );
}

#[test]
fn grafana_is_provisioned_with_prometheus_and_the_dsreg_dashboard() {
    let compose = compose();
    let grafana = service(&compose, "grafana");
    assert_eq!(
        mount_target(grafana, "./deploy/grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let dashboards_dir = mount_target(grafana, "./deploy/grafana/dashboards");

    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yaml");
    let prometheus = datasources["datasources"]
        .as_array()
        .expect("a datasources list")
        .iter()
        .find(|d| d["type"] == "prometheus")
        .expect("a Prometheus data source");
    let url = reqwest::Url::parse(prometheus["url"].as_str().expect("a url")).unwrap();
    let host = url.host_str().unwrap();
    let prometheus_service = service(&compose, host);
    assert!(
        published_ports(prometheus_service)
            .iter()
            .any(|p| Some(p.container_port) == url.port()),
        "the data source's port {:?} is Prometheus's",
        url.port()
    );
    let uid = prometheus["uid"]
        .as_str()
        .expect("the data source has a fixed uid");

    let providers = yaml("deploy/grafana/provisioning/dashboards/dsreg.yaml");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"], "file");
    assert_eq!(
        provider["options"]["path"].as_str(),
        Some(dashboards_dir.as_str()),
        "the provider reads the folder compose mounts the dashboards in"
    );

    // Every data source the dashboard names is the provisioned one.
    let dashboard = dashboard();
    let mut referenced = Vec::new();
    for panel in panels(&dashboard) {
        referenced.push(&panel["datasource"]);
        referenced.extend(
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| &t["datasource"]),
        );
    }
    referenced.extend(
        dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| &v["datasource"]),
    );
    for reference in referenced.into_iter().filter(|r| !r.is_null()) {
        if reference["type"] == "grafana" {
            continue;
        }
        assert_eq!(
            reference["uid"].as_str(),
            Some(uid),
            "a panel queries {reference}"
        );
    }
}

#[test]
fn the_dashboard_has_a_panel_for_each_signal() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "dsreg");
    let all = panels(&dashboard);
    let mut ids = BTreeSet::new();
    for panel in &all {
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel id")),
            "panel ids are unique"
        );
    }
    let [
        records,
        errors,
        dead_lettered,
        restarts,
        worker_state,
        reload_latency,
        listener_connected,
        listener_reconnects,
        rpc_requests,
        rpc_duration,
    ] = [
        registry::DATASOURCE_RECORDS,
        registry::DATASOURCE_ERRORS,
        registry::DATASOURCE_DEAD_LETTERED,
        registry::DATASOURCE_RESTARTS,
        registry::DATASOURCE_WORKER_STATE,
        registry::RELOAD_LATENCY,
        registry::LISTENER_CONNECTED,
        registry::LISTENER_RECONNECTS,
        registry::RPC_REQUESTS,
        registry::RPC_DURATION,
    ]
    .map(|f| f.sample());
    // Each panel, and what one of its queries must contain.
    let required: &[(&str, &[&str])] = &[
        ("Ingest rate", &[&format!("sum(rate({records}"), "[1m]"]),
        (
            "Ingest rate",
            &[&format!("by (datasource) (rate({records}"), "[1m]"],
        ),
        ("Errors", &[&format!("rate({errors}"), "[5m]"]),
        ("Dead letters", &[&dead_lettered]),
        ("Worker restarts", &[&restarts]),
        ("Worker states", &[&format!("by (state) ({worker_state}")]),
        (
            "Reload latency",
            &["histogram_quantile(", &format!("({reload_latency}_bucket")],
        ),
        ("Listener connected", &[&listener_connected]),
        ("Listener reconnects", &[&listener_reconnects]),
        (
            "RPC rate by method",
            &[&format!("by (method) (rate({rpc_requests}")],
        ),
        (
            "RPC latency by method",
            &[
                "histogram_quantile(",
                "by (method, le)",
                &format!("({rpc_duration}_bucket"),
            ],
        ),
    ];
    for (title, needles) in required {
        let panel = all
            .iter()
            .find(|p| p["title"] == *title)
            .unwrap_or_else(|| panic!("no {title:?} panel"));
        let exprs = panel_exprs(panel);
        assert!(
            exprs
                .iter()
                .any(|e| needles.iter().all(|needle| e.contains(needle))),
            "no query of the {title:?} panel contains all of {needles:?}: {exprs:?}"
        );
    }
}

#[test]
fn the_dashboard_queries_every_registry_metric_and_no_other() {
    let queries = dashboard_queries(&dashboard());
    let mut shown = BTreeSet::new();
    for query in &queries {
        for series in dsreg_names(query) {
            let metric = listed_metric(&series).unwrap_or_else(|| {
                panic!("the dashboard queries {series}, which is not in SHOWN: {query}")
            });
            shown.insert(metric);
        }
        for label in label_names(query) {
            assert!(
                LABELS.contains(&label.as_str()),
                "the dashboard uses the label {label:?}, which is not in LABELS: {query}"
            );
        }
    }
    let missing: Vec<_> = metrics()
        .into_iter()
        .filter(|m| !shown.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard does not show {missing:?}"
    );
}

// --- The image --------------------------------------------------------------------------------

#[test]
fn the_image_builds_dsreg_in_release_and_runs_it_unprivileged_on_both_ports() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "a multi-stage build");
    let (runtime_from, runtime) = stages.last().unwrap();
    assert!(
        runtime_from.starts_with("debian:bookworm-slim"),
        "the runtime image is Debian bookworm-slim, not {runtime_from:?}"
    );

    // The build stage: the release binary, with the locked dependencies and the toolchain
    // Cargo.toml asks for.
    let (build_stage, build_from) = stages[..stages.len() - 1]
        .iter()
        .find_map(|(from, body)| {
            let builds = instruction_args(body, "RUN").iter().any(|run| {
                run.contains("cargo build")
                    && run.contains("--release")
                    && run.contains("--locked")
                    && run.contains("--bin dsreg")
            });
            let name = from.split_whitespace().collect::<Vec<_>>();
            match name.as_slice() {
                [image, as_, name] if builds && as_.eq_ignore_ascii_case("as") => {
                    Some(((*name).to_owned(), (*image).to_owned()))
                }
                _ => None,
            }
        })
        .expect("a named stage runs `cargo build --release --locked --bin dsreg`");
    assert!(
        build_from.starts_with("rust:"),
        "built with the official Rust image"
    );
    assert_eq!(
        dockerfile_arg_default("RUST_VERSION"),
        Some(cargo_rust_version()),
        "the build toolchain is Cargo.toml's rust-version"
    );
    let dockerfile = read("Dockerfile");
    assert!(
        !dockerfile.contains("protobuf-compiler"),
        "the build needs no system protoc"
    );

    let copies = instruction_args(runtime, "COPY");
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with(&format!("--from={build_stage} "))
                && c.split_whitespace()
                    .nth(1)
                    .is_some_and(|src| src.ends_with("/dsreg"))),
        "the runtime stage copies the dsreg binary from {build_stage}: {copies:?}"
    );
    assert!(
        instruction_args(runtime, "RUN")
            .iter()
            .any(|r| r.contains("apt-get install") && r.contains("ca-certificates")),
        "the runtime image has CA certificates"
    );

    let user = instruction_args(runtime, "USER")
        .last()
        .copied()
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0" && !uid.is_empty(),
        "the image runs as an unprivileged user, not {user:?}"
    );

    let exposed: BTreeSet<u16> = instruction_args(runtime, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| port_number(p.split('/').next().unwrap()))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([8080, 50051]),
        "HTTP and gRPC are exposed"
    );
    let compose = compose();
    let dsreg = service(&compose, "dsreg");
    for variable in ["DSREG_HTTP_ADDR", "DSREG_GRPC_ADDR"] {
        let port = port_of(&env_var(dsreg, variable));
        assert!(
            exposed.contains(&port),
            "{variable} listens on an exposed port"
        );
    }

    assert_eq!(instruction_args(runtime, "ENTRYPOINT"), [r#"["dsreg"]"#]);
    assert_eq!(instruction_args(runtime, "CMD"), [r#"["serve"]"#]);
}

/// The default of an `ARG` declared before the first `FROM`.
fn dockerfile_arg_default(name: &str) -> Option<String> {
    read("Dockerfile")
        .lines()
        .take_while(|l| !l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .filter_map(|l| l.trim().strip_prefix("ARG "))
        .find_map(|arg| arg.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
}

/// `rust-version` from Cargo.toml.
fn cargo_rust_version() -> String {
    read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version"))
        .and_then(|rest| rest.split('"').nth(1))
        .expect("Cargo.toml has a rust-version")
        .to_owned()
}

#[test]
fn the_build_context_leaves_out_build_output_local_state_and_secrets() {
    let ignored: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_owned())
        .collect();
    for path in ["target", ".dsreg", ".git", "deploy/secrets"] {
        assert!(ignored.contains(path), ".dockerignore leaves out {path}");
    }
}

// --- Development secrets and tokens ---------------------------------------------------------

/// The authenticator `dsreg serve` builds from the compose file's auth settings, with the
/// secret file at `secret_file`.
fn compose_authenticator(secret_file: &Path) -> Authenticator {
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        auth: AuthSettings,
    }
    let compose = compose();
    let dsreg = service(&compose, "dsreg");
    let args = Args::parse_from([
        "dsreg".to_owned(),
        "--auth-hs256-secret-file".to_owned(),
        secret_file.display().to_string(),
        "--auth-issuer".to_owned(),
        env_var(dsreg, "DSREG_AUTH_ISSUER"),
        "--auth-audience".to_owned(),
        env_var(dsreg, "DSREG_AUTH_AUDIENCE"),
    ]);
    Authenticator::from_settings(&args.auth).expect("dsreg accepts the development secret")
}

fn run_script(script: &str, arg: &Path, env: &[(&str, &str)]) -> String {
    let mut command = Command::new("sh");
    command.arg(repo_path(script)).arg(arg);
    // Only the defaults and what this test sets: the caller's environment must not leak in.
    for name in [
        "TOKEN_SUB",
        "TOKEN_ROLE",
        "TOKEN_ORG",
        "TOKEN_TTL_SECS",
        "DSREG_AUTH_ISSUER",
        "DSREG_AUTH_AUDIENCE",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} failed (it needs openssl):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[test]
fn the_documented_development_secrets_and_tokens_are_accepted_by_the_registry() {
    // Where the stack finds them: secrets-init copies deploy/secrets/ into the volume dsreg
    // reads its key files from, under the names the script writes.
    let compose = compose();
    let dsreg = service(&compose, "dsreg");
    let init = service(&compose, "secrets-init");
    let volume_dir = mounts(dsreg)
        .into_iter()
        .find(|m| !m.bind && mounts(init).iter().any(|i| i.source == m.source))
        .expect("dsreg mounts the volume secrets-init fills")
        .target;
    assert!(
        mounts(init)
            .iter()
            .any(|m| m.bind && m.source == "./deploy/secrets")
    );
    assert_eq!(
        dsreg["depends_on"]["secrets-init"]["condition"],
        "service_completed_successfully"
    );
    for (variable, file) in [
        ("DSREG_AUTH_HS256_SECRET_FILE", "hs256.key"),
        ("DSREG_MASTER_KEY_FILE", "master-keys.json"),
    ] {
        assert_eq!(env_var(dsreg, variable), format!("{volume_dir}/{file}"));
        assert!(
            init["command"].to_string().contains(file),
            "secrets-init copies {file}"
        );
    }
    let ignored = read("deploy/secrets/.gitignore");
    assert!(
        ignored.lines().any(|l| l.trim() == "*"),
        "deploy/secrets/ is never committed"
    );

    // Arrange: the secrets, made as the README says.
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    run_script("deploy/dev-secrets.sh", &secrets, &[]);
    let hs256 = secrets.join("hs256.key");
    let master_keys = secrets.join("master-keys.json");
    for file in [&hs256, &master_keys] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is private", file.display());
    }
    let before = std::fs::read(&hs256).unwrap();
    run_script("deploy/dev-secrets.sh", &secrets, &[]);
    assert_eq!(
        std::fs::read(&hs256).unwrap(),
        before,
        "running it again keeps the secret, so minted tokens stay valid"
    );
    let keys = FileKeyProvider::load(&master_keys).expect("dsreg loads the master key file");
    assert_eq!(keys.active_version(), 1);
    let authenticator = compose_authenticator(&hs256);

    // Act: mint tokens as the README says.
    let admin = run_script("deploy/dev-token.sh", &hs256, &[]);
    let viewer = run_script(
        "deploy/dev-token.sh",
        &hs256,
        &[
            ("TOKEN_ROLE", "datasource:viewer"),
            ("TOKEN_ORG", "acme"),
            ("TOKEN_SUB", "ada"),
        ],
    );

    // Assert: the registry takes them, with the roles and tenants asked for.
    let admin = authenticator
        .authenticate_now(Some(&format!("Bearer {}", admin.trim())))
        .expect("the default token is accepted");
    assert_eq!(admin.subject, "dev");
    assert_eq!(admin.role, Role::Admin);
    assert_eq!(admin.tenant, Tenant::All);
    let viewer = authenticator
        .authenticate_now(Some(&format!("Bearer {}", viewer.trim())))
        .expect("a viewer token is accepted");
    assert_eq!(viewer.subject, "ada");
    assert_eq!(viewer.role, Role::Viewer);
    assert_eq!(
        viewer.tenant,
        Tenant::Org {
            org: "acme".into(),
            projects: None
        }
    );
    let other_secret = dir.path().join("other");
    run_script("deploy/dev-secrets.sh", &other_secret, &[]);
    let forged = run_script("deploy/dev-token.sh", &other_secret.join("hs256.key"), &[]);
    assert!(
        authenticator
            .authenticate_now(Some(&format!("Bearer {}", forged.trim())))
            .is_err(),
        "a token signed with another secret is refused"
    );
}

// --- README -----------------------------------------------------------------------------------

#[test]
fn the_readme_explains_running_with_docker_compose() {
    let readme = read("README.md");
    let (_, section) = readme
        .split_once("## Running with docker compose")
        .expect("README.md has a \"Running with docker compose\" section");
    let section = section.split("\n## ").next().unwrap();
    for needle in [
        "deploy/dev-secrets.sh",
        "docker compose up --build",
        "deploy/dev-token.sh",
        "16686",
        "9090",
        "3000",
    ] {
        assert!(section.contains(needle), "the section mentions {needle}");
    }
}
