//! The control API under `/_emulator/` (JSON), the HTTP twin of the in-process methods on
//! `Emulator`. Its requests are never counted and never hit by faults (but a `Refuse` fault closes
//! the port they share with the identity API).
//!
//! - `GET /_emulator/counters` -> 200 `Counters`
//! - `POST /_emulator/counters/reset` -> 204
//! - `GET /_emulator/faults` -> 200 list of active `Fault`s
//! - `POST /_emulator/faults` (body: a `Fault`, e.g.
//!   `{"kind":"status","status":400,"body":"none","operations":["regenerate"],"requests":1}`)
//!   -> 204; 400 `invalid_request` with the reason if it cannot work (unknown kind, body style or
//!   operation, a status outside 400-599, `retry_after` without 429/503, `requests: 0`, ...)
//! - `DELETE /_emulator/faults` -> 204
//! - `POST /_emulator/revoke` with exactly one of `{"api_token_id": "<id>"}` (204, or 404 if unknown),
//!   `{"access_tokens": "all"}` or `{"admin_bearers": "all"}` (204)

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::http::{json, no_content, read_body, ApiError, Response};
use super::{Counters, Fault, Shared};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoke {
    api_token_id: Option<String>,
    access_tokens: Option<All>,
    admin_bearers: Option<All>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum All {
    All,
}

pub(crate) async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response {
    match serve(shared, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn serve(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (path.as_str(), method) {
        ("/_emulator/counters", Method::GET) => {
            Ok(json(StatusCode::OK, &to_json(&*shared.counters())))
        }
        ("/_emulator/counters", _) => Err(ApiError::method_not_allowed("GET")),
        ("/_emulator/counters/reset", Method::POST) => {
            *shared.counters() = Counters::default();
            Ok(no_content())
        }
        ("/_emulator/counters/reset", _) => Err(ApiError::method_not_allowed("POST")),
        ("/_emulator/faults", Method::GET) => {
            let active = shared.faults().active(Instant::now());
            Ok(json(StatusCode::OK, &to_json(&active)))
        }
        ("/_emulator/faults", Method::POST) => {
            let fault: Fault = body_json(req).await?;
            shared
                .inject_fault(fault)
                .map_err(ApiError::invalid_request)?;
            Ok(no_content())
        }
        ("/_emulator/faults", Method::DELETE) => {
            shared.clear_faults();
            Ok(no_content())
        }
        ("/_emulator/faults", _) => Err(ApiError::method_not_allowed("GET, POST, DELETE")),
        ("/_emulator/revoke", Method::POST) => revoke(shared, body_json(req).await?),
        ("/_emulator/revoke", _) => Err(ApiError::method_not_allowed("POST")),
        _ => Err(ApiError::not_found(format!(
            "no control endpoint at {path}"
        ))),
    }
}

fn revoke(shared: &Shared, revoke: Revoke) -> Result<Response, ApiError> {
    match revoke {
        Revoke {
            api_token_id: Some(id),
            access_tokens: None,
            admin_bearers: None,
        } => {
            if shared.tokens().revoke_api_token(&id) {
                tracing::info!(api_token_id = %id, "API token revoked");
                Ok(no_content())
            } else {
                Err(ApiError::not_found(format!("no API token with id {id}")))
            }
        }
        Revoke {
            api_token_id: None,
            access_tokens: Some(All::All),
            admin_bearers: None,
        } => {
            shared.tokens().revoke_access_tokens();
            Ok(no_content())
        }
        Revoke {
            api_token_id: None,
            access_tokens: None,
            admin_bearers: Some(All::All),
        } => {
            shared.tokens().revoke_admin_bearers();
            Ok(no_content())
        }
        _ => Err(ApiError::invalid_request(
            "give exactly one of api_token_id, access_tokens, admin_bearers",
        )),
    }
}

async fn body_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = read_body(req.into_body()).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_request(format!("bad JSON body: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}
