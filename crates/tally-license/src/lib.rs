//! Signed license tokens that an SDK verifies offline, with no network.
//!
//! Tally's API issues each customer a [`License`] as a PASETO `v4.public` token (Ed25519).
//! Its claims are JSON: the registered `sub` (the customer), `iat`, `nbf` and `exp` (RFC
//! 3339), then `plan`, `features`, `seats` and `regions`. Its footer, `{"kid":"k4.pid.…"}`,
//! names the signing key by its PASERK id. Whoever holds the published [`KeySet`] checks a
//! token with [`verify`]: the key is picked by the footer's id, the signature is verified
//! before any claim is read, and the validity window is checked against an injected clock.
//!
//! Keys rotate: a set holds the active key and retired ones. A retired key signs nothing new
//! but still verifies the tokens it signed; the API drops it from the set only once every
//! such token has expired. Nothing here does I/O except [`KeySet::from_file`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use pasetors::claims::Claims;
use pasetors::footer::Footer;
use pasetors::keys::{AsymmetricKeyPair, AsymmetricPublicKey, AsymmetricSecretKey, Generate};
use pasetors::paserk::{FormatAsPaserk, Id};
use pasetors::token::UntrustedToken;
use pasetors::version4::{PublicToken, V4};
use pasetors::{Public, public};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The header of every token this crate issues and accepts.
const HEADER: &str = "v4.public.";
/// The longest token [`verify`] decodes: a license is a few kilobytes at most.
const MAX_TOKEN_LEN: usize = 64 * 1024;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Failures to read keys or to issue a license. All are bad input except [`Error::Sign`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key is not the PASERK it should be.
    #[error("invalid key: {0}")]
    Key(String),
    /// Text that is neither the key set JSON nor one `k4.public` key, or a key set with an
    /// invalid entry.
    #[error("invalid key set: {0}")]
    KeySet(String),
    /// A key file could not be read (the I/O error is the source).
    #[error("cannot read key file {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A key file was read but does not hold a key set.
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    /// The license cannot be issued as it stands.
    #[error("invalid license: {0}")]
    License(String),
    /// The PASETO library failed to sign (internal).
    #[error("cannot sign the license: {0}")]
    Sign(String),
}

/// Why [`verify`] refused a token. Each case is distinct, for callers that act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a `v4.public` token, bad base64, a footer without a key id, or claims that are not
    /// a license.
    #[error("malformed license token: {0}")]
    Malformed(String),
    /// The footer's key id is not in the key set.
    #[error(
        "license signed by unknown key {kid}: it is not in the key set (a token of another \
         issuer, or the wrong key file)"
    )]
    UnknownKey { kid: String },
    /// The key is in the set but the signature does not verify with it.
    #[error("license signature does not verify with key {kid}: the token was altered")]
    BadSignature { kid: String },
    /// The license's `exp` has passed.
    #[error("license expired at {}", rfc3339(.expired_at))]
    Expired { expired_at: DateTime<Utc> },
    /// The license's `nbf` (or `iat`) is still to come.
    #[error("license is not valid before {}", rfc3339(.valid_from))]
    NotYetValid { valid_from: DateTime<Utc> },
    /// The key set's entry for the token's key id is unusable: its public key does not
    /// parse, or has another id. (A hand-made [`KeySet`]; [`KeySet::parse`] refuses these.)
    #[error("key {kid} in the key set is invalid: {reason}")]
    InvalidKey { kid: String, reason: String },
}

/// What a license grants. Signed as the token's claims; see the crate documentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct License {
    /// The customer id (the `sub` claim).
    pub customer: String,
    /// The plan the customer is on.
    pub plan: String,
    /// Feature → what the customer may do with it, in the shape the API decides, e.g.
    /// `{"kind":"metered","limit":1000.0,"period":"month","enforcement":"hard"}`.
    pub features: BTreeMap<String, Value>,
    /// Seats the plan allows; `None`: no seat limit.
    pub seats: Option<u32>,
    /// Regions usage may come from; empty: anywhere.
    pub regions: Vec<String>,
    /// When the token was issued (`iat`).
    pub issued_at: DateTime<Utc>,
    /// The start of the validity window (`nbf`), included.
    pub not_before: DateTime<Utc>,
    /// The end of the validity window (`exp`), excluded.
    pub expires_at: DateTime<Utc>,
    /// The PASERK id (`k4.pid.…`) of the key that signed the token, from its footer. Filled
    /// by [`verify`]; [`SigningKey::sign`] ignores it and writes its own.
    pub key_id: String,
}

/// The claims as they travel in the token: registered PASETO names where one exists.
#[derive(Serialize, Deserialize)]
struct TokenClaims {
    sub: String,
    iat: DateTime<Utc>,
    nbf: DateTime<Utc>,
    exp: DateTime<Utc>,
    plan: String,
    features: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seats: Option<u32>,
    #[serde(default)]
    regions: Vec<String>,
}

/// An Ed25519 secret key that issues licenses, with the id of its public key.
pub struct SigningKey {
    secret: AsymmetricSecretKey<V4>,
    id: Id,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<SigningKey> {
        let pair = AsymmetricKeyPair::<V4>::generate()
            .map_err(|e| Error::Key(format!("cannot generate a key pair: {e:?}")))?;
        Self::from_secret(pair.secret)
    }

    fn from_secret(secret: AsymmetricSecretKey<V4>) -> Result<SigningKey> {
        let public = AsymmetricPublicKey::<V4>::try_from(&secret)
            .map_err(|e| Error::Key(format!("cannot derive the public key: {e:?}")))?;
        Ok(SigningKey {
            secret,
            id: Id::from(&public),
            public: PublicKey::from_key(&public),
        })
    }

    /// The PASERK id of the public key, `k4.pid.…`: the `kid` of the tokens it signs.
    pub fn key_id(&self) -> &str {
        &self.public.kid
    }

    /// The public half, to publish in a [`KeySet`].
    pub fn public(&self) -> PublicKey {
        self.public.clone()
    }

    /// The secret key as a PASERK, `k4.secret.…`, for storage. Keep it secret.
    pub fn to_paserk(&self) -> String {
        paserk(&self.secret)
    }

    /// Reads a key written by [`SigningKey::to_paserk`] (surrounding whitespace ignored).
    pub fn from_paserk(s: &str) -> Result<SigningKey> {
        let secret = AsymmetricSecretKey::<V4>::try_from(s.trim()).map_err(|_| {
            Error::Key("expected a k4.secret PASERK (an Ed25519 secret key)".into())
        })?;
        Self::from_secret(secret)
    }

    /// Signs a license: a `v4.public.…` token whose footer is `{"kid":"<this key's id>"}`.
    /// The license's `key_id` is ignored.
    pub fn sign(&self, license: &License) -> Result<String> {
        if license.customer.is_empty() {
            return Err(Error::License("the customer is empty".into()));
        }
        if license.expires_at <= license.not_before {
            return Err(Error::License(format!(
                "it expires ({}) before it becomes valid ({}): it would never be valid",
                rfc3339(&license.expires_at),
                rfc3339(&license.not_before)
            )));
        }
        let claims = TokenClaims {
            sub: license.customer.clone(),
            iat: license.issued_at,
            nbf: license.not_before,
            exp: license.expires_at,
            plan: license.plan.clone(),
            features: license.features.clone(),
            seats: license.seats,
            regions: license.regions.clone(),
        };
        let json = serde_json::to_string(&claims).map_err(|e| Error::Sign(e.to_string()))?;
        // Going through pasetors' `Claims` checks that the JSON is a PASETO claim set
        // (registered claims are strings, times RFC 3339) that other verifiers accept.
        let claims = Claims::from_string(&json)
            .map_err(|e| Error::Sign(format!("the claims are not a PASETO claim set: {e:?}")))?;
        let mut footer = Footer::new();
        footer.key_id(&self.id);
        public::sign(&self.secret, &claims, Some(&footer), None)
            .map_err(|e| Error::Sign(format!("{e:?}")))
    }
}

/// A public key as published: its PASERK id and the key itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    /// The PASERK id, `k4.pid.…`.
    pub kid: String,
    /// The key as a PASERK, `k4.public.…`.
    pub paserk: String,
}

impl PublicKey {
    /// Reads a `k4.public.…` PASERK (surrounding whitespace ignored) and computes its id.
    pub fn from_paserk(s: &str) -> Result<PublicKey> {
        Ok(Self::from_key(&parse_public(s)?))
    }

    fn from_key(key: &AsymmetricPublicKey<V4>) -> PublicKey {
        PublicKey {
            kid: paserk(&Id::from(key)),
            paserk: paserk(key),
        }
    }
}

/// The published key set: what `GET /api/v1/license-keys` returns and what
/// `tally license verify --key FILE` reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeySet {
    /// Every key whose tokens may still be valid: the active one and retired ones.
    pub keys: Vec<PublishedKey>,
}

/// One key of a [`KeySet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    /// The PASERK id of the public key, `k4.pid.…`.
    pub kid: String,
    /// The public key, `k4.public.…`.
    pub public_key: String,
    /// When the key was made (the Unix epoch for a key read from a bare PASERK).
    pub created_at: DateTime<Utc>,
    /// `None` while the key signs new tokens; when it was retired otherwise.
    #[serde(default)]
    pub retired_at: Option<DateTime<Utc>>,
    /// Whether the key signs new tokens.
    pub status: KeyStatus,
}

/// Whether a key signs new tokens. Both kinds verify tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// Signs new tokens.
    Active,
    /// Signs nothing new; still verifies the tokens it signed.
    Retired,
}

impl PublishedKey {
    /// An active key made at `created_at`.
    pub fn active(key: &PublicKey, created_at: DateTime<Utc>) -> PublishedKey {
        PublishedKey {
            kid: key.kid.clone(),
            public_key: key.paserk.clone(),
            created_at,
            retired_at: None,
            status: KeyStatus::Active,
        }
    }
}

impl KeySet {
    /// Reads a key file: the key set JSON, or one `k4.public.…` PASERK (whitespace trimmed).
    pub fn from_file(path: &Path) -> Result<KeySet> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| Error::KeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Parses the key set JSON (`{"keys":[…]}`) or one `k4.public.…` PASERK. Every key must
    /// parse and carry its own PASERK id, once.
    pub fn parse(text: &str) -> Result<KeySet> {
        let text = text.trim();
        if text.starts_with("k4.public.") {
            let key = PublicKey::from_paserk(text)?;
            return Ok(KeySet {
                keys: vec![PublishedKey::active(&key, DateTime::UNIX_EPOCH)],
            });
        }
        if text.starts_with("k4.secret.") {
            return Err(Error::KeySet(
                "this is a secret key (k4.secret): a key file holds public keys only".into(),
            ));
        }
        if !text.starts_with('{') {
            return Err(Error::KeySet(
                "expected the key set JSON ({\"keys\":[…]}) or one k4.public PASERK".into(),
            ));
        }
        let set: KeySet = serde_json::from_str(text)
            .map_err(|e| Error::KeySet(format!("not the key set JSON: {e}")))?;
        for (i, key) in set.keys.iter().enumerate() {
            let public = PublicKey::from_paserk(&key.public_key)
                .map_err(|e| Error::KeySet(format!("key {}: {e}", key.kid)))?;
            if public.kid != key.kid {
                return Err(Error::KeySet(format!(
                    "key {}: its public key has the id {}",
                    key.kid, public.kid
                )));
            }
            if set.keys[..i].iter().any(|k| k.kid == key.kid) {
                return Err(Error::KeySet(format!("key {} is listed twice", key.kid)));
            }
        }
        Ok(set)
    }

    /// The key with this PASERK id.
    pub fn get(&self, kid: &str) -> Option<&PublishedKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// Verifies a token against a key set at `now`, offline, and returns its license.
///
/// The footer's key id picks the key (active or retired); the signature is verified before
/// any claim is trusted; the license is valid from `max(nbf, iat)` included to `exp`
/// excluded. No leeway is given for clock skew: the issuer backdates `nbf` if it wants one.
pub fn verify(token: &str, keys: &KeySet, now: DateTime<Utc>) -> Result<License, VerifyError> {
    use VerifyError::Malformed;
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(Malformed(format!(
            "the token is longer than {} KiB",
            MAX_TOKEN_LEN / 1024
        )));
    }
    if !token.starts_with(HEADER) {
        return Err(Malformed(describe_wrong_header(token)));
    }
    let untrusted = UntrustedToken::<Public, V4>::try_from(token).map_err(|e| {
        Malformed(match e {
            pasetors::errors::Error::Base64 => "the token is not valid base64url".into(),
            _ => "the token is not a v4.public PASETO token (wrong number of parts, or too \
                  short to hold a signature)"
                .into(),
        })
    })?;
    // The footer is read before the signature is checked, only to pick the key: it is part
    // of the signed message, so a changed footer fails the signature.
    let kid = footer_key_id(untrusted.untrusted_footer())?;
    let entry = keys
        .get(&kid)
        .ok_or_else(|| VerifyError::UnknownKey { kid: kid.clone() })?;
    let invalid_key = |reason: String| VerifyError::InvalidKey {
        kid: kid.clone(),
        reason,
    };
    let key = parse_public(&entry.public_key).map_err(|e| invalid_key(e.to_string()))?;
    let actual = paserk(&Id::from(&key));
    if actual != kid {
        return Err(invalid_key(format!("its public key has the id {actual}")));
    }
    // The low-level verify: `pasetors::public::verify` would also check `exp` against the
    // system clock, and the clock here is `now`.
    let trusted = PublicToken::verify(&key, &untrusted, None, None).map_err(|e| match e {
        pasetors::errors::Error::TokenValidation => VerifyError::BadSignature { kid: kid.clone() },
        pasetors::errors::Error::PayloadInvalidUtf8 => Malformed("the claims are not UTF-8".into()),
        other => Malformed(format!("the token cannot be verified: {other:?}")),
    })?;
    let claims: TokenClaims = serde_json::from_str(trusted.payload())
        .map_err(|e| Malformed(format!("the claims are not a license: {e}")))?;
    let valid_from = claims.nbf.max(claims.iat);
    if now < valid_from {
        return Err(VerifyError::NotYetValid { valid_from });
    }
    if now >= claims.exp {
        return Err(VerifyError::Expired {
            expired_at: claims.exp,
        });
    }
    Ok(License {
        customer: claims.sub,
        plan: claims.plan,
        features: claims.features,
        seats: claims.seats,
        regions: claims.regions,
        issued_at: claims.iat,
        not_before: claims.nbf,
        expires_at: claims.exp,
        key_id: kid,
    })
}

/// The `kid` of a token's footer.
fn footer_key_id(footer: &[u8]) -> Result<String, VerifyError> {
    use VerifyError::Malformed;
    if footer.is_empty() {
        return Err(Malformed("the token has no footer, so no key id".into()));
    }
    let mut parsed = Footer::new();
    parsed
        .parse_bytes(footer)
        .map_err(|_| Malformed("the footer is not a JSON object".into()))?;
    match parsed.get_claim("kid") {
        Some(Value::String(kid)) => Ok(kid.clone()),
        Some(_) => Err(Malformed("the footer's kid is not a string".into())),
        None => Err(Malformed("the footer has no key id (kid)".into())),
    }
}

/// Says what a token that is not `v4.public` looks like, without echoing it.
fn describe_wrong_header(token: &str) -> String {
    if token.is_empty() {
        return "the token is empty".into();
    }
    let mut parts = token.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(version), Some(purpose), Some(_))
            if version.len() == 2
                && version.starts_with('v')
                && matches!(purpose, "local" | "public") =>
        {
            format!("expected a v4.public token, found a {version}.{purpose} token")
        }
        _ => "not a PASETO token (it does not start with v4.public.)".into(),
    }
}

fn parse_public(s: &str) -> Result<AsymmetricPublicKey<V4>> {
    AsymmetricPublicKey::<V4>::try_from(s.trim())
        .map_err(|_| Error::Key("expected a k4.public PASERK (an Ed25519 public key)".into()))
}

fn paserk(key: &dyn FormatAsPaserk) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail, nor can base64 of a key of fixed size.
    FormatAsPaserk::fmt(key, &mut out).expect("a key formats as PASERK");
    out
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests;
