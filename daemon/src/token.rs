//! Onboarding access tokens (`contract/api.md` §4): JWS-signed JWTs from the configured
//! trusted issuers, verified with the TS 33.501 §13.4.1 rules, and minted for the
//! development issuer.

use crate::client::{HttpVersion, HttpsClient};
use crate::config::{Config, TokenIssuerConfig};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The scope every onboarding token must carry.
pub const SCOPE: &str = "eecs-eesregistration";
/// Clock leeway for `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 60;
/// The algorithms accepted; `none` and HMAC never are.
const ACCEPTED: [Algorithm; 5] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::RS256,
    Algorithm::PS256,
];

/// Why a token was refused. Every variant answers 401 `INVALID_TOKEN`; the text goes into
/// the problem's `detail` and the audit record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted")]
    AlgorithmRefused(String),
    #[error("issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("no key {0:?} for this issuer")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("audience does not name this ECS")]
    WrongAudience,
    #[error("scope does not contain {SCOPE}")]
    WrongScope,
    #[error("claim {0} is missing or malformed")]
    BadClaim(&'static str),
    #[error("critical header parameters {0:?} are not understood (RFC 7515, section 4.1.11)")]
    CriticalHeader(Vec<String>),
    #[error(
        "lifetime of {0} s (exp - iat) is longer than this issuer's max_token_lifetime of {1} s"
    )]
    LifetimeTooLong(i64, i64),
}

/// The facts of a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Configuration name of the issuer (`[token_issuers.NAME]`).
    pub issuer_name: String,
    pub iss: String,
    pub sub: String,
    pub jti: String,
    pub exp: i64,
    pub prov_id: Option<String>,
}

struct KeyEntry {
    key: DecodingKey,
    /// The JWK's `alg`, when it names one: the token must use exactly that.
    alg: Option<Algorithm>,
}

struct Issuer {
    name: String,
    issuer: String,
    keys: RwLock<HashMap<String, Arc<KeyEntry>>>,
    url: Option<(String, HttpsClient)>,
    last_fetch: Mutex<Option<Instant>>,
    /// At most one JWKS fetch in this interval when an unknown `kid` arrives.
    min_refresh: Duration,
    /// The longest `exp - iat` accepted: a token's ID is kept until it expires.
    max_lifetime: i64,
}

/// Verifies onboarding tokens against the configured issuers.
pub struct TokenVerifier {
    audience: String,
    issuers: Vec<Issuer>,
}

impl TokenVerifier {
    /// Loads every issuer's keys. JWKS URLs are fetched here once; a failure is an error, so
    /// a misconfigured URL is found at start rather than at the first EES.
    pub async fn from_config(cfg: &Config) -> Result<Self, String> {
        let mut issuers = Vec::new();
        for (name, ic) in &cfg.token_issuers {
            let keys = load_static_keys(name, ic)?;
            let url = match &ic.jwks_url {
                Some(u) => {
                    let roots = match &ic.jwks_ca {
                        Some(p) => crate::files::read(p).map_err(|e| {
                            format!("token_issuers.{name}.jwks_ca: {}: {e}", p.display())
                        })?,
                        // A JWKS decides who may onboard: its server is trusted through the
                        // CA named for it, else the system's web roots, never the ECS's own
                        // CA (an EES certificate is a server certificate under it).
                        None => crate::client::system_roots_pem()
                            .map_err(|e| format!("token_issuers.{name}.jwks_url: {e}"))?,
                    };
                    let client = HttpsClient::new(&roots, None, HttpVersion::Http1)
                        .map_err(|e| format!("token_issuers.{name}.jwks_ca: {e}"))?;
                    Some((u.clone(), client))
                }
                None => None,
            };
            let issuer = Issuer {
                name: name.clone(),
                issuer: ic.issuer.clone(),
                keys: RwLock::new(keys),
                url,
                last_fetch: Mutex::new(None),
                min_refresh: Duration::from_secs(ic.jwks_min_refresh.as_secs()),
                max_lifetime: ic.max_token_lifetime.as_secs() as i64,
            };
            if issuer.url.is_some() {
                issuer
                    .refresh()
                    .await
                    .map_err(|e| format!("token_issuers.{name}.jwks_url: {e}"))?;
            }
            issuers.push(issuer);
        }
        Ok(TokenVerifier {
            audience: cfg.ecs_id.clone(),
            issuers,
        })
    }

    /// A verifier for one issuer whose keys are the JWKS `jwks` (no URL to refresh from).
    pub fn from_jwks(audience: &str, iss: &str, jwks: &str) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("JWKS: {e}"))?;
        Ok(TokenVerifier {
            audience: audience.to_string(),
            issuers: vec![Issuer {
                name: "jwks".into(),
                issuer: iss.to_string(),
                keys: RwLock::new(keys_from_jwks(&set)?),
                url: None,
                last_fetch: Mutex::new(None),
                min_refresh: Duration::from_secs(60),
                max_lifetime: crate::config::DEFAULT_MAX_TOKEN_LIFETIME_SECS,
            }],
        })
    }

    /// Verifies `token`: algorithm, issuer, key, signature, `aud`, `exp`/`nbf`/`iat`,
    /// `scope`, and the presence of `sub` and `jti`. Single use is the store's to enforce.
    pub async fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > 16 * 1024 {
            return Err(TokenError::Malformed("longer than 16 KiB".into()));
        }
        let (header, issuer) = self.header_and_issuer(token)?;
        let iss = issuer.issuer.as_str();
        let kid = header.kid.clone().unwrap_or_default();
        let entry = match issuer.key(&kid) {
            Some(e) => e,
            None => {
                issuer.refresh_rate_limited().await;
                issuer
                    .key(&kid)
                    .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?
            }
        };
        if entry.alg.is_some_and(|a| a != header.alg) {
            return Err(TokenError::AlgorithmRefused(format!(
                "{:?} for a key meant for {:?}",
                header.alg, entry.alg
            )));
        }
        let mut v = Validation::new(header.alg);
        // Time claims are checked below against `now`, the one clock of the request.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&issuer.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(token, &entry.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidAudience => TokenError::WrongAudience,
                K::InvalidIssuer => TokenError::UnknownIssuer(iss.to_string()),
                K::InvalidSignature => TokenError::BadSignature,
                K::InvalidAlgorithm => TokenError::AlgorithmRefused(format!("{:?}", header.alg)),
                K::MissingRequiredClaim(c) => {
                    TokenError::Malformed(format!("claim {c} is missing"))
                }
                other => TokenError::Malformed(format!("{other:?}")),
            }
        })?;
        let c = data.claims;
        let leeway = LEEWAY_SECS as i64;
        let time_claim = |name: &'static str| match c.get(name) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or(TokenError::BadClaim(name)),
        };
        let exp = time_claim("exp")?.ok_or(TokenError::BadClaim("exp"))?;
        if exp + leeway <= now {
            return Err(TokenError::Expired);
        }
        if time_claim("nbf")?.is_some_and(|nbf| nbf > now + leeway) {
            return Err(TokenError::NotYetValid);
        }
        let iat = time_claim("iat")?;
        if iat.is_some_and(|iat| iat > now + leeway) {
            return Err(TokenError::NotYetValid);
        }
        let lifetime = exp - iat.unwrap_or(now);
        if lifetime > issuer.max_lifetime {
            return Err(TokenError::LifetimeTooLong(lifetime, issuer.max_lifetime));
        }
        let scope = c.get("scope").and_then(Value::as_str).unwrap_or("");
        if !scope.split(' ').any(|s| s == SCOPE) {
            return Err(TokenError::WrongScope);
        }
        let sub = c
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::BadClaim("sub"))?;
        let jti = c
            .get("jti")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or(TokenError::BadClaim("jti"))?;
        let prov_id = match c.get("provId") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => Some(p.clone()),
            Some(_) => return Err(TokenError::BadClaim("provId")),
        };
        Ok(VerifiedToken {
            issuer_name: issuer.name.clone(),
            iss: issuer.issuer.clone(),
            sub: sub.to_string(),
            jti: jti.to_string(),
            exp,
            prov_id,
        })
    }
}

impl TokenVerifier {
    /// The key and algorithm that verify `token`'s signature, looked up as [`verify`] does
    /// (issuer from the unverified `iss`, key by `kid`), without a JWKS fetch: what
    /// `ecsd bench --ceiling` times on its own.
    ///
    /// [`verify`]: TokenVerifier::verify
    pub fn signature_key(&self, token: &str) -> Result<(DecodingKey, Algorithm), TokenError> {
        let (header, issuer) = self.header_and_issuer(token)?;
        let kid = header.kid.unwrap_or_default();
        let entry = issuer.key(&kid).ok_or(TokenError::UnknownKey(kid))?;
        Ok((entry.key.clone(), header.alg))
    }

    /// The token's header, its algorithm and extensions accepted, and the configured issuer
    /// its unverified `iss` names: the issuer decides which keys may verify, so it is read
    /// before the signature, and the signed claims must then say the same.
    fn header_and_issuer(&self, token: &str) -> Result<(Header, &Issuer), TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(TokenError::AlgorithmRefused(format!("{:?}", header.alg)));
        }
        // This ECS understands no JWS extension: any `crit` means a rule it cannot apply.
        if let Some(crit) = &header.crit {
            return Err(TokenError::CriticalHeader(crit.clone()));
        }
        let unverified: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(TokenError::BadClaim("iss"))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| TokenError::UnknownIssuer(iss.to_string()))?;
        Ok((header, issuer))
    }
}

impl Issuer {
    fn key(&self, kid: &str) -> Option<Arc<KeyEntry>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        match keys.get(kid) {
            Some(k) => Some(k.clone()),
            // A token without `kid` is accepted only when the issuer has a single key.
            None if kid.is_empty() && keys.len() == 1 => keys.values().next().cloned(),
            None => None,
        }
    }

    async fn refresh_rate_limited(&self) {
        if self.url.is_none() {
            return;
        }
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.refresh().await {
            tracing::warn!(issuer = %self.name, error = %e, "JWKS refresh failed; keeping the cached keys");
        }
    }

    async fn refresh(&self) -> Result<(), String> {
        let Some((url, client)) = &self.url else {
            return Ok(());
        };
        let resp = client
            .request("GET", url, &[("accept", "application/json")], None)
            .await
            .map_err(|e| e.to_string())?;
        if resp.status != 200 {
            return Err(format!("{url} answered {}", resp.status));
        }
        let set: JwkSet =
            serde_json::from_slice(&resp.body).map_err(|e| format!("{url}: not a JWKS: {e}"))?;
        let keys = keys_from_jwks(&set)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        tracing::info!(issuer = %self.name, "JWKS refreshed from {url}");
        Ok(())
    }
}

fn keys_from_jwks(set: &JwkSet) -> Result<HashMap<String, Arc<KeyEntry>>, String> {
    let mut out = HashMap::new();
    for jwk in &set.keys {
        if matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            // A symmetric key can never verify an onboarding token.
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad JWK: {e}"))?;
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        out.insert(kid, Arc::new(KeyEntry { key, alg }));
    }
    Ok(out)
}

fn load_static_keys(
    name: &str,
    ic: &TokenIssuerConfig,
) -> Result<HashMap<String, Arc<KeyEntry>>, String> {
    if let Some(p) = &ic.jwks {
        let text = crate::files::read(p)
            .map_err(|e| format!("token_issuers.{name}.jwks: {}: {e}", p.display()))?;
        let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "token_issuers.{name}.jwks: {}: not a JWKS: {e}",
                p.display()
            )
        })?;
        return keys_from_jwks(&set)
            .map_err(|e| format!("token_issuers.{name}.jwks: {}: {e}", p.display()));
    }
    let mut out = HashMap::new();
    for p in &ic.keys {
        let pem = crate::files::read(p)
            .map_err(|e| format!("token_issuers.{name}.keys: {}: {e}", p.display()))?;
        let key = DecodingKey::from_ec_pem(&pem)
            .or_else(|_| DecodingKey::from_ed_pem(&pem))
            .or_else(|_| DecodingKey::from_rsa_pem(&pem))
            .map_err(|e| format!("token_issuers.{name}.keys: {}: {e}", p.display()))?;
        let kid = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.insert(kid, Arc::new(KeyEntry { key, alg: None }));
    }
    Ok(out)
}

/// What to put in a minted token.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    pub ees_id: &'a str,
    pub prov_id: Option<&'a str>,
    pub ttl_secs: u64,
    pub now: i64,
}

/// Mints an ES256 onboarding token with the private key of issuer `name`.
/// The token issuer that `token mint` and `bench` sign as: the one named, else the only one
/// whose private key the configuration holds.
pub fn minting_issuer(cfg: &Config, named: Option<&str>) -> Result<String, String> {
    if let Some(n) = named {
        return Ok(n.to_string());
    }
    let minting: Vec<&String> = cfg
        .token_issuers
        .iter()
        .filter(|(_, i)| i.private_key.is_some())
        .map(|(n, _)| n)
        .collect();
    match minting.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err("no token issuer in the configuration has a private_key".into()),
        _ => Err("--issuer: several token issuers have a private_key; name one".into()),
    }
}

pub fn mint(cfg: &Config, name: &str, req: &MintRequest<'_>) -> Result<String, String> {
    let ic = cfg
        .token_issuers
        .get(name)
        .ok_or_else(|| format!("no [token_issuers.{name}]"))?;
    let path = ic.private_key.as_ref().ok_or_else(|| {
        format!("token_issuers.{name}: no private_key: this ECS cannot mint for that issuer")
    })?;
    if req.ttl_secs > ic.max_token_lifetime.as_secs() {
        return Err(format!(
            "--ttl: {} s is longer than token_issuers.{name}.max_token_lifetime ({}): the ECS would refuse the token",
            req.ttl_secs, ic.max_token_lifetime
        ));
    }
    crate::secrets::check_private(path, &format!("token_issuers.{name}.private_key"))?;
    let pem = zeroize::Zeroizing::new(
        crate::files::read(path)
            .map_err(|e| format!("token_issuers.{name}.private_key: {}: {e}", path.display()))?,
    );
    let key = EncodingKey::from_ec_pem(&pem)
        .map_err(|e| format!("token_issuers.{name}.private_key: {}: {e}", path.display()))?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = ic.kid.clone();
    let mut claims = json!({
        "iss": ic.issuer,
        "sub": req.ees_id,
        "aud": cfg.ecs_id,
        "scope": SCOPE,
        "iat": req.now,
        "nbf": req.now,
        "exp": req.now + req.ttl_secs as i64,
        "jti": random_b64(16),
    });
    if let Some(p) = req.prov_id {
        claims["provId"] = json!(p);
    }
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
}

/// The JWKS (public half) of a PKCS#8 P-256 private key, with `kid`.
pub fn jwks_for_private_key(pem: &[u8], kid: &str) -> Result<String, String> {
    let key = EncodingKey::from_ec_pem(pem).map_err(|e| e.to_string())?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).map_err(|e| e.to_string())?;
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
    serde_json::to_string_pretty(&JwkSet { keys: vec![jwk] }).map_err(|e| e.to_string())
}

/// `n` bytes from the OS CSPRNG, base64url without padding.
pub fn random_b64(n: usize) -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("the OS random generator works");
    URL_SAFE_NO_PAD.encode(buf)
}
