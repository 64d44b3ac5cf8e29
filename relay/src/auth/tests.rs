//! Tests of token verification (`super`): keys and their rotation, claims, algorithms, forged
//! and malformed tokens.

use super::*;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

const NOW: u64 = 1_750_000_000;
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-old";
const SECRET_NEW: &[u8] = b"fedcba9876543210fedcba9876543210-new";

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("pabal-auth-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn hs_key(kid: Option<&str>, path: PathBuf) -> KeyConfig {
    KeyConfig {
        kid: kid.map(Into::into),
        algorithm: KeyAlgorithm::Hs256,
        default: false,
        secret_file: Some(path),
        public_key_file: None,
    }
}

fn ed_key(kid: Option<&str>, path: PathBuf) -> KeyConfig {
    KeyConfig {
        kid: kid.map(Into::into),
        algorithm: KeyAlgorithm::EdDsa,
        default: false,
        secret_file: None,
        public_key_file: Some(path),
    }
}

fn verifier(keys: Vec<KeyConfig>) -> Verifier {
    Verifier::from_config(&JwtConfig { leeway: 30, keys }).unwrap()
}

/// A verifier with the single HS256 key `SECRET`.
fn hs_verifier(dir: &TempDir) -> Verifier {
    verifier(vec![hs_key(None, dir.file("secret", SECRET))])
}

/// A verifier with the single EdDSA key "a".
fn ed_verifier() -> Verifier {
    verifier(vec![ed_key(None, data("jwt-test-ed25519-a.pub.pem"))])
}

fn claims() -> Value {
    json!({ "sub": "alice", "exp": NOW + 600, "iat": NOW })
}

fn header(alg: Algorithm, kid: Option<&str>) -> Header {
    let mut h = Header::new(alg);
    h.kid = kid.map(Into::into);
    h
}

fn hs_token(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret);
    jsonwebtoken::encode(&header(Algorithm::HS256, kid), claims, &key).unwrap()
}

fn ed_encoding_key(name: &str) -> EncodingKey {
    let pem = std::fs::read_to_string(data(name)).unwrap();
    let der = SigningKey::from_pkcs8_pem(&pem)
        .unwrap()
        .to_pkcs8_der()
        .unwrap();
    EncodingKey::from_ed_der(der.as_bytes())
}

fn ed_token(private_pem: &str, kid: Option<&str>, claims: &Value) -> String {
    let key = ed_encoding_key(private_pem);
    jsonwebtoken::encode(&header(Algorithm::EdDSA, kid), claims, &key).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token from a raw header and payload, HMAC-signed with `secret`.
fn hand_hs(header: &str, payload: &str, secret: &[u8]) -> String {
    let msg = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(
        msg.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{msg}.{sig}")
}

#[test]
fn valid_hs256() {
    let dir = TempDir::new("valid_hs256");
    let v = hs_verifier(&dir);
    let t = hs_token(
        SECRET,
        None,
        &json!({"sub": "alice", "exp": NOW + 600, "chn": ["brand:*", "news"],
                    "pub": ["room:42"]}),
    );
    let c = v.verify(t.as_bytes(), NOW).unwrap();
    assert_eq!(c.user, "alice");
    assert_eq!(c.expires_at, NOW + 600);
    assert_eq!(
        c.subscribe,
        vec![
            Pattern::parse("brand:*").unwrap(),
            Pattern::parse("news").unwrap()
        ]
    );
    assert_eq!(c.publish, vec![Pattern::parse("room:42").unwrap()]);
    assert!(!c.service);
}

#[test]
fn valid_eddsa() {
    let v = ed_verifier();
    let t = ed_token("jwt-test-ed25519-a.key.pem", None, &claims());
    let c = v.verify(t.as_bytes(), NOW).unwrap();
    assert_eq!(c.user, "alice");
    assert_eq!(c.expires_at, NOW + 600);
    assert!(c.subscribe.is_empty() && c.publish.is_empty());
}

#[test]
fn expiry_honours_the_leeway() {
    let dir = TempDir::new("expiry");
    let v = hs_verifier(&dir);
    let t = hs_token(SECRET, None, &json!({"sub": "a", "exp": NOW}));
    // Within the 30 s leeway.
    assert!(v.verify(t.as_bytes(), NOW).is_ok());
    assert!(v.verify(t.as_bytes(), NOW + 29).is_ok());
    // Beyond it.
    let e = v.verify(t.as_bytes(), NOW + 30).unwrap_err();
    assert!(
        matches!(e, AuthError::Expired { expired_at: NOW, now } if now == NOW + 30),
        "{e:?}"
    );
    assert!(e.is_expiry());
    let e = v.verify(t.as_bytes(), NOW + 86_400).unwrap_err();
    assert!(matches!(e, AuthError::Expired { .. }), "{e:?}");
    // A fractional NumericDate is accepted.
    let t = hs_token(
        SECRET,
        None,
        &json!({"sub": "a", "exp": NOW as f64 + 100.5}),
    );
    assert_eq!(v.verify(t.as_bytes(), NOW).unwrap().expires_at, NOW + 100);
}

#[test]
fn not_before_honours_the_leeway() {
    let dir = TempDir::new("nbf");
    let v = hs_verifier(&dir);
    let t = hs_token(
        SECRET,
        None,
        &json!({"sub": "a", "exp": NOW + 600, "nbf": NOW + 100}),
    );
    let e = v.verify(t.as_bytes(), NOW).unwrap_err();
    assert!(
        matches!(e, AuthError::NotYetValid { not_before, now: NOW } if not_before == NOW + 100),
        "{e:?}"
    );
    assert!(e.is_expiry());
    assert!(v.verify(t.as_bytes(), NOW + 69).is_err());
    assert!(
        v.verify(t.as_bytes(), NOW + 70).is_ok(),
        "within the leeway"
    );
    assert!(v.verify(t.as_bytes(), NOW + 100).is_ok());
}

#[test]
fn wrong_key_is_a_bad_signature() {
    let dir = TempDir::new("badsig");
    let v = hs_verifier(&dir);
    let t = hs_token(SECRET_NEW, None, &claims());
    let e = v.verify(t.as_bytes(), NOW).unwrap_err();
    assert!(matches!(e, AuthError::BadSignature), "{e:?}");
    assert!(!e.is_expiry());

    let t = ed_token("jwt-test-ed25519-b.key.pem", None, &claims());
    let e = ed_verifier().verify(t.as_bytes(), NOW).unwrap_err();
    assert!(matches!(e, AuthError::BadSignature), "{e:?}");

    // A tampered payload with the original signature.
    let t = hs_token(SECRET, None, &claims());
    let parts: Vec<&str> = t.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(br#"{"sub":"mallory","exp":9999999999}"#),
        parts[2]
    );
    let e = v.verify(forged.as_bytes(), NOW).unwrap_err();
    assert!(matches!(e, AuthError::BadSignature), "{e:?}");
    // An empty signature.
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    let e = v.verify(stripped.as_bytes(), NOW).unwrap_err();
    assert!(matches!(e, AuthError::BadSignature), "{e:?}");
}

#[test]
fn algorithms_are_pinned_per_key() {
    let dir = TempDir::new("alg");
    let hs = hs_verifier(&dir);
    let ed = ed_verifier();

    // HS256 token against an EdDSA key.
    let t = hs_token(SECRET, None, &claims());
    let e = ed.verify(t.as_bytes(), NOW).unwrap_err();
    assert!(
        matches!(&e, AuthError::WrongAlgorithm { expected: "EdDSA", found } if found == "HS256"),
        "{e:?}"
    );
    assert!(!e.is_expiry());
    // EdDSA token against an HS256 key.
    let t = ed_token("jwt-test-ed25519-a.key.pem", None, &claims());
    let e = hs.verify(t.as_bytes(), NOW).unwrap_err();
    assert!(
        matches!(&e, AuthError::WrongAlgorithm { expected: "HS256", found } if found == "EdDSA"),
        "{e:?}"
    );
    // The classic confusion: HMAC keyed with the EdDSA public key file's bytes.
    let public_pem = std::fs::read(data("jwt-test-ed25519-a.pub.pem")).unwrap();
    let t = hs_token(&public_pem, None, &claims());
    let e = ed.verify(t.as_bytes(), NOW).unwrap_err();
    assert!(matches!(e, AuthError::WrongAlgorithm { .. }), "{e:?}");
    // `alg: none`, with and without a signature part.
    let payload = b64(claims().to_string().as_bytes());
    for alg in ["none", "None", "NONE"] {
        let h = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        for t in [format!("{h}.{payload}."), format!("{h}.{payload}.AAAA")] {
            for v in [&hs, &ed] {
                let e = v.verify(t.as_bytes(), NOW).unwrap_err();
                assert!(
                    matches!(e, AuthError::WrongAlgorithm { .. }),
                    "{alg}: {e:?}"
                );
            }
        }
    }
    // Another HMAC, a case variant, a missing alg.
    for h in [
        r#"{"alg":"HS512"}"#,
        r#"{"alg":"hs256"}"#,
        r#"{"alg":"RS256"}"#,
    ] {
        let t = hand_hs(h, &claims().to_string(), SECRET);
        let e = hs.verify(t.as_bytes(), NOW).unwrap_err();
        assert!(matches!(e, AuthError::WrongAlgorithm { .. }), "{h}: {e:?}");
    }
    let t = hand_hs(r#"{"typ":"JWT"}"#, &claims().to_string(), SECRET);
    assert!(matches!(
        hs.verify(t.as_bytes(), NOW),
        Err(AuthError::Malformed(_))
    ));
    // A hand-built header the library itself would accept does verify.
    let t = hand_hs(r#"{"alg":"HS256"}"#, &claims().to_string(), SECRET);
    assert!(hs.verify(t.as_bytes(), NOW).is_ok());
}

#[test]
fn malformed_tokens() {
    let dir = TempDir::new("malformed");
    let v = hs_verifier(&dir);
    let good = hs_token(SECRET, None, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("garbage", b"not a token at all".to_vec()),
        ("garbage b64", b"qwertyuiop".to_vec()),
        (
            "two parts",
            format!("{}.{}", parts[0], parts[1]).into_bytes(),
        ),
        ("four parts", format!("{good}.{}", parts[2]).into_bytes()),
        ("dots only", b"..".to_vec()),
        ("non-ascii", format!("{good}\u{e9}").into_bytes()),
        ("invalid utf-8", [good.as_bytes(), &[0xff]].concat()),
        (
            "padding",
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]).into_bytes(),
        ),
        ("std base64", b"ab+/.cd.ef".to_vec()),
        (
            "bad b64 length",
            format!("A.{}.{}", parts[1], parts[2]).into_bytes(),
        ),
        (
            "bad header json",
            hand_hs("{\"alg\":", "{}", SECRET).into_bytes(),
        ),
        (
            "header array",
            hand_hs(r#"["HS256"]"#, "{}", SECRET).into_bytes(),
        ),
        (
            "header string",
            hand_hs(r#""HS256""#, "{}", SECRET).into_bytes(),
        ),
        (
            "alg not string",
            hand_hs(r#"{"alg":1}"#, "{}", SECRET).into_bytes(),
        ),
        ("duplicate alg", {
            hand_hs(r#"{"alg":"HS256","alg":"none"}"#, "{}", SECRET).into_bytes()
        }),
        ("crit", {
            hand_hs(r#"{"alg":"HS256","crit":["exp"]}"#, "{}", SECRET).into_bytes()
        }),
        (
            "kid not string",
            hand_hs(r#"{"alg":"HS256","kid":7}"#, "{}", SECRET).into_bytes(),
        ),
        // Signed correctly, but the claims are not a JSON object.
        (
            "bad claims json",
            hand_hs(r#"{"alg":"HS256"}"#, "{\"sub\":", SECRET).into_bytes(),
        ),
        (
            "claims array",
            hand_hs(r#"{"alg":"HS256"}"#, r#"["a",1]"#, SECRET).into_bytes(),
        ),
        ("claims not utf-8", {
            let msg = format!("{}.{}", b64(br#"{"alg":"HS256"}"#), b64(b"\xff\xfe"));
            let sig = jsonwebtoken::crypto::sign(
                msg.as_bytes(),
                &EncodingKey::from_secret(SECRET),
                Algorithm::HS256,
            )
            .unwrap();
            format!("{msg}.{sig}").into_bytes()
        }),
        ("duplicate exp", {
            hand_hs(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"sub":"a","exp":{},"exp":{}}}"#, NOW - 1000, NOW + 600),
                SECRET,
            )
            .into_bytes()
        }),
    ];
    for (what, token) in cases {
        let e = v.verify(&token, NOW).unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{what}: {e:?}");
        assert!(!e.is_expiry());
    }
}

#[test]
fn oversized_tokens_are_refused_before_parsing() {
    let dir = TempDir::new("oversized");
    let v = hs_verifier(&dir);
    let big = json!({"sub": "a", "exp": NOW + 600, "pad": "x".repeat(MAX_TOKEN_LEN)});
    let t = hs_token(SECRET, None, &big);
    let e = v.verify(t.as_bytes(), NOW).unwrap_err();
    assert!(
        matches!(e, AuthError::Malformed("longer than 8192 bytes")),
        "{e:?}"
    );
    let e = v.verify(&vec![b'.'; 1 << 20], NOW).unwrap_err();
    assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
    // A token just within the limit is fine.
    let mut pad = MAX_TOKEN_LEN / 2;
    loop {
        let c = json!({"sub": "a", "exp": NOW + 600, "pad": "x".repeat(pad)});
        let t = hs_token(SECRET, None, &c);
        if t.len() > MAX_TOKEN_LEN {
            let c = json!({"sub": "a", "exp": NOW + 600, "pad": "x".repeat(pad - 3)});
            let t = hs_token(SECRET, None, &c);
            assert!(t.len() <= MAX_TOKEN_LEN && t.len() > MAX_TOKEN_LEN - 8);
            assert!(v.verify(t.as_bytes(), NOW).is_ok());
            break;
        }
        pad += 1;
    }
}

#[test]
fn required_claims() {
    let dir = TempDir::new("required");
    let v = hs_verifier(&dir);
    let cases = [
        (json!({"exp": NOW + 600}), "sub"),
        (json!({"sub": null, "exp": NOW + 600}), "sub"),
        (json!({"sub": "a"}), "exp"),
        (json!({"sub": "a", "exp": null}), "exp"),
    ];
    for (c, missing) in cases {
        let e = v
            .verify(hs_token(SECRET, None, &c).as_bytes(), NOW)
            .unwrap_err();
        assert!(
            matches!(e, AuthError::MissingClaim(m) if m == missing),
            "{c}: {e:?}"
        );
    }
}

#[test]
fn invalid_claims() {
    let dir = TempDir::new("invalid");
    let v = hs_verifier(&dir);
    let exp = NOW + 600;
    let cases = [
        (json!({"sub": "", "exp": exp}), "sub"),
        (json!({"sub": "x".repeat(256), "exp": exp}), "sub"),
        (json!({"sub": 42, "exp": exp}), "sub"),
        (json!({"sub": "a", "exp": "tomorrow"}), "exp"),
        (json!({"sub": "a", "exp": -1}), "exp"),
        (json!({"sub": "a", "exp": exp, "nbf": "now"}), "nbf"),
        (json!({"sub": "a", "exp": exp, "iat": true}), "iat"),
        (json!({"sub": "a", "exp": exp, "chn": "news"}), "chn"),
        (json!({"sub": "a", "exp": exp, "chn": [1]}), "chn"),
        (json!({"sub": "a", "exp": exp, "chn": [""]}), "chn"),
        (json!({"sub": "a", "exp": exp, "pub": ["a*b"]}), "pub"),
        (json!({"sub": "a", "exp": exp, "pub": ["**"]}), "pub"),
        (json!({"sub": "a", "exp": exp, "svc": "yes"}), "svc"),
    ];
    for (c, claim) in cases {
        let e = v
            .verify(hs_token(SECRET, None, &c).as_bytes(), NOW)
            .unwrap_err();
        assert!(
            matches!(e, AuthError::InvalidClaim { claim: got, .. } if got == claim),
            "{c}: {e:?}"
        );
    }
    // 255 bytes of UTF-8 is the longest user id.
    let long = "\u{e9}".repeat(127) + "x";
    assert_eq!(long.len(), 255);
    let c = v
        .verify(
            hs_token(SECRET, None, &json!({"sub": long, "exp": exp})).as_bytes(),
            NOW,
        )
        .unwrap();
    assert_eq!(c.user, long);
    // Unknown claims are ignored.
    let c = json!({"sub": "a", "exp": exp, "iss": "app", "aud": ["x"], "jti": "1"});
    assert!(v.verify(hs_token(SECRET, None, &c).as_bytes(), NOW).is_ok());
}

#[test]
fn kid_selects_the_key_during_rotation() {
    let dir = TempDir::new("rotation");
    let mut old = hs_key(Some("old"), dir.file("old", SECRET));
    old.default = true;
    let v = verifier(vec![
        old,
        hs_key(Some("new"), dir.file("new", SECRET_NEW)),
        ed_key(Some("ed"), data("jwt-test-ed25519-a.pub.pem")),
    ]);
    let c = claims();
    assert!(
        v.verify(hs_token(SECRET, Some("old"), &c).as_bytes(), NOW)
            .is_ok()
    );
    assert!(
        v.verify(hs_token(SECRET_NEW, Some("new"), &c).as_bytes(), NOW)
            .is_ok()
    );
    let t = ed_token("jwt-test-ed25519-a.key.pem", Some("ed"), &c);
    assert!(v.verify(t.as_bytes(), NOW).is_ok());
    // Exactly the named key: the new secret under the old kid fails.
    let e = v
        .verify(hs_token(SECRET_NEW, Some("old"), &c).as_bytes(), NOW)
        .unwrap_err();
    assert!(matches!(e, AuthError::BadSignature), "{e:?}");
    // No kid: the default key.
    assert!(v.verify(hs_token(SECRET, None, &c).as_bytes(), NOW).is_ok());
    let e = v
        .verify(hs_token(SECRET_NEW, None, &c).as_bytes(), NOW)
        .unwrap_err();
    assert!(matches!(e, AuthError::BadSignature), "{e:?}");
    // Unknown kid.
    let e = v
        .verify(hs_token(SECRET, Some("older"), &c).as_bytes(), NOW)
        .unwrap_err();
    assert!(
        matches!(&e, AuthError::UnknownKey(k) if k == "older"),
        "{e:?}"
    );
    assert!(!e.is_expiry());
    // A long kid is shortened in the error.
    let kid = "k".repeat(4000);
    let e = v
        .verify(hs_token(SECRET, Some(&kid), &c).as_bytes(), NOW)
        .unwrap_err();
    assert!(
        matches!(&e, AuthError::UnknownKey(k) if k.len() < 100),
        "{e}"
    );

    // Without a default, a token must name its key.
    let v = verifier(vec![
        hs_key(Some("old"), dir.file("old", SECRET)),
        hs_key(Some("new"), dir.file("new", SECRET_NEW)),
    ]);
    let e = v
        .verify(hs_token(SECRET, None, &c).as_bytes(), NOW)
        .unwrap_err();
    assert!(matches!(e, AuthError::MissingKeyId), "{e:?}");
    // A single key is the default, whatever its kid.
    let v = verifier(vec![hs_key(Some("only"), dir.file("only", SECRET))]);
    assert!(v.verify(hs_token(SECRET, None, &c).as_bytes(), NOW).is_ok());
    assert!(
        v.verify(hs_token(SECRET, Some("only"), &c).as_bytes(), NOW)
            .is_ok()
    );
}

#[test]
fn patterns() {
    let p = Pattern::parse("brand:*").unwrap();
    assert!(p.matches("brand:acme"));
    assert!(p.matches("brand:"));
    assert!(!p.matches("brandx"));
    assert!(!p.matches("brand"));
    assert!(!p.matches("xbrand:acme"));
    let exact = Pattern::parse("news").unwrap();
    assert!(exact.matches("news"));
    assert!(!exact.matches("news2"));
    assert!(!exact.matches("new"));
    let all = Pattern::parse("*").unwrap();
    assert!(all.matches("anything") && all.matches(""));
    assert_eq!(all.as_str(), "*");
    assert_eq!(p.to_string(), "brand:*");
    assert_eq!("news".parse::<Pattern>().unwrap(), exact);

    assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
    assert_eq!(Pattern::parse("a*b"), Err(PatternError::MisplacedWildcard));
    assert_eq!(Pattern::parse("*a"), Err(PatternError::MisplacedWildcard));
    assert_eq!(Pattern::parse("a**"), Err(PatternError::MisplacedWildcard));
    assert_eq!(Pattern::parse(&"x".repeat(256)), Err(PatternError::TooLong));
    assert!(Pattern::parse(&"x".repeat(255)).is_ok());
    for e in [
        PatternError::Empty,
        PatternError::TooLong,
        PatternError::MisplacedWildcard,
    ] {
        assert_eq!(e.as_str(), e.to_string());
    }
}

#[test]
fn subscribe_and_publish_rights() {
    let dir = TempDir::new("rights");
    let v = hs_verifier(&dir);
    let t = hs_token(
        SECRET,
        None,
        &json!({"sub": "a", "exp": NOW + 600, "chn": ["brand:*", "news"], "pub": ["chat:7"]}),
    );
    let c = v.verify(t.as_bytes(), NOW).unwrap();
    assert!(c.may_subscribe("brand:acme"));
    assert!(c.may_subscribe("news"));
    assert!(!c.may_subscribe("brandx"));
    assert!(!c.may_subscribe("chat:7"));
    assert!(c.may_publish("chat:7"));
    assert!(!c.may_publish("news"));
    assert!(!c.service);

    // No claims: no rights.
    let c = v
        .verify(hs_token(SECRET, None, &claims()).as_bytes(), NOW)
        .unwrap();
    assert!(!c.may_subscribe("news") && !c.may_publish("news"));

    // A service token publishes anywhere; subscribing still follows `chn`.
    let t = hs_token(
        SECRET,
        None,
        &json!({"sub": "app", "exp": NOW + 600, "svc": true, "chn": ["ops"]}),
    );
    let c = v.verify(t.as_bytes(), NOW).unwrap();
    assert!(c.service);
    assert!(c.may_publish("brand:acme") && c.may_publish("room:1"));
    assert!(c.may_subscribe("ops") && !c.may_subscribe("news"));
    let t = hs_token(
        SECRET,
        None,
        &json!({"sub": "a", "exp": NOW + 600, "svc": false}),
    );
    assert!(!v.verify(t.as_bytes(), NOW).unwrap().service);
}

#[test]
fn secret_file_trailing_newline_is_trimmed() {
    let dir = TempDir::new("newline");
    for contents in [
        [SECRET, b"\n"].concat(),
        [SECRET, b"\r\n"].concat(),
        SECRET.to_vec(),
    ] {
        let v = verifier(vec![hs_key(None, dir.file("s", &contents))]);
        let t = hs_token(SECRET, None, &claims());
        assert!(v.verify(t.as_bytes(), NOW).is_ok());
    }
    // Only one newline: the rest is part of the secret.
    let v = verifier(vec![hs_key(
        None,
        dir.file("s", &[SECRET, b"\n\n"].concat()),
    )]);
    let t = hs_token(SECRET, None, &claims());
    assert!(matches!(
        v.verify(t.as_bytes(), NOW),
        Err(AuthError::BadSignature)
    ));
}

#[test]
fn key_file_errors_name_the_field_and_path() {
    let dir = TempDir::new("keyfiles");
    let cfg = |keys| JwtConfig { leeway: 30, keys };

    let missing = dir.0.join("no-such-secret");
    let e = Verifier::from_config(&cfg(vec![hs_key(None, missing.clone())])).unwrap_err();
    assert!(
        matches!(&e, AuthError::KeyFile { path, .. } if *path == missing),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("auth.jwt.keys[0].secret_file"), "{msg}");
    assert!(msg.contains(&missing.display().to_string()), "{msg}");

    let short = dir.file("short", b"too short\n");
    let e = Verifier::from_config(&cfg(vec![hs_key(None, short.clone())])).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, AuthError::KeyFormat { .. }), "{msg}");
    assert!(
        msg.contains("at least 32") && msg.contains("9 bytes"),
        "{msg}"
    );
    assert!(msg.contains(&short.display().to_string()), "{msg}");

    let huge = dir.file("huge", &vec![b'x'; MAX_KEY_FILE_LEN + 1]);
    let e = Verifier::from_config(&cfg(vec![hs_key(None, huge)])).unwrap_err();
    assert!(matches!(e, AuthError::KeyFormat { .. }), "{e:?}");

    let private = data("jwt-test-ed25519-a.key.pem");
    let e = Verifier::from_config(&cfg(vec![
        hs_key(Some("h"), dir.file("s", SECRET)),
        ed_key(Some("e"), private.clone()),
    ]))
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("auth.jwt.keys[1].public_key_file"), "{msg}");
    assert!(msg.contains("private key"), "{msg}");
    assert!(msg.contains(&private.display().to_string()), "{msg}");

    for (name, contents) in [
            ("garbage.pem", &b"hello"[..]),
            ("binary.pem", &b"\xff\xfe"[..]),
            (
                "truncated.pem",
                &b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"[..],
            ),
            // An X25519 key: SPKI, but not Ed25519.
            (
                "x25519.pem",
                &b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VuAyEA/l6rpE+kxJbKCMVm4dkWblMiYGb7l7wI0t0Z8H0jLuU=\n-----END PUBLIC KEY-----\n"[..],
            ),
            // A small-order point.
            ("weak.pem", &b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n-----END PUBLIC KEY-----\n"[..]),
        ] {
            let path = dir.file(name, contents);
            let e = Verifier::from_config(&cfg(vec![ed_key(None, path.clone())])).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, AuthError::KeyFormat { .. }), "{name}: {msg}");
            assert!(msg.contains("auth.jwt.keys[0].public_key_file"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }

    // The fixture public key, with CRLF line ends, loads.
    let pem = std::fs::read_to_string(data("jwt-test-ed25519-a.pub.pem")).unwrap();
    let crlf = dir.file("crlf.pem", pem.replace('\n', "\r\n").as_bytes());
    let v = verifier(vec![ed_key(None, crlf)]);
    let t = ed_token("jwt-test-ed25519-a.key.pem", None, &claims());
    assert!(v.verify(t.as_bytes(), NOW).is_ok());
}

#[test]
fn config_validation_names_the_field() {
    let s = PathBuf::from("/nonexistent/secret");
    let p = PathBuf::from("/nonexistent/key.pub.pem");
    let check = |cfg: JwtConfig, field: &str| {
        let e = cfg.validate().unwrap_err();
        assert!(
            matches!(&e, AuthError::Config { field: f, .. } if f == field),
            "want {field}: {e}"
        );
        // from_config validates before it reads any file.
        let e = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(e, AuthError::Config { .. }), "{e}");
    };
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![],
        },
        "auth.jwt.keys",
    );
    check(
        JwtConfig {
            leeway: 301,
            keys: vec![hs_key(None, s.clone())],
        },
        "auth.jwt.leeway",
    );
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![hs_key(Some("a"), s.clone()), ed_key(Some("a"), p.clone())],
        },
        "auth.jwt.keys[1].kid",
    );
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![hs_key(Some(""), s.clone())],
        },
        "auth.jwt.keys[0].kid",
    );
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![hs_key(Some("a"), s.clone()), ed_key(None, p.clone())],
        },
        "auth.jwt.keys[1].kid",
    );
    let mut a = hs_key(Some("a"), s.clone());
    a.default = true;
    let mut b = ed_key(Some("b"), p.clone());
    b.default = true;
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![a, b],
        },
        "auth.jwt.keys[1].default",
    );
    let mut no_secret = hs_key(Some("a"), s.clone());
    no_secret.secret_file = None;
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![ed_key(Some("e"), p.clone()), no_secret],
        },
        "auth.jwt.keys[1].secret_file",
    );
    let mut both = hs_key(None, s.clone());
    both.public_key_file = Some(p.clone());
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![both],
        },
        "auth.jwt.keys[0].public_key_file",
    );
    let mut no_public = ed_key(None, p.clone());
    no_public.public_key_file = None;
    check(
        JwtConfig {
            leeway: 30,
            keys: vec![no_public],
        },
        "auth.jwt.keys[0].public_key_file",
    );
    let e = JwtConfig {
        leeway: 30,
        keys: vec![],
    }
    .validate()
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid config: `auth.jwt.keys`: at least one key is required"
    );
    // A key without a kid is fine when it is the default of several.
    let mut d = hs_key(None, s.clone());
    d.default = true;
    JwtConfig {
        leeway: 30,
        keys: vec![d, ed_key(Some("e"), p)],
    }
    .validate()
    .unwrap();
}

#[test]
fn config_from_toml() {
    let cfg: JwtConfig = toml::from_str(
        r#"
            [[keys]]
            kid = "k1"
            algorithm = "EdDSA"
            public_key_file = "/etc/pabal/k1.pub.pem"
            default = true

            [[keys]]
            algorithm = "HS256"
            kid = "k0"
            secret_file = "/etc/pabal/k0.secret"
            "#,
    )
    .unwrap();
    assert_eq!(cfg.leeway, 30, "the default");
    assert_eq!(cfg.keys.len(), 2);
    assert_eq!(cfg.keys[0].algorithm, KeyAlgorithm::EdDsa);
    assert!(cfg.keys[0].default && !cfg.keys[1].default);
    cfg.validate().unwrap();
    let again: JwtConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(again, cfg);

    for bad in [
        "leeway = 5\nsecret = \"x\"\nkeys = []",
        "[[keys]]\nalgorithm = \"HS256\"\nsecret_file = \"s\"\nsecret = \"inline\"",
        "[[keys]]\nalgorithm = \"RS256\"\npublic_key_file = \"k\"",
        "[[keys]]\nalgorithm = \"none\"",
        "[[keys]]\nalgorithm = \"hs256\"\nsecret_file = \"s\"",
        "leeway = 5",
    ] {
        assert!(toml::from_str::<JwtConfig>(bad).is_err(), "{bad}");
    }
}

#[test]
fn verifier_is_shareable_and_its_debug_hides_keys() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Verifier>();
    assert_send_sync::<std::sync::Arc<Verifier>>();
    let dir = TempDir::new("debug");
    let v = hs_verifier(&dir);
    let dbg = format!("{v:?}");
    assert!(dbg.contains("HS256") || dbg.contains("Hs256"), "{dbg}");
    assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
    let secret_bytes = format!("{:?}", SECRET.to_vec());
    assert!(!dbg.contains(&secret_bytes[1..20]), "{dbg}");
}

#[test]
fn errors_display_sensibly() {
    let e = AuthError::WrongAlgorithm {
        expected: "HS256",
        found: "none".into(),
    };
    assert_eq!(
        e.to_string(),
        "token algorithm \"none\" refused: the key accepts only HS256"
    );
    let e = AuthError::Expired {
        expired_at: 5,
        now: 40,
    };
    assert_eq!(e.to_string(), "token expired at 5 (now 40)");
    assert!(e.is_expiry());
    assert!(!AuthError::MissingClaim("sub").is_expiry());
    assert_eq!(echo(&"\u{e9}".repeat(100)).chars().count(), ECHO_LEN + 3);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn shared() -> &'static (Verifier, String) {
        static V: std::sync::OnceLock<(Verifier, String)> = std::sync::OnceLock::new();
        V.get_or_init(|| {
            let dir = TempDir::new("prop");
            let mut old = hs_key(Some("old"), dir.file("old", SECRET));
            old.default = true;
            let v = verifier(vec![
                old,
                ed_key(Some("ed"), data("jwt-test-ed25519-a.pub.pem")),
            ]);
            let t = hs_token(
                SECRET,
                None,
                &json!({"sub": "alice", "exp": NOW + 600, "chn": ["*"]}),
            );
            (v, t)
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_verify_or_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (v, _) = shared();
            prop_assert!(v.verify(&bytes, NOW).is_err());
        }

        #[test]
        fn arbitrary_token_shaped_input_never_panics(
            s in "[A-Za-z0-9_.-]{0,600}",
        ) {
            let (v, _) = shared();
            prop_assert!(v.verify(s.as_bytes(), NOW).is_err());
        }

        #[test]
        fn any_change_to_a_valid_token_is_refused(
            at in any::<prop::sample::Index>(),
            with in prop::sample::select(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \0".to_vec()),
            now in NOW - 1000..NOW + 1000,
        ) {
            let (v, t) = shared();
            prop_assert!(v.verify(t.as_bytes(), NOW).is_ok());
            let mut m = t.clone().into_bytes();
            let i = at.index(m.len());
            prop_assume!(m[i] != with);
            m[i] = with;
            prop_assert!(v.verify(&m, now).is_err());
            // Cut short, too.
            prop_assert!(v.verify(&t.as_bytes()[..i], now).is_err());
        }
    }
}
