//! The passthrough backend: an external CA that speaks the CFSSL remote-signing API signs,
//! and the ECS delivers nothing it has not checked (step-ca's RA mode trusts what comes
//! back; this does not).
//!
//! Every answer is verified before it is used: it parses, carries the CSR's key, chains to
//! the configured CA certificate, stays within the approved validity, and names exactly
//! what was approved (less what the configuration declares the external profile cannot
//! honour). A circuit breaker answers at once while the CA is down and probes it in the
//! background.

use crate::{
    CertIssuer, CertTemplate, Error, IssuedCert, RevokedEntry, SanEntry, verify_cert_signed_by,
};
use aws_lc_rs::hmac;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Parts of the approved certificate an external CA profile may be unable to put in; each
/// must be declared in the configuration to be tolerated when missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHonoured {
    /// URI subjectAltNames (CFSSL 1.2 writes URIs as dNSNames, so they are never sent).
    UriSan,
    /// The organization (`O=<provId>`) of the subject.
    Organization,
    /// `serverAuth` in extendedKeyUsage.
    ServerAuth,
}

impl NotHonoured {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "uri_san" => Some(NotHonoured::UriSan),
            "organization" => Some(NotHonoured::Organization),
            "server_auth" => Some(NotHonoured::ServerAuth),
            _ => None,
        }
    }
}

/// Configuration of a passthrough backend.
#[derive(Debug, Clone)]
pub struct CfsslConfig {
    pub name: String,
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub profile: Option<String>,
    /// The HMAC key of `/authsign`, raw bytes.
    pub auth_key: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// The external CA's chain (issuing CA first): what it returns must chain to it.
    pub chain_der: Vec<Vec<u8>>,
    /// Trust roots for an `https://` URL (DER); the chain above when empty.
    pub tls_roots_der: Vec<Vec<u8>>,
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub not_honoured: Vec<NotHonoured>,
}

#[derive(Debug)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant, reason: String },
}

/// Consecutive failures that open the breaker.
const OPEN_AFTER: u32 = 2;
/// How long the breaker stays open before a probe may close it.
const OPEN_FOR: Duration = Duration::from_secs(5);
/// Leeway on the returned validity (clocks, and the CA's backdating).
const VALIDITY_SLACK_SECS: i64 = 600;

/// The passthrough issuer.
pub struct CfsslIssuer {
    cfg: CfsslConfig,
    agent: ureq::Agent,
    breaker: Mutex<Breaker>,
}

/// Why a call to the external CA failed: the CA is unreachable (counts toward the breaker),
/// or it answered something unusable.
enum CallError {
    Down(String),
    Bad(String),
}

impl CfsslIssuer {
    pub fn new(cfg: CfsslConfig) -> Result<Self, Error> {
        if cfg.chain_der.is_empty() {
            return Err(Error::Config(
                "cert: the external CA's chain is empty".into(),
            ));
        }
        if !(cfg.url.starts_with("http://") || cfg.url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "url: {:?} is not http(s)://",
                cfg.url
            )));
        }
        let roots: Vec<ureq::tls::Certificate<'static>> = if cfg.tls_roots_der.is_empty() {
            &cfg.chain_der
        } else {
            &cfg.tls_roots_der
        }
        .iter()
        .map(|d| ureq::tls::Certificate::from_der(d).to_owned())
        .collect();
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
            .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_connect(Some(cfg.connect_timeout))
            .timeout_global(Some(cfg.total_timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        Ok(CfsslIssuer {
            cfg,
            agent,
            breaker: Mutex::new(Breaker::Closed { failures: 0 }),
        })
    }

    fn base(&self) -> &str {
        self.cfg.url.trim_end_matches('/')
    }

    /// POSTs `body` to `path`; one retry when the connection itself failed.
    fn post(&self, path: &str, body: &Value) -> Result<Value, CallError> {
        let url = format!("{}{path}", self.base());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let bytes = serde_json::to_vec(body).map_err(|e| CallError::Bad(e.to_string()))?;
            match self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(&bytes[..])
            {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text = resp
                        .body_mut()
                        .with_config()
                        .limit(1 << 20)
                        .read_to_string()
                        .map_err(|e| CallError::Down(format!("{url}: reading the answer: {e}")))?;
                    return read_answer(&url, status, &text);
                }
                Err(e) => {
                    let connect_failed = matches!(
                        e,
                        ureq::Error::ConnectionFailed
                            | ureq::Error::Io(_)
                            | ureq::Error::HostNotFound
                    );
                    if connect_failed && attempt == 1 {
                        continue;
                    }
                    return Err(CallError::Down(format!("{url}: {e}")));
                }
            }
        }
    }

    fn breaker_check(&self) -> Result<(), Error> {
        let b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if let Breaker::Open { until, reason } = &*b
            && Instant::now() < *until
        {
            return Err(Error::Unavailable(format!(
                "the external CA is down ({reason}); not tried again for {} s",
                until.saturating_duration_since(Instant::now()).as_secs() + 1
            )));
        }
        Ok(())
    }

    fn record(&self, ok: bool, reason: &str) {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        *b = match (&*b, ok) {
            (_, true) => Breaker::Closed { failures: 0 },
            (Breaker::Closed { failures }, false) if failures + 1 < OPEN_AFTER => Breaker::Closed {
                failures: failures + 1,
            },
            (_, false) => {
                tracing::warn!(backend = %self.cfg.name, %reason, "external CA down: circuit open");
                Breaker::Open {
                    until: Instant::now() + OPEN_FOR,
                    reason: reason.to_string(),
                }
            }
        };
    }

    /// The sign request CFSSL expects: the CSR, and the approved subject and hosts (which
    /// override what the CSR says).
    fn request(&self, t: &CertTemplate) -> Result<Value, Error> {
        let csr = t
            .csr_pem
            .as_ref()
            .ok_or_else(|| Error::Config("the passthrough backend needs the EES's CSR".into()))?;
        let hosts: Vec<String> = t
            .sans
            .iter()
            .filter_map(|s| match s {
                SanEntry::Dns(d) => Some(d.clone()),
                SanEntry::Ip(ip) => Some(ip.to_string()),
                SanEntry::Uri(_) => None,
            })
            .collect();
        let mut subject = json!({ "CN": t.common_name });
        if let Some(o) = &t.organization {
            subject["names"] = json!([{ "O": o }]);
        }
        let mut req = json!({ "certificate_request": csr, "hosts": hosts, "subject": subject });
        if let Some(p) = &self.cfg.profile {
            req["profile"] = json!(p);
        }
        Ok(req)
    }

    /// What [`CertIssuer::issue`] does with the external CA's answer (HTTP `status`, body
    /// `text`) to a request for `t`: the certificate it carries, if every check passes.
    /// Public so that the answers can be fuzzed without a server.
    pub fn check_answer(
        &self,
        t: &CertTemplate,
        status: u16,
        text: &str,
    ) -> Result<IssuedCert, Error> {
        match read_answer("the external CA", status, text) {
            Ok(answer) => self.accept(t, &answer),
            Err(CallError::Down(why) | CallError::Bad(why)) => Err(Error::BadCertificate(why)),
        }
    }

    fn accept(&self, t: &CertTemplate, answer: &Value) -> Result<IssuedCert, Error> {
        let pem = answer["result"]["certificate"]
            .as_str()
            .ok_or_else(|| Error::BadCertificate("the answer has no result.certificate".into()))?;
        let der = crate::pem_to_der(pem, "CERTIFICATE").map_err(|_| {
            Error::BadCertificate("result.certificate is not a PEM certificate".into())
        })?;
        self.verify(t, &der).map_err(|why| {
            Error::BadCertificate(format!("the external CA's certificate was refused: {why}"))
        })
    }

    /// Checks a returned certificate against the approval. Returns a sentence for what is
    /// wrong.
    fn verify(&self, t: &CertTemplate, der: &[u8]) -> Result<IssuedCert, String> {
        let leaf = crate::chain::leaf_facts(der).map_err(|e| format!("does not parse: {e}"))?;
        if leaf.spki_der != t.spki_der {
            return Err("it certifies another public key than the CSR's".into());
        }
        verify_cert_signed_by(der, &self.cfg.chain_der[0])
            .map_err(|_| "it is not signed by the configured CA certificate".to_string())?;
        let (nb, na) = (leaf.not_before, leaf.not_after);
        if na <= t.now {
            return Err("it has already expired".into());
        }
        if nb > t.now + VALIDITY_SLACK_SECS {
            return Err("it is not valid yet".into());
        }
        if na > t.now + t.validity_secs as i64 + VALIDITY_SLACK_SECS {
            return Err(format!(
                "it is valid until {na}, beyond the approved {} s",
                t.validity_secs
            ));
        }
        let tolerated = |n| self.cfg.not_honoured.contains(&n);
        // Subject: exactly the approved CN (and O unless declared not honoured).
        if let Some(oid) = leaf.other_subject_attributes.first() {
            return Err(format!("its subject has an unapproved attribute {oid}"));
        }
        if leaf.common_names != [t.common_name.clone()] {
            return Err(format!(
                "its subject CN is {:?}, approved {:?}",
                leaf.common_names, t.common_name
            ));
        }
        let want_org: Vec<String> = t.organization.iter().cloned().collect();
        if leaf.organizations != want_org
            && !(leaf.organizations.is_empty() && tolerated(NotHonoured::Organization))
        {
            return Err(format!(
                "its subject O is {:?}, approved {want_org:?}",
                leaf.organizations
            ));
        }
        // subjectAltName: nothing unapproved, nothing approved missing (URIs if declared).
        let mut got: Vec<SanEntry> = Vec::new();
        got.extend(
            leaf.dns_names
                .iter()
                .map(|d| SanEntry::Dns(d.to_ascii_lowercase())),
        );
        got.extend(leaf.uris.iter().map(|u| SanEntry::Uri(u.clone())));
        for ip in &leaf.ips {
            got.push(SanEntry::Ip(
                ip.parse()
                    .map_err(|_| "its subjectAltName has a bad IP address")?,
            ));
        }
        for g in &got {
            if !t.sans.contains(g) {
                return Err(format!("it names {g:?}, which was not approved"));
            }
        }
        for w in &t.sans {
            let missing_ok = matches!(w, SanEntry::Uri(_)) && tolerated(NotHonoured::UriSan);
            if !got.contains(w) && !missing_ok {
                return Err(format!("it does not name the approved {w:?}"));
            }
        }
        // Usage: an end entity for TLS, digitalSignature, the approved EKUs.
        if leaf.is_ca {
            return Err("it is a CA certificate".into());
        }
        if !leaf.digital_signature || leaf.key_cert_sign {
            return Err("its keyUsage is not digitalSignature".into());
        }
        let has = |e: &str| leaf.ekus.iter().any(|x| x == e);
        if t.client_auth && !has("clientAuth") {
            return Err("its extendedKeyUsage lacks clientAuth".into());
        }
        if t.server_auth && !has("serverAuth") && !tolerated(NotHonoured::ServerAuth) {
            return Err("its extendedKeyUsage lacks serverAuth".into());
        }
        Ok(IssuedCert {
            fingerprint: leaf.fingerprint,
            der: der.to_vec(),
            serial_hex: leaf.serial_hex,
            not_before: nb,
            not_after: na,
        })
    }
}

/// Reads a CFSSL API answer: 5xx is the CA being down; anything but `200` with
/// `"success": true` is a refusal, reported with the CA's first message.
fn read_answer(url: &str, status: u16, text: &str) -> Result<Value, CallError> {
    if status >= 500 {
        return Err(CallError::Down(format!("{url} answered {status}")));
    }
    let v: Value = serde_json::from_str(text).map_err(|_| {
        CallError::Bad(format!(
            "{url} answered {status} with something that is not JSON"
        ))
    })?;
    if status != 200 || v["success"] != json!(true) {
        let msg = v["errors"][0]["message"].as_str().unwrap_or("no message");
        return Err(CallError::Bad(format!("{url} refused ({status}): {msg}")));
    }
    Ok(v)
}

impl CertIssuer for CfsslIssuer {
    fn issue(&self, t: &CertTemplate) -> Result<IssuedCert, Error> {
        self.breaker_check()?;
        let req = self.request(t)?;
        let (path, body) = match &self.cfg.auth_key {
            None => ("/api/v1/cfssl/sign", req),
            Some(key) => {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD;
                let bytes = serde_json::to_vec(&req).map_err(|e| Error::Encoding(e.to_string()))?;
                let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &bytes);
                (
                    "/api/v1/cfssl/authsign",
                    json!({ "token": b64.encode(tag.as_ref()), "request": b64.encode(&bytes) }),
                )
            }
        };
        let answer = match self.post(path, &body) {
            Ok(v) => {
                self.record(true, "");
                v
            }
            Err(CallError::Down(reason)) => {
                self.record(false, &reason);
                return Err(Error::Unavailable(reason));
            }
            Err(CallError::Bad(reason)) => {
                self.record(true, "");
                return Err(Error::BadCertificate(reason));
            }
        };
        self.accept(t, &answer)
    }

    fn chain_der(&self) -> &[Vec<u8>] {
        &self.cfg.chain_der
    }

    fn sign_crl(&self, _: u64, _: i64, _: i64, _: &[RevokedEntry]) -> Result<Vec<u8>, Error> {
        Err(Error::Config(
            "the external CA publishes its own CRL; this ECS cannot sign one for it".into(),
        ))
    }

    /// While the breaker is open, a due probe (`/api/v1/cfssl/info`) may close it.
    fn ready(&self) -> Result<(), String> {
        let open = {
            let b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
            match &*b {
                Breaker::Closed { .. } => return Ok(()),
                Breaker::Open { until, reason } => (Instant::now() >= *until, reason.clone()),
            }
        };
        match open {
            (false, reason) => Err(format!("external CA down: {reason}")),
            (true, _) => match self.post("/api/v1/cfssl/info", &json!({})) {
                Ok(_) | Err(CallError::Bad(_)) => {
                    self.record(true, "");
                    tracing::info!(backend = %self.cfg.name, "external CA answers again: circuit closed");
                    Ok(())
                }
                Err(CallError::Down(reason)) => {
                    self.record(false, &reason);
                    Err(format!("external CA down: {reason}"))
                }
            },
        }
    }

    fn revocation_published(&self) -> bool {
        false
    }
}
