//! Traces over real OTLP: a receiver built from the OpenTelemetry collector protocol gets the
//! spans of a registry running as the real binary. A gateway's call, the publish it makes,
//! the reconcile that applies it and the worker restart form one trace; a SQL publisher's
//! `dsreg.traceparent` reaches the reconcile too; a status stream's span is exported while the
//! stream is open; a span made inside a call is the call's child, and a call its caller did
//! not sample exports nothing; with the collector down, reloads still happen and the lost
//! spans are counted. Collectors behind TLS (a CA the test makes), over OTLP/gRPC and
//! OTLP/HTTP, with gzip and a header they check, get the same one trace; a collector's partial
//! success, over OTLP/gRPC (behind TLS) and OTLP/HTTP alike, is logged with its message and
//! counted.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::harness_client::HarnessClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::api::grpc::pb::registry_client::RegistryClient;
use tonic::transport::Channel;

use crate::helpers::otlp::{
    Behaviour, Got, Receiver, ServerTls, grpc_receiver, http_receiver, receiver,
};
use crate::helpers::{ServeProcess, TestDb, wait_for};

fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_SERVICE_NAME", "dsreg-test".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000".to_owned()),
    ]
}

async fn start(db: &TestDb, env: &[(&'static str, String)]) -> ServeProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ServeProcess::start(&db.url, &env).await
}

async fn generator_with_two_versions(ch: &Channel, name: &str) -> String {
    let mut ds = DatasourcesClient::new(ch.clone());
    let created = ds
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: name.into(),
            kind: "generator".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for rate in [1, 2] {
        ds.create_version(pb::CreateVersionRequest {
            datasource_id: created.id.clone(),
            config_json: serde_json::json!({ "rate_per_sec": rate, "template": {} }).to_string(),
            comment: String::new(),
        })
        .await
        .unwrap();
    }
    created.id
}

async fn running_on(ch: &Channel, id: &str, version: i32) {
    let life = LifecycleClient::new(ch.clone());
    wait_for(
        "the worker running the version",
        Duration::from_secs(20),
        || {
            let mut life = life.clone();
            let id = id.to_owned();
            async move {
                let s = life
                    .get_status(pb::GetStatusRequest { datasource_id: id })
                    .await
                    .ok()?
                    .into_inner();
                (s.status == pb::WorkerStatus::Running as i32 && s.running_version == version)
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_gateway_call_its_publish_the_reconcile_and_the_worker_restart_are_one_trace() {
    let db = TestDb::new().await;
    let (endpoint, received) = receiver().await;
    let env = otel_env(&endpoint);
    let server = start(&db, &env).await;
    let ch = server.channel().await;
    let id = generator_with_two_versions(&ch, "orders").await;
    DatasourcesClient::new(ch.clone())
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.clone(),
            version: 1,
        })
        .await
        .unwrap();
    running_on(&ch, &id, 1).await;

    // The gateway's trace: publish version 2 (a hot reload of the running worker).
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let gateway_span = "b7ad6b7169203331";
    let mut publish = tonic::Request::new(pb::PublishVersionRequest {
        datasource_id: id.clone(),
        version: 2,
    });
    publish.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{gateway_span}-01").parse().unwrap(),
    );
    DatasourcesClient::new(ch.clone())
        .publish_version(publish)
        .await
        .unwrap();
    running_on(&ch, &id, 2).await;

    // The span named `name` in trace `trace` (under `parent`, when given), once received.
    let find = |name: &'static str, trace: String, parent: Option<String>| {
        let received = received.clone();
        move || {
            let received = received.clone();
            let (trace, parent) = (trace.clone(), parent.clone());
            async move {
                received
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|s| {
                        s.name == name
                            && s.trace == trace
                            && parent.as_ref().is_none_or(|p| &s.parent == p)
                    })
                    .cloned()
            }
        }
    };
    let rpc = wait_for(
        "the RPC span, a child of the gateway's",
        Duration::from_secs(60),
        find(
            "dsreg.v1.Datasources/PublishVersion",
            trace.to_owned(),
            Some(gateway_span.to_owned()),
        ),
    )
    .await;
    let reconcile = wait_for(
        "the reconcile span, a child of the RPC's",
        Duration::from_secs(60),
        find("reconcile", trace.to_owned(), Some(rpc.span.clone())),
    )
    .await;
    wait_for(
        "the worker's stop and start, children of the reconcile",
        Duration::from_secs(60),
        || {
            let received = received.clone();
            let reconcile = reconcile.span.clone();
            async move {
                let got = received.0.lock().unwrap();
                let children: Vec<&str> = got
                    .iter()
                    .filter(|s| s.trace == trace && s.parent == reconcile)
                    .map(|s| s.name.as_str())
                    .collect();
                (children.contains(&"worker.start") && children.contains(&"worker.stop"))
                    .then_some(())
            }
        },
    )
    .await;
    // Log lines written inside the call carry its trace id.
    let logs = server.logs.lock().unwrap().clone();
    let inside: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("change committed") && l.contains("PublishVersion"))
        .collect();
    assert!(
        !inside.is_empty() && inside.iter().any(|l| l.contains(trace)),
        "no log line of the publish call carries trace id {trace}: {:?}",
        logs.iter()
            .filter(|l| l.contains("PublishVersion"))
            .take(3)
            .collect::<Vec<_>>()
    );
    // A call with no trace of its own starts one, and its log lines carry that trace's id.
    let created = logs
        .iter()
        .filter(|l| l.contains("change committed") && l.contains("CreateDatasource"))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .expect("the create call logged its change");
    let logged = created["span"]["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no trace id in {created}"))
        .to_owned();
    wait_for(
        "the create call's span, in the trace its log line names",
        Duration::from_secs(60),
        find("dsreg.v1.Datasources/CreateDatasource", logged, None),
    )
    .await;
    // A status stream's span ends when the call is answered: it is exported while the
    // stream is still open.
    let watch_trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let mut watch = tonic::Request::new(pb::GetStatusRequest {
        datasource_id: id.clone(),
    });
    watch.metadata_mut().insert(
        "traceparent",
        format!("00-{watch_trace}-{gateway_span}-01")
            .parse()
            .unwrap(),
    );
    let mut stream = LifecycleClient::new(ch.clone())
        .watch_status(watch)
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some(), "a first state");
    wait_for(
        "the WatchStatus span, with its stream open",
        Duration::from_secs(60),
        find(
            "dsreg.v1.Lifecycle/WatchStatus",
            watch_trace.to_owned(),
            Some(gateway_span.to_owned()),
        ),
    )
    .await;
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn a_sql_publish_with_a_traceparent_is_reconciled_in_the_publishers_trace() {
    let db = TestDb::new().await;
    let (endpoint, received) = receiver().await;
    let server = start(&db, &otel_env(&endpoint)).await;
    let ch = server.channel().await;
    let id = generator_with_two_versions(&ch, "orders").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let publisher = "00f067aa0ba902b7";
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL dsreg.traceparent = '00-{trace}-{publisher}-01'"
    ))
    .await
    .unwrap();
    let uuid: uuid::Uuid = id.parse().unwrap();
    tx.execute("SELECT dsreg_publish($1, 1)", &[&uuid])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    running_on(&ch, &id, 1).await;
    let reconcile = wait_for(
        "the reconcile span in the publisher's trace",
        Duration::from_secs(60),
        || {
            let received = received.clone();
            async move {
                received
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|s| s.name == "reconcile" && s.trace == trace)
                    .cloned()
            }
        },
    )
    .await;
    assert_eq!(reconcile.parent, publisher);
    assert!(reconcile.links.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn with_the_collector_down_reloads_still_happen_and_lost_spans_are_counted() {
    let db = TestDb::new().await;
    // A port nothing listens on.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let server = start(&db, &otel_env(&dead)).await;
    let ch = server.channel().await;
    let id = generator_with_two_versions(&ch, "orders").await;
    let mut ds = DatasourcesClient::new(ch.clone());
    // Every reload is applied (how soon is the otel bench's figure).
    for (n, version) in [1, 2, 1, 2, 1].into_iter().enumerate() {
        if n < 2 {
            ds.publish_version(pb::PublishVersionRequest {
                datasource_id: id.clone(),
                version,
            })
            .await
            .unwrap();
        } else {
            ds.rollback_version(pb::RollbackVersionRequest {
                datasource_id: id.clone(),
                to_version: version,
            })
            .await
            .unwrap();
        }
        running_on(&ch, &id, version).await;
    }
    let dropped = wait_for("lost spans counted", Duration::from_secs(60), || {
        let ch = ch.clone();
        async move {
            let m = RegistryClient::new(ch)
                .get_registry_metrics(pb::GetRegistryMetricsRequest {})
                .await
                .ok()?
                .into_inner();
            (m.spans_dropped > 0).then_some(m.spans_dropped)
        }
    })
    .await;
    assert!(dropped > 0);
    // The failure is logged, with what the exporter said.
    wait_for("the failed export logged", Duration::from_secs(60), || {
        let logs = server.logs.clone();
        async move {
            logs.lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("exporting spans to the OTLP collector failed"))
                .cloned()
        }
    })
    .await;
    server.stop().await;
}

/// `request` with a W3C `traceparent` naming span `parent` of `trace`, sampled or not.
fn traced<T>(request: T, trace: &str, parent: &str, sampled: bool) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    let flags = if sampled { "01" } else { "00" };
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-{flags}").parse().unwrap(),
    );
    request
}

#[tokio::test]
async fn a_span_made_inside_a_call_is_its_child_its_code_is_recorded_and_an_unsampled_call_exports_nothing()
 {
    let db = TestDb::new().await;
    let (endpoint, received) = receiver().await;
    let server = start(&db, &otel_env(&endpoint)).await;
    let ch = server.channel().await;
    let created = DatasourcesClient::new(ch.clone())
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "hook".into(),
            kind: "webhook".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let caller = "b7ad6b7169203331";
    let test = |trace: &str, sampled: bool| {
        traced(
            pb::RunTestRequest {
                datasource_id: created.id.clone(),
                config_json: serde_json::json!({ "transform": "#{ id: record.n }" }).to_string(),
                samples_json: vec!["[{\"n\": 1}]".into()],
                ..Default::default()
            },
            trace,
            caller,
            sampled,
        )
    };
    // Not sampled by the caller: under the default parent-based sampler neither the call's
    // span nor the test run's is exported.
    let unsampled = "1af7651916cd43dd8448eb211c80319c";
    let report = HarnessClient::new(ch.clone())
        .run_test(test(unsampled, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.inputs, 1);
    let sampled = "2af7651916cd43dd8448eb211c80319c";
    HarnessClient::new(ch.clone())
        .run_test(test(sampled, true))
        .await
        .unwrap();
    // A call refused for the caller's mistake carries its code and is not a server error.
    let refused = LifecycleClient::new(ch.clone())
        .get_status(traced(
            pb::GetStatusRequest {
                datasource_id: uuid::Uuid::new_v4().to_string(),
            },
            sampled,
            caller,
            true,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    let (rpc, run, missing) = wait_for(
        "the RunTest span, the test run's span and the GetStatus span",
        Duration::from_secs(60),
        || {
            let received = received.clone();
            async move {
                let got = received.0.lock().unwrap();
                let in_trace = |name: &str| {
                    got.iter()
                        .find(|s| s.trace == sampled && s.name == name)
                        .cloned()
                };
                Some((
                    in_trace("dsreg.v1.Harness/RunTest")?,
                    in_trace("harness.run")?,
                    in_trace("dsreg.v1.Lifecycle/GetStatus")?,
                ))
            }
        },
    )
    .await;
    assert_eq!(rpc.parent, caller, "the RPC span continues the caller's");
    assert_eq!(run.parent, rpc.span, "the test run is a child of the call");
    assert_eq!((rpc.grpc_code, rpc.failed), (Some(0), false));
    assert_eq!(
        (missing.grpc_code, missing.failed),
        (Some(tonic::Code::NotFound as i64), false)
    );
    // The calls' spans are exported from one queue in the order they ended, and the test
    // runs' from another: what was received of the first call is all there will be.
    let leaked: Vec<String> = received
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace == unsampled)
        .map(|s| s.name.clone())
        .collect();
    assert!(leaked.is_empty(), "an unsampled call exported {leaked:?}");
    server.stop().await;
}

/// The span named `name` in `trace` (a child of `parent`, when given), once received.
async fn span_in(received: &Receiver, name: &str, trace: &str, parent: Option<&str>) -> Got {
    wait_for(
        &format!("the span {name} in trace {trace}"),
        Duration::from_secs(60),
        || {
            let received = received.clone();
            async move {
                received
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|s| {
                        s.name == name && s.trace == trace && parent.is_none_or(|p| s.parent == p)
                    })
                    .cloned()
            }
        },
    )
    .await
}

/// A CA and a certificate for `localhost` it signed, made with the `openssl` CLI, and a
/// client certificate it signed (`client.crt`, `client.key`) that the collector requires:
/// the directory holding them, the server's TLS settings, and the CA file's path.
fn collector_certificates() -> (tempfile::TempDir, ServerTls, String) {
    let dir = tempfile::tempdir().unwrap();
    crate::pgtls::ca(dir.path(), "collector-ca");
    crate::pgtls::leaf(
        dir.path(),
        "collector-ca",
        "collector",
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    crate::pgtls::leaf(
        dir.path(),
        "collector-ca",
        "client",
        "dsreg",
        "extendedKeyUsage=clientAuth\n",
    );
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let tls = ServerTls {
        cert: read("collector.crt"),
        key: read("collector.key"),
        client_ca: Some(read("collector-ca.crt")),
    };
    let ca = dir.path().join("collector-ca.crt").display().to_string();
    (dir, tls, ca)
}

/// A registry exporting to a collector over mutual TLS and `protocol` (`grpc`,
/// `http/protobuf` or `http/json`) with gzip and a header the collector checks: a gateway's publish, its
/// reconcile and the worker's start arrive as one trace, every export compressed and carrying
/// the header.
async fn a_publish_reaches_a_tls_collector_in_one_trace(protocol: &str) {
    let db = TestDb::new().await;
    let (certs, tls, ca) = collector_certificates();
    let client = |name: &str| certs.path().join(name).display().to_string();
    let token = "t0ken-of-the-collector";
    let behaviour = Behaviour {
        header: Some(("x-collector-token".to_owned(), token.to_owned())),
        ..Behaviour::default()
    };
    let (endpoint, received) = if protocol == "grpc" {
        grpc_receiver(behaviour, Some(tls)).await
    } else {
        http_receiver(behaviour, Some(tls)).await
    };
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", ca),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            client("client.crt"),
        ),
        ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", client("client.key")),
        (
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            format!("x-collector-token={token}"),
        ),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".to_owned()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "10000".to_owned()),
        ("OTEL_SERVICE_NAME", "dsreg-test".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
    ];
    let server = start(&db, &env).await;
    let ch = server.channel().await;
    let id = generator_with_two_versions(&ch, "orders").await;
    DatasourcesClient::new(ch.clone())
        .publish_version(pb::PublishVersionRequest {
            datasource_id: id.clone(),
            version: 1,
        })
        .await
        .unwrap();
    running_on(&ch, &id, 1).await;
    // The gateway's trace: publish version 2 (a hot reload of the running worker).
    let trace = "7af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    DatasourcesClient::new(ch.clone())
        .publish_version(traced(
            pb::PublishVersionRequest {
                datasource_id: id.clone(),
                version: 2,
            },
            trace,
            caller,
            true,
        ))
        .await
        .unwrap();
    running_on(&ch, &id, 2).await;

    let rpc = span_in(
        &received,
        "dsreg.v1.Datasources/PublishVersion",
        trace,
        Some(caller),
    )
    .await;
    let reconcile = span_in(&received, "reconcile", trace, Some(&rpc.span)).await;
    span_in(&received, "worker.start", trace, Some(&reconcile.span)).await;
    // The RPC span follows the RPC conventions.
    let attribute = |key: &str| {
        rpc.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(attribute("rpc.system"), Some("grpc"));
    assert_eq!(attribute("rpc.service"), Some("dsreg.v1.Datasources"));
    assert_eq!(attribute("rpc.method"), Some("PublishVersion"));
    assert_eq!(attribute("network.peer.address"), Some("127.0.0.1"));
    assert!(
        attribute("server.address").is_some(),
        "{:?}",
        rpc.attributes
    );
    assert_eq!(rpc.grpc_code, Some(0));

    let seen = &received.1;
    let requests = seen.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(requests > 0);
    assert_eq!(
        seen.gzipped.load(std::sync::atomic::Ordering::Relaxed),
        requests,
        "every export is gzip-compressed"
    );
    assert_eq!(
        seen.refused.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "every export carries the header"
    );
    // Start-up says once where spans go, and the header's value is in no log line.
    let logs = server.logs.lock().unwrap().clone();
    let announced: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("spans are exported over OTLP"))
        .collect();
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert!(
        announced[0].contains(&format!(
            "localhost:{}",
            endpoint.rsplit(':').next().unwrap()
        )) && announced[0].contains(protocol)
            && announced[0].contains("gzip")
            && announced[0].contains("x-collector-token"),
        "{}",
        announced[0]
    );
    assert!(
        !logs.iter().any(|l| l.contains(token)),
        "the collector's header value was logged"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_publish_reaches_a_mutual_tls_collector_over_grpc_with_gzip_and_a_header_in_one_trace() {
    a_publish_reaches_a_tls_collector_in_one_trace("grpc").await;
}

#[tokio::test]
async fn a_publish_reaches_a_mutual_tls_collector_over_http_with_gzip_and_a_header_in_one_trace() {
    a_publish_reaches_a_tls_collector_in_one_trace("http/protobuf").await;
}

#[tokio::test]
async fn a_publish_reaches_a_mutual_tls_collector_over_http_json_with_gzip_and_a_header_in_one_trace()
 {
    a_publish_reaches_a_tls_collector_in_one_trace("http/json").await;
}

/// The message every export's partial success carries in the tests below.
const REJECTION: &str = "span rejected: attribute value too long";

/// A registry exporting with `env` to a collector (`received`) that answers every export with
/// a partial success of 3 rejected spans and [`REJECTION`]: the registry logs the rejection
/// with the collector's message (its own line, not the library's internal event), and counts
/// the rejected spans and the export in the metrics failed exports count in.
async fn a_partial_success_is_logged_and_counted(
    db: &TestDb,
    env: &[(&'static str, String)],
    received: &Receiver,
) -> ServeProcess {
    let server = start(db, env).await;
    let ch = server.channel().await;
    generator_with_two_versions(&ch, "orders").await;
    let logged = wait_for(
        "the collector's message in the log",
        Duration::from_secs(60),
        || {
            let logs = server.logs.clone();
            async move {
                logs.lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(REJECTION) && l.contains("rejected part of a span export"))
                    .cloned()
            }
        },
    )
    .await;
    assert!(logged.contains(r#""rejected":3"#), "{logged}");
    let dropped = wait_for("rejected spans counted", Duration::from_secs(60), || {
        let ch = ch.clone();
        async move {
            let m = RegistryClient::new(ch)
                .get_registry_metrics(pb::GetRegistryMetricsRequest {})
                .await
                .ok()?
                .into_inner();
            (m.spans_dropped > 0).then_some(m.spans_dropped)
        }
    })
    .await;
    // Every export is answered, and every answer rejects 3: nothing else is lost.
    assert_eq!(dropped % 3, 0, "{dropped} spans dropped");
    let (code, scrape) = crate::serve::http_get(&server.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    let failures: u64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("dsreg_otel_export_failures_total "))
        .unwrap_or_else(|| panic!("no export failure counter in {scrape}"))
        .trim()
        .parse()
        .unwrap();
    assert!(failures > 0, "{scrape}");
    assert!(
        !received.0.lock().unwrap().is_empty(),
        "spans were received"
    );
    let logs = server.logs.lock().unwrap().clone();
    let raw: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("PartialSuccess"))
        .collect();
    assert!(
        raw.is_empty(),
        "the library's own event reached the log: {raw:?}"
    );
    server
}

#[tokio::test]
async fn a_collectors_partial_success_over_http_is_logged_with_its_message_and_counted() {
    let db = TestDb::new().await;
    let (endpoint, received) = http_receiver(
        Behaviour {
            partial: Some((3, REJECTION.to_owned())),
            ..Behaviour::default()
        },
        None,
    )
    .await;
    let mut env = otel_env(&endpoint);
    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()));
    // The specification's word for no compression.
    env.push(("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none".to_owned()));
    env.push(("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".to_owned()));
    let server = a_partial_success_is_logged_and_counted(&db, &env, &received).await;
    assert_eq!(
        received
            .1
            .gzipped
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the traces-specific none wins over the general gzip"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_collectors_partial_success_over_grpc_is_logged_with_its_message_and_counted() {
    let db = TestDb::new().await;
    let (_certs, tls, ca) = collector_certificates();
    let (endpoint, received) = grpc_receiver(
        Behaviour {
            partial: Some((3, REJECTION.to_owned())),
            ..Behaviour::default()
        },
        Some(tls),
    )
    .await;
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let mut env = otel_env(&endpoint);
    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()));
    env.push(("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", ca));
    env.push(("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".to_owned()));
    let server = a_partial_success_is_logged_and_counted(&db, &env, &received).await;
    let seen = &received.1;
    assert_eq!(
        seen.gzipped.load(std::sync::atomic::Ordering::Relaxed),
        seen.requests.load(std::sync::atomic::Ordering::Relaxed),
        "every export is gzip-compressed"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_later_version_traceparent_is_audited_and_continued_over_grpc_and_sql_alike() {
    let db = TestDb::new().await;
    let (endpoint, received) = receiver().await;
    let server = start(&db, &otel_env(&endpoint)).await;
    let ch = server.channel().await;
    let id = generator_with_two_versions(&ch, "orders").await;
    let uuid: uuid::Uuid = id.parse().unwrap();

    // A SQL publisher's version-01 trace context: audited, and the reconcile continues it.
    let sql_trace = "3cf92f3577b34da6a3ce929d0e0e4736";
    let publisher = "00f067aa0ba902b7";
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL dsreg.traceparent = '01-{sql_trace}-{publisher}-01'"
    ))
    .await
    .unwrap();
    tx.execute("SELECT dsreg_publish($1, 1)", &[&uuid])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    running_on(&ch, &id, 1).await;
    span_in(&received, "reconcile", sql_trace, Some(publisher)).await;

    // A gateway's version-01 header: the call continues its trace, and so does the reconcile.
    let grpc_trace = "3df92f3577b34da6a3ce929d0e0e4736";
    let caller = "b7ad6b7169203331";
    let mut publish = tonic::Request::new(pb::PublishVersionRequest {
        datasource_id: id.clone(),
        version: 2,
    });
    publish.metadata_mut().insert(
        "traceparent",
        format!("01-{grpc_trace}-{caller}-01").parse().unwrap(),
    );
    DatasourcesClient::new(ch.clone())
        .publish_version(publish)
        .await
        .unwrap();
    running_on(&ch, &id, 2).await;
    let rpc = span_in(
        &received,
        "dsreg.v1.Datasources/PublishVersion",
        grpc_trace,
        Some(caller),
    )
    .await;
    span_in(&received, "reconcile", grpc_trace, Some(&rpc.span)).await;

    // Both are audited in the trace they continued.
    let audited: Vec<(String, String)> = db
        .client()
        .await
        .query(
            "SELECT action, trace_id FROM audit_log WHERE target_id = $1 AND trace_id IS NOT NULL",
            &[&uuid],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for trace in [sql_trace, grpc_trace] {
        assert!(
            audited.iter().any(|(_, t)| t == trace),
            "no audit row in trace {trace}: {audited:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_credential_in_the_collectors_url_is_in_no_log_line() {
    let db = TestDb::new().await;
    // A port nothing listens on, behind a URL carrying credentials.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "http://otlp:s3cret-password@{}/v1/traces?token=s3cret-token",
            listener.local_addr().unwrap()
        )
    };
    let env = vec![
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", dead),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000".to_owned()),
    ];
    let server = start(&db, &env).await;
    let ch = server.channel().await;
    generator_with_two_versions(&ch, "orders").await;
    wait_for("the failed export logged", Duration::from_secs(60), || {
        let logs = server.logs.clone();
        async move {
            logs.lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("exporting spans to the OTLP collector failed"))
                .cloned()
        }
    })
    .await;
    let logs = server.logs.lock().unwrap().clone();
    assert!(
        logs.iter()
            .any(|l| l.contains("spans are exported over OTLP")),
        "start-up names where spans go"
    );
    let leaked: Vec<&String> = logs.iter().filter(|l| l.contains("s3cret")).collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    server.stop().await;
}
