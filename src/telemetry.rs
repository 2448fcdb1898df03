//! OpenTelemetry traces (`[telemetry]`, off by default): a server span per proxied request, a
//! client span for its upstream call and one per identity-service call, exported by OTLP over
//! HTTP (protobuf) to `{endpoint}/v1/traces`. A caller's W3C `traceparent` makes its span our
//! server span's parent; the upstream gets a `traceparent` naming our upstream span. A caller's
//! `tracestate` is passed on to the upstream as sent (W3C asks that of every hop) but never read
//! into a span, so it is not exported; the proxy adds none of its own.
//!
//! When telemetry is off, no OpenTelemetry layer is installed and [`is_on`] is false: the request
//! path makes no span at all (one relaxed atomic load per request).
//!
//! The exporter's HTTP client is the crate's own hyper-util client over rustls with the process's
//! ring provider (no second TLS stack); the batch processor exports from a thread of its own,
//! so each export is spawned on the tokio runtime that started telemetry.
//!
//! The resource names the service (`service.name`, `service.version`) and this process
//! (`service.instance.id`, new at every start). Exports that fail (the collector unreachable,
//! or answering an error) are counted (`telemetry_export_failures_total`) and warned about once
//! until one succeeds again; the spans of a failed export are dropped.
//!
//! Must never: put a token, key, secret, header value or query string in a span or attribute.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TelemetryConfig;

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are made: telemetry was started in this process.
#[inline]
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exports that failed, for `telemetry_export_failures_total` (one counter for the process: the
/// exporter starts before the metrics registry, and there is one exporter).
static EXPORT_FAILURES: LazyLock<prometheus_client::metrics::counter::Counter> =
    LazyLock::new(Default::default);
/// The last export failed: the warning was logged, and is not again until one succeeds.
static FAILING: AtomicBool = AtomicBool::new(false);

/// The counter of failed exports, to register in a metrics registry.
pub fn export_failures() -> prometheus_client::metrics::counter::Counter {
    EXPORT_FAILURES.clone()
}

/// Counts an export's outcome; warns at the first failure after a success (or the start).
fn exported(result: Result<http::StatusCode, &dyn std::fmt::Display>) {
    let failure = match result {
        Ok(status) if status.is_success() => None,
        Ok(status) => Some(format!("the collector answered {status}")),
        Err(e) => Some(e.to_string()),
    };
    match failure {
        None => {
            if FAILING.swap(false, Ordering::Relaxed) {
                tracing::info!("telemetry: the collector accepts spans again");
            }
        }
        Some(error) => {
            EXPORT_FAILURES.inc();
            if !FAILING.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    %error,
                    "telemetry: spans cannot be exported; they are dropped until the collector answers (telemetry_export_failures_total counts the failed exports)"
                );
            }
        }
    }
}

/// `endpoint` without any user or password, as it may be logged.
pub fn loggable_endpoint(endpoint: &str) -> String {
    match endpoint.parse::<http::Uri>() {
        Ok(uri) => {
            format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("http"),
                uri.host().unwrap_or(""),
                uri.port().map(|p| format!(":{p}")).unwrap_or_default()
            ) + uri.path().trim_end_matches('/')
        }
        Err(_) => "(unparsable endpoint)".to_string(),
    }
}

/// The running exporter. Dropping it does not flush: call [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts the exporter for `config` (must be called inside a tokio runtime). Spans are made
    /// from then on; they reach the exporter through [`Telemetry::layer`].
    pub fn start(config: &TelemetryConfig, export_every: Duration) -> Result<Telemetry, String> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "telemetry must start inside the tokio runtime".to_string())?;
        let client = ExportClient::new(handle)?;
        let endpoint = format!("{}/v1/traces", config.endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("telemetry exporter: {e}"))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(export_every)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .with_attributes([
                        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                        opentelemetry::KeyValue::new(
                            "service.instance.id",
                            uuid::Uuid::new_v4().to_string(),
                        ),
                    ])
                    .build(),
            )
            .build();
        ON.store(true, Ordering::Relaxed);
        Ok(Telemetry { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for this exporter.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("tokenbroker"))
    }

    /// Exports what is buffered now.
    pub fn flush(&self) {
        // A failed export was counted and warned about where it failed.
        if let Err(e) = self.provider.force_flush() {
            tracing::debug!(error = %e, "telemetry: flush failed");
        }
    }

    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(&self) {
        self.flush();
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "telemetry: shutdown");
        }
    }
}

/// Names `span` anew (recording `otel.name` no longer renames a span once its OpenTelemetry
/// context exists, as it does from the first child span or trace-id lookup on).
pub fn rename(span: &tracing::Span, name: String) {
    use opentelemetry::trace::TraceContextExt;
    span.context().span().update_name(name);
}

/// The trace id of `span`, as 32 hex digits, when it is sampled.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes the caller's W3C `traceparent` the parent of `span` (its `tracestate` is not read).
pub fn set_parent_from(span: &tracing::Span, headers: &HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtract(headers));
    let _ = span.set_parent(parent);
}

/// Writes `span`'s context as `traceparent` into `headers`, replacing the caller's; the caller's
/// `tracestate`, if any, stays as it was.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInject(headers));
}

const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The caller's headers as the propagator reads them, without `tracestate`: a span keeps its
/// parent's trace state and the exporter sends it, and a caller's is no value of ours to export.
struct HeaderExtract<'a>(&'a HeaderMap);

impl Extractor for HeaderExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case(TRACESTATE.as_str()) {
            return None;
        }
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter(|k| **k != TRACESTATE)
            .map(HeaderName::as_str)
            .collect()
    }
}

struct HeaderInject<'a>(&'a mut HeaderMap);

impl Injector for HeaderInject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing: none is sent.
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// OTLP/HTTP export over hyper-util and rustls (ring), each request spawned on the runtime.
#[derive(Clone)]
struct ExportClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportClient").finish_non_exhaustive()
    }
}

impl ExportClient {
    fn new(runtime: tokio::runtime::Handle) -> Result<ExportClient, String> {
        let tls = crate::tls::client_config(None).map_err(|e| format!("telemetry: {e}"))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(EXPORT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(ExportClient { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let exchange = async move {
            let (parts, body) = request.into_parts();
            let response = client
                .request(Request::from_parts(parts, Full::new(body)))
                .await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, 4 * 1024 * 1024)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, body))
        };
        let timed = async move {
            let result = tokio::time::timeout(EXPORT_TIMEOUT, exchange)
                .await
                .map_err(|_| "telemetry export timed out".into())
                .and_then(|r| r);
            match &result {
                Ok(response) => exported(Ok(response.status())),
                Err(e) => exported(Err(e)),
            }
            result
        };
        self.runtime.spawn(timed).await?
    }
}
