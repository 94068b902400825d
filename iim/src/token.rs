//! Client authentication tokens: what a WebSocket client presents in its
//! first frame (`{"op":"auth","token":...}`) to say which user it is.
//!
//! Owns the token format the app server accepts out of the box — an HS256
//! JWT whose `sub` is the user id as a decimal string, with `exp` and `iat`
//! in Unix seconds — and the [`TokenVerifier`] seam through which an
//! operator replaces it. It does not own users or sessions.
//!
//! # Plugging in another key
//!
//! The app server only ever calls [`TokenVerifier::verify`]. To accept
//! tokens signed elsewhere (an identity provider's RS256 or ES256 keys, say),
//! implement the trait and pass it to `iim_appserver::start_with`:
//!
//! ```ignore
//! use iim::token::{TokenError, TokenVerifier};
//! use iim::types::UserId;
//! use jsonwebtoken::{Algorithm, DecodingKey, Validation};
//!
//! struct Rs256 { key: DecodingKey, validation: Validation }
//!
//! impl Rs256 {
//!     fn from_pem(pem: &[u8]) -> anyhow::Result<Self> {
//!         let mut validation = Validation::new(Algorithm::RS256);
//!         validation.leeway = 5;
//!         Ok(Rs256 { key: DecodingKey::from_rsa_pem(pem)?, validation })
//!     }
//! }
//!
//! impl TokenVerifier for Rs256 {
//!     fn verify(&self, token: &str) -> Result<UserId, TokenError> {
//!         let data = jsonwebtoken::decode::<iim::token::Claims>(token, &self.key, &self.validation)
//!             .map_err(TokenError::from)?;
//!         iim::token::user_of(&data.claims)
//!     }
//! }
//!
//! // iim_appserver::start_with(config, tls, plugins, Some(Arc::new(Rs256::from_pem(&pem)?)), shutdown)
//! ```
//!
//! `verify` runs on the connection's task: keep it CPU-only (no network
//! calls); fetch key sets ahead of time.

use crate::types::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The secret the development configuration ships with. A server running
/// with it logs a warning: anyone can mint tokens for any user.
pub const DEV_SECRET: &str = "iim-development-secret";

/// Clock skew tolerated on `exp`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// Longest token accepted, so a hostile client cannot make us parse
/// megabytes of base64.
pub const MAX_TOKEN_BYTES: usize = 8_192;

/// The claims of an iim token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, as a decimal string (JWT subjects are strings).
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default)]
    pub iat: u64,
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl TokenError {
    /// A stable label (metrics, logs): `expired` or `invalid`.
    pub fn kind(&self) -> &'static str {
        match self {
            TokenError::Expired => "expired",
            TokenError::Invalid(_) => "invalid",
        }
    }
}

impl From<jsonwebtoken::errors::Error> for TokenError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid(e.to_string()),
        }
    }
}

/// Checks a client's token and names its user.
pub trait TokenVerifier: Send + Sync + 'static {
    fn verify(&self, token: &str) -> Result<UserId, TokenError>;
}

/// The user a token's claims name: `sub` must be a decimal user id other
/// than 0.
pub fn user_of(claims: &Claims) -> Result<UserId, TokenError> {
    match claims.sub.parse::<u64>() {
        Ok(0) => Err(TokenError::Invalid("sub: user 0 is reserved".into())),
        Ok(u) if claims.sub.bytes().all(|b| b.is_ascii_digit()) => Ok(UserId(u)),
        _ => Err(TokenError::Invalid(
            "sub: not a decimal user id".to_string(),
        )),
    }
}

/// Verifies HS256 tokens made with one shared secret (see [`mint`]).
pub struct Hs256Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Hs256Verifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Hs256Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }
}

impl std::fmt::Debug for Hs256Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hs256Verifier")
    }
}

impl TokenVerifier for Hs256Verifier {
    fn verify(&self, token: &str) -> Result<UserId, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        user_of(&data.claims)
    }
}

/// An HS256 token for `user`, valid for `ttl` from now.
pub fn mint(secret: &[u8], user: UserId, ttl: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    mint_at(secret, user, now, now.saturating_add(ttl.as_secs()))
}

/// An HS256 token with explicit `iat` and `exp` (tests make expired ones).
pub fn mint_at(secret: &[u8], user: UserId, iat: u64, exp: u64) -> String {
    let claims = Claims {
        sub: user.0.to_string(),
        exp,
        iat,
    };
    // Encoding HS256 with serde_json-serialisable claims cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &[u8] = b"test-secret";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_minted_token_verifies_to_its_user() {
        let t = mint(S, UserId(1001), Duration::from_secs(60));
        assert_eq!(Hs256Verifier::new(S).verify(&t), Ok(UserId(1001)));
    }

    #[test]
    fn wrong_secret_garbage_and_alg_none_are_invalid() {
        let t = mint(S, UserId(1001), Duration::from_secs(60));
        let v = Hs256Verifier::new(b"other");
        assert_eq!(v.verify(&t).unwrap_err().kind(), "invalid");
        assert_eq!(v.verify("not.a.jwt").unwrap_err().kind(), "invalid");
        assert_eq!(v.verify("").unwrap_err().kind(), "invalid");
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1))
                .unwrap_err()
                .kind(),
            "invalid"
        );
        // {"alg":"none"} with the same claims and no signature.
        let mut parts = t.split('.');
        let _ = parts.next();
        let payload = parts.next().unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert_eq!(
            Hs256Verifier::new(S).verify(&none).unwrap_err().kind(),
            "invalid"
        );
    }

    #[test]
    fn expiry_honours_the_leeway() {
        let v = Hs256Verifier::new(S);
        let n = now();
        let old = mint_at(S, UserId(7), n - 120, n - 60);
        assert_eq!(v.verify(&old), Err(TokenError::Expired));
        assert_eq!(TokenError::Expired.kind(), "expired");
        let just = mint_at(S, UserId(7), n - 120, n - 1);
        assert_eq!(v.verify(&just), Ok(UserId(7)));
    }

    #[test]
    fn subjects_must_be_decimal_nonzero_user_ids() {
        let claims = |sub: &str| Claims {
            sub: sub.into(),
            exp: now() + 60,
            iat: now(),
        };
        assert_eq!(user_of(&claims("42")), Ok(UserId(42)));
        for bad in ["0", "", "-1", "+5", "abc", "1.5", "99999999999999999999999"] {
            assert!(user_of(&claims(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
