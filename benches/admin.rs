//! The admin endpoints at scale: a broker with N callers, each holding an API token and an access
//! token (one create and one exchange each, through the real broker against an in-process
//! identity service that answers at once), and one proxied request counted per caller in the
//! metrics. Then `GET /metrics` (both formats) and `GET /tokens` over a real socket to the admin
//! listener, timed; and the resident memory the callers added, per caller.
//!
//! Each size runs in a child process of its own, so that one size's memory does not hide in the
//! next one's. Targets (issue #16): each endpoint under 100 ms at 10,000 callers, under 8 KB of
//! memory per caller with its tokens.
//!
//! Run: `cargo bench --bench admin` (sizes 1,000 2,500 5,000 10,000; `-- --callers 10000` for one).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

use tokenbroker::admin::{self, AdminState};
use tokenbroker::broker::{Broker, IdentityService};
use tokenbroker::config::{CallerConfig, Config, IdentityConfig};
use tokenbroker::identity::{AccessToken, ApiToken, CreateRequest, IdentityError};
use tokenbroker::metrics::Metrics;
use tokenbroker::proxy::ProxyMetrics;
use tokenbroker::secret::Secret;
use tokenbroker::server::Shutdown;

const SIZES: [usize; 4] = [1_000, 2_500, 5_000, 10_000];
/// Timed GETs per endpoint; the median and the slowest are reported.
const ROUNDS: usize = 5;

/// An identity service that answers every call at once with a fresh, unique token.
#[derive(Default)]
struct InstantIdentity {
    serial: AtomicU64,
}

impl InstantIdentity {
    fn next(&self, prefix: &str) -> String {
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{n:040}")
    }

    fn access(&self, prefix: &str) -> AccessToken {
        AccessToken {
            token: Secret::new(self.next(prefix)),
            token_type: "Bearer".into(),
            lifetime: Some(Duration::from_secs(1800)),
            received: tokio::time::Instant::now(),
            scope: None,
        }
    }

    fn api(&self, id: String) -> ApiToken {
        let token = self.next("vidb_");
        ApiToken {
            id,
            suffix: token[token.len() - 5..].to_string(),
            token: Secret::new(token),
            display_name: None,
            status: Some("ACTIVE".into()),
            lifetime: Duration::from_secs(6 * 3600),
            received: tokio::time::Instant::now(),
            access_token_ttl_minutes: None,
        }
    }
}

impl IdentityService for InstantIdentity {
    fn client_credentials<'a>(
        &'a self,
        _client_id: &'a str,
        _client_secret: &'a Secret,
        _scope: Option<&'a str>,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        Box::pin(async move { Ok(self.access("admin")) })
    }

    fn exchange<'a>(
        &'a self,
        _api_token: &'a Secret,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        Box::pin(async move { Ok(self.access("access")) })
    }

    fn create_api_token<'a>(
        &'a self,
        _admin: &'a Secret,
        _request: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        Box::pin(async move { Ok(self.api(self.next("id-"))) })
    }

    fn regenerate_api_token<'a>(
        &'a self,
        _admin: &'a Secret,
        _api_token: &'a Secret,
        _ttl_minutes: i64,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        Box::pin(async move { Ok(self.api(self.next("id-"))) })
    }
}

fn config(callers: usize) -> Config {
    let identity = IdentityConfig {
        base_url: "http://127.0.0.1:9".into(),
        tenant: "CUSTOMER".into(),
        client_id: "bench-admin".into(),
        client_secret: Secret::new("bench-admin-secret"),
        scope: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
    };
    let mut config = Config::minimal(identity);
    config.callers = (0..callers)
        .map(|i| CallerConfig {
            name: format!("service-{i:05}"),
            client_id: None,
            key_hashes: vec![Sha256::digest(format!("bench-key-{i:05}")).into()],
            cert_identities: vec![],
            inject: None,
            max_count_of_uses: None,
        })
        .collect();
    config.tokens.warm_up = false;
    config
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

async fn get(addr: SocketAddr, path: &str, accept: &str) -> (Duration, usize) {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header("accept", accept)
        .body(Empty::new())
        .expect("request");
    let started = Instant::now();
    let response = client.request(request).await.expect("admin answers");
    assert_eq!(response.status(), 200, "{path}");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (started.elapsed(), body.len())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One size, in this process.
fn run(callers: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Everything that does not grow with the callers, first: runtime, metrics, the admin
        // listener, a broker with no caller.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let before = rss();
        let config = config(callers);
        let metrics = Metrics::new();
        let broker = Broker::start_against(&config, metrics.clone(), Arc::new(InstantIdentity::default()))
            .await
            .expect("broker");
        let filled = Instant::now();
        let names: Vec<String> = config.callers.iter().map(|c| c.name.clone()).collect();
        for chunk in names.chunks(256) {
            let results =
                futures_util::future::join_all(chunk.iter().map(|n| broker.token(n))).await;
            for r in results {
                r.expect("token");
            }
        }
        let route: Arc<str> = Arc::from("api");
        let requests = metrics.set::<ProxyMetrics>();
        for name in &names {
            requests.record_request(
                Some(&route),
                Some(&Arc::from(name.as_str())),
                200,
                Duration::from_millis(2),
                Some(Duration::from_millis(1)),
            );
        }
        let fill_time = filled.elapsed();
        drop(config);
        let after = rss();
        let status = broker.status();
        assert_eq!(status.callers.len(), callers);
        assert!(status.callers.iter().all(|c| c.state == "ready"));
        drop(status);

        let state = AdminState::new(broker.clone(), metrics.clone());
        let shutdown = Shutdown::new();
        let server = tokio::spawn(admin::serve(
            listener,
            None,
            state,
            tokenbroker::server::ConnLimits::default(),
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        let mut report = format!(
            "callers {callers:>6}: tokens for all in {:>7.1} ms; RSS +{:.1} MiB = {:.2} KiB per caller",
            ms(fill_time),
            (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
            (after.saturating_sub(before)) as f64 / 1024.0 / callers as f64,
        );
        for (label, path, accept) in [
            ("/metrics text", "/metrics", "text/plain; version=0.0.4"),
            ("/metrics openmetrics", "/metrics", "application/openmetrics-text; version=1.0.0"),
            ("/tokens", "/tokens", "application/json"),
        ] {
            let _ = get(addr, path, accept).await; // warm
            let mut times = Vec::with_capacity(ROUNDS);
            let mut size = 0;
            for _ in 0..ROUNDS {
                let (t, n) = get(addr, path, accept).await;
                times.push(t);
                size = n;
            }
            times.sort();
            report.push_str(&format!(
                "\n    {label:<22} median {:>8.2} ms, slowest {:>8.2} ms of {ROUNDS}; {:.1} MiB",
                ms(times[ROUNDS / 2]),
                ms(times[ROUNDS - 1]),
                size as f64 / (1024.0 * 1024.0),
            ));
        }
        println!("{report}");
        shutdown.trigger();
        let _ = server.await;
        broker.shutdown().await;
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--callers") {
        let n = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .expect("--callers N");
        run(n);
        return;
    }
    // `cargo bench` passes `--bench`; a `cargo test` of benches passes nothing we run on.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let me = std::env::current_exe().expect("own path");
    for n in SIZES {
        let status = std::process::Command::new(&me)
            .args(["--callers", &n.to_string()])
            .status()
            .expect("child runs");
        assert!(status.success(), "{n} callers failed");
    }
}
