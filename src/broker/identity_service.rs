//! What the broker asks of the identity service, as a trait: the real [`IdentityClient`] in
//! production, a fake in tests (so that the lifecycle can be tested on paused time). The trait
//! only moves calls; classifying answers stays with [`crate::identity`].

use futures_util::future::BoxFuture;

use crate::identity::{AccessToken, ApiToken, CreateRequest, IdentityClient, IdentityError};
use crate::secret::Secret;

/// The four operations of the identity service (see `docs/identity-service.md`).
pub trait IdentityService: Send + Sync + 'static {
    /// `client_credentials`: the admin bearer.
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        client_secret: &'a Secret,
        scope: Option<&'a str>,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>>;

    /// The API-token exchange: an access token.
    fn exchange<'a>(
        &'a self,
        api_token: &'a Secret,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>>;

    /// Creates an API token with the admin bearer.
    fn create_api_token<'a>(
        &'a self,
        admin: &'a Secret,
        request: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>>;

    /// Regenerates an API token: same id, new secret, the old one dead at once.
    fn regenerate_api_token<'a>(
        &'a self,
        admin: &'a Secret,
        api_token: &'a Secret,
        ttl_minutes: i64,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>>;
}

impl IdentityService for IdentityClient {
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        client_secret: &'a Secret,
        scope: Option<&'a str>,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        Box::pin(IdentityClient::client_credentials(
            self,
            client_id,
            client_secret,
            scope,
        ))
    }

    fn exchange<'a>(
        &'a self,
        api_token: &'a Secret,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        Box::pin(IdentityClient::exchange(self, api_token))
    }

    fn create_api_token<'a>(
        &'a self,
        admin: &'a Secret,
        request: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        Box::pin(IdentityClient::create_api_token(self, admin, request))
    }

    fn regenerate_api_token<'a>(
        &'a self,
        admin: &'a Secret,
        api_token: &'a Secret,
        ttl_minutes: i64,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        Box::pin(IdentityClient::regenerate_api_token(
            self,
            admin,
            api_token,
            ttl_minutes,
        ))
    }
}
