//! The token signing key: Ed25519, created once and kept in the service's database so every
//! instance signs with the same key; published (public half only) as a JWKS.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqlitePool};

pub const ISSUER: &str = "switchyard-users";
pub const AUDIENCE: &str = "switchyard";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub email: String,
    pub name: String,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

impl Claims {
    pub fn new(id: i64, email: String, name: String, ttl: Duration) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { sub: id.to_string(), email, name, iss: ISSUER.into(), aud: AUDIENCE.into(), iat: now, exp: now + ttl.as_secs() }
    }
}

pub struct Keys {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public_x: String,
}

impl Keys {
    /// Loads the key, creating it on the very first start. Instances starting together race on
    /// the insert; `INSERT OR IGNORE` on the single slot lets exactly one win and all read it back.
    pub async fn load_or_create(db: &SqlitePool) -> anyhow::Result<Self> {
        let signing = SigningKey::generate(&mut rand::rngs::OsRng);
        let der = signing.to_pkcs8_der()?;
        let public = signing.verifying_key().to_bytes();
        let kid = format!("users-{}", &URL_SAFE_NO_PAD.encode(&public[..9]));
        let now = common::clock::now_ms();
        sqlx::query("INSERT OR IGNORE INTO signing_key (slot, kid, private_pkcs8, public_key, created_at_ms) VALUES (1, ?, ?, ?, ?)")
            .bind(&kid)
            .bind(der.as_bytes())
            .bind(&public[..])
            .bind(now)
            .execute(db)
            .await?;
        let row = sqlx::query("SELECT kid, private_pkcs8, public_key FROM signing_key WHERE slot = 1").fetch_one(db).await?;
        let private: Vec<u8> = row.try_get("private_pkcs8")?;
        let public: Vec<u8> = row.try_get("public_key")?;
        let public_x = URL_SAFE_NO_PAD.encode(&public);
        Ok(Self { kid: row.try_get("kid")?, encoding: EncodingKey::from_ed_der(&private), decoding: DecodingKey::from_ed_components(&public_x)?, public_x })
    }

    pub fn sign(&self, claims: &Claims) -> jsonwebtoken::errors::Result<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }

    pub fn verify(&self, token: &str) -> jsonwebtoken::errors::Result<Claims> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        v.leeway = 5;
        Ok(jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)?.claims)
    }

    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": self.public_x, "kid": self.kid, "alg": "EdDSA", "use": "sig" }]
        })
    }
}
