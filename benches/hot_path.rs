//! The per-request work of the proxy with a warm token cache, step by step and as a whole:
//! caller identification (`Proxy-Authorization` key, SHA-256, table lookup), route match on the
//! canonical target (path and authority decided first, and the upstream URI), token lookup (the real `Broker`, warmed on the in-process emulator), header
//! rewrite, and the request id. Target: the whole under 500 ns per request.
//!
//! No socket I/O is measured here (that is `benches/load.sh`); the emulator only serves the one
//! warm-up fetch per caller.
//!
//! Run: `cargo bench --bench hot_path` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderValue, Request};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use tokenbroker::broker::Broker;
use tokenbroker::config::{CallerConfig, Config, IdentityConfig, ListenerConfig, RouteConfig};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::metrics::Metrics;
use tokenbroker::proxy::rewrite::request_id;
use tokenbroker::proxy::{
    check_head, find_route, identify, rewrite_request, ConnInfo, Forwarded, ProxyMetrics, State,
    Target,
};
use tokenbroker::secret::Secret;

/// Callers in the config (the key table), of which the benchmark uses one.
const CALLERS: usize = 100;
/// The caller the requests come from.
const CALLER: usize = 42;
const ADMIN_ID: &str = "bench-admin";
/// Fresh requests are made in small batches, outside the measurement, so that the allocator reuses
/// the same memory as a server would (large batches measure page faults instead).
const BATCH: BatchSize = BatchSize::NumIterations(64);

/// A made-up caller key for caller `i`; only its hash goes into the config.
fn caller_key(i: usize) -> String {
    format!("bench-caller-key-{i:04}-0123456789abcdef")
}

fn caller_name(i: usize) -> String {
    format!("caller-{i:03}")
}

fn route(name: &str, host: Option<&str>, prefix: &str, allow: Vec<String>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        host: host.map(Into::into),
        path_prefix: prefix.into(),
        strip_prefix: true,
        upstream: "http://127.0.0.1:9/base".parse().expect("upstream uri"),
        upstream_ca_file: None,
        allow,
        upgrades: vec![],
        pass_caller_headers: vec![],
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(20),
    }
}

fn config(identity: IdentityConfig) -> Config {
    let callers: Vec<CallerConfig> = (0..CALLERS)
        .map(|i| CallerConfig {
            name: caller_name(i),
            client_id: None,
            key_hashes: vec![Sha256::digest(caller_key(i)).into()],
            cert_identities: vec![],
            inject: None,
            max_count_of_uses: None,
        })
        .collect();
    let everyone: Vec<String> = callers.iter().map(|c| c.name.clone()).collect();
    // A handful of routes, as a shared proxy would have; the request matches the third one tried
    // (routes are tried longest prefix first).
    let routes = vec![
        route("billing", None, "/billing/v2", everyone.clone()),
        route("search", Some("search.internal"), "/", everyone.clone()),
        route("inventory", None, "/inventory", everyone.clone()),
        route("api", None, "/api", everyone.clone()),
        route("reports", None, "/reports", everyone.clone()),
        route("fallback", None, "/", vec![caller_name(0)]),
    ];
    Config {
        listeners: vec![ListenerConfig {
            name: "main".into(),
            addr: "127.0.0.1:0".parse().expect("addr"),
            tls: None,
            caller: None,
        }],
        callers,
        routes,
        ..Config::minimal(identity)
    }
}

/// A typical HTTP/1.1 request as a caller sends it to the proxy.
fn template_request() -> Request<()> {
    Request::builder()
        .method("GET")
        .uri("/api/v1/orders/12345?expand=items")
        .header("host", "tokenbroker.internal:8080")
        .header("user-agent", "orders-client/1.4")
        .header("accept", "application/json")
        .header("accept-encoding", "gzip")
        .header(
            "proxy-authorization",
            format!("Bearer {}", caller_key(CALLER)),
        )
        .header("connection", "keep-alive")
        .body(())
        .expect("request")
}

struct Fixture {
    rt: Runtime,
    _emulator: Emulator,
    broker: Arc<Broker>,
    state: State,
    conn: ConnInfo,
    caller: String,
    request: Request<()>,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let admin_secret = format!("bench-admin-secret-{}", std::process::id());
    let (emulator, broker, config) = rt.block_on(async {
        let emulator = Emulator::start(EmulatorConfig {
            clients: vec![(ADMIN_ID.into(), Secret::new(admin_secret.as_str()))],
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator");
        let config =
            config(emulator.identity_config(ADMIN_ID, &Secret::new(admin_secret.as_str())));
        let broker = Broker::start(&config, Metrics::new())
            .await
            .expect("broker");
        (emulator, broker, config)
    });
    let caller = caller_name(CALLER);
    rt.block_on(broker.token(&caller))
        .expect("warm-up token from the emulator");
    let state = {
        let _guard = rt.enter();
        State::from_config(&config, &Metrics::new().set::<ProxyMetrics>()).expect("proxy state")
    };
    let conn = ConnInfo::new("main", SocketAddr::from(([127, 0, 0, 1], 40_000)));
    Fixture {
        rt,
        _emulator: emulator,
        broker,
        state,
        conn,
        caller,
        request: template_request(),
    }
}

/// The header rewrite as `proxy::service` calls it, for a request on the fixture's connection.
fn rewrite(
    f: &Fixture,
    headers: &mut HeaderMap,
    token: &HeaderValue,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) {
    *headers = rewrite_request(
        headers,
        token,
        &Forwarded {
            peer_ip: &f.conn.peer_ip,
            proto: f.conn.proto,
            host,
            request_id,
        },
        tokenbroker::claims::PassedClaims::NONE,
        false,
    );
}

fn fresh_headers(f: &Fixture) -> HeaderMap {
    f.request.headers().clone()
}

fn hot_path(c: &mut Criterion) {
    let f = fixture();
    let token =
        f.rt.block_on(f.broker.token(&f.caller))
            .expect("warm token");
    // Not a timing: the size of the token lookup's future, which every request's handler future
    // contains (and hyper allocates one handler future per connection, in use or not).
    let future = f.broker.token(&f.caller);
    eprintln!(
        "size of the Broker::token future: {} bytes",
        std::mem::size_of_val(&future)
    );
    drop(future);
    let mut g = c.benchmark_group("hot_path");

    g.bench_function("identify", |b| {
        b.iter(|| {
            identify(
                &f.state.callers,
                &f.conn.identity,
                black_box(f.request.headers()),
            )
            .expect("caller")
            .len()
        })
    });

    g.bench_function("route", |b| {
        b.iter(|| {
            let target = Target::of(black_box(&f.request), true).expect("target");
            let route = find_route(&f.state, &target, &f.caller).expect("route");
            route.upstream_uri(&target).expect("uri")
        })
    });

    g.bench_function("token_warm", |b| {
        b.to_async(&f.rt)
            .iter(|| async { f.broker.token(black_box(&f.caller)).await.expect("token") })
    });

    g.bench_function("rewrite", |b| {
        let request_id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
        let host = f.request.headers().get(http::header::HOST).cloned();
        b.iter_batched_ref(
            || fresh_headers(&f),
            |headers| rewrite(&f, headers, &token.header, host.as_ref(), &request_id),
            BATCH,
        )
    });

    g.bench_function("request_id_new", |b| {
        b.iter(|| request_id(black_box(f.request.headers())))
    });

    // Not one of the four steps, but per request too: `service::handle` records every request in
    // the Prometheus families (labels route, caller, status class; two histograms).
    g.bench_function("metrics_record", |b| {
        let metrics = Metrics::new().set::<ProxyMetrics>();
        let (total, upstream) = (Duration::from_micros(180), Some(Duration::from_micros(120)));
        let (route, caller) = (Arc::from("api"), Arc::from(f.caller.as_str()));
        b.iter(|| {
            metrics.record_request(Some(&route), black_box(Some(&caller)), 200, total, upstream)
        })
    });

    // Everything above but the metrics, in the order `proxy::service` does it, on a fresh copy of the request
    // each time (the copy is made outside the measurement).
    g.bench_function("per_request", |b| {
        b.to_async(&f.rt).iter_batched(
            || f.request.clone(),
            |mut request| async {
                let request_id = request_id(request.headers());
                check_head(&request, &f.conn.activity, &f.state.limits).expect("head");
                let target = Target::of(&request, f.state.limits.merge_slashes).expect("target");
                let caller = identify(&f.state.callers, &f.conn.identity, request.headers())
                    .expect("caller");
                let route = find_route(&f.state, &target, caller).expect("route");
                let token = f.broker.token(caller).await.expect("token");
                let uri = route.upstream_uri(&target).expect("uri");
                let host = target.forwarded_host();
                rewrite(
                    &f,
                    request.headers_mut(),
                    &token.header,
                    host.as_ref(),
                    &request_id,
                );
                *request.uri_mut() = uri;
                request
            },
            BATCH,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = hot_path
}
criterion_main!(benches);
