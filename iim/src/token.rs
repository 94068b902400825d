//! Client authentication tokens: what a WebSocket client presents in its
//! first frame (`{"op":"auth","token":...}`) to say which user it is.
//!
//! Owns the token format the app server accepts out of the box — an HS256
//! JWT whose `sub` is the user id as a decimal string, with `exp` and `iat`
//! in Unix seconds — and the [`TokenVerifier`] seam through which an
//! operator replaces it. It does not own users or sessions.
//!
//! # Keys
//!
//! [`KeySet`] checks tokens against the keys a deployment configures: the
//! shared HS256 secret, public keys (EdDSA, RS256, ES256) from PEM files or
//! a JWKS file, each by its key id, under one [`Policy`] (required `iss`
//! and `aud`, the longest lifetime). `nbf` and `exp` are checked with
//! [`LEEWAY_SECS`] of skew; [`TokenVerifier::verify_token`] says until
//! when the token is valid, and the gateway closes the connection then.
//! Another verifier can be plugged in with `iim_appserver::start_with`;
//! it runs on the connection's task: keep it CPU-only (no network calls),
//! fetch key sets ahead of time.

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
    /// Not before, Unix seconds (checked when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
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

/// A token that passed: its user, and when it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub user: UserId,
    /// Unix seconds after which the token is no longer valid (its `exp`
    /// plus the leeway); a connection it opened is closed then.
    /// `u64::MAX`: the verifier does not say.
    pub valid_until: u64,
}

/// Checks a client's token and names its user.
pub trait TokenVerifier: Send + Sync + 'static {
    fn verify(&self, token: &str) -> Result<UserId, TokenError>;

    /// [`TokenVerifier::verify`], and until when the token is valid. The
    /// gateway calls this one; a verifier that knows its tokens' expiry
    /// should say it, so connections end with their tokens.
    fn verify_token(&self, token: &str) -> Result<Verified, TokenError> {
        self.verify(token).map(|user| Verified {
            user,
            valid_until: u64::MAX,
        })
    }
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

/// What every accepted token must also satisfy, whatever its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The `iss` a token must carry, if set.
    pub issuer: Option<String>,
    /// An `aud` a token must carry, if set.
    pub audience: Option<String>,
    /// The longest a token may still be valid for when it is presented:
    /// one whose `exp` lies further ahead is refused.
    pub max_lifetime: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            issuer: None,
            audience: None,
            max_lifetime: Duration::from_secs(DEFAULT_MAX_LIFETIME_SECS),
        }
    }
}

/// A token's longest lifetime by default: a day (`iimctl token`'s default).
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 86_400;

/// The algorithms a key may be for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlg {
    HS256,
    EdDSA,
    RS256,
    ES256,
}

impl KeyAlg {
    fn algorithm(self) -> Algorithm {
        match self {
            KeyAlg::HS256 => Algorithm::HS256,
            KeyAlg::EdDSA => Algorithm::EdDSA,
            KeyAlg::RS256 => Algorithm::RS256,
            KeyAlg::ES256 => Algorithm::ES256,
        }
    }

    fn of(a: Algorithm) -> Option<KeyAlg> {
        match a {
            Algorithm::HS256 => Some(KeyAlg::HS256),
            Algorithm::EdDSA => Some(KeyAlg::EdDSA),
            Algorithm::RS256 => Some(KeyAlg::RS256),
            Algorithm::ES256 => Some(KeyAlg::ES256),
            _ => None,
        }
    }
}

/// A public key a token may be signed with, from a PEM file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// The `kid` tokens signed with this key carry in their header.
    pub kid: String,
    pub alg: KeyAlg,
    /// A PEM public key (`BEGIN PUBLIC KEY`, or `BEGIN RSA PUBLIC KEY`).
    pub public_key_file: std::path::PathBuf,
}

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Bad { what: String, detail: String },
    #[error("no key to check tokens with: set a secret, keys or a JWKS file")]
    None,
}

struct Key {
    kid: Option<String>,
    alg: KeyAlg,
    key: DecodingKey,
}

/// The keys client tokens may be signed with — a shared HS256 secret,
/// public keys (EdDSA, RS256, ES256) from PEM files or a JWKS file — each
/// with its key id, and the [`Policy`] every token must also meet.
///
/// A token naming a `kid` is checked with that key only, and only if its
/// header's `alg` is the key's: several keys can be configured at once, so
/// an identity provider rotates its keys without a cut-over. A token
/// without a `kid` is checked with the one key of its `alg` that has no
/// key id (the HS256 secret, typically). `exp` and `nbf` are checked with
/// [`LEEWAY_SECS`] of clock skew.
pub struct KeySet {
    keys: Vec<Key>,
    policy: Policy,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(|k| (k.kid.as_deref(), k.alg))
                    .collect::<Vec<_>>(),
            )
            .field("policy", &self.policy)
            .finish()
    }
}

impl KeySet {
    /// An empty set with `policy`; add keys before use.
    pub fn new(policy: Policy) -> KeySet {
        KeySet {
            keys: Vec::new(),
            policy,
        }
    }

    /// The shared HS256 secret (tokens without a `kid`).
    pub fn with_secret(mut self, secret: &[u8]) -> KeySet {
        self.keys.push(Key {
            kid: None,
            alg: KeyAlg::HS256,
            key: DecodingKey::from_secret(secret),
        });
        self
    }

    /// A public key in PEM for `alg`, named `kid`.
    pub fn with_public_pem(
        mut self,
        kid: &str,
        alg: KeyAlg,
        pem: &[u8],
    ) -> Result<KeySet, KeyError> {
        let bad = |e: jsonwebtoken::errors::Error| KeyError::Bad {
            what: format!("key {kid}"),
            detail: e.to_string(),
        };
        let key = match alg {
            KeyAlg::EdDSA => DecodingKey::from_ed_pem(pem).map_err(bad)?,
            KeyAlg::RS256 => DecodingKey::from_rsa_pem(pem).map_err(bad)?,
            KeyAlg::ES256 => DecodingKey::from_ec_pem(pem).map_err(bad)?,
            KeyAlg::HS256 => {
                return Err(KeyError::Bad {
                    what: format!("key {kid}"),
                    detail: "HS256 is a shared secret, not a public key".into(),
                });
            }
        };
        self.keys.push(Key {
            kid: Some(kid.to_owned()),
            alg,
            key,
        });
        Ok(self)
    }

    /// Every key of a JWKS document (JSON), each by its `kid`.
    pub fn with_jwks(mut self, json: &[u8]) -> Result<KeySet, KeyError> {
        let bad = |detail: String| KeyError::Bad {
            what: "JWKS".into(),
            detail,
        };
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| bad("a key without a kid".into()))?;
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => KeyAlg::EdDSA,
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => KeyAlg::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => KeyAlg::ES256,
                _ => {
                    return Err(bad(format!(
                        "key {kid}: not an EdDSA, RSA or EC public key"
                    )));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("key {kid}: {e}")))?;
            self.keys.push(Key {
                kid: Some(kid),
                alg,
                key,
            });
        }
        Ok(self)
    }

    /// The secret (if any), the key files and the JWKS file (if any), read
    /// now: a missing or bad one is an error at start, not at the first
    /// client.
    pub fn load(
        secret: Option<&[u8]>,
        keys: &[KeyFile],
        jwks_file: Option<&std::path::Path>,
        policy: Policy,
    ) -> Result<KeySet, KeyError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let mut set = KeySet::new(policy);
        if let Some(s) = secret {
            set = set.with_secret(s);
        }
        for k in keys {
            set = set.with_public_pem(&k.kid, k.alg, &read(&k.public_key_file)?)?;
        }
        if let Some(path) = jwks_file {
            set = set.with_jwks(&read(path)?)?;
        }
        if set.keys.is_empty() {
            return Err(KeyError::None);
        }
        Ok(set)
    }

    fn key_for(&self, header: &Header) -> Result<&Key, TokenError> {
        let alg = KeyAlg::of(header.alg).ok_or_else(|| {
            TokenError::Invalid(format!("algorithm {:?} not accepted", header.alg))
        })?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| TokenError::Invalid(format!("unknown key id {kid:?}")))?,
            None => self
                .keys
                .iter()
                .find(|k| k.kid.is_none() && k.alg == alg)
                .ok_or_else(|| TokenError::Invalid("no key id, and no key without one".into()))?,
        };
        if key.alg != alg {
            return Err(TokenError::Invalid(format!(
                "signed with {:?}, but the key is for {:?}",
                header.alg, key.alg
            )));
        }
        Ok(key)
    }
}

impl TokenVerifier for KeySet {
    fn verify(&self, token: &str) -> Result<UserId, TokenError> {
        self.verify_token(token).map(|v| v.user)
    }

    fn verify_token(&self, token: &str) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token)?;
        let key = self.key_for(&header)?;
        let mut v = Validation::new(key.alg.algorithm());
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        required.extend(self.policy.issuer.as_ref().map(|_| "iss"));
        required.extend(self.policy.audience.as_ref().map(|_| "aud"));
        v.set_required_spec_claims(&required);
        match &self.policy.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.policy.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &v)?;
        let now = unix_now();
        let limit = now
            .saturating_add(self.policy.max_lifetime.as_secs())
            .saturating_add(LEEWAY_SECS);
        if data.claims.exp > limit {
            return Err(TokenError::Invalid(format!(
                "valid for longer than the {} s allowed",
                self.policy.max_lifetime.as_secs()
            )));
        }
        Ok(Verified {
            user: user_of(&data.claims)?,
            valid_until: data.claims.exp.saturating_add(LEEWAY_SECS),
        })
    }
}

/// Verifies HS256 tokens made with one shared secret (see [`mint`]), with
/// the default [`Policy`].
#[derive(Debug)]
pub struct Hs256Verifier(KeySet);

impl Hs256Verifier {
    pub fn new(secret: &[u8]) -> Self {
        Hs256Verifier(KeySet::new(Policy::default()).with_secret(secret))
    }
}

impl TokenVerifier for Hs256Verifier {
    fn verify(&self, token: &str) -> Result<UserId, TokenError> {
        self.0.verify(token)
    }

    fn verify_token(&self, token: &str) -> Result<Verified, TokenError> {
        self.0.verify_token(token)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// An HS256 token for `user`, valid for `ttl` from now.
pub fn mint(secret: &[u8], user: UserId, ttl: Duration) -> String {
    let now = unix_now();
    mint_at(secret, user, now, now.saturating_add(ttl.as_secs()))
}

/// An HS256 token with explicit `iat` and `exp` (tests make expired ones).
pub fn mint_at(secret: &[u8], user: UserId, iat: u64, exp: u64) -> String {
    let claims = Claims {
        sub: user.0.to_string(),
        exp,
        iat,
        nbf: None,
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
            nbf: None,
        };
        assert_eq!(user_of(&claims("42")), Ok(UserId(42)));
        for bad in ["0", "", "-1", "+5", "abc", "1.5", "99999999999999999999999"] {
            assert!(user_of(&claims(bad)).is_err(), "{bad:?} accepted");
        }
    }

    /// A token with any claims, signed with `key` under `alg` and `kid`.
    fn sign(
        claims: serde_json::Value,
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
    ) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, &claims, key).unwrap()
    }

    fn claims(user: u64, exp: u64) -> serde_json::Value {
        serde_json::json!({"sub": user.to_string(), "exp": exp, "iat": now()})
    }

    #[test]
    fn nbf_is_checked_and_lifetimes_are_capped() {
        let v = Hs256Verifier::new(S);
        let key = EncodingKey::from_secret(S);
        let mut c = claims(5, now() + 60);
        c["nbf"] = (now() + 600).into();
        let early = sign(c, Algorithm::HS256, None, &key);
        assert_eq!(v.verify(&early).unwrap_err().kind(), "invalid");
        let long = mint(
            S,
            UserId(5),
            Duration::from_secs(DEFAULT_MAX_LIFETIME_SECS + 60),
        );
        let e = v.verify(&long).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let ok = v
            .verify_token(&mint(S, UserId(5), Duration::from_secs(60)))
            .unwrap();
        assert_eq!(ok.user, UserId(5));
        assert!((now() + 60..=now() + 61 + LEEWAY_SECS).contains(&ok.valid_until));
    }

    #[test]
    fn issuer_and_audience_are_required_when_set() {
        let policy = Policy {
            issuer: Some("https://id.example".into()),
            audience: Some("iim".into()),
            ..Policy::default()
        };
        let v = KeySet::new(policy).with_secret(S);
        let key = EncodingKey::from_secret(S);
        let mut c = claims(9, now() + 60);
        assert!(
            v.verify(&sign(c.clone(), Algorithm::HS256, None, &key))
                .is_err()
        );
        c["iss"] = "https://id.example".into();
        c["aud"] = "other".into();
        assert!(
            v.verify(&sign(c.clone(), Algorithm::HS256, None, &key))
                .is_err()
        );
        c["aud"] = "iim".into();
        assert_eq!(
            v.verify(&sign(c, Algorithm::HS256, None, &key)),
            Ok(UserId(9))
        );
    }

    #[test]
    fn public_keys_by_key_id_rotate_without_a_cut_over() {
        let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let new = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let v = KeySet::new(Policy::default())
            .with_public_pem("old", KeyAlg::EdDSA, old.public_key_pem().as_bytes())
            .unwrap()
            .with_public_pem("new", KeyAlg::ES256, new.public_key_pem().as_bytes())
            .unwrap();
        let old_key = EncodingKey::from_ed_pem(old.serialize_pem().as_bytes()).unwrap();
        let new_key = EncodingKey::from_ec_pem(new.serialize_pem().as_bytes()).unwrap();
        // Both keys are good at once.
        let t_old = sign(
            claims(1, now() + 60),
            Algorithm::EdDSA,
            Some("old"),
            &old_key,
        );
        let t_new = sign(
            claims(2, now() + 60),
            Algorithm::ES256,
            Some("new"),
            &new_key,
        );
        assert_eq!(v.verify(&t_old), Ok(UserId(1)));
        assert_eq!(v.verify(&t_new), Ok(UserId(2)));
        // A token naming the wrong key, an unknown one, none at all, or an
        // algorithm its key is not for, is refused.
        let wrong = sign(
            claims(1, now() + 60),
            Algorithm::EdDSA,
            Some("new"),
            &old_key,
        );
        let unknown = sign(
            claims(1, now() + 60),
            Algorithm::EdDSA,
            Some("gone"),
            &old_key,
        );
        let no_kid = sign(claims(1, now() + 60), Algorithm::EdDSA, None, &old_key);
        for t in [wrong, unknown, no_kid] {
            assert_eq!(v.verify(&t).unwrap_err().kind(), "invalid");
        }
        // An HS256 token made with the public key as its secret (the
        // classic confusion) is refused: no HS256 key here.
        let forged = sign(
            claims(1, now() + 60),
            Algorithm::HS256,
            Some("old"),
            &EncodingKey::from_secret(old.public_key_pem().as_bytes()),
        );
        assert_eq!(v.verify(&forged).unwrap_err().kind(), "invalid");
    }

    fn base64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn a_jwks_file_and_rsa_keys_are_read() {
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "j1", "alg": "EdDSA",
            "x": base64url(ed.public_key_raw()),
        }]});
        let dir = tempfile::tempdir().unwrap();
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, jwks.to_string()).unwrap();
        // An RSA key, made here with the system's openssl.
        let rsa_key = dir.path().join("rsa.pem");
        let rsa_pub = dir.path().join("rsa.pub.pem");
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&rsa_key)
            .status()
            .expect("openssl runs")
            .success()
            && std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&rsa_key)
                .arg("-out")
                .arg(&rsa_pub)
                .status()
                .expect("openssl runs")
                .success();
        assert!(ok, "openssl made an RSA key");
        let files = [KeyFile {
            kid: "r1".into(),
            alg: KeyAlg::RS256,
            public_key_file: rsa_pub,
        }];
        let v = KeySet::load(None, &files, Some(&jwks_path), Policy::default()).unwrap();
        let ed_key = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
        let rsa = EncodingKey::from_rsa_pem(&std::fs::read(&rsa_key).unwrap()).unwrap();
        assert_eq!(
            v.verify(&sign(
                claims(3, now() + 60),
                Algorithm::EdDSA,
                Some("j1"),
                &ed_key
            )),
            Ok(UserId(3))
        );
        assert_eq!(
            v.verify(&sign(
                claims(4, now() + 60),
                Algorithm::RS256,
                Some("r1"),
                &rsa
            )),
            Ok(UserId(4))
        );
        // Without a secret, an HS256 token has no key.
        assert!(
            v.verify(&mint(S, UserId(4), Duration::from_secs(60)))
                .is_err()
        );
        // Nothing to check with, or a missing file: an error at start.
        assert!(matches!(
            KeySet::load(None, &[], None, Policy::default()),
            Err(KeyError::None)
        ));
        assert!(matches!(
            KeySet::load(None, &[], Some(&dir.path().join("nope")), Policy::default()),
            Err(KeyError::Read { .. })
        ));
    }
}
