//! Token verification: the JWTs app servers sign and phones present in their HELLO.
//!
//! Owns: the `[auth.jwt]` key configuration, the key material read from the files it names,
//! verifying a token (signature, algorithm, key id, time claims) and turning its claims into
//! [`Claims`], including the channel [`Pattern`]s a user may subscribe and publish to.
//! Must not touch: connections, the clock, the network, logging. The caller passes the time
//! in ([`Verifier::verify`] takes `now_unix_s`), so verification is deterministic and
//! testable; the only I/O is reading key files in [`Verifier::from_config`].
//!
//! # Tokens
//! A token is a JWS in compact form (`header.payload.signature`), as any ordinary JWT library
//! mints it, signed with one of:
//! - **HS256**, HMAC-SHA-256 with a secret shared with the app servers;
//! - **EdDSA** (Ed25519), so the relay holds only a public key and no secret.
//!
//! The algorithm is pinned per key: a key configured as HS256 verifies only tokens whose header
//! says `"alg": "HS256"`, an EdDSA key only `"EdDSA"`. Anything else, `none` included, is refused
//! with [`AuthError::WrongAlgorithm`] before any signature is computed, so the classic
//! confusion (an HS256 token "signed" with an EdDSA public key as the HMAC secret) cannot
//! work. HMAC tags are compared in constant time: `jsonwebtoken`'s `rust_crypto` backend checks
//! them with `hmac`'s `Mac::verify_slice`, which compares the whole tag with
//! `subtle::ConstantTimeEq`.
//!
//! Claims:
//! - `sub` (required): the user id, 1..=255 bytes of UTF-8;
//! - `exp` (required), `nbf` (optional): NumericDates checked against the time passed in,
//!   with `leeway` seconds of tolerance either way; `iat` (optional) must be a NumericDate;
//! - `chn` (optional): channel patterns the user may subscribe to; absent means none;
//! - `pub` (optional): channel patterns the user may publish to; absent means none;
//! - `svc` (optional, `true`): a service token, a trusted app server connection that may
//!   publish anywhere and is exempt from the per-connection publish rate limit.
//!
//! A pattern is an exact name (`"news"`) or a prefix ending in `*` (`"brand:*"`); `"*"` alone
//! matches every name. Other claims (`iss`, `aud`, `jti`, ...) are ignored.
//!
//! Bounds: a token longer than [`MAX_TOKEN_LEN`] bytes is refused before anything is parsed;
//! no input makes verification panic.
//!
//! # Keys and rotation
//! ```toml
//! [auth.jwt]
//! leeway = 30                      # seconds, default 30, at most 300
//!
//! [[auth.jwt.keys]]
//! kid = "2025-06"
//! algorithm = "EdDSA"              # or "HS256"
//! public_key_file = "/etc/pabal/jwt-2025-06.pub.pem"
//! default = true                   # used for tokens without a `kid`
//!
//! [[auth.jwt.keys]]
//! kid = "2025-01"
//! algorithm = "HS256"
//! secret_file = "/etc/pabal/jwt-2025-01.secret"
//! ```
//! A token whose header names a `kid` is checked against exactly that key (an unknown kid is
//! [`AuthError::UnknownKey`]); a token without one against the key marked `default`, or the
//! only key when there is just one.
//!
//! The relay rebuilds the [`Verifier`] from the configuration on SIGHUP and swaps it in
//! (a `Verifier` is immutable, so it is shared behind an `Arc`); if the rebuild fails, the old
//! one stays. Connections already open are unaffected: their claims were checked at HELLO and
//! each connection keeps the expiry it got then. To rotate: add the new key under a new kid
//! next to the old one and reload; switch the app servers to mint with the new kid; once the
//! longest-lived token signed with the old key has expired, remove it and reload again.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::{fmt, str};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::VerifyingKey;
use ed25519_dalek::pkcs8::DecodePublicKey;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;
use zeroize::Zeroizing;

/// Longest token accepted, bytes. Longer ones are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Longest user id (`sub`), bytes: the protocol's limit on names.
pub const MAX_USER_LEN: usize = 255;
/// Longest channel pattern, bytes, the `*` included.
pub const MAX_PATTERN_LEN: usize = 255;
/// Largest `leeway` the configuration accepts, seconds.
pub const MAX_LEEWAY_S: u64 = 300;
/// Shortest HS256 secret accepted, bytes (RFC 7518 §3.2: at least the hash's size).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest key file read, bytes; a larger file is a mistake (or `/dev/zero`).
const MAX_KEY_FILE_LEN: usize = 16 * 1024;
/// Longest `kid`, bytes.
const MAX_KID_LEN: usize = 255;
/// How much of a peer-supplied string (a kid, an alg) an error keeps.
const ECHO_LEN: usize = 64;
/// Where the configuration lives in the relay's file, for error messages.
const FIELD: &str = "auth.jwt";

fn default_leeway() -> u64 {
    30
}

/// `[auth.jwt]`: the keys tokens are signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Seconds of clock skew tolerated on `exp` and `nbf`. Default 30, at most 300.
    #[serde(default = "default_leeway")]
    pub leeway: u64,
    /// The keys, at least one. Several keys let a new one be rolled out beside the old.
    pub keys: Vec<KeyConfig>,
}

/// `[[auth.jwt.keys]]`: one verification key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key id tokens name in their header's `kid`. Unique among the keys. May be left out
    /// only for the default key, or when there is a single key. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// `"HS256"` or `"EdDSA"`: the only algorithm this key accepts.
    pub algorithm: KeyAlgorithm,
    /// Verify tokens that name no `kid` with this key. At most one key is the default; a single
    /// key is the default without saying so. Default false.
    #[serde(default)]
    pub default: bool,
    /// HS256 only: a file holding the raw secret bytes (one trailing newline is trimmed),
    /// at least 32 bytes, e.g. made with `openssl rand -base64 48 > FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// EdDSA only: a PEM `PUBLIC KEY` (SPKI) file holding an Ed25519 public key, as
    /// `openssl genpkey -algorithm ed25519 -out k.pem; openssl pkey -in k.pem -pubout` write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
}

/// The algorithms a key may be pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    #[serde(rename = "HS256")]
    Hs256,
    /// Ed25519 signatures; the relay holds the public key only.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl KeyAlgorithm {
    /// The name JWT headers use for it (`alg`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Hs256 => "HS256",
            KeyAlgorithm::EdDsa => "EdDSA",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            KeyAlgorithm::Hs256 => Algorithm::HS256,
            KeyAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl JwtConfig {
    /// Checks everything that does not need the key files: at least one key, unique kids, the
    /// file each algorithm needs, one default at most, every key reachable, the leeway.
    pub fn validate(&self) -> Result<(), AuthError> {
        let invalid = |field: String, why: &str| AuthError::Config {
            field,
            why: why.to_owned(),
        };
        if self.leeway > MAX_LEEWAY_S {
            return Err(invalid(
                format!("{FIELD}.leeway"),
                &format!("at most {MAX_LEEWAY_S} s"),
            ));
        }
        if self.keys.is_empty() {
            return Err(invalid(
                format!("{FIELD}.keys"),
                "at least one key is required",
            ));
        }
        let several = self.keys.len() > 1;
        for (i, key) in self.keys.iter().enumerate() {
            let at = |name: &str| format!("{FIELD}.keys[{i}].{name}");
            if let Some(kid) = &key.kid {
                if kid.is_empty() || kid.len() > MAX_KID_LEN {
                    return Err(invalid(at("kid"), "must be 1 ..= 255 bytes"));
                }
                if let Some(j) = self.keys[..i]
                    .iter()
                    .position(|k| k.kid.as_deref() == Some(kid.as_str()))
                {
                    return Err(invalid(
                        at("kid"),
                        &format!("duplicate: keys[{j}] has kid {kid:?} too"),
                    ));
                }
            }
            if key.default
                && let Some(j) = self.keys[..i].iter().position(|k| k.default)
            {
                return Err(invalid(
                    at("default"),
                    &format!("only one key may be the default; keys[{j}] is already"),
                ));
            }
            if key.kid.is_none() && several && !key.default {
                return Err(invalid(
                    at("kid"),
                    "required when several keys are configured, unless this key is the default",
                ));
            }
            match key.algorithm {
                KeyAlgorithm::Hs256 => {
                    if key.secret_file.is_none() {
                        return Err(invalid(at("secret_file"), "required for algorithm HS256"));
                    }
                    if key.public_key_file.is_some() {
                        return Err(invalid(
                            at("public_key_file"),
                            "not used by algorithm HS256 (use secret_file, or algorithm EdDSA)",
                        ));
                    }
                }
                KeyAlgorithm::EdDsa => {
                    if key.public_key_file.is_none() {
                        return Err(invalid(
                            at("public_key_file"),
                            "required for algorithm EdDSA",
                        ));
                    }
                    if key.secret_file.is_some() {
                        return Err(invalid(
                            at("secret_file"),
                            "not used by algorithm EdDSA (use public_key_file, or algorithm HS256)",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a token was refused, or why the key configuration could not be loaded.
///
/// Token errors never echo more than a few dozen characters of what the peer sent.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Not a JWS in compact form, or its header or claims are not the JSON expected.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The signature does not verify with the selected key.
    #[error("bad token signature")]
    BadSignature,
    /// The header's `kid` names no configured key (the kid, shortened).
    #[error("token names unknown key id {0:?}")]
    UnknownKey(String),
    /// The header names no `kid` and no key is the default.
    #[error("token names no key id (`kid`) and no default key is configured")]
    MissingKeyId,
    /// The header's `alg` is not the one algorithm the selected key is pinned to.
    #[error("token algorithm {found:?} refused: the key accepts only {expected}")]
    WrongAlgorithm {
        /// The key's algorithm.
        expected: &'static str,
        /// What the header said (shortened).
        found: String,
    },
    /// `exp` has passed, beyond the leeway.
    #[error("token expired at {expired_at} (now {now})")]
    Expired {
        /// The `exp` claim, Unix seconds.
        expired_at: u64,
        /// The time checked against, Unix seconds.
        now: u64,
    },
    /// `nbf` is still ahead, beyond the leeway.
    #[error("token not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The `nbf` claim, Unix seconds.
        not_before: u64,
        /// The time checked against, Unix seconds.
        now: u64,
    },
    /// A required claim is absent (or `null`).
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong type or an unacceptable value.
    #[error("invalid `{claim}` claim: {why}")]
    InvalidClaim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The key configuration is inconsistent.
    #[error("invalid config: `{field}`: {why}")]
    Config {
        /// The field, as written in the config file (`auth.jwt.keys[1].kid`).
        field: String,
        /// What is wrong.
        why: String,
    },
    /// A key file could not be read.
    #[error("invalid config: `{field}`: cannot read {}: {source}", path.display())]
    KeyFile {
        /// The field naming the file (`auth.jwt.keys[0].secret_file`).
        field: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A key file was read but does not hold a usable key.
    #[error("invalid config: `{field}`: {}: {why}", path.display())]
    KeyFormat {
        /// The field naming the file.
        field: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl AuthError {
    /// Whether the token failed only on time (`exp` passed or `nbf` ahead): the client should
    /// fetch a fresh token (wire code `TokenExpired`). Every other error is `AuthFailed`.
    pub fn is_expiry(&self) -> bool {
        matches!(
            self,
            AuthError::Expired { .. } | AuthError::NotYetValid { .. }
        )
    }
}

/// A channel name pattern from a token's `chn` or `pub` claim: an exact name, or a prefix
/// ending in `*` (`"brand:*"` matches `"brand:acme"` and `"brand:"`, not `"brandx"`; `"*"`
/// matches every name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Box<str>);

/// Why a string is not a [`Pattern`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The empty string.
    #[error("a channel pattern must not be empty")]
    Empty,
    /// Longer than [`MAX_PATTERN_LEN`].
    #[error("a channel pattern is at most 255 bytes")]
    TooLong,
    /// A `*` somewhere other than at the end.
    #[error("`*` may appear only once, at the end of a channel pattern")]
    MisplacedWildcard,
}

impl PatternError {
    fn as_str(self) -> &'static str {
        match self {
            PatternError::Empty => "a channel pattern must not be empty",
            PatternError::TooLong => "a channel pattern is at most 255 bytes",
            PatternError::MisplacedWildcard => {
                "`*` may appear only once, at the end of a channel pattern"
            }
        }
    }
}

impl Pattern {
    /// Parses `name` or `prefix*`.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong);
        }
        let body = s.strip_suffix('*').unwrap_or(s);
        if body.contains('*') {
            return Err(PatternError::MisplacedWildcard);
        }
        Ok(Pattern(s.into()))
    }

    /// Whether `name` is this exact name, or starts with this prefix.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => *self.0 == *name,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl str::FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::parse(s)
    }
}

/// What a verified token says about its holder.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The user id (`sub`), 1..=255 bytes.
    pub user: String,
    /// When the token expires (`exp`), Unix seconds. The connection keeps this expiry.
    pub expires_at: u64,
    /// Channels the user may subscribe to (`chn`); empty when the claim is absent.
    pub subscribe: Vec<Pattern>,
    /// Channels the user may publish to (`pub`); empty when the claim is absent.
    pub publish: Vec<Pattern>,
    /// A service token (`svc: true`): a trusted app server connection that may publish to any
    /// room or channel and is exempt from the per-connection publish rate limit.
    pub service: bool,
}

impl Claims {
    /// Whether the token lets its holder subscribe to `channel`. A service token has no
    /// subscribe rights beyond its `chn` claim.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(channel))
    }

    /// Whether the token lets its holder publish to `channel`: a service token may publish
    /// anywhere, others where a `pub` pattern matches.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.service || self.publish.iter().any(|p| p.matches(channel))
    }
}

/// One loaded key.
struct Key {
    kid: Option<String>,
    algorithm: KeyAlgorithm,
    decoding: DecodingKey,
    /// The library's checks, narrowed to the signature and this key's one algorithm: time and
    /// claims are checked here, against the time the caller passes in.
    validation: Validation,
}

/// Verifies tokens against the configured keys. Immutable once built; share it in an `Arc`
/// and replace it whole on reload.
pub struct Verifier {
    keys: Vec<Key>,
    /// The key for tokens without a `kid`.
    default: Option<usize>,
    leeway: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key ids and algorithms only: never key material.
        struct KeyInfo<'a>(&'a Key, bool);
        impl fmt::Debug for KeyInfo<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("Key")
                    .field("kid", &self.0.kid)
                    .field("algorithm", &self.0.algorithm)
                    .field("default", &self.1)
                    .finish()
            }
        }
        let keys: Vec<_> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| KeyInfo(k, self.default == Some(i)))
            .collect();
        f.debug_struct("Verifier")
            .field("keys", &keys)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// The header fields read before the signature is checked.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// RFC 7515 §4.1.11: extensions the recipient must understand. We understand none.
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

impl Verifier {
    /// Validates `cfg` and loads every key file it names.
    pub fn from_config(cfg: &JwtConfig) -> Result<Verifier, AuthError> {
        cfg.validate()?;
        let mut keys = Vec::with_capacity(cfg.keys.len());
        for (i, kc) in cfg.keys.iter().enumerate() {
            let decoding = match kc.algorithm {
                KeyAlgorithm::Hs256 => {
                    let field = format!("{FIELD}.keys[{i}].secret_file");
                    let path = kc.secret_file.as_deref().ok_or_else(|| AuthError::Config {
                        field: field.clone(),
                        why: "required for algorithm HS256".to_owned(),
                    })?;
                    load_secret(&field, path)?
                }
                KeyAlgorithm::EdDsa => {
                    let field = format!("{FIELD}.keys[{i}].public_key_file");
                    let path = kc
                        .public_key_file
                        .as_deref()
                        .ok_or_else(|| AuthError::Config {
                            field: field.clone(),
                            why: "required for algorithm EdDSA".to_owned(),
                        })?;
                    load_ed25519_public(&field, path)?
                }
            };
            let mut validation = Validation::new(kc.algorithm.jwt());
            validation.required_spec_claims.clear();
            validation.validate_exp = false;
            validation.validate_nbf = false;
            validation.validate_aud = false;
            validation.leeway = 0;
            keys.push(Key {
                kid: kc.kid.clone(),
                algorithm: kc.algorithm,
                decoding,
                validation,
            });
        }
        let default = match cfg.keys.iter().position(|k| k.default) {
            Some(i) => Some(i),
            None if cfg.keys.len() == 1 => Some(0),
            None => None,
        };
        Ok(Verifier {
            keys,
            default,
            leeway: cfg.leeway,
        })
    }

    /// Verifies `token` (the bytes of a compact JWS) at `now_unix_s` and returns its claims.
    pub fn verify(&self, token: &[u8], now_unix_s: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("longer than 8192 bytes"));
        }
        if token.is_empty() {
            return Err(AuthError::Malformed("empty"));
        }
        if !token
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(AuthError::Malformed(
                "holds a byte outside the base64url alphabet and '.'",
            ));
        }
        let mut parts = token.split(|&b| b == b'.');
        let (Some(header), Some(_payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("not three dot-separated parts"));
        };
        let header = parse_header(header)?;
        if header.crit.is_some() {
            return Err(AuthError::Malformed(
                "the header names critical extensions (`crit`)",
            ));
        }
        let key = match header.kid.as_deref() {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| AuthError::UnknownKey(echo(kid)))?,
            None => self
                .default
                .and_then(|i| self.keys.get(i))
                .ok_or(AuthError::MissingKeyId)?,
        };
        // Pinned: the header must name exactly this key's algorithm. `none`, other HMAC or
        // asymmetric algorithms and case variants all stop here, before any crypto.
        if header.alg != key.algorithm.as_str() {
            return Err(AuthError::WrongAlgorithm {
                expected: key.algorithm.as_str(),
                found: echo(&header.alg),
            });
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &key.validation)
                .map_err(|e| map_jwt_error(e.kind(), key.algorithm))?;
        self.claims(&data.claims, now_unix_s)
    }

    /// Checks the claims of a token whose signature has verified.
    fn claims(&self, c: &Map<String, Value>, now: u64) -> Result<Claims, AuthError> {
        let user = match c.get("sub") {
            None | Some(Value::Null) => return Err(AuthError::MissingClaim("sub")),
            Some(Value::String(s)) if s.is_empty() || s.len() > MAX_USER_LEN => {
                return Err(AuthError::InvalidClaim {
                    claim: "sub",
                    why: "must be 1 ..= 255 bytes",
                });
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(AuthError::InvalidClaim {
                    claim: "sub",
                    why: "must be a string",
                });
            }
        };
        let exp = numeric_date(c, "exp")?.ok_or(AuthError::MissingClaim("exp"))?;
        let nbf = numeric_date(c, "nbf")?;
        numeric_date(c, "iat")?;
        let subscribe = patterns(c, "chn")?;
        let publish = patterns(c, "pub")?;
        let service = match c.get("svc") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(AuthError::InvalidClaim {
                    claim: "svc",
                    why: "must be a boolean",
                });
            }
        };
        // RFC 7519 §4.1.4: not accepted on or after `exp`.
        if now >= exp.saturating_add(self.leeway) {
            return Err(AuthError::Expired {
                expired_at: exp,
                now,
            });
        }
        // §4.1.5: not accepted before `nbf`.
        if let Some(nbf) = nbf
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(AuthError::NotYetValid {
                not_before: nbf,
                now,
            });
        }
        Ok(Claims {
            user,
            expires_at: exp,
            subscribe,
            publish,
            service,
        })
    }
}

fn parse_header(b64: &[u8]) -> Result<RawHeader, AuthError> {
    let json = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| AuthError::Malformed("the header is not base64url"))?;
    // A JSON object, not an array that serde would read field by field.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(AuthError::Malformed("the header is not a JSON object"));
    }
    serde_json::from_slice(&json).map_err(|_| {
        AuthError::Malformed(
            "the header is not JSON with a string `alg` and an optional string `kid`",
        )
    })
}

fn map_jwt_error(kind: &ErrorKind, algorithm: KeyAlgorithm) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        // Checked before decoding; kept in case the library's view ever differs.
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm {
            expected: algorithm.as_str(),
            found: String::new(),
        },
        ErrorKind::InvalidToken => AuthError::Malformed("not three dot-separated parts"),
        ErrorKind::Base64(_) => AuthError::Malformed("a part is not base64url"),
        ErrorKind::Json(_) => {
            AuthError::Malformed("the header or claims are not the JSON expected")
        }
        ErrorKind::Utf8(_) => AuthError::Malformed("not UTF-8"),
        _ => AuthError::Malformed("refused by the JWT decoder"),
    }
}

/// A NumericDate claim (RFC 7519 §2): seconds since the epoch, integer or not.
fn numeric_date(c: &Map<String, Value>, claim: &'static str) -> Result<Option<u64>, AuthError> {
    let invalid = AuthError::InvalidClaim {
        claim,
        why: "must be a non-negative number of seconds since the Unix epoch",
    };
    match c.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    // `as` saturates: a date past u64::MAX seconds is u64::MAX.
                    Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
                    _ => Err(invalid),
                }
            }
        }
        Some(_) => Err(invalid),
    }
}

fn patterns(c: &Map<String, Value>, claim: &'static str) -> Result<Vec<Pattern>, AuthError> {
    match c.get(claim) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Pattern::parse(s).map_err(|e| AuthError::InvalidClaim {
                    claim,
                    why: e.as_str(),
                }),
                _ => Err(AuthError::InvalidClaim {
                    claim,
                    why: "must be an array of strings",
                }),
            })
            .collect(),
        Some(_) => Err(AuthError::InvalidClaim {
            claim,
            why: "must be an array of strings",
        }),
    }
}

/// At most [`ECHO_LEN`] characters of a peer-supplied string, for an error message.
fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_LEN) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// Reads a key file, at most [`MAX_KEY_FILE_LEN`] bytes, into memory wiped on drop.
fn read_key_file(field: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    let file_error = |source| AuthError::KeyFile {
        field: field.to_owned(),
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(file_error)?;
    // Room for one byte past the limit, so the buffer never reallocates (leaving a copy).
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_LEN + 1));
    file.take(MAX_KEY_FILE_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(file_error)?;
    if buf.len() > MAX_KEY_FILE_LEN {
        return Err(AuthError::KeyFormat {
            field: field.to_owned(),
            path: path.to_owned(),
            why: format!("larger than {MAX_KEY_FILE_LEN} bytes: not a key"),
        });
    }
    Ok(buf)
}

fn load_secret(field: &str, path: &Path) -> Result<DecodingKey, AuthError> {
    let buf = read_key_file(field, path)?;
    let secret = buf
        .strip_suffix(b"\r\n")
        .or_else(|| buf.strip_suffix(b"\n"))
        .unwrap_or(&buf);
    if secret.len() < MIN_SECRET_LEN {
        return Err(AuthError::KeyFormat {
            field: field.to_owned(),
            path: path.to_owned(),
            why: format!(
                "the secret is {} bytes; HS256 needs at least {MIN_SECRET_LEN} \
                 (e.g. `openssl rand -base64 48 > FILE`)",
                secret.len()
            ),
        });
    }
    // The library keeps its own copy and wipes it on drop.
    Ok(DecodingKey::from_secret(secret))
}

fn load_ed25519_public(field: &str, path: &Path) -> Result<DecodingKey, AuthError> {
    let format_error = |why: String| AuthError::KeyFormat {
        field: field.to_owned(),
        path: path.to_owned(),
        why,
    };
    let buf = read_key_file(field, path)?;
    let text = str::from_utf8(&buf).map_err(|_| format_error("not a PEM text file".to_owned()))?;
    if text.contains("PRIVATE KEY-----") {
        return Err(format_error(
            "holds a private key; the relay needs only the public key \
             (`openssl pkey -in KEY.pem -pubout -out KEY.pub.pem`)"
                .to_owned(),
        ));
    }
    if !text.contains("-----BEGIN PUBLIC KEY-----") {
        return Err(format_error(
            "no PEM `PUBLIC KEY` block; expected an Ed25519 public key as \
             `openssl pkey -in KEY.pem -pubout` writes it"
                .to_owned(),
        ));
    }
    let key = VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| {
        format_error(format!(
            "not an Ed25519 public key in PEM `PUBLIC KEY` (SPKI) form, as \
             `openssl pkey -pubout` writes: {e}"
        ))
    })?;
    if key.is_weak() {
        return Err(format_error(
            "a weak (small-order) Ed25519 public key".to_owned(),
        ));
    }
    // `from_ed_der` takes the raw 32-byte public key, as `from_ed_pem` would extract it.
    Ok(DecodingKey::from_ed_der(key.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests;
