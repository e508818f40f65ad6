//! `users`: accounts (argon2id password hashes), login returning an Ed25519-signed JWT, the
//! caller's profile, and the public key as JWKS at `/.well-known/jwks.json` for the gateway.

mod hashing;
mod keys;

use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use common::ApiError;
use common::args::ServiceArgs;
use common::clock::{now_ms, rfc3339};
use common::error::JsonBody;
use common::http::db_call;
use common::service::Service;
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqlitePool};

use crate::keys::{Claims, Keys};

#[derive(Debug, Parser)]
#[command(name = "users", about = "Switchyard's users service", version)]
struct Config {
    #[command(flatten)]
    service: ServiceArgs,
    /// How long an access token is valid.
    #[arg(long, env = "TOKEN_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// Password hashes computed at once (each takes 19 MiB while it runs).
    #[arg(long, env = "HASH_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    hash_threads: u16,
}

struct AppState {
    db: SqlitePool,
    keys: Keys,
    token_ttl: Duration,
    hashers: hashing::Hashers,
}

const DB: &str = "users";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let svc = Service::start("users", cfg.service.clone()).await?;
    let db = common::db::open(&cfg.service.db_path("users"), 4).await?;
    common::db::migrate(&db, &sqlx::migrate!()).await?;
    let keys = Keys::load_or_create(&db).await?;
    let hashers = hashing::Hashers::new(usize::from(cfg.hash_threads))?;
    let state = Arc::new(AppState { db, keys, token_ttl: cfg.token_ttl, hashers });
    let api = Router::new()
        .route("/register", post(register))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state);
    svc.serve(api, [("api".to_owned(), "rest".to_owned())].into()).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    email: String,
    password: String,
    name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct User {
    id: i64,
    email: String,
    name: String,
    created_at: String,
}

fn validate(req: &RegisterRequest) -> Result<(), ApiError> {
    let email = req.email.trim();
    let valid_email = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.'))
        && !email.chars().any(char::is_whitespace);
    if !valid_email {
        return Err(ApiError::bad_field("email", format!("email must be an address like name@example.com, got {:?}", req.email)));
    }
    let n = req.password.chars().count();
    if !(8..=128).contains(&n) {
        return Err(ApiError::bad_field("password", format!("password must be 8 to 128 characters, got {n}")));
    }
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::bad_field("name", "name must be 1 to 100 characters"));
    }
    Ok(())
}

async fn register(State(s): State<Arc<AppState>>, JsonBody(req): JsonBody<RegisterRequest>) -> Result<(StatusCode, Json<User>), ApiError> {
    validate(&req)?;
    let password = req.password.clone();
    // Hashing is deliberately CPU- and memory-heavy: keep it off the async workers, on the few
    // hashing threads.
    let hash = s
        .hashers
        .run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
        })
        .await?
        .map_err(ApiError::internal)?;
    let (email, name, created) = (req.email.trim().to_owned(), req.name.trim().to_owned(), now_ms());
    let insert = sqlx::query("INSERT INTO users (email, name, password_hash, created_at_ms) VALUES (?, ?, ?, ?) RETURNING id")
        .bind(&email)
        .bind(&name)
        .bind(&hash)
        .bind(created)
        .fetch_one(&s.db);
    let row = db_call("INSERT", "users", DB, insert).await.map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            ApiError::Conflict { field: Some("email".into()), message: format!("an account with email {email} already exists") }
        }
        e => ApiError::internal(e),
    })?;
    let id: i64 = row.try_get(0).map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(User { id, email, name, created_at: rfc3339(created) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoginResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
}

async fn login(State(s): State<Arc<AppState>>, JsonBody(req): JsonBody<LoginRequest>) -> Result<Json<LoginResponse>, ApiError> {
    let select = sqlx::query("SELECT id, email, name, password_hash FROM users WHERE email = ?").bind(req.email.trim()).fetch_optional(&s.db);
    let row = db_call("SELECT", "users", DB, select).await.map_err(ApiError::internal)?;
    let wrong = || ApiError::Unauthorized("wrong email or password".into());
    let Some(row) = row else { return Err(wrong()) };
    let hash: String = row.try_get("password_hash").map_err(ApiError::internal)?;
    let password = req.password;
    let ok =
        s.hashers.run(move || PasswordHash::new(&hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())).await?;
    if !ok {
        return Err(wrong());
    }
    let id: i64 = row.try_get("id").map_err(ApiError::internal)?;
    let claims = Claims::new(id, row.try_get("email").map_err(ApiError::internal)?, row.try_get("name").map_err(ApiError::internal)?, s.token_ttl);
    let token = s.keys.sign(&claims).map_err(ApiError::internal)?;
    Ok(Json(LoginResponse { access_token: token, token_type: "Bearer", expires_in: s.token_ttl.as_secs() }))
}

/// The caller's profile. The gateway has checked the token already; this service checks it again
/// (it is cheap, and a service must not trust whoever reaches it).
async fn me(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<User>, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
    let claims = s.keys.verify(token).map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
    let id: i64 = claims.sub.parse().map_err(|_| ApiError::Unauthorized("invalid token subject".into()))?;
    let select = sqlx::query("SELECT id, email, name, created_at_ms FROM users WHERE id = ?").bind(id).fetch_optional(&s.db);
    let row =
        db_call("SELECT", "users", DB, select).await.map_err(ApiError::internal)?.ok_or_else(|| ApiError::NotFound(format!("user {id} no longer exists")))?;
    let get = |r: &sqlx::sqlite::SqliteRow| -> Result<User, sqlx::Error> {
        Ok(User { id: r.try_get("id")?, email: r.try_get("email")?, name: r.try_get("name")?, created_at: rfc3339(r.try_get("created_at_ms")?) })
    };
    Ok(Json(get(&row).map_err(ApiError::internal)?))
}

async fn jwks(State(s): State<Arc<AppState>>) -> ([(header::HeaderName, &'static str); 1], Json<serde_json::Value>) {
    ([(header::CACHE_CONTROL, "public, max-age=300")], Json(s.keys.jwks()))
}
