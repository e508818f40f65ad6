//! Token checks at the door: EdDSA JWTs signed by `users`, verified with the keys it publishes
//! as JWKS (found through the registry, cached, fetched again when a token names an unknown key).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use common::ApiError;
use common::registry::Discovery;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

pub const ISSUER: &str = "switchyard-users";
pub const AUDIENCE: &str = "switchyard";
/// The shortest time between two JWKS fetches triggered by unknown key ids.
const REFETCH_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub email: String,
}

pub struct Verifier {
    discovery: Discovery,
    http: common::http::Client,
    keys: RwLock<(HashMap<String, DecodingKey>, Option<Instant>)>,
    validation: Validation,
}

impl Verifier {
    pub fn new(discovery: Discovery, leeway: Duration, http: common::http::Client) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = leeway.as_secs();
        Self { discovery, http, keys: RwLock::new((HashMap::new(), None)), validation }
    }

    /// Checks an `Authorization` header value; the error says what is wrong with the token.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Claims, ApiError> {
        let unauthorized = |m: &str| ApiError::Unauthorized(m.to_owned());
        let value = authorization.ok_or_else(|| unauthorized("missing bearer token"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?
            .trim();
        let header = jsonwebtoken::decode_header(token).map_err(|e| ApiError::Unauthorized(format!("malformed token: {e}")))?;
        if header.alg != Algorithm::EdDSA {
            return Err(ApiError::Unauthorized(format!("token algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| unauthorized("token names no key (kid)"))?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refresh().await?;
                self.key(&kid).ok_or_else(|| ApiError::Unauthorized(format!("token signed with unknown key {kid:?}")))?
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "token expired".to_owned(),
                ErrorKind::InvalidSignature => "token signature is invalid".to_owned(),
                ErrorKind::InvalidIssuer => "token issuer is not accepted".to_owned(),
                ErrorKind::InvalidAudience => "token audience is not accepted".to_owned(),
                _ => format!("invalid token: {e}"),
            };
            ApiError::Unauthorized(why)
        })?;
        Ok(data.claims)
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys.read().ok()?.0.get(kid).cloned()
    }

    /// Fetches the JWKS from a `users` instance (at most once per REFETCH_AFTER).
    async fn refresh(&self) -> Result<(), ApiError> {
        let recent = self.keys.read().ok().and_then(|k| k.1).is_some_and(|t| t.elapsed() < REFETCH_AFTER);
        if recent {
            return Ok(());
        }
        let users = self.discovery.healthy("users");
        let mut last_error = "no healthy users instance to fetch signing keys from".to_owned();
        for instance in users {
            let url = format!("http://{}/.well-known/jwks.json", instance.address);
            match self.fetch(&url).await {
                Ok(set) => {
                    let keys: HashMap<String, DecodingKey> =
                        set.keys.iter().filter_map(|jwk| Some((jwk.common.key_id.clone()?, DecodingKey::from_jwk(jwk).ok()?))).collect();
                    tracing::info!(keys = keys.len(), from = %instance.instance_id, "signing keys fetched");
                    if let Ok(mut k) = self.keys.write() {
                        *k = (keys, Some(Instant::now()));
                    }
                    return Ok(());
                }
                Err(e) => last_error = format!("fetching signing keys from {url}: {e}"),
            }
        }
        tracing::warn!(error = %last_error, "JWKS refresh");
        Err(ApiError::Unavailable("cannot check tokens: the signing keys are unavailable".into()))
    }

    /// Fetched inside the request that needed the keys, so the fetch shows in its trace.
    async fn fetch(&self, url: &str) -> Result<JwkSet, String> {
        let resp = self.http.send(self.http.raw().get(url), "users", None).await.map_err(|e| e.to_string())?;
        let resp = resp.error_for_status().map_err(|e| e.to_string())?;
        resp.json().await.map_err(|e| e.to_string())
    }
}
