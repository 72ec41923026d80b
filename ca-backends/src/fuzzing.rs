//! Entry points of the fuzz targets (`fuzz/`, `scripts/fuzz`) for the parsers of this crate
//! that see outside input, shared with the regression test that replays their corpora in
//! `./scripts/test`. Each takes arbitrary bytes; the only failure is a panic (or, under the
//! fuzzer, unbounded memory or time).

use crate::cfssl::{CfsslConfig, CfsslIssuer};
use crate::{
    CaParams, CertTemplate, KeySigner, LocalIssuer, SanEntry, SoftwareKey, chain, der_to_pem,
    make_ca_certificate, parse_csr,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A published P-256 test key, fuzzing only: the external CA's key, so that answers signed
/// with it (the seeds) reach every check after the signature.
const CA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgbRErEMPhpLwcBoFo
eWZFqEYLdxzZb64eime/KZ+/pYmhRANCAATpb+1MMBPmkVl6Z48CQ7i3gOhCLxNR
7xnTN2I626kLwqrwC4Cb9LNT8OJZsDGuzhWSz79olYtL6GtxTJ/IsoMF
-----END PRIVATE KEY-----
";

/// A published P-256 test key, fuzzing only: the EES's key the approval names.
const EES_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg383LEkfzo0/+ZGQR
0ABlnnlpycgQY2iXeJcO004WWEKhRANCAATVK1gSZnxD4dQ/cWYTUzU86OfNbj47
csdvmbvA1qml089htL9q3JN/ih110K6jE9dW5HizUAaIghG9B2LAFl7I
-----END PRIVATE KEY-----
";

/// The decision time of every fuzzed check (2026-11-27T00:00:00Z): fixed, so that a seed
/// stays valid and a crash input replays the same way.
pub const NOW: i64 = 1_795_737_600;

struct Fixture {
    ca: Arc<LocalIssuer>,
    cfssl: CfsslIssuer,
    template: CertTemplate,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ca_key: Arc<dyn KeySigner> =
            Arc::new(SoftwareKey::from_pkcs8_pem(CA_KEY).expect("fixed CA key"));
        let ca_cert = make_ca_certificate(
            ca_key.as_ref(),
            &CaParams {
                subject: "CN=Fuzzing External CA".into(),
                spki_der: ca_key.public_key_der().to_vec(),
                not_before: NOW - 86_400,
                not_after: NOW + 10 * 365 * 86_400,
                path_len: Some(0),
                crl_url: None,
                serial: Some(vec![0x1f; 16]),
            },
        )
        .expect("fixed CA certificate");
        let ca = Arc::new(LocalIssuer::new(ca_key, vec![ca_cert.der.clone()]).expect("CA"));
        let cfssl = CfsslIssuer::new(CfsslConfig {
            name: "fuzz".into(),
            // Never called: answers are handed to check_answer directly.
            url: "http://127.0.0.1:9".into(),
            profile: None,
            auth_key: None,
            chain_der: vec![ca_cert.der],
            tls_roots_der: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(1),
            not_honoured: Vec::new(),
        })
        .expect("cfssl issuer");
        let ees = SoftwareKey::from_pkcs8_pem(EES_KEY).expect("fixed EES key");
        let template = CertTemplate {
            common_name: "ees-1.ecsp.example".into(),
            organization: Some("prov-1".into()),
            sans: vec![SanEntry::Dns("ees-1.ecsp.example".into())],
            spki_der: ees.public_key_der().to_vec(),
            now: NOW,
            validity_secs: 30 * 86_400,
            client_auth: true,
            server_auth: true,
            crl_url: None,
            csr_pem: None,
        };
        Fixture {
            ca,
            cfssl,
            template,
        }
    })
}

/// A CSR as an EES sends it (PEM text), and the same bytes as DER inside a PEM block.
pub fn csr(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_csr(text);
    }
    let _ = parse_csr(&der_to_pem(data, "CERTIFICATE REQUEST"));
}

/// A certificate chain as a client presents it: DER certificates one after another. The
/// leaf's facts are read, then the path validated to the fixed CA and, so that fuzzed
/// anchors are exercised too, to the chain's own last certificate.
pub fn certificate_chain(data: &[u8]) {
    let certs = split_der(data);
    if let Some(leaf) = certs.first() {
        let _ = chain::leaf_facts(leaf);
    }
    if certs.is_empty() {
        return;
    }
    let mut anchors = fixture().ca.chain_der().to_vec();
    anchors.extend(certs.last().cloned());
    let _ = chain::validate_path(&certs, &anchors, NOW);
}

/// An external CA's answer to a sign request (HTTP 200 body).
pub fn cfssl_answer(data: &[u8]) {
    let f = fixture();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = f.cfssl.check_answer(&f.template, 200, text);
    }
}

/// A key ceremony file (TOML), parsed and checked without an HSM.
pub fn ceremony_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::ceremony::CeremonyConfig::parse(text, std::path::Path::new("/nonexistent"));
    }
}

/// A well-formed answer of the fuzzing external CA, for the seed corpus.
pub fn cfssl_seed_answer() -> String {
    let f = fixture();
    let cert = f.ca.issue(&f.template).expect("seed certificate");
    serde_json::json!({
        "success": true,
        "result": { "certificate": der_to_pem(&cert.der, "CERTIFICATE") },
        "errors": [],
        "messages": [],
    })
    .to_string()
}

/// The fuzzing CA's certificate followed by a leaf it issued, for the seed corpus.
pub fn chain_seed() -> Vec<u8> {
    let f = fixture();
    let cert = f.ca.issue(&f.template).expect("seed certificate");
    let mut out = cert.der;
    out.extend_from_slice(&f.ca.chain_der()[0]);
    out
}

/// Splits consecutive DER TLVs (stops at the first that does not frame).
fn split_der(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 8 {
        let (len, header) = match data[1] {
            n if n < 0x80 => (n as usize, 2usize),
            0x81 if data.len() >= 3 => (data[2] as usize, 3),
            0x82 if data.len() >= 4 => (u16::from_be_bytes([data[2], data[3]]) as usize, 4),
            _ => break,
        };
        let Some(end) = header.checked_add(len).filter(|e| *e <= data.len()) else {
            break;
        };
        out.push(data[..end].to_vec());
        data = &data[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_seeds_pass_every_check() {
        let f = super::fixture();
        let answer = super::cfssl_seed_answer();
        f.cfssl.check_answer(&f.template, 200, &answer).unwrap();
        let chain = super::split_der(&super::chain_seed());
        assert_eq!(chain.len(), 2);
        crate::chain::validate_path(&chain, f.ca.chain_der(), super::NOW).unwrap();
    }
}
