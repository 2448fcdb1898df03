//! OpenTelemetry traces end to end: a small OTLP/HTTP receiver (a hyper server decoding
//! `ExportTraceServiceRequest` with `opentelemetry-proto`), the real broker against the real
//! emulator, the proxy, and a fake upstream that records the `traceparent` it got. One test in
//! its own binary: telemetry is process-wide (the global subscriber and the on switch).

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tracing_subscriber::layer::SubscriberExt;

use proxy_config::{caller, listener, route};
use support::{header, http, sample};
use tokenbroker::broker::Broker;
use tokenbroker::config::{Config, TelemetryConfig};
use tokenbroker::emulator::{Emulator, EmulatorConfig, Fault, FaultKind, Operation};
use tokenbroker::metrics::Metrics;
use tokenbroker::proxy::ProxyHandle;
use tokenbroker::secret::Secret;
use tokenbroker::server::Shutdown;
use tokenbroker::telemetry::Telemetry;
use upstream::FakeUpstream;

const ADMIN_SECRET: &str = "admin-secret-for-telemetry-test";
const KEY: &str = "billing-key-for-telemetry-test";
const SECOND_KEY: &str = "second-key-for-telemetry-test";
/// `Status.code` of a span that failed (OTLP's STATUS_CODE_ERROR).
const ERROR: i32 = 2;
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// Every span received, with the `service.name` of its resource; the resources' other
/// attributes; and whether the receiver answers 503 (a collector failing).
#[derive(Clone, Default)]
struct Received(
    Arc<Mutex<Vec<(String, Span)>>>,
    Arc<Mutex<Vec<HashMap<String, String>>>>,
    Arc<AtomicBool>,
);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
    fn resources(&self) -> Vec<HashMap<String, String>> {
        self.1.lock().unwrap().clone()
    }
    fn fail(&self, failing: bool) {
        self.2.store(failing, Ordering::Relaxed);
    }
}

/// A hyper server accepting `POST /v1/traces` (OTLP/HTTP, protobuf) on 127.0.0.1:0.
async fn receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let ok = req.method() == http::Method::POST
                            && req.uri().path() == "/v1/traces"
                            && header(req.headers(), "content-type") == "application/x-protobuf";
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let status = match ExportTraceServiceRequest::decode(body) {
                            _ if store.2.load(Ordering::Relaxed) => StatusCode::SERVICE_UNAVAILABLE,
                            Ok(export) if ok => {
                                let mut spans = store.0.lock().unwrap();
                                for rs in export.resource_spans {
                                    store.1.lock().unwrap().push(
                                        rs.resource
                                            .iter()
                                            .flat_map(|r| &r.attributes)
                                            .filter_map(|a| {
                                                let v = string(a.value.as_ref()?.value.as_ref()?)?;
                                                Some((a.key.clone(), v))
                                            })
                                            .collect(),
                                    );
                                    let service = rs
                                        .resource
                                        .iter()
                                        .flat_map(|r| &r.attributes)
                                        .find(|a| a.key == "service.name")
                                        .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for span in ss.spans {
                                            spans.push((service.clone(), span));
                                        }
                                    }
                                }
                                StatusCode::OK
                            }
                            _ => StatusCode::BAD_REQUEST,
                        };
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, received)
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            Value::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        }
    })
}

/// An attribute that must be an integer.
fn int_attr(span: &Span, key: &str) -> Option<i64> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::IntValue(i) => Some(*i),
            other => panic!("{key} is not an integer: {other:?}"),
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `traceparent` as (trace id, parent span id).
fn traceparent(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_make_linked_spans_exported_over_otlp_http() {
    let (collector, received) = receiver().await;
    let telemetry = Telemetry::start(
        &TelemetryConfig {
            endpoint: format!("http://{collector}"),
            service_name: "tokenbroker-under-test".into(),
            sampling_ratio: 1.0,
        },
        Duration::from_millis(100),
    )
    .unwrap();
    let logs = support::logs::LogCapture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::registry().with(telemetry.layer()).with(
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone()),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let emu = Emulator::start(EmulatorConfig {
        clients: vec![("admin".into(), Secret::new(ADMIN_SECRET))],
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let up = FakeUpstream::start().await;
    let config = Config {
        listeners: vec![listener("plain", None, None)],
        callers: vec![
            caller("billing", KEY, vec![]),
            caller("second", SECOND_KEY, vec![]),
        ],
        routes: vec![route(
            "fake",
            "/fake",
            format!("http://{}/", up.addr()),
            &["billing", "second"],
        )],
        ..Config::minimal(emu.identity_config("admin", &Secret::new(ADMIN_SECRET)))
    };
    let metrics = Metrics::new();
    let broker = Broker::start(&config, metrics.clone()).await.unwrap();
    let shutdown = Shutdown::new();
    let proxy = ProxyHandle::start(
        Arc::new(config),
        broker.clone(),
        metrics.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let addr = proxy.local_addrs()[0].1;
    let auth = format!("Bearer {KEY}");

    // 1: a cold caller, no incoming trace: the token fetch happens inside the request
    let (status, _, _) = http(
        "GET",
        &format!("http://{addr}/fake/first?q=query-value"),
        &[("proxy-authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // 2: with the caller's trace context
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let (status, _, _) = http(
        "GET",
        &format!("http://{addr}/fake/second"),
        &[
            ("proxy-authorization", &auth),
            (
                "traceparent",
                &format!("00-{caller_trace}-{caller_span}-01"),
            ),
            ("tracestate", "vendor=opaque"),
        ],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let flushing = Arc::new(telemetry);
    let flusher = flushing.clone();
    tokio::task::spawn_blocking(move || flusher.flush())
        .await
        .unwrap();
    let servers = |spans: &[(String, Span)]| spans.iter().filter(|(_, s)| s.kind == SERVER).count();
    assert!(
        support::eventually(Duration::from_secs(20), || {
            let n = servers(&received.spans());
            async move { n >= 2 }
        })
        .await,
        "spans received: {:?}",
        received.spans()
    );
    let spans = received.spans();
    assert!(spans
        .iter()
        .all(|(service, _)| service == "tokenbroker-under-test"));
    // The resource names the version and this process (one id for every export).
    let resources = received.resources();
    let instances: std::collections::HashSet<_> = resources
        .iter()
        .map(|r| r.get("service.instance.id").cloned().unwrap_or_default())
        .collect();
    assert_eq!(instances.len(), 1, "{resources:?}");
    assert!(
        uuid::Uuid::parse_str(instances.iter().next().unwrap()).is_ok(),
        "{resources:?}"
    );
    assert!(resources
        .iter()
        .all(|r| r.get("service.version").map(String::as_str) == Some(env!("CARGO_PKG_VERSION"))));
    let servers: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SERVER)
        .collect();
    assert_eq!(
        servers.len(),
        2,
        "one server span per request: {servers:#?}"
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let by_id: HashMap<String, &Span> = spans.iter().map(|(_, s)| (hex(&s.span_id), s)).collect();

    for (n, server) in servers.iter().enumerate() {
        let trace = hex(&server.trace_id);
        let path = attr(server, "url.path").unwrap();
        let first = path == "/fake/first";
        assert!(first || path == "/fake/second", "{path}");
        assert_eq!(attr(server, "http.route").as_deref(), Some("fake"));
        assert_eq!(
            attr(server, "tokenbroker.caller").as_deref(),
            Some("billing")
        );
        assert_eq!(int_attr(server, "http.response.status_code"), Some(200));
        assert_eq!(server.name, "GET fake");
        assert_eq!(attr(server, "http.request.method").as_deref(), Some("GET"));
        if first {
            assert!(server.parent_span_id.is_empty(), "request 1 starts a trace");
        } else {
            assert_eq!(
                trace, caller_trace,
                "request 2 continues the caller's trace"
            );
            assert_eq!(hex(&server.parent_span_id), caller_span);
        }
        // every span of this trace hangs off this server span
        let in_trace: Vec<&Span> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| hex(&s.trace_id) == trace)
            .collect();
        for span in &in_trace {
            let mut at = *span;
            while at.span_id != server.span_id {
                at = by_id
                    .get(&hex(&at.parent_span_id))
                    .unwrap_or_else(|| panic!("{} has no parent in the trace", at.name));
            }
        }
        let upstream: Vec<&&Span> = in_trace
            .iter()
            .filter(|s| s.kind == CLIENT && s.name.starts_with("upstream"))
            .collect();
        assert_eq!(upstream.len(), 1, "request {n}: {in_trace:#?}");
        assert_eq!(upstream[0].parent_span_id, server.span_id);
        assert_eq!(
            int_attr(upstream[0], "http.response.status_code"),
            Some(200)
        );
        // the upstream got our upstream span as its parent
        let got = seen
            .iter()
            .find(|s| {
                s.target
                    .starts_with(if first { "/first" } else { "/second" })
            })
            .unwrap_or_else(|| panic!("{seen:?}"));
        let (tp_trace, tp_parent) = traceparent(header(&got.headers, "traceparent"));
        assert_eq!(tp_trace, trace);
        assert_eq!(tp_parent, hex(&upstream[0].span_id));
        // The caller's tracestate is passed on as sent, and none is made up.
        if first {
            assert!(
                !got.headers.contains_key("tracestate"),
                "{:?}",
                got.headers.keys()
            );
        } else {
            assert_eq!(header(&got.headers, "tracestate"), "vendor=opaque");
        }
        let identity: Vec<String> = in_trace
            .iter()
            .filter(|s| s.kind == CLIENT && s.name.starts_with("identity"))
            .map(|s| attr(s, "tokenbroker.operation").unwrap())
            .collect();
        if first {
            let mut ops = identity.clone();
            ops.sort();
            assert_eq!(
                ops,
                ["client_credentials", "create", "exchange"],
                "{in_trace:#?}"
            );
        } else {
            assert!(identity.is_empty(), "the token was cached: {identity:?}");
        }
    }

    // the request line carries the trace id
    let lines = logs.json_lines("tokenbroker::request");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for line in &lines {
        let trace = line["trace_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{line}"));
        assert!(servers.iter().any(|s| hex(&s.trace_id) == trace), "{line}");
    }
    assert_eq!(lines[1]["trace_id"], caller_trace);

    // no secret, token or query in any span's name or attribute
    let token = broker.token("billing").await.unwrap();
    let token = token
        .header
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_string();
    for (_, span) in &spans {
        assert_eq!(
            span.trace_state, "",
            "the caller's tracestate in {}",
            span.name
        );
        let mut texts = vec![span.name.clone()];
        texts.extend(
            span.attributes
                .iter()
                .map(|a| format!("{}={:?}", a.key, a.value)),
        );
        for text in texts {
            for secret in [KEY, ADMIN_SECRET, token.as_str(), "query-value", "Bearer"] {
                assert!(
                    !text.contains(secret),
                    "{secret:?} in span {}: {text}",
                    span.name
                );
            }
        }
    }

    // A failed identity call is an ERROR span: a cold caller whose create fails (the breaker
    // opens, the request gets 503).
    emu.inject_fault(Fault {
        kind: FaultKind::ServerError,
        operations: vec![Operation::Create],
        requests: Some(1),
        seconds: None,
    });
    // A request by `key` to `path`, then its spans flushed; its status.
    let request_and_flush = |path: &'static str, key: &'static str| {
        let flusher = flushing.clone();
        async move {
            let auth = format!("Bearer {key}");
            let url = format!("http://{addr}{path}");
            let (status, _, _) = http("GET", &url, &[("proxy-authorization", &auth)], "").await;
            tokio::task::spawn_blocking(move || flusher.flush())
                .await
                .unwrap();
            status
        }
    };
    assert_eq!(
        request_and_flush("/fake/third", SECOND_KEY).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let failed_create = |spans: &[(String, Span)]| {
        spans
            .iter()
            .find(|(_, s)| {
                s.name == "identity create"
                    && attr(s, "tokenbroker.outcome").as_deref() == Some("transient")
            })
            .map(|(_, s)| s.clone())
    };
    assert!(
        support::eventually(Duration::from_secs(20), || {
            let found = failed_create(&received.spans()).is_some();
            async move { found }
        })
        .await
    );
    let failed = failed_create(&received.spans()).unwrap();
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(ERROR),
        "{failed:?}"
    );
    for (_, s) in received.spans() {
        if attr(&s, "tokenbroker.outcome").as_deref() == Some("ok") {
            assert_ne!(s.status.map(|s| s.code), Some(ERROR), "{}", s.name);
        }
    }

    // A collector that fails: counted for every export, warned about once, and once more when it
    // accepts spans again.
    let failures = || {
        sample(
            &metrics.encode_prometheus(),
            "tokenbroker_telemetry_export_failures_total",
        )
        .unwrap_or(-1.0)
    };
    assert_eq!(failures(), 0.0);
    received.fail(true);
    for n in 1..=2 {
        assert_eq!(request_and_flush("/fake/lost", KEY).await, StatusCode::OK);
        assert!(
            support::eventually(Duration::from_secs(20), || async { failures() >= n as f64 }).await,
            "export {n} failed and was counted"
        );
    }
    let warned = |message: &str| logs.text().lines().filter(|l| l.contains(message)).count();
    assert_eq!(
        warned("telemetry: spans cannot be exported"),
        1,
        "{}",
        logs.text()
    );
    received.fail(false);
    assert_eq!(request_and_flush("/fake/again", KEY).await, StatusCode::OK);
    assert!(
        support::eventually(Duration::from_secs(20), || async {
            warned("telemetry: the collector accepts spans again") == 1
        })
        .await
    );

    shutdown.trigger();
    proxy.wait().await;
    broker.shutdown().await;
    emu.shutdown().await;
    tokio::task::spawn_blocking(move || flushing.shutdown())
        .await
        .unwrap();
}
