//! The identity service's HTTP API as the emulator serves it: routing (`/acs/t/{tenant}/...`, with
//! `/_emulator/` handed to the control API), the token endpoint (client_credentials and the
//! API-token exchange) and the api-tokens create and regenerate endpoints, with the validation rules
//! of `docs/identity-service.md`.
//!
//! Error answers, as the vendor reference describes them:
//! - **regenerate 400** ("API Token is invalid or expired", "Operation doesn't return any data
//!   structure"): no body, no `Content-Type`, `Content-Length: 0`. The reference documents a
//!   single 400 for regenerate, so every regenerate 400 (unknown, expired, revoked or regenerated
//!   token, and a malformed request body) has this shape; the reason goes to the debug log only.
//! - **create 401** ("Auth token is missing or not valid", no data structure): no body.
//!   **regenerate 401** is not in the reference at all `[assume]`: the same as create's, since both
//!   take the same admin bearer. Both keep `WWW-Authenticate: Bearer error="invalid_token"`
//!   (RFC 6750 3; a header, not a data structure).
//! - **create 400**: the reference says both "the error description will contain 'error' and
//!   'error_description' fields" and "Operation doesn't return any data structure". The first is
//!   a sentence written for this answer; the second is the line the reference prints under every
//!   answer that declares no response schema (it follows create's 401 and regenerate's 400 too),
//!   i.e. "no typed media", not "no bytes". So create's 400 is JSON
//!   `{"error": "invalid_request", "error_description": "<field>: <rule>"}`. The other reading is
//!   one fault away: `{"kind":"status","status":400,"body":"none","operations":["create"]}`.
//! - **Token endpoint** (client_credentials, exchange): RFC 6749 5.2 JSON, 400 `invalid_request`,
//!   `invalid_grant`, `invalid_scope`, `unsupported_grant_type`, 401 `invalid_client` `[assume]`.
//!
//! Choices where the vendor is silent:
//! - A wrong `Content-Type` on the api-tokens endpoints is 415 (`error: invalid_request`); on the token
//!   endpoint it is 400 `invalid_request`, as RFC 6749 wants. Media-type parameters are ignored.
//! - Checks run in this order: bearer (401), content type (415), body (400).
//! - A missing or bad admin bearer is 401 `invalid_token` with `WWW-Authenticate: Bearer`.
//! - `max_count_of_uses` absent means unlimited (-1). `client_id` absent means the bearer's own client;
//!   when given it must look like a client id (`[A-Za-z0-9-_.@]`, at most 256 characters).
//! - Basic client credentials are accepted raw or form-urlencoded (RFC 6749 2.3.1). Basic together
//!   with a form `client_secret` is 400 (two methods); a form `client_id` next to Basic must match.
//! - A token response carries `Cache-Control: no-store`. Without `scope`, the admin scope is `admin`.
//! - The response media uses `token_type` `API_CLIENT`, `token_sub_type` `API_TOKEN`, `acct` and
//!   `client_display_name` = the client id, `user_status` true, `token_description` "" when absent.

use std::sync::Arc;
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderValue, CACHE_CONTROL, PRAGMA};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::http::{
    authorization, has_media_type, json as json_response, json_as, read_body, ApiError, Response,
};
use super::tokens::{ApiToken, Issued, NewApiToken, Now};
use super::{control, Operation, Shared};

const FORM: &str = "application/x-www-form-urlencoded";
const CREATE_REQUEST: &str = "application/vnd.vmware.vidm.api-tokens.create.request+json";
const CREATE_RESPONSE: &str = "application/vnd.vmware.vidm.api-tokens.create.response+json";
const REGENERATE_REQUEST: &str = "application/vnd.vmware.vidm.api-tokens.regenerate.request+json";
const REGENERATE_RESPONSE: &str = "application/vnd.vmware.vidm.api-tokens.regenerate.response+json";

const CLIENT_CREDENTIALS: &str = "client_credentials";
const API_TOKEN_GRANT: &str = "urn:custom:vcf:params:oauth:grant-type:api-token";
const ADMIN_SCOPE: &str = "admin";
const MAX_SCOPE: usize = 1024;

/// Every request to the identity listener.
pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = if path == "/_emulator" || path.starts_with("/_emulator/") {
        control::handle(&shared, req).await
    } else {
        match serve(&shared, req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        }
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "identity request");
    resp
}

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Token,
    Create,
    Regenerate,
}

fn route(path: &str, tenant: &str) -> Result<Endpoint, ApiError> {
    let not_found = || ApiError::not_found(format!("no endpoint at {path}"));
    let (path_tenant, rest) = path
        .strip_prefix("/acs/t/")
        .and_then(|p| p.split_once('/'))
        .ok_or_else(not_found)?;
    let endpoint = match rest {
        "token" => Endpoint::Token,
        "api-tokens" => Endpoint::Create,
        "api-tokens/regenerate" => Endpoint::Regenerate,
        _ => return Err(not_found()),
    };
    if path_tenant != tenant {
        return Err(ApiError::not_found(format!(
            "unknown tenant {path_tenant:?}"
        )));
    }
    Ok(endpoint)
}

async fn serve(shared: &Shared, req: Request<Incoming>) -> Result<Response, ApiError> {
    let endpoint = route(req.uri().path(), &shared.tenant)?;
    if req.method() != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body).await?;
    let headers = &parts.headers;
    match endpoint {
        Endpoint::Token => token(shared, headers, &body).await,
        Endpoint::Create => Ok(match shared.admit(Operation::Create).await {
            Some(faulty) => faulty,
            None => create(shared, headers, &body)
                .unwrap_or_else(|e| api_tokens_error(Operation::Create, e)),
        }),
        Endpoint::Regenerate => Ok(match shared.admit(Operation::Regenerate).await {
            Some(faulty) => faulty,
            None => regenerate(shared, headers, &body)
                .unwrap_or_else(|e| api_tokens_error(Operation::Regenerate, e)),
        }),
    }
}

/// An api-tokens error in the shape the reference gives it (module docs): regenerate's 400 and
/// both endpoints' 401 without a body; anything else (create's 400, 415) as JSON.
fn api_tokens_error(op: Operation, e: ApiError) -> Response {
    let bodyless = matches!(
        (op, e.status().as_u16()),
        (Operation::Regenerate, 400) | (Operation::Create | Operation::Regenerate, 401)
    );
    if bodyless {
        e.into_bodyless_response()
    } else {
        e.into_response()
    }
}

// ---- token endpoint ----

/// A parsed form body. Empty values count as absent (RFC 6749 3.1); a repeated one is an error.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Form, ApiError> {
        if !has_media_type(headers, FORM) {
            return Err(ApiError::invalid_request(format!(
                "Content-Type must be {FORM}"
            )));
        }
        serde_urlencoded::from_bytes(body)
            .map(Form)
            .map_err(|e| ApiError::invalid_request(format!("malformed form body: {e}")))
    }

    fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut values = self
            .0
            .iter()
            .filter(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::invalid_request(format!(
                "parameter {name} is repeated"
            )));
        }
        Ok(first)
    }
}

async fn token(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let form = Form::parse(headers, body)?;
    let grant = form
        .get("grant_type")?
        .ok_or_else(|| ApiError::invalid_request("grant_type is required"))?;
    let op = match grant {
        CLIENT_CREDENTIALS => Operation::ClientCredentials,
        API_TOKEN_GRANT => Operation::Exchange,
        other => return Err(ApiError::unsupported_grant_type(other)),
    };
    if let Some(faulty) = shared.admit(op).await {
        return Ok(faulty);
    }
    match op {
        Operation::ClientCredentials => client_credentials(shared, headers, &form),
        _ => exchange(shared, &form),
    }
}

fn client_credentials(
    shared: &Shared,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Response, ApiError> {
    let candidates = client_auth(headers, form)?;
    let scope = form.get("scope")?.unwrap_or(ADMIN_SCOPE);
    if scope.len() > MAX_SCOPE {
        return Err(ApiError::invalid_scope(format!(
            "scope: at most {MAX_SCOPE} characters"
        )));
    }
    let now = Now::get();
    let mut tokens = shared.tokens();
    let (client_id, _) = candidates
        .into_iter()
        .find(|(id, secret)| tokens.authenticate_client(id, secret))
        .ok_or_else(|| ApiError::invalid_client("client authentication failed"))?;
    let issued = tokens.issue_admin_bearer(&client_id, scope, &now);
    drop(tokens);
    tracing::debug!(%client_id, "admin bearer issued");
    Ok(token_response(&issued))
}

/// The (client_id, secret) the request may mean: from the form, or from HTTP Basic taken raw or
/// form-urlencoded (RFC 6749 2.3.1; clients differ). Never both methods.
fn client_auth(headers: &HeaderMap, form: &Form) -> Result<Vec<(String, String)>, ApiError> {
    let form_id = form.get("client_id")?;
    let form_secret = form.get("client_secret")?;
    let Some(basic) = authorization(headers, "Basic") else {
        return match (form_id, form_secret) {
            (Some(id), Some(secret)) => Ok(vec![(id.to_string(), secret.to_string())]),
            (None, None) => Err(ApiError::invalid_client(
                "client authentication is required",
            )),
            _ => Err(ApiError::invalid_client(
                "client_id and client_secret go together",
            )),
        };
    };
    if form_secret.is_some() {
        return Err(ApiError::invalid_request(
            "use one client authentication method: Basic or form parameters",
        ));
    }
    let (id, secret) = decode_basic(basic)
        .ok_or_else(|| ApiError::invalid_client("malformed Basic credentials"))?;
    let decoded = (form_decode(&id), form_decode(&secret));
    if form_id.is_some_and(|f| f != id && f != decoded.0) {
        return Err(ApiError::invalid_client(
            "client_id differs from the Basic credentials",
        ));
    }
    Ok(vec![(id, secret), decoded])
}

fn decode_basic(credential: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(STANDARD.decode(credential).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

/// `application/x-www-form-urlencoded` decoding of one value; the input itself if it is malformed.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let Some(b) = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                else {
                    return s.to_string();
                };
                out.push(b);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

fn exchange(shared: &Shared, form: &Form) -> Result<Response, ApiError> {
    let api_token = form
        .get("api_token")?
        .ok_or_else(|| ApiError::invalid_request("api_token is required"))?;
    let now = Now::get();
    let exchanged = shared.tokens().exchange(api_token, &now);
    let (issued, api_token_id) = exchanged.ok_or_else(ApiError::invalid_grant)?;
    tracing::debug!(%api_token_id, expires_in = issued.expires_in, "access token issued");
    Ok(token_response(&issued))
}

fn token_response(issued: &Issued) -> Response {
    let mut resp = json_response(
        StatusCode::OK,
        &json!({
            "access_token": issued.token.expose(),
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
            "scope": issued.scope,
        }),
    );
    let headers = resp.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

// ---- api-tokens endpoints ----

/// The client of the live admin bearer in `Authorization`.
fn admin_client(shared: &Shared, headers: &HeaderMap, now: &Now) -> Result<String, ApiError> {
    let bearer = authorization(headers, "Bearer")
        .ok_or_else(|| ApiError::invalid_token("a Bearer admin token is required"))?;
    let client = shared
        .tokens()
        .admin_client(bearer, now)
        .map(str::to_string);
    client.ok_or_else(|| ApiError::invalid_token("the admin token is invalid or expired"))
}

fn require_media_type(headers: &HeaderMap, expected: &str) -> Result<(), ApiError> {
    if has_media_type(headers, expected) {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(expected))
    }
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

fn create(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let now = Now::get();
    let bearer_client = admin_client(shared, headers, &now)?;
    require_media_type(headers, CREATE_REQUEST)?;
    let new = validate_create(&json_object(body)?, bearer_client)?;
    let token = shared.tokens().create(new, &now);
    tracing::info!(api_token_id = %token.id, token_suffix = %token.token.suffix(5), "API token created");
    Ok(json_as(
        StatusCode::CREATED,
        CREATE_RESPONSE,
        &media(&token, &shared.tenant),
    ))
}

fn regenerate(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let now = Now::get();
    admin_client(shared, headers, &now)?;
    require_media_type(headers, REGENERATE_REQUEST)?;
    let body = json_object(body)?;
    let api_token = match body.get("api_token") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => return Err(ApiError::invalid_request("api_token: required, a string")),
    };
    let regenerated = shared.tokens().regenerate(api_token, &now);
    let token = regenerated.ok_or_else(ApiError::invalid_grant)?;
    tracing::info!(api_token_id = %token.id, token_suffix = %token.token.suffix(5), "API token regenerated");
    Ok(json_as(
        StatusCode::OK,
        REGENERATE_RESPONSE,
        &media(&token, &shared.tenant),
    ))
}

/// The create request's rules (docs/identity-service.md section 3.3); unknown fields are ignored.
fn validate_create(
    body: &Map<String, Value>,
    bearer_client: String,
) -> Result<NewApiToken, ApiError> {
    let rule = |field: &str, rule: &str| ApiError::invalid_request(format!("{field}: {rule}"));
    let string = |field: &str| match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(rule(field, "must be a string")),
    };
    let positive = |field: &str| match body.get(field).and_then(Value::as_i64) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(rule(field, "required, a positive integer (minutes)")),
    };

    let display_name = string("token_display_name")?
        .filter(|s| (3..=255).contains(&s.chars().count()))
        .ok_or_else(|| rule("token_display_name", "required, 3 to 255 characters"))?;
    let api_token_ttl = positive("api_token_ttl")?;
    let access_token_ttl = positive("access_token_ttl")?;
    let max_count_of_uses = match body.get("max_count_of_uses") {
        None | Some(Value::Null) => -1,
        Some(v) => match v.as_i64() {
            Some(1) => 1,
            Some(-1) => -1,
            _ => return Err(rule("max_count_of_uses", "must be 1 or -1")),
        },
    };
    let description = string("token_description")?.unwrap_or_default();
    if description.chars().count() > 4000 {
        return Err(rule("token_description", "at most 4000 characters"));
    }
    let client_id = match string("client_id")? {
        None => bearer_client,
        Some(id) if is_client_id(&id) => id,
        Some(_) => {
            return Err(rule(
                "client_id",
                "1 to 256 characters of A-Z a-z 0-9 - _ . @",
            ))
        }
    };
    if !matches!(
        body.get("_links"),
        None | Some(Value::Null | Value::Object(_))
    ) {
        return Err(rule("_links", "must be an object"));
    }
    Ok(NewApiToken {
        display_name,
        description,
        api_token_ttl,
        access_token_ttl,
        max_count_of_uses,
        client_id,
    })
}

fn is_client_id(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

fn iso(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `APITokensResponseMedia` (docs/identity-service.md section 3.5).
fn media(t: &ApiToken, tenant: &str) -> Value {
    json!({
        "id": t.id,
        "client_display_name": t.client_id,
        "client_id": t.client_id,
        "client_type": "API_CLIENT",
        "token_display_name": t.display_name,
        "token_type": "API_CLIENT",
        "token_sub_type": "API_TOKEN",
        "token_suffix": t.token.suffix(5),
        "api_token_ttl": t.api_token_ttl,
        "access_token_ttl": t.access_token_ttl,
        "acct": t.client_id,
        "user_status": true,
        "expiration_date": iso(t.expiration),
        "last_access_time": t.last_access.map(iso),
        "created_date": iso(t.created),
        "modified_date": iso(t.modified),
        "token_status": "ACTIVE",
        "token_description": t.description,
        "token": t.token.expose(),
        "_links": {"self": {"href": format!("/acs/t/{tenant}/api-tokens/{}", t.id)}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_tenant_and_endpoint() {
        assert!(matches!(
            route("/acs/t/CUSTOMER/token", "CUSTOMER"),
            Ok(Endpoint::Token)
        ));
        assert!(matches!(
            route("/acs/t/CUSTOMER/api-tokens/regenerate", "CUSTOMER"),
            Ok(Endpoint::Regenerate)
        ));
        let wrong = route("/acs/t/OTHER/api-tokens", "CUSTOMER").unwrap_err();
        assert_eq!(wrong.into_response().status(), StatusCode::NOT_FOUND);
        assert!(route("/acs/t/CUSTOMER/token/", "CUSTOMER").is_err());
        assert!(route("/acs/t/CUSTOMER", "CUSTOMER").is_err());
        assert!(route("/", "CUSTOMER").is_err());
    }

    #[test]
    fn form_decoding_is_lenient() {
        assert_eq!(form_decode("svc%40corp"), "svc@corp");
        assert_eq!(form_decode("a+b"), "a b");
        assert_eq!(form_decode("bad%zz"), "bad%zz");
        assert_eq!(form_decode("end%4"), "end%4");
        assert_eq!(form_decode("%C3%A9"), "é");
    }

    #[test]
    fn client_id_rule() {
        assert!(is_client_id("svc-1_a.b@corp"));
        assert!(!is_client_id(""));
        assert!(!is_client_id("has space"));
        assert!(!is_client_id(&"a".repeat(257)));
    }
}
