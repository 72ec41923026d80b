//! `ecsd bench --ceiling`: the machine's own limit for registrations. Every registration
//! needs four public-key operations that nothing can skip: the onboarding token's signature
//! checked, the CSR's proof of possession checked, the certificate signed, and that
//! signature checked against the issuing CA's key (a signer is distrusted). This times
//! exactly those four, with the configured token issuer and signing backend and the same
//! functions the daemon calls, on every core, and nothing else: no parsing, no TLS, no
//! store. A registration rate is then read as a fraction of it.

use crate::config::Config;
use ecs_ca_backends::{
    CertTemplate, KeySigner, SanEntry, SignatureChecker, SoftwareKey, build_csr,
    generate_p256_pkcs8_pem, verify_signature,
};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One registration's cryptography, prepared so that only the operations are timed.
struct Work {
    backend: String,
    token_message: Vec<u8>,
    token_signature: String,
    token_key: jsonwebtoken::DecodingKey,
    token_alg: jsonwebtoken::Algorithm,
    csr_spki: Vec<u8>,
    csr_alg: der::asn1::ObjectIdentifier,
    csr_info: Vec<u8>,
    csr_signature: Vec<u8>,
    issuer: Arc<dyn ecs_ca_backends::CertIssuer>,
    tbs: Vec<u8>,
}

impl Work {
    /// The issuer's own signer, and the checker it verifies each signature with.
    fn signing(&self) -> (&dyn KeySigner, &SignatureChecker) {
        self.issuer
            .signer()
            .expect("prepare() refuses an issuer without a local signer")
    }

    fn token_verify(&self) -> Result<(), String> {
        let ok = jsonwebtoken::crypto::verify(
            &self.token_signature,
            &self.token_message,
            &self.token_key,
            self.token_alg,
        )
        .map_err(|e| e.to_string())?;
        ok.then_some(())
            .ok_or_else(|| "the token does not verify".into())
    }

    fn csr_verify(&self) -> Result<(), String> {
        verify_signature(
            &self.csr_spki,
            &self.csr_alg,
            &self.csr_info,
            &self.csr_signature,
        )
        .map_err(|e| e.to_string())
    }

    fn sign(&self) -> Result<Vec<u8>, String> {
        self.signing().0.sign(&self.tbs).map_err(|e| e.to_string())
    }

    fn sign_check(&self, signature: &[u8]) -> Result<(), String> {
        self.signing()
            .1
            .verify(&self.tbs, signature)
            .map_err(|e| e.to_string())
    }

    /// The four operations of one registration.
    fn registration(&self) -> Result<(), String> {
        self.token_verify()?;
        self.csr_verify()?;
        let signature = self.sign()?;
        self.sign_check(&signature)
    }
}

async fn prepare(cfg: &Config) -> Result<Work, String> {
    use der::{Decode, Encode};
    let base = cfg
        .source
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    // A token as the configured development issuer signs it, checked with the key the
    // daemon's verifier picks for it.
    let name = crate::token::minting_issuer(cfg, None)?;
    let ees_id = "ceiling.bench.example";
    let token = crate::token::mint(
        cfg,
        &name,
        &crate::token::MintRequest {
            ees_id,
            prov_id: None,
            ttl_secs: 600,
            now: crate::clock::now(),
        },
    )?;
    let verifier = crate::token::TokenVerifier::from_config(cfg).await?;
    let (token_key, token_alg) = verifier.signature_key(&token).map_err(|e| e.to_string())?;
    let (message, signature) = token
        .rsplit_once('.')
        .ok_or("a minted token has no signature")?;

    // A P-256 CSR, as the EES and the load generator make it.
    let ees_key =
        SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let csr_pem = build_csr(&ees_key, ees_id).map_err(|e| e.to_string())?;
    let (_, csr_der) = der::pem::decode_vec(csr_pem.as_bytes()).map_err(|e| e.to_string())?;
    let csr = x509_cert::request::CertReq::from_der(&csr_der).map_err(|e| e.to_string())?;

    // The backend that signs for EES profiles without provId (else the first domain's),
    // and a real TBSCertificate of it to sign.
    let backend = cfg
        .domains
        .get(crate::config::DEFAULT_DOMAIN)
        .or_else(|| cfg.domains.values().next())
        .map(|d| cfg.domain_backend(d))
        .unwrap_or_else(|| cfg.default_backend())
        .to_string();
    let backend_cfg = cfg
        .backends
        .get(&backend)
        .ok_or_else(|| format!("no backend {backend:?} in the configuration"))?;
    let (issuer, _) = crate::backends::load_backend(&backend, backend_cfg, &base)?;
    if issuer.signer().is_none() {
        return Err(format!(
            "backend {backend:?} signs outside this process (an external CA): it has no \
             ceiling here"
        ));
    }
    let sample = issuer
        .issue(&CertTemplate {
            common_name: ees_id.into(),
            organization: None,
            sans: vec![SanEntry::Dns(ees_id.into())],
            spki_der: ees_key.public_key_der().to_vec(),
            now: crate::clock::now(),
            validity_secs: 86_400,
            client_auth: true,
            server_auth: true,
            crl_url: Some(format!("{}/pki/v1/crl/{backend}", cfg.public_base())),
            csr_pem: None,
        })
        .map_err(|e| e.to_string())?;
    let cert = x509_cert::Certificate::from_der(&sample.der).map_err(|e| e.to_string())?;
    Ok(Work {
        backend,
        token_message: message.as_bytes().to_vec(),
        token_signature: signature.to_string(),
        token_key,
        token_alg,
        csr_spki: csr.info.public_key.to_der().map_err(|e| e.to_string())?,
        csr_alg: csr.algorithm.oid,
        csr_info: csr.info.to_der().map_err(|e| e.to_string())?,
        csr_signature: csr.signature.raw_bytes().to_vec(),
        tbs: cert.tbs_certificate().to_der().map_err(|e| e.to_string())?,
        issuer,
    })
}

/// Microseconds per call of `f` on one thread, over about `budget`.
fn per_call_us(budget: Duration, mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < budget {
        for _ in 0..16 {
            f()?;
        }
        n += 16;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// Registrations' cryptography per second on all cores for `duration`, with a per-operation
/// breakdown on one core.
pub async fn run(cfg: &Config, duration: Duration) -> Result<Value, String> {
    let work = prepare(cfg).await?;
    // Every operation checked once: a ceiling of failing operations would be meaningless.
    work.registration()?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let (rps, seconds) = tokio::task::block_in_place(|| {
        let started = Instant::now();
        let counts = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<u64, String> {
                        let mut n = 0u64;
                        while started.elapsed() < duration {
                            work.registration()?;
                            n += 1;
                        }
                        Ok(n)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .map_err(|_| "a ceiling thread panicked".to_string())?
                })
                .collect::<Result<Vec<u64>, String>>()
        })?;
        let seconds = started.elapsed().as_secs_f64();
        Ok::<_, String>((counts.iter().sum::<u64>() as f64 / seconds, seconds))
    })?;
    let budget = Duration::from_millis(200);
    let signature = work.sign()?;
    let (token_us, csr_us, sign_us, check_us) = tokio::task::block_in_place(|| {
        Ok::<_, String>((
            per_call_us(budget, || work.token_verify())?,
            per_call_us(budget, || work.csr_verify())?,
            per_call_us(budget, || work.sign().map(drop))?,
            per_call_us(budget, || work.sign_check(&signature))?,
        ))
    })?;
    Ok(json!({
        "target": "ceiling",
        "threads": threads,
        "seconds": seconds,
        "rps": rps,
        "backend": work.backend,
        "one_core_us": {
            "token_verify": token_us,
            "csr_verify": csr_us,
            "sign": sign_us,
            "sign_check": check_us,
        },
    }))
}

/// One line for people.
pub fn render_text(v: &Value) -> String {
    let us = &v["one_core_us"];
    let f = |k: &str| us[k].as_f64().unwrap_or(0.0);
    format!(
        "ceiling ({} threads, backend {}): {:.0} registrations/s of cryptography; one core, µs: token verify {:.1}, CSR verify {:.1}, sign {:.1}, sign check {:.1}",
        v["threads"],
        v["backend"].as_str().unwrap_or(""),
        v["rps"].as_f64().unwrap_or(0.0),
        f("token_verify"),
        f("csr_verify"),
        f("sign"),
        f("sign_check"),
    )
}
