//! Bearer tokens: made by [`new_token`], stored as their SHA-256 ([`token_sha256`]) in the
//! daemon's configuration, checked on every request but `/healthz`. A read-only token is
//! refused on actions; every refusal is logged with the peer, the method and the path.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bulwark_daemon::config::{ApiToken, Scope};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The prefix of every token (so a leaked one is recognisable in logs and scanners).
pub const TOKEN_PREFIX: &str = "bwk_";

/// A new random token: the prefix and 32 random bytes in hex (256 bits from the OS-seeded
/// generator). Show it once; store only [`token_sha256`] of it.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The SHA-256 of a token, as the configuration stores it. Tokens carry 256 random bits, so a
/// plain hash is enough (no password stretching needed).
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The caller, once authenticated (a request extension).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its scope.
    pub scope: Scope,
}

/// The peer's address (a request extension set per connection).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// The accepted tokens.
#[derive(Debug, Clone)]
pub(crate) struct Tokens(pub(crate) Arc<Vec<ApiToken>>);

impl Tokens {
    /// The token whose hash matches, comparing every stored hash in constant time.
    fn find(&self, presented: &str) -> Option<&ApiToken> {
        let h = token_sha256(presented);
        let mut found = None;
        for t in self.0.iter() {
            if bool::from(t.sha256.ct_eq(&h)) {
                found = Some(t);
            }
        }
        found
    }
}

fn refuse(status: StatusCode, why: &str, req: &Request) -> Response {
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.to_string())
        .unwrap_or_else(|| "-".into());
    tracing::warn!(
        %peer,
        method = %req.method(),
        path = %req.uri().path(),
        status = status.as_u16(),
        why,
        "request refused"
    );
    let mut r = (status, axum::Json(serde_json::json!({ "error": why }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"bulwark\""),
        );
    }
    r
}

/// The middleware: a valid bearer token for every route it wraps; `operator` scope for every
/// method but GET and HEAD.
pub(crate) async fn require_token(
    State(tokens): State<Tokens>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return refuse(StatusCode::UNAUTHORIZED, "no bearer token", &req);
    };
    let Some(token) = tokens.find(presented) else {
        return refuse(StatusCode::UNAUTHORIZED, "unknown token", &req);
    };
    let reading = req.method() == Method::GET || req.method() == Method::HEAD;
    if !reading && token.scope < Scope::Operator {
        let why = format!(
            "token {:?} has read scope: actions need operator",
            token.name
        );
        return refuse(StatusCode::FORBIDDEN, &why, &req);
    }
    req.extensions_mut().insert(Caller {
        name: token.name.clone(),
        scope: token.scope,
    });
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        let t = Tokens(Arc::new(vec![ApiToken {
            name: "x".into(),
            scope: Scope::Read,
            sha256: token_sha256(&a),
        }]));
        assert_eq!(t.find(&a).map(|t| t.name.as_str()), Some("x"));
        assert!(t.find(&b).is_none());
    }
}
