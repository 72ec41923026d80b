//! Onboarding access tokens (`contract/api.md` §4): JWS-signed JWTs from the configured
//! trusted issuers, verified with the TS 33.501 §13.4.1 rules, and minted for the
//! development issuer.

use crate::client::{HttpVersion, HttpsClient};
use crate::config::{Config, TokenIssuerConfig};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::json;
use std::borrow::Cow;
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
        let parts = Parts::split(token)?;
        let payload = parts.payload()?;
        let (header, c, issuer) = self.open(&parts, &payload)?;
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
        parts.verify_signature(&entry.key, header.alg)?;

        match &c.aud {
            Some(Audience::One(a)) if *a == self.audience => {}
            Some(Audience::Many(all)) if all.iter().any(|a| *a == self.audience) => {}
            Some(_) => return Err(TokenError::WrongAudience),
            None => return Err(TokenError::BadClaim("aud")),
        }
        // Saturating: the times are the issuer's numbers, and a wrapped sum would turn the
        // longest lifetime into a negative one that passes.
        let leeway = LEEWAY_SECS as i64;
        let exp = c.exp.ok_or(TokenError::BadClaim("exp"))?;
        if exp.saturating_add(leeway) <= now {
            return Err(TokenError::Expired);
        }
        if c.nbf.is_some_and(|nbf| nbf > now + leeway) {
            return Err(TokenError::NotYetValid);
        }
        if c.iat.is_some_and(|iat| iat > now + leeway) {
            return Err(TokenError::NotYetValid);
        }
        let lifetime = exp.saturating_sub(c.iat.unwrap_or(now));
        if lifetime > issuer.max_lifetime {
            return Err(TokenError::LifetimeTooLong(lifetime, issuer.max_lifetime));
        }
        let scope = c.scope.as_deref().unwrap_or("");
        if !scope.split(' ').any(|s| s == SCOPE) {
            return Err(TokenError::WrongScope);
        }
        let sub = c
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::BadClaim("sub"))?;
        let jti = c
            .jti
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or(TokenError::BadClaim("jti"))?;
        Ok(VerifiedToken {
            issuer_name: issuer.name.clone(),
            iss: issuer.issuer.clone(),
            sub: sub.into_owned(),
            jti: jti.into_owned(),
            exp,
            prov_id: c.prov_id.map(Cow::into_owned),
        })
    }

    /// The key and algorithm that verify `token`'s signature, looked up as [`verify`] does
    /// (issuer from `iss`, key by `kid`), without a JWKS fetch: what `ecsd bench --ceiling`
    /// times on its own.
    ///
    /// [`verify`]: TokenVerifier::verify
    pub fn signature_key(&self, token: &str) -> Result<(DecodingKey, Algorithm), TokenError> {
        let parts = Parts::split(token)?;
        let payload = parts.payload()?;
        let (header, _, issuer) = self.open(&parts, &payload)?;
        let kid = header.kid.unwrap_or_default();
        let entry = issuer.key(&kid).ok_or(TokenError::UnknownKey(kid))?;
        Ok((entry.key.clone(), header.alg))
    }

    /// The token's header, its claims parsed once from `payload` (its decoded payload), and
    /// the configured issuer that `iss` names: the issuer decides which keys may verify, so
    /// it is read before the signature, from the very bytes the signature covers.
    fn open<'p>(
        &self,
        parts: &Parts<'_>,
        payload: &'p [u8],
    ) -> Result<(Header, Claims<'p>, &Issuer), TokenError> {
        let header = parts.header()?;
        let claims = Claims::parse(payload)?;
        let iss = claims.iss.as_deref().ok_or(TokenError::BadClaim("iss"))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| TokenError::UnknownIssuer(iss.to_string()))?;
        Ok((header, claims, issuer))
    }
}

/// A compact JWS, split at its two dots.
struct Parts<'t> {
    token: &'t str,
    /// `header.payload`, what the signature covers.
    signed: &'t str,
    payload: &'t str,
    signature: &'t str,
}

impl<'t> Parts<'t> {
    fn split(token: &'t str) -> Result<Self, TokenError> {
        let (signed, signature) = token
            .rsplit_once('.')
            .ok_or_else(|| TokenError::Malformed("not three parts".into()))?;
        let (_, payload) = signed
            .split_once('.')
            .filter(|(_, p)| !p.contains('.'))
            .ok_or_else(|| TokenError::Malformed("not three parts".into()))?;
        Ok(Parts {
            token,
            signed,
            payload,
            signature,
        })
    }

    /// The header, its algorithm and extensions accepted.
    fn header(&self) -> Result<Header, TokenError> {
        let header = jsonwebtoken::decode_header(self.token)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(TokenError::AlgorithmRefused(format!("{:?}", header.alg)));
        }
        // This ECS understands no JWS extension: any `crit` means a rule it cannot apply.
        if let Some(crit) = &header.crit {
            return Err(TokenError::CriticalHeader(crit.clone()));
        }
        Ok(header)
    }

    fn payload(&self) -> Result<Vec<u8>, TokenError> {
        URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|e| TokenError::Malformed(format!("payload: {e}")))
    }

    /// The signature checked by jsonwebtoken's verifier, which also refuses a key of
    /// another family than `alg` (an RSA key for ES256, say).
    fn verify_signature(&self, key: &DecodingKey, alg: Algorithm) -> Result<(), TokenError> {
        match jsonwebtoken::crypto::verify(self.signature, self.signed.as_bytes(), key, alg) {
            Ok(true) => Ok(()),
            Ok(false) => Err(TokenError::BadSignature),
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::Base64(_)) => {
                Err(TokenError::Malformed(format!("signature: {e}")))
            }
            Err(e) => Err(TokenError::AlgorithmRefused(format!(
                "{alg:?} with this issuer's {:?} key: {e}",
                key.family()
            ))),
        }
    }
}

/// The claims this ECS reads. Unknown claims are ignored; a claim given twice, or of the
/// wrong JSON type, makes the token malformed.
#[derive(serde::Deserialize)]
struct Claims<'a> {
    #[serde(borrow)]
    iss: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sub: Option<Cow<'a, str>>,
    #[serde(borrow)]
    aud: Option<Audience<'a>>,
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    #[serde(borrow)]
    jti: Option<Cow<'a, str>>,
    #[serde(borrow)]
    scope: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "provId")]
    prov_id: Option<Cow<'a, str>>,
}

impl<'a> Claims<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, TokenError> {
        serde_json::from_slice(payload).map_err(|e| TokenError::Malformed(format!("claims: {e}")))
    }
}

/// `aud`: one string or an array of strings (RFC 7519, section 4.1.3).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Audience<'a> {
    #[serde(borrow)]
    One(Cow<'a, str>),
    #[serde(borrow)]
    Many(Vec<Cow<'a, str>>),
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

/// A new registration ID: 24 bytes from [`ecs_ca_backends::time_ordered`] (the millisecond
/// it was made, then 144 bits from the OS CSPRNG), base64url (32 characters). IDs made in
/// the same 64 ms share their first 7 characters, so the IDs of one group commit are
/// neighbours in the store's indexes.
pub fn registration_id() -> String {
    let id = ecs_ca_backends::time_ordered::<24>(&aws_lc_rs::rand::SystemRandom::new())
        .expect("the OS random generator and the clock work");
    URL_SAFE_NO_PAD.encode(id)
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

#[cfg(test)]
mod tests {
    use super::*;

    const ECS: &str = "ecs.ecsp.example";
    const ISS: &str = "https://as.ecsp.example";
    const NOW: i64 = 1_800_000_000;

    struct Signer {
        key: EncodingKey,
        verifier: TokenVerifier,
    }

    fn signer() -> Signer {
        let pem = ecs_ca_backends::generate_p256_pkcs8_pem().unwrap();
        let jwks = jwks_for_private_key(pem.as_bytes(), "k1").unwrap();
        Signer {
            key: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            verifier: TokenVerifier::from_jwks(ECS, ISS, &jwks).unwrap(),
        }
    }

    impl Signer {
        /// A token whose payload is exactly `payload`, signed with ES256.
        fn sign(&self, payload: &str) -> String {
            let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","kid":"k1"}"#);
            let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
            let sig =
                jsonwebtoken::crypto::sign(signed.as_bytes(), &self.key, Algorithm::ES256).unwrap();
            format!("{signed}.{sig}")
        }

        async fn verify(&self, payload: &str) -> Result<VerifiedToken, TokenError> {
            self.verifier.verify(&self.sign(payload), NOW).await
        }
    }

    fn claims(aud: &str) -> String {
        format!(
            r#"{{"iss":"{ISS}","sub":"ees1.ecsp.example","aud":{aud},"scope":"{SCOPE}","iat":{NOW},"exp":{},"jti":"j1"}}"#,
            NOW + 300
        )
    }

    #[test]
    fn registration_ids_carry_144_random_bits_after_their_millisecond() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (a, b) = (registration_id(), registration_id());
        assert_eq!((a.len(), b.len()), (32, 32));
        let (a, b) = (
            URL_SAFE_NO_PAD.decode(&a).unwrap(),
            URL_SAFE_NO_PAD.decode(&b).unwrap(),
        );
        let ms = |id: &[u8]| u64::from_be_bytes([0, 0, id[0], id[1], id[2], id[3], id[4], id[5]]);
        assert!(ms(&a).abs_diff(now) < 1_000 && ms(&b).abs_diff(now) < 1_000);
        assert_eq!(a.len() - 6, 18, "144 random bits");
        // The random part differs (a repeat of 144 bits would be a broken generator).
        assert_ne!(a[6..], b[6..]);
    }

    #[tokio::test]
    async fn aud_names_this_ecs_alone_or_among_others() {
        let s = signer();
        let t = s.verify(&claims(&format!(r#""{ECS}""#))).await.unwrap();
        assert_eq!(
            (t.sub.as_str(), t.jti.as_str()),
            ("ees1.ecsp.example", "j1")
        );
        assert!(
            s.verify(&claims(&format!(r#"["other", "{ECS}"]"#)))
                .await
                .is_ok()
        );
        assert_eq!(
            s.verify(&claims(r#"["other", "another"]"#)).await,
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            s.verify(&claims("null")).await,
            Err(TokenError::BadClaim("aud"))
        );
    }

    #[tokio::test]
    async fn a_claim_given_twice_or_of_the_wrong_type_makes_the_token_malformed() {
        let s = signer();
        let ok = claims(&format!(r#""{ECS}""#));
        let twice = ok.replacen('{', r#"{"sub":"ees2.ecsp.example","#, 1);
        assert!(
            matches!(s.verify(&twice).await, Err(TokenError::Malformed(m)) if m.contains("duplicate field `sub`"))
        );
        let number = ok.replace(r#""jti":"j1""#, r#""jti":1"#);
        assert!(matches!(
            s.verify(&number).await,
            Err(TokenError::Malformed(_))
        ));
        let escaped = ok.replace(r#""jti":"j1""#, r#""jti":"j\u0031""#);
        assert_eq!(s.verify(&escaped).await.unwrap().jti, "j1");
    }

    #[tokio::test]
    async fn a_lifetime_past_the_end_of_time_is_too_long_not_negative() {
        let s = signer();
        let claims = format!(
            r#"{{"iss":"{ISS}","sub":"ees1.ecsp.example","aud":"{ECS}","scope":"{SCOPE}","iat":-200,"exp":{},"jti":"j1"}}"#,
            i64::MAX - 100
        );
        assert!(matches!(
            s.verify(&claims).await,
            Err(TokenError::LifetimeTooLong(i64::MAX, _))
        ));
    }

    #[tokio::test]
    async fn a_token_is_three_parts_and_its_signature_covers_the_claims_read() {
        let s = signer();
        let token = s.sign(&claims(&format!(r#""{ECS}""#)));
        assert!(matches!(
            s.verifier.verify(&format!("{token}.x"), NOW).await,
            Err(TokenError::Malformed(_))
        ));
        // Claims of another token under this token's signature.
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let (header, _) = signed.split_once('.').unwrap();
        let forged = format!(
            "{header}.{}.{sig}",
            URL_SAFE_NO_PAD.encode(claims(&format!(r#"["{ECS}"]"#)))
        );
        assert_eq!(
            s.verifier.verify(&forged, NOW).await,
            Err(TokenError::BadSignature)
        );
    }
}
