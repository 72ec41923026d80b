//! Entry points of the fuzz targets (`fuzz/`, `scripts/fuzz`) for the parsers of the daemon
//! that see outside input, shared with the regression test that replays their corpora in
//! `./scripts/test`. Each takes arbitrary bytes; the only failure is a panic (or, under the
//! fuzzer, unbounded memory or time).

use crate::config::Config;
use crate::registration::body::{self, parse_object, parse_registration};
use crate::token::TokenVerifier;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

pub use ecs_ca_backends::fuzzing::NOW;

/// A published P-256 test key, fuzzing only: the token issuer's, so that tokens the fuzz
/// target signs itself reach the claim checks after the signature.
const ISSUER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgbRErEMPhpLwcBoFo
eWZFqEYLdxzZb64eime/KZ+/pYmhRANCAATpb+1MMBPmkVl6Z48CQ7i3gOhCLxNR
7xnTN2I626kLwqrwC4Cb9LNT8OJZsDGuzhWSz79olYtL6GtxTJ/IsoMF
-----END PRIVATE KEY-----
";
const ISSUER: &str = "https://idp.ecsp.example";
const AUDIENCE: &str = "ecs.ecsp.example";

/// A registration body (POST or PUT): JSON, then the EESRegistration + onboarding checks.
pub fn registration_body(data: &[u8]) {
    if let Ok(obj) = parse_object(data) {
        let _ = parse_registration(&obj, NOW);
    }
}

/// A merge patch (RFC 7396) applied to a registered EES's document, then checked as PATCH
/// checks the result.
pub fn merge_patch(data: &[u8]) {
    let Ok(patch) = parse_object(data) else {
        return;
    };
    let mut doc = json!({
        "eesProf": {
            "eesId": "ees-1.ecsp.example",
            "endPt": { "fqdn": "ees-1.ecsp.example", "ipv4Addrs": ["192.0.2.1"] },
            "eecRegConf": false
        },
        "expTime": crate::clock::format_time(NOW + 86_400),
    });
    body::merge_patch(&mut doc, &Value::Object(patch));
    if let Some(obj) = doc.as_object() {
        let _ = parse_registration(obj, NOW);
    }
}

/// An onboarding token. With an even first byte, the rest is the token as sent; with an
/// odd one, the rest is a JOSE header and a claims set separated by 0xFF, which are encoded
/// and signed with the issuer's key, so that the claims are fuzzed behind a valid signature.
pub fn token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        match std::str::from_utf8(rest) {
            Ok(t) => t.to_string(),
            Err(_) => return,
        }
    } else {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let split = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
        let (header, claims) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
        let message = format!("{}.{}", b64.encode(header), b64.encode(claims));
        let Ok(signature) = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &issuer_encoding_key(),
            jsonwebtoken::Algorithm::ES256,
        ) else {
            return;
        };
        format!("{message}.{signature}")
    };
    let (rt, verifier) = verifier();
    let _ = rt.block_on(verifier.verify(&token, NOW));
}

/// The ECS configuration file (TOML), parsed and cross-checked (`Config::validate`).
/// Paths it names resolve under a folder that does not exist.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::parse_text(text, Path::new("/nonexistent/ecs.toml"), HashMap::new()) {
        let _ = cfg.validate(NOW);
    }
}

fn issuer_encoding_key() -> jsonwebtoken::EncodingKey {
    jsonwebtoken::EncodingKey::from_ec_pem(ISSUER_KEY.as_bytes()).expect("fixed issuer key")
}

fn verifier() -> &'static (tokio::runtime::Runtime, TokenVerifier) {
    static V: OnceLock<(tokio::runtime::Runtime, TokenVerifier)> = OnceLock::new();
    V.get_or_init(|| {
        let jwks =
            crate::token::jwks_for_private_key(ISSUER_KEY.as_bytes(), "fuzz").expect("fixed JWKS");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let v = TokenVerifier::from_jwks(AUDIENCE, ISSUER, &jwks).expect("verifier");
        (rt, v)
    })
}

/// Seed inputs for the `token` target: a valid token's header and claims (odd first byte),
/// and the same token as sent (even first byte).
pub fn token_seeds() -> Vec<Vec<u8>> {
    let header = json!({ "alg": "ES256", "typ": "JWT", "kid": "fuzz" }).to_string();
    let claims = json!({
        "iss": ISSUER, "sub": "ees-1.ecsp.example", "aud": AUDIENCE,
        // Every time claim is checked against NOW, the one clock passed in.
        "scope": "eecs-eesregistration", "iat": NOW, "nbf": NOW, "exp": NOW + 600,
        "jti": "fuzz-1", "provId": "prov-1",
    })
    .to_string();
    let mut structured = vec![1u8];
    structured.extend_from_slice(header.as_bytes());
    structured.push(0xff);
    structured.extend_from_slice(claims.as_bytes());
    let mut header_t = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header_t.kid = Some("fuzz".into());
    let claims_v: Value = serde_json::from_str(&claims).expect("claims");
    let sent = jsonwebtoken::encode(&header_t, &claims_v, &issuer_encoding_key()).expect("token");
    let mut raw = vec![0u8];
    raw.extend_from_slice(sent.as_bytes());
    vec![structured, raw]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_token_seeds_verify() {
        let (rt, v) = super::verifier();
        for seed in super::token_seeds() {
            if seed[0] == 0 {
                let t = std::str::from_utf8(&seed[1..]).unwrap();
                rt.block_on(v.verify(t, super::NOW)).unwrap();
            }
            super::token(&seed);
        }
    }
}
