//! The identity service's JSON and form shapes, as docs/identity-service.md describes them. Responses
//! ignore unknown fields and accept nulls anywhere; what is required is decided by the client.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub const CREATE_REQUEST_TYPE: &str = "application/vnd.vmware.vidm.api-tokens.create.request+json";
pub const CREATE_RESPONSE_TYPE: &str =
    "application/vnd.vmware.vidm.api-tokens.create.response+json";
pub const REGENERATE_REQUEST_TYPE: &str =
    "application/vnd.vmware.vidm.api-tokens.regenerate.request+json";
pub const REGENERATE_RESPONSE_TYPE: &str =
    "application/vnd.vmware.vidm.api-tokens.regenerate.response+json";
pub const FORM_TYPE: &str = "application/x-www-form-urlencoded";
pub const API_TOKEN_GRANT: &str = "urn:custom:vcf:params:oauth:grant-type:api-token";

/// `OAuth2Token`: the token endpoint's answer.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct OAuth2Token {
    pub access_token: Option<String>,
    pub token_type: Option<String>,
    /// Seconds; 0 = already expired, -1 = unknown.
    pub expires_in: Option<i64>,
    pub scope: Option<String>,
}

/// `APITokensResponseMedia`: the answer of create and regenerate.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApiTokenMedia {
    pub id: Option<String>,
    pub client_display_name: Option<String>,
    pub client_id: Option<String>,
    pub client_type: Option<String>,
    pub token_display_name: Option<String>,
    pub token_type: Option<String>,
    pub token_sub_type: Option<String>,
    pub token_suffix: Option<String>,
    pub api_token_ttl: Option<i64>,
    pub access_token_ttl: Option<i64>,
    pub acct: Option<String>,
    pub user_status: Option<bool>,
    pub expiration_date: Option<String>,
    pub last_access_time: Option<String>,
    pub created_date: Option<String>,
    pub modified_date: Option<String>,
    pub token_status: Option<String>,
    pub token_description: Option<String>,
    pub token: Option<String>,
}

/// RFC 6749 error body (also used by the api-tokens endpoints).
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ErrorBody {
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub message: Option<String>,
}

impl ErrorBody {
    /// The fields of an error answer's body, each taken only if it is a string: empty for no
    /// body, an HTML page or any other non-object, and one odd field does not hide the others.
    pub fn parse(body: &[u8]) -> ErrorBody {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
            return ErrorBody::default();
        };
        let text = |name: &str| map.get(name).and_then(|v| v.as_str()).map(str::to_string);
        ErrorBody {
            error: text("error"),
            error_description: text("error_description"),
            message: text("message"),
        }
    }
}

/// `APITokensRequestMedia`: the create request.
#[derive(Debug, Serialize)]
pub struct CreateBody<'a> {
    pub token_display_name: &'a str,
    pub api_token_ttl: i64,
    pub access_token_ttl: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_count_of_uses: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
}

/// `RegenerateAPITokenRequestMedia`.
#[derive(Serialize)]
pub struct RegenerateBody<'a> {
    pub api_token: &'a str,
}

/// Parses the service's ISO-8601 dates (`2025-03-28T18:11:11.282Z`, also with an offset, and
/// without a zone taken as UTC). `None` for anything else.
pub fn parse_date(text: &str) -> Option<SystemTime> {
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, PrimitiveDateTime};
    let text = text.trim();
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t.into());
    }
    let iso = time::format_description::well_known::Iso8601::DEFAULT;
    if let Ok(t) = OffsetDateTime::parse(text, &iso) {
        return Some(t.into());
    }
    PrimitiveDateTime::parse(text, &iso)
        .ok()
        .map(|t| t.assume_utc().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates() {
        let t = parse_date("2025-03-28T18:11:11.282Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_743_185_471_282)
        );
        let offset = parse_date("2025-03-28T20:11:11.282+02:00").unwrap();
        assert_eq!(offset, t);
        let naive = parse_date("2025-03-28T18:11:11.282").unwrap();
        assert_eq!(naive, t);
        assert!(parse_date("yesterday").is_none());
        assert!(parse_date("").is_none());
    }

    #[test]
    fn media_ignores_unknown_fields_and_nulls() {
        let m: ApiTokenMedia = serde_json::from_str(
            r#"{"id":"x","token":null,"last_access_time":null,"new_field":{"a":1},"_links":{}}"#,
        )
        .unwrap();
        assert_eq!(m.id.as_deref(), Some("x"));
        assert!(m.token.is_none());
    }

    #[test]
    fn error_body_takes_each_string_field_it_finds() {
        let body = ErrorBody::parse(br#"{"error":"invalid_grant","error_description":7}"#);
        assert_eq!(body.error.as_deref(), Some("invalid_grant"));
        assert_eq!(body.error_description, None);
        let body = ErrorBody::parse(br#"{"message":"API Token is invalid or expired"}"#);
        assert_eq!(
            body.message.as_deref(),
            Some("API Token is invalid or expired")
        );
        for nothing in [
            &b""[..],
            b"<html>400</html>",
            b"[1]",
            b"\"invalid_grant\"",
            b"null",
        ] {
            assert_eq!(ErrorBody::parse(nothing), ErrorBody::default());
        }
    }

    #[test]
    fn create_body_omits_absent_optionals() {
        let body = CreateBody {
            token_display_name: "abc",
            api_token_ttl: 10,
            access_token_ttl: 5,
            max_count_of_uses: None,
            token_description: None,
            client_id: Some("svc"),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"token_display_name":"abc","api_token_ttl":10,"access_token_ttl":5,"client_id":"svc"}"#
        );
    }
}
