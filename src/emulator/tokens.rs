//! Every credential the emulator issued and how long it lives: admin bearers (client_credentials),
//! API tokens (create, regenerate) and access tokens (API-token exchange).
//!
//! Pure state, no I/O: callers pass the time in ([`Now`]), so lifetimes are testable without
//! sleeping. Token strings are map keys (looked up, never logged); only ids and suffixes may be
//! logged. Expired bearers are pruned whenever a new one is issued; API tokens are kept forever
//! (few) so that a dead one is told apart from a bogus one in logs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::distributions::Alphanumeric;
use rand::Rng;
use subtle::ConstantTimeEq;

use super::EmulatorConfig;
use crate::secret::Secret;

/// Lifetimes are clamped to this, so absurd TTLs cannot overflow a clock.
const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The scope of access tokens from the API-token exchange.
pub(crate) const EXCHANGE_SCOPE: &str = "openid profile user email group";

/// One instant on both clocks: `mono` decides expiry, `wall` is what JSON dates show.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub(crate) fn get() -> Now {
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// A freshly issued bearer (admin bearer or access token).
pub(crate) struct Issued {
    pub token: Secret,
    pub expires_in: i64,
    pub scope: String,
}

/// Whose token the echo upstream saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    pub api_token_id: String,
    pub token_display_name: String,
    pub client_id: String,
    pub kind: TokenKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    AccessToken,
    ApiToken,
}

impl TokenKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TokenKind::AccessToken => "access_token",
            TokenKind::ApiToken => "api_token",
        }
    }
}

/// A validated create request.
pub(crate) struct NewApiToken {
    pub display_name: String,
    pub description: String,
    pub api_token_ttl: i64,
    pub access_token_ttl: i64,
    /// 1 (one exchange) or -1 (unlimited).
    pub max_count_of_uses: i32,
    pub client_id: String,
}

/// An API token as the create and regenerate responses show it.
#[derive(Clone)]
pub(crate) struct ApiToken {
    pub id: String,
    pub token: Secret,
    pub client_id: String,
    pub display_name: String,
    pub description: String,
    pub api_token_ttl: i64,
    pub access_token_ttl: i64,
    pub created: SystemTime,
    pub modified: SystemTime,
    pub expiration: SystemTime,
    pub last_access: Option<SystemTime>,
    max_count_of_uses: i32,
    uses: u64,
    expires: Instant,
    revoked: bool,
}

impl ApiToken {
    fn is_live(&self, now: &Now) -> bool {
        !self.revoked && now.mono < self.expires
    }

    fn is_used_up(&self) -> bool {
        self.max_count_of_uses == 1 && self.uses >= 1
    }

    fn caller(&self, kind: TokenKind) -> Caller {
        Caller {
            api_token_id: self.id.clone(),
            token_display_name: self.display_name.clone(),
            client_id: self.client_id.clone(),
            kind,
        }
    }
}

struct Bearer {
    /// For access tokens: the API token it was exchanged from. For admin bearers: the client.
    owner: String,
    expires: Instant,
}

pub(crate) struct Tokens {
    seconds_per_minute: f64,
    admin_ttl_minutes: i64,
    clients: Vec<(String, Secret)>,
    admin_bearers: HashMap<String, Bearer>,
    access_tokens: HashMap<String, Bearer>,
    /// By id.
    api_tokens: HashMap<String, ApiToken>,
    /// Live token string -> id.
    api_ids: HashMap<String, String>,
}

impl Tokens {
    pub(crate) fn new(config: &EmulatorConfig) -> Tokens {
        Tokens {
            seconds_per_minute: config.seconds_per_minute,
            admin_ttl_minutes: config.admin_token_ttl_minutes,
            clients: config.clients.clone(),
            admin_bearers: HashMap::new(),
            access_tokens: HashMap::new(),
            api_tokens: HashMap::new(),
            api_ids: HashMap::new(),
        }
    }

    /// `minutes` of emulated time as a real duration.
    fn lifetime(&self, minutes: i64) -> Duration {
        let secs = minutes as f64 * self.seconds_per_minute;
        Duration::try_from_secs_f64(secs)
            .unwrap_or(if secs > 0.0 {
                MAX_LIFETIME
            } else {
                Duration::ZERO
            })
            .min(MAX_LIFETIME)
    }

    /// A bearer's `expires_in` for `minutes`: rounded seconds, at least 1.
    fn expires_in(&self, minutes: i64) -> i64 {
        let secs = (minutes as f64 * self.seconds_per_minute).round();
        (secs as i64).clamp(1, MAX_LIFETIME.as_secs() as i64)
    }

    /// Whether `client_id` / `secret` is a configured client (secret compared in constant time).
    pub(crate) fn authenticate_client(&self, client_id: &str, secret: &str) -> bool {
        self.clients.iter().any(|(id, s)| {
            id == client_id && bool::from(s.expose().as_bytes().ct_eq(secret.as_bytes()))
        })
    }

    pub(crate) fn issue_admin_bearer(&mut self, client_id: &str, scope: &str, now: &Now) -> Issued {
        let expires_in = self.expires_in(self.admin_ttl_minutes);
        let token = jwt(client_id, scope, expires_in, now);
        prune(&mut self.admin_bearers, now);
        self.admin_bearers.insert(
            token.clone(),
            Bearer {
                owner: client_id.to_string(),
                expires: now.mono + Duration::from_secs(expires_in.unsigned_abs()),
            },
        );
        Issued {
            token: Secret::new(token),
            expires_in,
            scope: scope.to_string(),
        }
    }

    /// The client whose live admin bearer this is.
    pub(crate) fn admin_client(&self, bearer: &str, now: &Now) -> Option<&str> {
        let b = self.admin_bearers.get(bearer)?;
        (now.mono < b.expires).then_some(b.owner.as_str())
    }

    pub(crate) fn create(&mut self, new: NewApiToken, now: &Now) -> ApiToken {
        let id = uuid_v4();
        let lifetime = self.lifetime(new.api_token_ttl);
        let token = ApiToken {
            token: api_token_string(&id, now),
            id: id.clone(),
            client_id: new.client_id,
            display_name: new.display_name,
            description: new.description,
            api_token_ttl: new.api_token_ttl,
            access_token_ttl: new.access_token_ttl,
            created: now.wall,
            modified: now.wall,
            expiration: now.wall + lifetime,
            last_access: None,
            max_count_of_uses: new.max_count_of_uses,
            uses: 0,
            expires: now.mono + lifetime,
            revoked: false,
        };
        self.api_ids
            .insert(token.token.expose().to_string(), id.clone());
        self.api_tokens.insert(id, token.clone());
        token
    }

    /// A new secret for a live token: same id and creation date, new expiry, use count reset.
    /// `None` if the token is unknown, expired, revoked or already regenerated away.
    pub(crate) fn regenerate(&mut self, token: &str, now: &Now) -> Option<ApiToken> {
        let id = self.api_ids.get(token)?.clone();
        let lifetime = self.lifetime(self.api_tokens.get(&id)?.api_token_ttl);
        let t = self.api_tokens.get_mut(&id)?;
        if !t.is_live(now) {
            return None;
        }
        t.token = api_token_string(&id, now);
        t.uses = 0;
        t.modified = now.wall;
        t.expiration = now.wall + lifetime;
        t.expires = now.mono + lifetime;
        let fresh = t.clone();
        self.api_ids.remove(token);
        self.api_ids.insert(fresh.token.expose().to_string(), id);
        Some(fresh)
    }

    /// An access token for a live, not used-up API token (which counts one use).
    pub(crate) fn exchange(&mut self, token: &str, now: &Now) -> Option<(Issued, String)> {
        let id = self.api_ids.get(token)?;
        let t = self.api_tokens.get_mut(id)?;
        if !t.is_live(now) || t.is_used_up() {
            return None;
        }
        t.uses += 1;
        t.last_access = Some(now.wall);
        let (id, client_id, ttl) = (t.id.clone(), t.client_id.clone(), t.access_token_ttl);
        let expires_in = self.expires_in(ttl);
        let access = jwt(&client_id, EXCHANGE_SCOPE, expires_in, now);
        prune(&mut self.access_tokens, now);
        self.access_tokens.insert(
            access.clone(),
            Bearer {
                owner: id.clone(),
                expires: now.mono + Duration::from_secs(expires_in.unsigned_abs()),
            },
        );
        let issued = Issued {
            token: Secret::new(access),
            expires_in,
            scope: EXCHANGE_SCOPE.to_string(),
        };
        Some((issued, id))
    }

    /// Who holds this live access token.
    pub(crate) fn access_token_caller(&self, bearer: &str, now: &Now) -> Option<Caller> {
        let b = self.access_tokens.get(bearer)?;
        if now.mono >= b.expires {
            return None;
        }
        Some(
            self.api_tokens
                .get(&b.owner)?
                .caller(TokenKind::AccessToken),
        )
    }

    /// Who holds this live API token (used directly as a bearer; does not count as a use).
    pub(crate) fn api_token_caller(&self, bearer: &str, now: &Now) -> Option<Caller> {
        let t = self.api_tokens.get(self.api_ids.get(bearer)?)?;
        t.is_live(now).then(|| t.caller(TokenKind::ApiToken))
    }

    pub(crate) fn revoke_api_token(&mut self, id: &str) -> bool {
        let Some(t) = self.api_tokens.get_mut(id) else {
            return false;
        };
        t.revoked = true;
        self.api_ids.remove(t.token.expose());
        true
    }

    pub(crate) fn revoke_access_tokens(&mut self) {
        self.access_tokens.clear();
    }

    pub(crate) fn revoke_admin_bearers(&mut self) {
        self.admin_bearers.clear();
    }
}

fn prune(bearers: &mut HashMap<String, Bearer>, now: &Now) {
    bearers.retain(|_, b| now.mono < b.expires);
}

/// A random (version 4) UUID, hyphenated.
pub(crate) fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn epoch_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `vidb_` + unpadded base64url of `"<id>#<64 alphanumeric secret>#<epoch seconds>"`.
fn api_token_string(id: &str, now: &Now) -> Secret {
    let secret: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(64)
        .map(char::from)
        .collect();
    let raw = format!("{id}#{secret}#{}", epoch_seconds(now.wall));
    Secret::new(format!("vidb_{}", URL_SAFE_NO_PAD.encode(raw)))
}

/// A JWT-shaped bearer: real-looking header and claims, random signature (never verified: the
/// emulator looks tokens up).
fn jwt(subject: &str, scope: &str, expires_in: i64, now: &Now) -> String {
    let header = serde_json::json!({"alg": "RS256", "kid": "emulator", "typ": "JWT"});
    let iat = epoch_seconds(now.wall);
    let claims = serde_json::json!({
        "jti": uuid_v4(),
        "sub": subject,
        "scope": scope,
        "iat": iat,
        "exp": iat.saturating_add(expires_in.unsigned_abs()),
    });
    let signature: [u8; 32] = rand::random();
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(seconds_per_minute: f64) -> Tokens {
        Tokens::new(&EmulatorConfig {
            seconds_per_minute,
            ..EmulatorConfig::default()
        })
    }

    fn new_token(max_count_of_uses: i32) -> NewApiToken {
        NewApiToken {
            display_name: "svc".into(),
            description: String::new(),
            api_token_ttl: 10,
            access_token_ttl: 2,
            max_count_of_uses,
            client_id: "admin".into(),
        }
    }

    fn later(now: &Now, secs: u64) -> Now {
        Now {
            mono: now.mono + Duration::from_secs(secs),
            wall: now.wall + Duration::from_secs(secs),
        }
    }

    #[test]
    fn api_token_string_has_the_vendor_shape() {
        let now = Now::get();
        let id = uuid_v4();
        let token = api_token_string(&id, &now);
        let raw = token.expose().strip_prefix("vidb_").unwrap();
        let decoded = String::from_utf8(URL_SAFE_NO_PAD.decode(raw).unwrap()).unwrap();
        let parts: Vec<&str> = decoded.split('#').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], id);
        assert_eq!(parts[1].len(), 64);
        assert!(parts[1].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(parts[2].parse::<u64>().unwrap(), epoch_seconds(now.wall));
    }

    #[test]
    fn uuid_is_version_4() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
    }

    #[test]
    fn lifetimes_follow_seconds_per_minute_and_clamp() {
        let t = tokens(0.5);
        assert_eq!(t.lifetime(10), Duration::from_secs(5));
        assert_eq!(t.expires_in(1), 1, "0.5 s rounds to 1");
        assert_eq!(tokens(0.01).expires_in(1), 1, "at least one second");
        assert_eq!(tokens(60.0).lifetime(i64::MAX), MAX_LIFETIME);
        assert_eq!(tokens(60.0).expires_in(30), 1800);
    }

    #[test]
    fn exchange_lives_until_expiry_and_respects_single_use() {
        let mut t = tokens(1.0);
        let now = Now::get();
        let once = t.create(new_token(1), &now);
        assert!(t.exchange(once.token.expose(), &now).is_some());
        assert!(t.exchange(once.token.expose(), &now).is_none());

        let many = t.create(new_token(-1), &now);
        let (access, id) = t.exchange(many.token.expose(), &now).unwrap();
        assert_eq!(id, many.id);
        assert_eq!(access.expires_in, 2);
        let caller = t.access_token_caller(access.token.expose(), &now).unwrap();
        assert_eq!(caller.api_token_id, many.id);
        assert!(t
            .access_token_caller(access.token.expose(), &later(&now, 2))
            .is_none());
        assert!(t.exchange(many.token.expose(), &later(&now, 9)).is_some());
        assert!(t.exchange(many.token.expose(), &later(&now, 10)).is_none());
    }

    #[test]
    fn regenerate_keeps_id_and_kills_the_old_string() {
        let mut t = tokens(1.0);
        let now = Now::get();
        let old = t.create(new_token(1), &now);
        t.exchange(old.token.expose(), &now).unwrap();
        let new = t.regenerate(old.token.expose(), &later(&now, 5)).unwrap();
        assert_eq!(new.id, old.id);
        assert_eq!(new.created, old.created);
        assert_ne!(new.token, old.token);
        assert!(t.exchange(old.token.expose(), &now).is_none());
        assert!(t.regenerate(old.token.expose(), &now).is_none());
        assert!(
            t.exchange(new.token.expose(), &now).is_some(),
            "use count reset"
        );
        // New expiry counts from the regeneration.
        assert!(t.regenerate(new.token.expose(), &later(&now, 14)).is_some());
    }

    #[test]
    fn revocations() {
        let mut t = tokens(1.0);
        let now = Now::get();
        let api = t.create(new_token(-1), &now);
        let (access, _) = t.exchange(api.token.expose(), &now).unwrap();
        let admin = t.issue_admin_bearer("admin", "admin", &now);
        assert_eq!(t.admin_client(admin.token.expose(), &now), Some("admin"));
        t.revoke_access_tokens();
        assert!(t.access_token_caller(access.token.expose(), &now).is_none());
        assert!(t.admin_client(admin.token.expose(), &now).is_some());
        t.revoke_admin_bearers();
        assert!(t.admin_client(admin.token.expose(), &now).is_none());
        assert!(t.revoke_api_token(&api.id));
        assert!(!t.revoke_api_token("nope"));
        assert!(t.exchange(api.token.expose(), &now).is_none());
        assert!(t.api_token_caller(api.token.expose(), &now).is_none());
    }

    #[test]
    fn client_authentication() {
        let t = tokens(1.0);
        assert!(t.authenticate_client("admin", "secret"));
        assert!(!t.authenticate_client("admin", "secreT"));
        assert!(!t.authenticate_client("other", "secret"));
    }
}
