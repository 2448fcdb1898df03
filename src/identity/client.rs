//! The HTTP client for the identity service (docs/identity-service.md): one pooled connection
//! pool over rustls, four operations, typed answers. Every error answer carries the operation it
//! came from, so that [`ErrorClass::of`](super::ErrorClass::of) can class it. Lifetimes are
//! counted on the monotonic clock from receipt; server dates are only ever compared with other
//! server dates.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use base64::Engine;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, DATE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use super::error::{sanitize, IdentityError};
use super::wire::{self, ApiTokenMedia, ErrorBody, OAuth2Token};
use super::Operation;
use crate::config::IdentityConfig;
use crate::secret::Secret;

/// Largest answer body read from the identity service.
const MAX_BODY: usize = 1024 * 1024;

/// A token from the token endpoint (admin bearer or exchanged access token).
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub token: Secret,
    pub token_type: String,
    /// `None` when the service said the lifetime is unknown (`expires_in: -1`).
    pub lifetime: Option<Duration>,
    pub received: Instant,
    pub scope: Option<String>,
}

/// An API token from create or regenerate.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub id: String,
    pub token: Secret,
    pub suffix: String,
    pub display_name: Option<String>,
    pub status: Option<String>,
    /// Remaining life at `received` (docs/identity-service.md section 4).
    pub lifetime: Duration,
    pub received: Instant,
    pub access_token_ttl_minutes: Option<i64>,
}

/// What to ask of `create`.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub display_name: String,
    pub api_token_ttl_minutes: i64,
    pub access_token_ttl_minutes: i64,
    pub max_count_of_uses: Option<i32>,
    pub description: Option<String>,
    pub client_id: Option<String>,
}

/// The identity-service client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct IdentityClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `{base_url}/acs/t/{tenant}`
    tenant_url: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for IdentityClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityClient")
            .field("tenant_url", &self.tenant_url)
            .finish_non_exhaustive()
    }
}

struct Answer {
    op: Operation,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    received: Instant,
}

impl IdentityClient {
    pub fn new(config: &IdentityConfig) -> Result<Self, String> {
        let tls = crate::tls::client_config(config.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let base = config.base_url.trim_end_matches('/');
        Ok(IdentityClient {
            http: client,
            tenant_url: format!("{base}/acs/t/{}", config.tenant),
            request_timeout: config.request_timeout,
        })
    }

    /// `client_credentials` with HTTP Basic auth: the admin bearer.
    pub async fn client_credentials(
        &self,
        client_id: &str,
        client_secret: &Secret,
        scope: Option<&str>,
    ) -> Result<AccessToken, IdentityError> {
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{client_id}:{}", client_secret.expose()));
        let mut auth = HeaderValue::try_from(format!("Basic {basic}"))
            .map_err(|_| IdentityError::Transport("client id is not a valid header".into()))?;
        auth.set_sensitive(true);
        let answer = self
            .post_form(Operation::ClientCredentials, &form, Some(auth))
            .await?;
        token_from(answer)
    }

    /// Exchanges an API token for an access token (no client authentication).
    pub async fn exchange(&self, api_token: &Secret) -> Result<AccessToken, IdentityError> {
        let form = [
            ("grant_type", wire::API_TOKEN_GRANT),
            ("api_token", api_token.expose()),
        ];
        let answer = self.post_form(Operation::Exchange, &form, None).await?;
        token_from(answer)
    }

    /// Creates an API token with the admin bearer.
    pub async fn create_api_token(
        &self,
        admin: &Secret,
        request: &CreateRequest,
    ) -> Result<ApiToken, IdentityError> {
        let body = wire::CreateBody {
            token_display_name: &request.display_name,
            api_token_ttl: request.api_token_ttl_minutes,
            access_token_ttl: request.access_token_ttl_minutes,
            max_count_of_uses: request.max_count_of_uses,
            token_description: request.description.as_deref(),
            client_id: request.client_id.as_deref(),
        };
        let json = serde_json::to_vec(&body).expect("create body serializes");
        let answer = self
            .post_json(
                Operation::Create,
                wire::CREATE_REQUEST_TYPE,
                wire::CREATE_RESPONSE_TYPE,
                admin,
                json,
            )
            .await?;
        api_token_from(answer, request.api_token_ttl_minutes)
    }

    /// Regenerates an API token: same id, new secret; the old one stops working.
    /// `ttl_minutes` is the fallback lifetime if the answer carries no usable dates.
    pub async fn regenerate_api_token(
        &self,
        admin: &Secret,
        api_token: &Secret,
        ttl_minutes: i64,
    ) -> Result<ApiToken, IdentityError> {
        let body = wire::RegenerateBody {
            api_token: api_token.expose(),
        };
        let json = serde_json::to_vec(&body).expect("regenerate body serializes");
        let answer = self
            .post_json(
                Operation::Regenerate,
                wire::REGENERATE_REQUEST_TYPE,
                wire::REGENERATE_RESPONSE_TYPE,
                admin,
                json,
            )
            .await?;
        api_token_from(answer, ttl_minutes)
    }

    async fn post_form(
        &self,
        op: Operation,
        form: &[(&str, &str)],
        auth: Option<HeaderValue>,
    ) -> Result<Answer, IdentityError> {
        let body = serde_urlencoded::to_string(form)
            .map_err(|e| IdentityError::Transport(format!("cannot encode form: {e}")))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{}", self.tenant_url, op.path()))
            .header(CONTENT_TYPE, wire::FORM_TYPE)
            .header(ACCEPT, "application/json");
        if let Some(auth) = auth {
            req = req.header(AUTHORIZATION, auth);
        }
        self.send(op, req, Bytes::from(body)).await
    }

    async fn post_json(
        &self,
        op: Operation,
        content_type: &'static str,
        accept: &'static str,
        admin: &Secret,
        body: Vec<u8>,
    ) -> Result<Answer, IdentityError> {
        let mut auth = HeaderValue::try_from(format!("Bearer {}", admin.expose()))
            .map_err(|_| IdentityError::Transport("admin bearer is not a valid header".into()))?;
        auth.set_sensitive(true);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{}", self.tenant_url, op.path()))
            .header(CONTENT_TYPE, content_type)
            .header(ACCEPT, accept)
            .header(AUTHORIZATION, auth);
        self.send(op, req, Bytes::from(body)).await
    }

    async fn send(
        &self,
        op: Operation,
        req: http::request::Builder,
        body: Bytes,
    ) -> Result<Answer, IdentityError> {
        let req = req
            .body(Full::new(body))
            .map_err(|e| IdentityError::Transport(format!("bad request: {e}")))?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                if e.is_connect() {
                    IdentityError::Connect(error_chain(&e))
                } else {
                    IdentityError::Transport(error_chain(&e))
                }
            })?;
            let received = Instant::now();
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| IdentityError::BadBody {
                    status: parts.status.as_u16(),
                    reason: format!("cannot read body: {e}"),
                })?
                .to_bytes();
            Ok(Answer {
                op,
                status: parts.status,
                headers: parts.headers,
                body,
                received,
            })
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| IdentityError::Timeout(self.request_timeout))?
    }
}

/// The full cause chain of an error, e.g. "client error (Connect): tcp connect error: Connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Turns a non-success answer into an error; a success into its parsed JSON body.
/// An error answer may have no body, an HTML one or a JSON one (docs/identity-service.md
/// section 5): only a JSON body's `error` and `error_description` are kept (sanitized).
fn parse<T: DeserializeOwned>(answer: &Answer) -> Result<T, IdentityError> {
    let status = answer.status.as_u16();
    if !answer.status.is_success() {
        let body = ErrorBody::parse(&answer.body);
        let retry_after = answer
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        return Err(IdentityError::Status {
            op: answer.op,
            status,
            error: body.error.as_deref().map(sanitize),
            description: body
                .error_description
                .or(body.message)
                .as_deref()
                .map(sanitize),
            retry_after,
        });
    }
    if answer.body.is_empty() {
        return Err(IdentityError::BadBody {
            status,
            reason: "empty body".into(),
        });
    }
    serde_json::from_slice(&answer.body).map_err(|e| IdentityError::BadBody {
        status,
        reason: format!("not the expected JSON ({})", e.classify_name()),
    })
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong types",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// `Retry-After` as seconds or an HTTP date (relative to now).
fn parse_retry_after(text: &str) -> Option<Duration> {
    if let Ok(secs) = text.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(text)
        .ok()
        .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
}

fn missing(status: u16, field: &str) -> IdentityError {
    IdentityError::BadBody {
        status,
        reason: format!("missing field {field}"),
    }
}

fn token_from(answer: Answer) -> Result<AccessToken, IdentityError> {
    let status = answer.status.as_u16();
    let wire: OAuth2Token = parse(&answer)?;
    let token = wire
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| missing(status, "access_token"))?;
    let lifetime = match wire.expires_in {
        Some(-1) => None,
        Some(secs) if secs > 0 => Some(Duration::from_secs(secs as u64)),
        Some(_) => {
            return Err(IdentityError::BadBody {
                status,
                reason: "token is already expired (expires_in <= 0)".into(),
            })
        }
        None => return Err(missing(status, "expires_in")),
    };
    Ok(AccessToken {
        token: Secret::new(token),
        token_type: wire.token_type.unwrap_or_else(|| "Bearer".into()),
        lifetime,
        received: answer.received,
        scope: wire.scope,
    })
}

fn api_token_from(answer: Answer, fallback_ttl_minutes: i64) -> Result<ApiToken, IdentityError> {
    let status = answer.status.as_u16();
    let media: ApiTokenMedia = parse(&answer)?;
    let token = media
        .token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| missing(status, "token"))?;
    let id = media
        .id
        .filter(|t| !t.is_empty())
        .ok_or_else(|| missing(status, "id"))?;
    let modified = media.modified_date.as_deref().and_then(wire::parse_date);
    let date_header = answer
        .headers
        .get(DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    // The Date header counts whole seconds; a modified_date within that same second says the
    // same with milliseconds.
    let server_now = match (date_header, modified) {
        (Some(date), Some(m)) if m >= date && m < date + Duration::from_secs(1) => Some(m),
        (Some(date), _) => Some(date),
        (None, m) => m,
    };
    let expires = media.expiration_date.as_deref().and_then(wire::parse_date);
    let lifetime = match (expires, server_now) {
        (Some(expires), Some(now)) => expires.duration_since(now).unwrap_or_default(),
        _ => {
            let minutes = media.api_token_ttl.unwrap_or(fallback_ttl_minutes);
            if minutes <= 0 {
                return Err(missing(status, "expiration_date"));
            }
            Duration::from_secs(minutes as u64 * 60)
        }
    };
    let secret = Secret::new(token);
    let suffix = media
        .token_suffix
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| secret.suffix(5));
    Ok(ApiToken {
        id,
        token: secret,
        suffix,
        display_name: media.token_display_name,
        status: media.token_status,
        lifetime,
        received: answer.received,
        access_token_ttl_minutes: media.access_token_ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
        answer_to(Operation::Exchange, status, headers, body)
    }

    fn answer_to(op: Operation, status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Answer {
            op,
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_string()),
            received: Instant::now(),
        }
    }

    #[test]
    fn api_token_lifetime_uses_server_date_not_local_clock() {
        let a = answer(
            201,
            &[("date", "Fri, 28 Mar 2025 18:11:11 GMT")],
            r#"{"id":"i","token":"vidb_abcdefghij","expiration_date":"2025-03-28T19:11:11.000Z","created_date":"2020-01-01T00:00:00Z"}"#,
        );
        let t = api_token_from(a, 5).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(3600));
        assert_eq!(t.suffix, "fghij");
    }

    #[test]
    fn modified_date_refines_the_date_header_within_its_second() {
        let a = answer(
            201,
            &[("date", "Fri, 28 Mar 2025 18:11:11 GMT")],
            r#"{"id":"i","token":"vidb_x","expiration_date":"2025-03-28T18:11:12.000Z","modified_date":"2025-03-28T18:11:11.750Z"}"#,
        );
        assert_eq!(
            api_token_from(a, 5).unwrap().lifetime,
            Duration::from_millis(250)
        );
        // a modified_date far from the answer's Date (e.g. an old token) is not used
        let a = answer(
            201,
            &[("date", "Fri, 28 Mar 2025 18:11:11 GMT")],
            r#"{"id":"i","token":"vidb_x","expiration_date":"2025-03-28T18:11:21.000Z","modified_date":"2025-03-20T00:00:00Z"}"#,
        );
        assert_eq!(
            api_token_from(a, 5).unwrap().lifetime,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn api_token_lifetime_falls_back_to_modified_date_then_ttl() {
        let a = answer(
            200,
            &[],
            r#"{"id":"i","token":"vidb_x","expiration_date":"2025-03-28T19:11:11Z","modified_date":"2025-03-28T19:01:11Z"}"#,
        );
        assert_eq!(
            api_token_from(a, 5).unwrap().lifetime,
            Duration::from_secs(600)
        );
        let a = answer(200, &[], r#"{"id":"i","token":"vidb_x","api_token_ttl":2}"#);
        assert_eq!(
            api_token_from(a, 5).unwrap().lifetime,
            Duration::from_secs(120)
        );
        let a = answer(200, &[], r#"{"id":"i","token":"vidb_x"}"#);
        assert_eq!(
            api_token_from(a, 5).unwrap().lifetime,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn unusable_answers_are_transient_errors_not_panics() {
        use crate::identity::ErrorClass;
        for (status, body) in [
            (200, ""),
            (200, "<html>oops</html>"),
            (200, "{}"),
            (200, r#"{"access_token":"x"}"#),
            (200, r#"{"access_token":"x","expires_in":0}"#),
            (200, r#"{"access_token":7,"expires_in":10}"#),
            (200, "null"),
        ] {
            let e = token_from(answer(status, &[], body)).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Transient, "{body}: {e}");
        }
        let e = api_token_from(answer(201, &[], r#"{"id":"x"}"#), 5).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Transient);
    }

    #[test]
    fn error_answers_are_classed_by_operation_and_status_whatever_the_body() {
        use crate::identity::ErrorClass;
        let html = "<html><body><h1>400 Bad Request</h1></body></html>";
        for op in Operation::ALL {
            for status in [400, 401, 403, 404, 429, 500, 503] {
                for (body, code) in [
                    ("", None),
                    (html, None),
                    (
                        r#"{"error":"invalid_grant","error_description":"x"}"#,
                        Some("invalid_grant"),
                    ),
                    (r#"{"error":"invalid_request"}"#, Some("invalid_request")),
                    (r#"{"message":"no code"}"#, None),
                ] {
                    let e = parse::<OAuth2Token>(&answer_to(op, status, &[], body)).unwrap_err();
                    assert_eq!(e.op(), Some(op));
                    assert_eq!(
                        e.class(),
                        ErrorClass::of(op, status, code),
                        "{op} {status} {body:?}"
                    );
                }
            }
        }
        // The regenerate 400 of the reference has no body: the API token is dead.
        let e = api_token_from(answer_to(Operation::Regenerate, 400, &[], ""), 5).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidCredential, "{e}");
        assert!(e.to_string().starts_with("regenerate: "), "{e}");
    }

    #[test]
    fn expires_in_minus_one_is_unknown() {
        let t = token_from(answer(200, &[], r#"{"access_token":"x","expires_in":-1}"#)).unwrap();
        assert_eq!(t.lifetime, None);
    }

    #[test]
    fn error_answers_carry_code_description_and_retry_after() {
        let e = token_from(answer(
            429,
            &[("retry-after", "7")],
            r#"{"error":"slow_down"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let e = token_from(answer(
            400,
            &[],
            r#"{"error":"invalid_grant","error_description":"expired"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.class(), crate::identity::ErrorClass::InvalidCredential);
        assert!(e.to_string().contains("invalid_grant: expired"));
    }
}
