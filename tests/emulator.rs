//! The identity-service emulator over real sockets: protocol shapes, validation rules, token
//! lifetimes, faults, the control API and the echo upstream.

mod support;

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::{json, Value};
use support::{basic, form, header, http, json as body_json, Reply};
use tokenbroker::emulator::{
    BodyStyle, Counters, Emulator, EmulatorConfig, Fault, FaultKind, Operation,
};
use tokenbroker::secret::Secret;

const FORM: &str = "application/x-www-form-urlencoded";
const CREATE_CT: &str = "application/vnd.vmware.vidm.api-tokens.create.request+json";
const REGEN_CT: &str = "application/vnd.vmware.vidm.api-tokens.regenerate.request+json";
const API_TOKEN_GRANT: &str = "urn:custom:vcf:params:oauth:grant-type:api-token";

async fn start_with(change: impl FnOnce(&mut EmulatorConfig)) -> Emulator {
    let mut config = EmulatorConfig {
        clients: vec![
            ("admin".to_string(), Secret::new("secret")),
            ("svc@corp".to_string(), Secret::new("p+ss word")),
        ],
        echo_upstream: Some(([127, 0, 0, 1], 0).into()),
        ..EmulatorConfig::default()
    };
    change(&mut config);
    Emulator::start(config).await.expect("emulator starts")
}

async fn start() -> Emulator {
    start_with(|_| {}).await
}

fn url(emu: &Emulator, endpoint: &str) -> String {
    format!("{}/acs/t/CUSTOMER/{endpoint}", emu.base_url())
}

fn echo(emu: &Emulator, path: &str) -> String {
    format!("{}{path}", emu.echo_url().expect("echo runs"))
}

async fn token_request(emu: &Emulator, headers: &[(&str, &str)], pairs: &[(&str, &str)]) -> Reply {
    let mut all = vec![("content-type", FORM)];
    all.extend_from_slice(headers);
    http("POST", &url(emu, "token"), &all, form(pairs)).await
}

async fn admin_bearer(emu: &Emulator) -> String {
    let (status, _, body) = token_request(
        emu,
        &[("authorization", &basic("admin", "secret"))],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(status, 200);
    body_json(&body)["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn create_raw(emu: &Emulator, bearer: &str, content_type: &str, body: &str) -> Reply {
    let auth = format!("Bearer {bearer}");
    http(
        "POST",
        &url(emu, "api-tokens"),
        &[("authorization", &auth), ("content-type", content_type)],
        body.to_string(),
    )
    .await
}

/// Creates a token and returns its response media.
async fn create_token(emu: &Emulator, body: Value) -> Value {
    let bearer = admin_bearer(emu).await;
    let (status, _, resp) = create_raw(emu, &bearer, CREATE_CT, &body.to_string()).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&resp));
    body_json(&resp)
}

fn token_body(max_count_of_uses: i64, api_token_ttl: i64, access_token_ttl: i64) -> Value {
    json!({
        "token_display_name": "orders-service",
        "api_token_ttl": api_token_ttl,
        "access_token_ttl": access_token_ttl,
        "max_count_of_uses": max_count_of_uses,
    })
}

async fn exchange(emu: &Emulator, api_token: &str) -> Reply {
    token_request(
        emu,
        &[],
        &[("grant_type", API_TOKEN_GRANT), ("api_token", api_token)],
    )
    .await
}

async fn access_token(emu: &Emulator, api_token: &str) -> String {
    let (status, _, body) = exchange(emu, api_token).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body_json(&body)["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn regenerate(emu: &Emulator, bearer: &str, api_token: &str) -> Reply {
    let auth = format!("Bearer {bearer}");
    http(
        "POST",
        &url(emu, "api-tokens/regenerate"),
        &[("authorization", &auth), ("content-type", REGEN_CT)],
        json!({ "api_token": api_token }).to_string(),
    )
    .await
}

/// Asserts a JSON error answer: status, `error` code, JSON content type, `Date` header.
fn assert_error(reply: &Reply, status: u16, error: &str) -> Value {
    let (s, headers, body) = reply;
    assert_eq!(s.as_u16(), status, "{}", String::from_utf8_lossy(body));
    assert_eq!(header(headers, "content-type"), "application/json");
    assert!(!header(headers, "date").is_empty());
    let v = body_json(body);
    assert_eq!(v["error"], error, "{v}");
    v
}

/// Asserts an answer without a body, the shape the reference gives regenerate's 400 and the
/// api-tokens 401s: status, no `Content-Type`, `Content-Length: 0`, a `Date` header.
fn assert_bodyless(reply: &Reply, status: u16) {
    let (s, headers, body) = reply;
    assert_eq!(s.as_u16(), status, "{}", String::from_utf8_lossy(body));
    assert!(body.is_empty(), "{}", String::from_utf8_lossy(body));
    assert!(headers.get("content-type").is_none(), "{headers:?}");
    assert_eq!(header(headers, "content-length"), "0");
    assert!(!header(headers, "date").is_empty());
}

fn parse_iso(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn is_iso_millis(s: &str) -> bool {
    // 2025-03-28T18:11:11.282Z
    s.len() == 24 && s.ends_with('Z') && &s[19..20] == "." && parse_iso(s) > SystemTime::UNIX_EPOCH
}

fn api_token(media: &Value) -> String {
    media["token"].as_str().unwrap().to_string()
}

// ---- token endpoint ----

#[tokio::test]
async fn client_credentials_by_basic_or_form() {
    let emu = start().await;
    let (status, headers, body) = token_request(
        &emu,
        &[("authorization", &basic("admin", "secret"))],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "application/json");
    assert_eq!(header(&headers, "cache-control"), "no-store");
    assert!(httpdate::parse_http_date(header(&headers, "date")).is_ok());
    let v = body_json(&body);
    assert!(v["access_token"].as_str().unwrap().starts_with("eyJ"));
    assert_eq!(v["access_token"].as_str().unwrap().split('.').count(), 3);
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600, "60 minutes of 60 s");
    assert_eq!(v["scope"], "admin");

    // Form fields, a requested scope, a client id and secret that need form encoding in Basic.
    let (status, _, body) = token_request(
        &emu,
        &[],
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "admin"),
            ("client_secret", "secret"),
            ("scope", "admin extra"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body_json(&body)["scope"], "admin extra");
    for credentials in [
        basic("svc@corp", "p+ss word"),
        basic("svc%40corp", "p%2Bss+word"),
    ] {
        let reply = token_request(
            &emu,
            &[("authorization", &credentials)],
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(reply.0, 200, "{}", String::from_utf8_lossy(&reply.2));
    }
    assert_eq!(emu.counters().client_credentials, 4);
    emu.shutdown().await;
}

#[tokio::test]
async fn client_credentials_rejects_bad_client_auth() {
    let emu = start().await;
    let cc = [("grant_type", "client_credentials")];
    let wrong_basic =
        token_request(&emu, &[("authorization", &basic("admin", "wrong"))], &cc).await;
    let v = assert_error(&wrong_basic, 401, "invalid_client");
    assert!(v["error_description"].is_string());
    assert!(header(&wrong_basic.1, "www-authenticate").starts_with("Basic"));
    let unknown = token_request(&emu, &[("authorization", &basic("nobody", "secret"))], &cc).await;
    assert_error(&unknown, 401, "invalid_client");
    let wrong_form = token_request(
        &emu,
        &[],
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "admin"),
            ("client_secret", "nope"),
        ],
    )
    .await;
    assert_error(&wrong_form, 401, "invalid_client");
    assert_error(&token_request(&emu, &[], &cc).await, 401, "invalid_client");
    let id_only = token_request(
        &emu,
        &[],
        &[("grant_type", "client_credentials"), ("client_id", "admin")],
    )
    .await;
    assert_error(&id_only, 401, "invalid_client");
    let garbled = token_request(&emu, &[("authorization", "Basic %%%")], &cc).await;
    assert_error(&garbled, 401, "invalid_client");
    let both = token_request(
        &emu,
        &[("authorization", &basic("admin", "secret"))],
        &[
            ("grant_type", "client_credentials"),
            ("client_secret", "secret"),
        ],
    )
    .await;
    assert_error(&both, 400, "invalid_request");
    let mismatched = token_request(
        &emu,
        &[("authorization", &basic("admin", "secret"))],
        &[("grant_type", "client_credentials"), ("client_id", "other")],
    )
    .await;
    assert_error(&mismatched, 401, "invalid_client");
    let matching = token_request(
        &emu,
        &[("authorization", &basic("admin", "secret"))],
        &[("grant_type", "client_credentials"), ("client_id", "admin")],
    )
    .await;
    assert_eq!(
        matching.0, 200,
        "a form client_id next to Basic may repeat it"
    );
    let long_scope = "s".repeat(1025);
    let scope = token_request(
        &emu,
        &[("authorization", &basic("admin", "secret"))],
        &[("grant_type", "client_credentials"), ("scope", &long_scope)],
    )
    .await;
    assert_error(&scope, 400, "invalid_scope");
    assert_eq!(
        emu.counters().client_credentials,
        10,
        "failed requests count too"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn token_endpoint_request_errors() {
    let emu = start().await;
    let json_body = http(
        "POST",
        &url(&emu, "token"),
        &[("content-type", "application/json")],
        r#"{"grant_type":"client_credentials"}"#,
    )
    .await;
    assert_error(&json_body, 400, "invalid_request");
    assert_error(
        &token_request(&emu, &[], &[("scope", "x")]).await,
        400,
        "invalid_request",
    );
    assert_error(
        &token_request(&emu, &[], &[("grant_type", "password")]).await,
        400,
        "unsupported_grant_type",
    );
    let repeated = http(
        "POST",
        &url(&emu, "token"),
        &[("content-type", FORM)],
        "grant_type=client_credentials&grant_type=client_credentials",
    )
    .await;
    assert_error(&repeated, 400, "invalid_request");
    assert_error(
        &token_request(&emu, &[], &[("grant_type", API_TOKEN_GRANT)]).await,
        400,
        "invalid_request",
    );
    assert_error(&exchange(&emu, "vidb_bogus").await, 400, "invalid_grant");

    let charset = http(
        "POST",
        &url(&emu, "token"),
        &[(
            "content-type",
            "application/x-www-form-urlencoded; charset=UTF-8",
        )],
        form(&[("grant_type", API_TOKEN_GRANT), ("api_token", "vidb_x")]),
    )
    .await;
    assert_error(&charset, 400, "invalid_grant");

    let other_tenant = format!("{}/acs/t/OTHER/token", emu.base_url());
    let wrong_tenant = http(
        "POST",
        &other_tenant,
        &[("content-type", FORM)],
        "grant_type=client_credentials",
    )
    .await;
    assert_error(&wrong_tenant, 404, "not_found");
    let get = http("GET", &url(&emu, "token"), &[], "").await;
    assert_error(&get, 405, "method_not_allowed");
    assert_eq!(header(&get.1, "allow"), "POST");
    assert_error(
        &http("GET", &format!("{}/nope", emu.base_url()), &[], "").await,
        404,
        "not_found",
    );
    assert_error(
        &http("POST", &url(&emu, "api-tokens/other"), &[], "").await,
        404,
        "not_found",
    );

    let c = emu.counters();
    assert_eq!(c.exchange, 3, "counted once the grant is known");
    assert_eq!(c.client_credentials, 0);
    emu.shutdown().await;
}

// ---- create ----

#[tokio::test]
async fn create_answers_the_full_media() {
    let emu = start_with(|c| c.seconds_per_minute = 1.0).await;
    let bearer = admin_bearer(&emu).await;
    let body = json!({
        "token_display_name": "orders-service",
        "api_token_ttl": 600,
        "access_token_ttl": 30,
        "max_count_of_uses": -1,
        "token_description": "for orders",
        "_links": {"self": {"href": "https://example.com/x"}},
        "something_new": [1, 2],
    });
    let (status, headers, resp) = create_raw(
        &emu,
        &bearer,
        "application/vnd.vmware.vidm.api-tokens.create.request+json; charset=utf-8",
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(
        header(&headers, "content-type"),
        "application/vnd.vmware.vidm.api-tokens.create.response+json"
    );
    let m = body_json(&resp);
    let fields = [
        "id",
        "client_display_name",
        "client_id",
        "client_type",
        "token_display_name",
        "token_type",
        "token_sub_type",
        "token_suffix",
        "api_token_ttl",
        "access_token_ttl",
        "acct",
        "user_status",
        "expiration_date",
        "last_access_time",
        "created_date",
        "modified_date",
        "token_status",
        "token_description",
        "token",
        "_links",
    ];
    for f in fields {
        assert!(m.get(f).is_some(), "missing {f} in {m}");
    }
    let id = m["id"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    assert_eq!(id.matches('-').count(), 4);
    assert_eq!(m["client_id"], "admin", "defaults to the bearer's client");
    assert_eq!(m["client_type"], "API_CLIENT");
    assert_eq!(m["token_display_name"], "orders-service");
    assert_eq!(m["token_description"], "for orders");
    assert_eq!(m["api_token_ttl"], 600);
    assert_eq!(m["access_token_ttl"], 30);
    assert_eq!(m["user_status"], true);
    assert_eq!(m["token_status"], "ACTIVE");
    assert!(m["last_access_time"].is_null());
    assert!(m["_links"].is_object());

    // vidb_ + base64url("<uuid>#<64 alphanumeric>#<epoch seconds>")
    let token = api_token(&m);
    let raw = token.strip_prefix("vidb_").expect("vidb_ prefix");
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .unwrap();
    let decoded = String::from_utf8(decoded).unwrap();
    let parts: Vec<&str> = decoded.split('#').collect();
    assert_eq!(parts.len(), 3, "{decoded}");
    assert_eq!(parts[0], id);
    assert!(parts[1].len() == 64 && parts[1].chars().all(|c| c.is_ascii_alphanumeric()));
    assert!(parts[2].parse::<u64>().is_ok());
    assert_eq!(
        m["token_suffix"].as_str().unwrap(),
        &token[token.len() - 5..]
    );

    // Dates: ISO-8601 with milliseconds; expiry = Date + 600 min x 1 s.
    for f in ["expiration_date", "created_date", "modified_date"] {
        assert!(is_iso_millis(m[f].as_str().unwrap()), "{f}: {}", m[f]);
    }
    assert_eq!(m["created_date"], m["modified_date"]);
    let date = httpdate::parse_http_date(header(&headers, "date")).unwrap();
    let remaining = parse_iso(m["expiration_date"].as_str().unwrap())
        .duration_since(date)
        .unwrap();
    assert!(
        remaining > Duration::from_secs(598) && remaining <= Duration::from_secs(601),
        "{remaining:?}"
    );

    // A client_id may be named; max_count_of_uses 1 is allowed.
    let other = create_token(
        &emu,
        json!({"token_display_name": "abc", "api_token_ttl": 1, "access_token_ttl": 1,
               "max_count_of_uses": 1, "client_id": "svc@corp"}),
    )
    .await;
    assert_eq!(other["client_id"], "svc@corp");
    assert_eq!(other["token_description"], "");
    assert_eq!(emu.counters().create, 2);
    emu.shutdown().await;
}

#[tokio::test]
async fn create_rejects_every_rule_violation() {
    let emu = start().await;
    let bearer = admin_bearer(&emu).await;
    let valid = token_body(-1, 10, 5);
    let with = |field: &str, value: Value| {
        let mut b = valid.clone();
        b[field] = value;
        b
    };
    let without = |field: &str| {
        let mut b = valid.clone();
        b.as_object_mut().unwrap().remove(field);
        b
    };
    let cases = [
        (without("token_display_name"), "token_display_name"),
        (
            with("token_display_name", json!("ab")),
            "token_display_name",
        ),
        (
            with("token_display_name", json!("x".repeat(256))),
            "token_display_name",
        ),
        (with("token_display_name", json!(42)), "token_display_name"),
        (without("api_token_ttl"), "api_token_ttl"),
        (with("api_token_ttl", json!(0)), "api_token_ttl"),
        (with("api_token_ttl", json!(-5)), "api_token_ttl"),
        (with("api_token_ttl", json!(1.5)), "api_token_ttl"),
        (with("api_token_ttl", json!("10")), "api_token_ttl"),
        (without("access_token_ttl"), "access_token_ttl"),
        (with("access_token_ttl", json!(0)), "access_token_ttl"),
        (with("access_token_ttl", json!(null)), "access_token_ttl"),
        (with("max_count_of_uses", json!(0)), "max_count_of_uses"),
        (with("max_count_of_uses", json!(2)), "max_count_of_uses"),
        (with("max_count_of_uses", json!("1")), "max_count_of_uses"),
        (
            with("token_description", json!("d".repeat(4001))),
            "token_description",
        ),
        (with("token_description", json!(false)), "token_description"),
        (with("client_id", json!("has space")), "client_id"),
        (with("client_id", json!(7)), "client_id"),
        (with("_links", json!("self")), "_links"),
    ];
    for (body, field) in &cases {
        let reply = create_raw(&emu, &bearer, CREATE_CT, &body.to_string()).await;
        let v = assert_error(&reply, 400, "invalid_request");
        let description = v["error_description"].as_str().unwrap();
        assert!(description.starts_with(field), "{field}: {description}");
    }
    // Edges that are allowed.
    for body in [
        with("token_display_name", json!("abc")),
        with("token_display_name", json!("é".repeat(255))),
        with("token_description", json!("d".repeat(4000))),
        with("max_count_of_uses", json!(1)),
        without("max_count_of_uses"),
    ] {
        let (status, _, resp) = create_raw(&emu, &bearer, CREATE_CT, &body.to_string()).await;
        assert_eq!(status, 201, "{body}: {}", String::from_utf8_lossy(&resp));
    }
    assert_error(
        &create_raw(&emu, &bearer, CREATE_CT, "{not json").await,
        400,
        "invalid_request",
    );
    assert_error(
        &create_raw(&emu, &bearer, CREATE_CT, "[1]").await,
        400,
        "invalid_request",
    );
    let body = valid.to_string();
    assert_error(
        &create_raw(&emu, &bearer, "application/json", &body).await,
        415,
        "invalid_request",
    );
    assert_error(
        &create_raw(&emu, &bearer, REGEN_CT, &body).await,
        415,
        "invalid_request",
    );
    let no_bearer = http(
        "POST",
        &url(&emu, "api-tokens"),
        &[("content-type", CREATE_CT)],
        body.clone(),
    )
    .await;
    assert_bodyless(&no_bearer, 401);
    assert_bodyless(&create_raw(&emu, "eyJbogus", CREATE_CT, &body).await, 401);
    let basic_auth = http(
        "POST",
        &url(&emu, "api-tokens"),
        &[
            ("content-type", CREATE_CT),
            ("authorization", &basic("admin", "secret")),
        ],
        body,
    )
    .await;
    assert_bodyless(&basic_auth, 401);
    assert_error(
        &http("GET", &url(&emu, "api-tokens"), &[], "").await,
        405,
        "method_not_allowed",
    );
    assert_eq!(emu.counters().create, cases.len() as u64 + 5 + 2 + 2 + 3);
    emu.shutdown().await;
}

#[tokio::test]
async fn access_tokens_cannot_call_the_admin_endpoints() {
    let emu = start().await;
    let m = create_token(&emu, token_body(-1, 10, 5)).await;
    let access = access_token(&emu, &api_token(&m)).await;
    let reply = create_raw(&emu, &access, CREATE_CT, &token_body(-1, 10, 5).to_string()).await;
    assert_bodyless(&reply, 401);
    assert_eq!(
        header(&reply.1, "www-authenticate"),
        "Bearer error=\"invalid_token\""
    );
    emu.shutdown().await;
}

// ---- exchange ----

#[tokio::test]
async fn exchange_answers_an_access_token() {
    let emu = start_with(|c| c.seconds_per_minute = 0.5).await;
    let m = create_token(&emu, token_body(-1, 100, 7)).await;
    let (status, headers, body) = exchange(&emu, &api_token(&m)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "application/json");
    let v = body_json(&body);
    assert_eq!(v["scope"], "openid profile user email group");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 4, "7 min x 0.5 s rounds to 4");
    assert!(v["access_token"].as_str().unwrap().starts_with("eyJ"));
    assert!(v.get("refresh_token").is_none());
    for _ in 0..3 {
        access_token(&emu, &api_token(&m)).await;
    }
    assert_eq!(emu.counters().exchange, 4);
    emu.shutdown().await;
}

#[tokio::test]
async fn single_use_token_exchanges_exactly_once() {
    let emu = start().await;
    let m = create_token(&emu, token_body(1, 100, 7)).await;
    access_token(&emu, &api_token(&m)).await;
    let again = exchange(&emu, &api_token(&m)).await;
    let v = assert_error(&again, 400, "invalid_grant");
    assert_eq!(v["error_description"], "API Token is invalid or expired");
    assert_eq!(emu.counters().exchange, 2);
    emu.shutdown().await;
}

// ---- regenerate ----

#[tokio::test]
async fn regenerate_keeps_the_id_and_kills_the_old_secret() {
    let emu = start_with(|c| c.seconds_per_minute = 1.0).await;
    let bearer = admin_bearer(&emu).await;
    let old = create_token(&emu, token_body(1, 600, 5)).await;
    access_token(&emu, &api_token(&old)).await;
    assert_error(
        &exchange(&emu, &api_token(&old)).await,
        400,
        "invalid_grant",
    );

    // dates have millisecond resolution on the wall clock: wait until it shows a later one
    let millis = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let created = millis();
    while millis() <= created + 1 {
        tokio::task::yield_now().await;
    }
    let (status, headers, body) = regenerate(&emu, &bearer, &api_token(&old)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        header(&headers, "content-type"),
        "application/vnd.vmware.vidm.api-tokens.regenerate.response+json"
    );
    let new = body_json(&body);
    assert_eq!(new["id"], old["id"]);
    assert_eq!(new["created_date"], old["created_date"]);
    assert_eq!(new["token_status"], "ACTIVE");
    assert_ne!(new["token"], old["token"]);
    assert_ne!(new["modified_date"], old["modified_date"]);
    assert!(
        parse_iso(new["expiration_date"].as_str().unwrap())
            > parse_iso(old["expiration_date"].as_str().unwrap())
    );
    assert!(!new["last_access_time"].is_null(), "it was exchanged once");
    assert_eq!(
        new["token_suffix"].as_str().unwrap(),
        &api_token(&new)[api_token(&new).len() - 5..]
    );

    // The old string is dead for both exchange and regenerate; the new one's use count is reset.
    assert_error(
        &exchange(&emu, &api_token(&old)).await,
        400,
        "invalid_grant",
    );
    assert_bodyless(&regenerate(&emu, &bearer, &api_token(&old)).await, 400);
    access_token(&emu, &api_token(&new)).await;
    assert_eq!(emu.counters().regenerate, 2);
    emu.shutdown().await;
}

#[tokio::test]
async fn regenerate_rejects_bad_requests() {
    let emu = start().await;
    let bearer = admin_bearer(&emu).await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    let auth = format!("Bearer {bearer}");
    let post = |ct: &'static str, body: &'static str| {
        let auth = auth.clone();
        let u = url(&emu, "api-tokens/regenerate");
        async move {
            http(
                "POST",
                &u,
                &[("authorization", &auth), ("content-type", ct)],
                body,
            )
            .await
        }
    };
    assert_bodyless(&post(REGEN_CT, "{}").await, 400);
    assert_bodyless(&post(REGEN_CT, r#"{"api_token": 5}"#).await, 400);
    assert_bodyless(&post(REGEN_CT, "nope").await, 400);
    assert_bodyless(
        &post(REGEN_CT, r#"{"api_token": "vidb_unknown"}"#).await,
        400,
    );
    assert_error(
        &post(CREATE_CT, r#"{"api_token": "vidb_unknown"}"#).await,
        415,
        "invalid_request",
    );
    assert_bodyless(&regenerate(&emu, "bogus", &api_token(&m)).await, 401);
    assert!(emu.revoke_api_token(m["id"].as_str().unwrap()));
    assert_bodyless(&regenerate(&emu, &bearer, &api_token(&m)).await, 400);
    assert_eq!(emu.counters().regenerate, 7);
    emu.shutdown().await;
}

// ---- lifetimes ----

#[tokio::test(start_paused = true)]
async fn every_credential_expires() {
    // One emulated minute = 1 s: admin bearer 2 s, API token 2 s, access token 1 s.
    let emu = start_with(|c| {
        c.seconds_per_minute = 1.0;
        c.admin_token_ttl_minutes = 2;
    })
    .await;
    let bearer = admin_bearer(&emu).await;
    let m = create_token(&emu, token_body(-1, 2, 1)).await;
    let (_, _, body) = exchange(&emu, &api_token(&m)).await;
    let v = body_json(&body);
    assert_eq!(v["expires_in"], 1);
    let access = v["access_token"].as_str().unwrap().to_string();
    let auth = format!("Bearer {access}");
    assert_eq!(
        http("GET", &echo(&emu, "/"), &[("authorization", &auth)], "")
            .await
            .0,
        200
    );

    // past every lifetime (the emulator's clock is tokio's, paused here)
    tokio::time::advance(Duration::from_millis(2200)).await;
    assert_error(
        &http("GET", &echo(&emu, "/"), &[("authorization", &auth)], "").await,
        401,
        "invalid_token",
    );
    assert_error(&exchange(&emu, &api_token(&m)).await, 400, "invalid_grant");
    assert_bodyless(
        &create_raw(&emu, &bearer, CREATE_CT, &token_body(-1, 2, 1).to_string()).await,
        401,
    );
    let fresh = admin_bearer(&emu).await;
    assert_bodyless(&regenerate(&emu, &fresh, &api_token(&m)).await, 400);
    emu.shutdown().await;
}

// ---- faults ----

#[tokio::test]
async fn server_error_scoped_to_one_operation_ends_after_n_requests() {
    let emu = start().await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    emu.inject_fault(Fault::new(
        FaultKind::ServerError,
        vec![Operation::Exchange],
        Some(2),
    ));
    for _ in 0..2 {
        let reply = exchange(&emu, &api_token(&m)).await;
        assert_error(&reply, 500, "server_error");
        create_token(&emu, token_body(-1, 600, 5)).await; // other operations unaffected
    }
    access_token(&emu, &api_token(&m)).await;
    assert!(emu.active_faults().is_empty());
    let c = emu.counters();
    assert_eq!((c.exchange, c.create, c.client_credentials), (3, 3, 3));
    emu.shutdown().await;
}

#[tokio::test]
async fn too_many_requests_carries_retry_after() {
    let emu = start().await;
    emu.inject_fault(Fault::new(
        FaultKind::TooManyRequests {
            retry_after_secs: 7,
        },
        vec![Operation::ClientCredentials],
        Some(1),
    ));
    let reply = token_request(
        &emu,
        &[("authorization", &basic("admin", "secret"))],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_error(&reply, 429, "too_many_requests");
    assert_eq!(header(&reply.1, "retry-after"), "7");
    admin_bearer(&emu).await;
    assert_eq!(emu.counters().client_credentials, 2);
    emu.shutdown().await;
}

#[tokio::test]
async fn garbage_is_a_200_that_is_not_json() {
    let emu = start().await;
    let bearer = admin_bearer(&emu).await;
    emu.inject_fault(Fault::new(
        FaultKind::Garbage,
        vec![Operation::Create],
        Some(1),
    ));
    let (status, _, body) =
        create_raw(&emu, &bearer, CREATE_CT, &token_body(-1, 5, 5).to_string()).await;
    assert_eq!(status, 200);
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    create_token(&emu, token_body(-1, 5, 5)).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn slow_answers_normally_after_the_delay() {
    let emu = start().await;
    emu.inject_fault(Fault::new(
        FaultKind::Slow { delay_ms: 300 },
        vec![],
        Some(1),
    ));
    let started = Instant::now();
    admin_bearer(&emu).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(emu.active_faults().is_empty());
    emu.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_fault_ends_after_its_seconds_or_when_cleared() {
    let emu = start().await;
    emu.inject_fault(Fault {
        seconds: Some(1.0),
        ..Fault::new(FaultKind::ServerError, vec![], None)
    });
    assert_eq!(emu.active_faults().len(), 1);
    tokio::time::advance(Duration::from_millis(1100)).await;
    admin_bearer(&emu).await;

    emu.inject_fault(Fault::new(FaultKind::ServerError, vec![], None));
    let cc = [("grant_type", "client_credentials")];
    assert_error(&token_request(&emu, &[], &cc).await, 500, "server_error");
    emu.clear_faults();
    admin_bearer(&emu).await;
    assert!(emu
        .try_inject_fault(Fault::new(FaultKind::Garbage, vec![], Some(0)))
        .is_err());
    emu.shutdown().await;
}

/// A timed Refuse fault is in force: the port refuses now, then serves again by itself.
async fn refused_then_back_by_itself(emu: &Emulator) {
    let addr = emu.addr();
    assert!(support::connection_refused(addr).await);
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            !support::connection_refused(addr).await
        })
        .await,
        "the port did not open again"
    );
    admin_bearer(emu).await;
}

#[tokio::test]
async fn refuse_closes_the_port_until_cleared() {
    let emu = start().await;
    let addr = emu.addr();
    admin_bearer(&emu).await;
    emu.inject_fault(Fault::new(
        FaultKind::Refuse,
        vec![Operation::Create],
        Some(1),
    ));
    assert!(support::connection_refused(addr).await);
    let err = support::try_http("GET", &url(&emu, "token"), &[], "")
        .await
        .unwrap_err();
    assert!(err.contains("onnect"), "{err}");
    assert!(
        support::connection_refused(addr).await,
        "requests does not end Refuse"
    );
    emu.clear_faults();
    assert_eq!(emu.addr(), addr);
    admin_bearer(&emu).await;
    assert_eq!(
        emu.counters().client_credentials,
        2,
        "refused requests are not counted"
    );

    // Time-based: back by itself.
    emu.inject_fault(Fault {
        seconds: Some(1.0),
        ..Fault::new(FaultKind::Refuse, vec![], None)
    });
    refused_then_back_by_itself(&emu).await;
    emu.shutdown().await;
}

// ---- control API ----

#[tokio::test]
async fn status_fault_answers_any_error_status_with_each_body_style() {
    let emu = start().await;
    let bearer = admin_bearer(&emu).await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    let control = format!("{}/_emulator/faults", emu.base_url());
    let inject = |spec: Value| {
        let control = control.clone();
        async move { http("POST", &control, &[], spec.to_string()).await }
    };

    // One request of the named operation gets the injected answer; the next is served normally.
    let spec = |status: u16, body: &str| {
        json!({"kind": "status", "status": status, "body": body,
               "operations": ["regenerate"], "requests": 1})
    };
    assert_eq!(inject(spec(400, "none")).await.0, 204);
    assert_bodyless(&regenerate(&emu, &bearer, &api_token(&m)).await, 400);
    assert_eq!(inject(spec(400, "json")).await.0, 204);
    let v = assert_error(
        &regenerate(&emu, &bearer, &api_token(&m)).await,
        400,
        "invalid_request",
    );
    assert_eq!(v["error_description"], "injected fault");
    assert_eq!(inject(spec(502, "html")).await.0, 204);
    let (status, headers, body) = regenerate(&emu, &bearer, &api_token(&m)).await;
    assert_eq!(status, 502);
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert!(String::from_utf8_lossy(&body).contains("<h1>502 Bad Gateway</h1>"));
    let (status, _, body) = regenerate(&emu, &bearer, &api_token(&m)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let m = body_json(&body);

    // The default JSON code fits the endpoint; `error` chooses it; Retry-After on 429 and 503.
    let on = |op: &str, extra: Value| {
        let mut f = json!({"kind": "status", "body": "json", "operations": [op], "requests": 1});
        f.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        f
    };
    assert_eq!(
        inject(on("client_credentials", json!({"status": 401})))
            .await
            .0,
        204
    );
    let cc = token_request(
        &emu,
        &[("authorization", &basic("admin", "secret"))],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_error(&cc, 401, "invalid_client");
    assert_eq!(inject(on("create", json!({"status": 401}))).await.0, 204);
    let create = create_raw(&emu, &bearer, CREATE_CT, &token_body(-1, 5, 5).to_string()).await;
    assert_error(&create, 401, "invalid_token");
    let grant = json!({"status": 400, "error": "invalid_grant"});
    assert_eq!(inject(on("exchange", grant)).await.0, 204);
    assert_error(&exchange(&emu, &api_token(&m)).await, 400, "invalid_grant");
    let busy = json!({"status": 503, "body": "none", "retry_after": 9});
    assert_eq!(inject(on("exchange", busy)).await.0, 204);
    let reply = exchange(&emu, &api_token(&m)).await;
    assert_bodyless(&reply, 503);
    assert_eq!(header(&reply.1, "retry-after"), "9");
    access_token(&emu, &api_token(&m)).await;

    // The listed fault reads back as injected.
    assert_eq!(inject(spec(404, "html")).await.0, 204);
    assert_eq!(
        emu.active_faults(),
        vec![Fault::new(
            FaultKind::status(404, BodyStyle::Html),
            vec![Operation::Regenerate],
            Some(1)
        )]
    );
    emu.clear_faults();

    // Specs that cannot work are refused with the reason.
    for (bad, why) in [
        (
            json!({"kind": "status", "status": 302, "body": "none"}),
            "400 to 599, not 302",
        ),
        (
            json!({"kind": "status", "status": 600, "body": "none"}),
            "400 to 599, not 600",
        ),
        (
            json!({"kind": "status", "status": 400, "body": "xml"}),
            "unknown variant `xml`",
        ),
        (
            json!({"kind": "status", "status": 400}),
            "missing field `body`",
        ),
        (
            json!({"kind": "status", "body": "json"}),
            "missing field `status`",
        ),
        (
            json!({"kind": "status", "status": "400", "body": "json"}),
            "invalid type",
        ),
        (
            json!({"kind": "status", "status": 500, "body": "json", "retry_after": 1}),
            "retry_after goes with status 429 or 503, not 500",
        ),
        (
            json!({"kind": "status", "status": 400, "body": "html", "error": "invalid_grant"}),
            "needs body \"json\"",
        ),
        (
            json!({"kind": "status", "status": 400, "body": "json", "operations": ["delete"]}),
            "unknown variant `delete`",
        ),
    ] {
        let v = assert_error(&inject(bad.clone()).await, 400, "invalid_request");
        let description = v["error_description"].as_str().unwrap();
        assert!(description.contains(why), "{bad}: {description}");
    }
    assert!(emu.active_faults().is_empty());
    emu.shutdown().await;
}

#[tokio::test]
async fn control_api_over_http() {
    let emu = start().await;
    let control = |path: &str| format!("{}/_emulator/{path}", emu.base_url());
    let bearer = admin_bearer(&emu).await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    let access = access_token(&emu, &api_token(&m)).await;

    let (status, headers, body) = http("GET", &control("counters"), &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "application/json");
    let counters: Counters = serde_json::from_slice(&body).unwrap();
    assert_eq!(counters, emu.counters());
    assert_eq!(
        (
            counters.client_credentials,
            counters.create,
            counters.exchange
        ),
        (2, 1, 1)
    );
    assert_eq!(
        http("POST", &control("counters/reset"), &[], "").await.0,
        204
    );
    assert_eq!(emu.counters(), Counters::default());

    // Faults: inject, list, hit, clear. Control requests are neither faulted nor counted.
    let f = r#"{"kind":"too_many_requests","retry_after_secs":2,"operations":["exchange"],"requests":1}"#;
    assert_eq!(
        http(
            "POST",
            &control("faults"),
            &[("content-type", "application/json")],
            f
        )
        .await
        .0,
        204
    );
    let (_, _, listed) = http("GET", &control("faults"), &[], "").await;
    let listed: Vec<Fault> = serde_json::from_slice(&listed).unwrap();
    assert_eq!(
        listed,
        vec![Fault::new(
            FaultKind::TooManyRequests {
                retry_after_secs: 2
            },
            vec![Operation::Exchange],
            Some(1)
        )]
    );
    assert_error(
        &exchange(&emu, &api_token(&m)).await,
        429,
        "too_many_requests",
    );
    let all = r#"{"kind":"server_error"}"#;
    assert_eq!(http("POST", &control("faults"), &[], all).await.0, 204);
    assert_eq!(http("GET", &control("counters"), &[], "").await.0, 200);
    assert_eq!(http("DELETE", &control("faults"), &[], "").await.0, 204);
    assert!(emu.active_faults().is_empty());
    for bad in [
        r#"{"kind":"nope"}"#,
        r#"{"kind":"garbage","requests":0}"#,
        r#"{"kind":"garbage","seconds":-1}"#,
    ] {
        assert_error(
            &http("POST", &control("faults"), &[], bad).await,
            400,
            "invalid_request",
        );
    }

    // Revocations.
    let echo_auth = format!("Bearer {access}");
    assert_eq!(
        http(
            "GET",
            &echo(&emu, "/"),
            &[("authorization", &echo_auth)],
            ""
        )
        .await
        .0,
        200
    );
    assert_eq!(
        http(
            "POST",
            &control("revoke"),
            &[],
            r#"{"access_tokens":"all"}"#
        )
        .await
        .0,
        204
    );
    assert_error(
        &http(
            "GET",
            &echo(&emu, "/"),
            &[("authorization", &echo_auth)],
            "",
        )
        .await,
        401,
        "invalid_token",
    );
    let revoke_id = json!({"api_token_id": m["id"]}).to_string();
    assert_eq!(
        http("POST", &control("revoke"), &[], revoke_id.clone())
            .await
            .0,
        204
    );
    assert_error(&exchange(&emu, &api_token(&m)).await, 400, "invalid_grant");
    assert_error(
        &http(
            "POST",
            &control("revoke"),
            &[],
            r#"{"api_token_id":"nope"}"#,
        )
        .await,
        404,
        "not_found",
    );
    assert_eq!(
        http(
            "POST",
            &control("revoke"),
            &[],
            r#"{"admin_bearers":"all"}"#
        )
        .await
        .0,
        204
    );
    assert_bodyless(
        &create_raw(&emu, &bearer, CREATE_CT, &token_body(-1, 5, 5).to_string()).await,
        401,
    );
    for bad in [
        "{}",
        r#"{"access_tokens":"some"}"#,
        r#"{"access_tokens":"all","admin_bearers":"all"}"#,
        "[",
        r#"{"x":1}"#,
    ] {
        assert_error(
            &http("POST", &control("revoke"), &[], bad).await,
            400,
            "invalid_request",
        );
    }
    assert_error(
        &http("GET", &control("revoke"), &[], "").await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &http("PUT", &control("faults"), &[], "").await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &http("GET", &control("nope"), &[], "").await,
        404,
        "not_found",
    );
    let c = emu.counters();
    assert_eq!(
        (
            c.client_credentials,
            c.create,
            c.exchange,
            c.echo_ok,
            c.echo_rejected
        ),
        (0, 1, 2, 1, 1)
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn refuse_over_http_with_seconds() {
    let emu = start().await;
    let f = r#"{"kind":"refuse","seconds":1.0}"#;
    let reply = http(
        "POST",
        &format!("{}/_emulator/faults", emu.base_url()),
        &[],
        f,
    )
    .await;
    assert_eq!(reply.0, 204);
    refused_then_back_by_itself(&emu).await;
    emu.shutdown().await;
}

// ---- echo upstream ----

#[tokio::test]
async fn echo_shows_the_request_with_credentials_masked() {
    let emu = start().await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    let access = access_token(&emu, &api_token(&m)).await;
    let auth = format!("Bearer {access}");
    let body = vec![b'z'; 100_000];
    let (status, headers, resp) = http(
        "PUT",
        &echo(&emu, "/some/path?a=1&b=two"),
        &[
            ("authorization", &auth),
            ("cookie", "session=abcdef123456"),
            ("x-api-key", "key-0123456789"),
            ("x-request-id", "req-42"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "application/json");
    let v = body_json(&resp);
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["query"], "a=1&b=two");
    assert_eq!(v["caller"]["api_token_id"], m["id"]);
    assert_eq!(v["caller"]["token_display_name"], "orders-service");
    assert_eq!(v["caller"]["client_id"], "admin");
    assert_eq!(v["token_kind"], "access_token");
    assert_eq!(
        v["bearer_suffix"].as_str().unwrap(),
        &access[access.len() - 5..]
    );
    assert_eq!(v["body_bytes"], 100_000);
    let h = &v["headers"];
    assert_eq!(
        h["authorization"].as_str().unwrap(),
        format!("...{}", &access[access.len() - 5..])
    );
    assert_eq!(h["cookie"], "...23456");
    assert_eq!(h["x-api-key"], "...56789");
    assert_eq!(h["x-request-id"], "req-42");
    assert!(
        !resp.windows(access.len()).any(|w| w == access.as_bytes()),
        "no full token echoed"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn echo_rejects_anything_but_a_live_access_token() {
    let emu = start().await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    let admin = admin_bearer(&emu).await;
    let access = access_token(&emu, &api_token(&m)).await;
    let rejected = [
        None,
        Some("Bearer eyJbogus.x.y".to_string()),
        Some(format!("Bearer {}", api_token(&m))),
        Some(format!("Bearer {admin}")),
        Some(format!("Basic {access}")),
    ];
    for auth in &rejected {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let reply = http("GET", &echo(&emu, "/x"), &headers, "").await;
        assert_error(&reply, 401, "invalid_token");
    }
    let ok = http(
        "GET",
        &echo(&emu, "/x"),
        &[("authorization", &format!("bearer {access}"))],
        "",
    )
    .await;
    assert_eq!(ok.0, 200, "scheme is case-insensitive");
    emu.revoke_access_tokens();
    let revoked = http(
        "GET",
        &echo(&emu, "/x"),
        &[("authorization", &format!("Bearer {access}"))],
        "",
    )
    .await;
    assert_error(&revoked, 401, "invalid_token");
    let c = emu.counters();
    assert_eq!((c.echo_ok, c.echo_rejected), (1, rejected.len() as u64 + 1));
    emu.shutdown().await;
}

#[tokio::test]
async fn echo_accepts_api_tokens_when_configured() {
    let emu = start_with(|c| c.echo_accepts_api_tokens = true).await;
    let m = create_token(&emu, token_body(1, 600, 5)).await;
    let auth = format!("Bearer {}", api_token(&m));
    let (status, _, body) = http("GET", &echo(&emu, "/"), &[("authorization", &auth)], "").await;
    assert_eq!(status, 200);
    assert_eq!(body_json(&body)["token_kind"], "api_token");
    access_token(&emu, &api_token(&m)).await; // using it as a bearer is not a use
    emu.shutdown().await;
}

#[tokio::test]
async fn echo_streams_bytes_and_delays() {
    let emu = start().await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    let auth = format!("Bearer {}", access_token(&emu, &api_token(&m)).await);
    let n = 200_000;
    let resp = support::try_send(
        "GET",
        &echo(&emu, &format!("/big?bytes={n}")),
        &[("authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(resp.headers(), "content-type"),
        "application/octet-stream"
    );
    let mut body = resp.into_body();
    let (mut frames, mut bytes) = (0, Vec::new());
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames += 1;
            bytes.extend_from_slice(&data);
        }
    }
    assert_eq!(bytes.len(), n);
    assert!(frames >= 2, "streamed in several frames");
    assert!(bytes
        .iter()
        .enumerate()
        .all(|(i, b)| *b == b'a' + (i % 26) as u8));

    let started = Instant::now();
    let (status, _, _) = http(
        "GET",
        &echo(&emu, "/?delay_ms=300"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_error(
        &http(
            "GET",
            &echo(&emu, "/?bytes=lots"),
            &[("authorization", &auth)],
            "",
        )
        .await,
        400,
        "invalid_request",
    );
    emu.shutdown().await;
}

// ---- robustness ----

#[tokio::test]
async fn malformed_requests_get_answers_not_panics() {
    let emu = start().await;
    let addr = emu.addr();
    let answer = support::raw(addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );

    let bad_utf8 = b"POST /acs/t/CUSTOMER/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
        Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\n\r\ng=\xff\xfe";
    let answer = support::raw(addr, bad_utf8).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_request"), "{answer}");

    let huge = vec![b'a'; 70_000];
    let reply = http(
        "POST",
        &url(&emu, "api-tokens"),
        &[("content-type", CREATE_CT)],
        huge,
    )
    .await;
    assert_error(&reply, 413, "invalid_request");

    let bad_auth = b"POST /acs/t/CUSTOMER/api-tokens HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
        Authorization: Bearer \xff\xfe\r\nContent-Length: 0\r\n\r\n";
    let answer = support::raw(addr, bad_auth).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    let echo_addr = emu.echo_addr().unwrap();
    let answer = support::raw(
        echo_addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    admin_bearer(&emu).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn start_and_shutdown() {
    let bad = Emulator::start(EmulatorConfig {
        seconds_per_minute: 0.0,
        ..EmulatorConfig::default()
    })
    .await;
    assert!(bad.is_err());
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    assert!(emu.echo_addr().is_none());
    assert_eq!(emu.base_url(), format!("http://{}", emu.addr()));
    assert!(!emu.revoke_api_token("unknown"));
    let addr = emu.addr();
    emu.shutdown().await;
    assert!(support::connection_refused(addr).await);
}

#[tokio::test]
async fn refuse_also_closes_idle_kept_alive_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = start().await;
    let mut conn = tokio::net::TcpStream::connect(emu.addr()).await.unwrap();
    conn.write_all(b"GET /_emulator/counters HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    emu.inject_fault(Fault::new(FaultKind::Refuse, vec![], None));
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    emu.clear_faults();
    emu.shutdown().await;
}

/// Captures every log line of this test's thread (the current-thread runtime runs the emulator's
/// tasks on it too).
#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let logs = support::logs::LogCapture::default();
    let _guard = tracing::subscriber::set_default(logs.subscriber());

    let client_secret = "client-secret-5f2a9";
    let emu = start_with(|c| {
        c.echo_accepts_api_tokens = true;
        c.clients
            .push(("logger".into(), Secret::new(client_secret)));
    })
    .await;
    let bearer = admin_bearer(&emu).await;
    let m = create_token(&emu, token_body(-1, 600, 5)).await;
    let access = access_token(&emu, &api_token(&m)).await;
    let (_, _, body) = regenerate(&emu, &bearer, &api_token(&m)).await;
    let regenerated = api_token(&body_json(&body));
    let auth = format!("Bearer {access}");
    http("GET", &echo(&emu, "/x"), &[("authorization", &auth)], "").await;
    http(
        "GET",
        &echo(&emu, "/x"),
        &[("authorization", &format!("Bearer {regenerated}"))],
        "",
    )
    .await;
    let logger = basic("logger", client_secret);
    let (status, _, _) = token_request(
        &emu,
        &[("authorization", &logger)],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(status, 200);
    emu.inject_fault(Fault::new(FaultKind::ServerError, vec![], Some(1)));
    exchange(&emu, &regenerated).await;
    emu.shutdown().await;

    let logs = logs.text();
    assert!(
        logs.contains("API token created"),
        "logs were captured: {logs}"
    );
    assert!(
        logs.contains(m["id"].as_str().unwrap()),
        "ids may be logged"
    );
    for secret in [
        bearer.as_str(),
        &api_token(&m),
        &access,
        &regenerated,
        client_secret,
    ] {
        assert!(!logs.contains(secret), "a secret reached the logs:\n{logs}");
    }
}
