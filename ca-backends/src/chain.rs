//! Third-party certificate chains: the facts of a leaf, path validation to a set of trust
//! anchors, and revocation against CRLs, with rustls-webpki doing the cryptography and
//! RFC 5280 path checks (signatures, validity at a given time, basicConstraints, keyUsage,
//! name constraints). What the facts *mean* is the policy's decision.

use crate::{Error, PublicKeyInfo, classify_spki, sha256_hex};
use der::{Decode, Encode};
use rustls::pki_types::{CertificateDer, UnixTime};
use std::time::Duration;
use webpki::{
    EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};

/// What the policy (and the passthrough's checks) need to know about a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafFacts {
    pub common_names: Vec<String>,
    pub organizations: Vec<String>,
    /// OIDs of subject attributes other than CN and O.
    pub other_subject_attributes: Vec<String>,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub ips: Vec<String>,
    /// `clientAuth`, `serverAuth`, or the dotted OID of any other purpose.
    pub ekus: Vec<String>,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// Whether the certificate has a keyUsage extension at all (absent: every use allowed).
    pub has_key_usage: bool,
    /// keyUsage bits that matter for an end entity.
    pub digital_signature: bool,
    pub key_cert_sign: bool,
    /// The certified public key, DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub key: PublicKeyInfo,
    pub serial_hex: String,
    pub fingerprint: String,
}

impl LeafFacts {
    /// Every name the certificate carries: its subjectAltName dNSNames, URIs and IP addresses
    /// (as text). The subject CN is never a name (RFC 9525 §6.4.4): a leaf without a
    /// subjectAltName names nothing.
    pub fn names(&self) -> Vec<String> {
        self.dns_names
            .iter()
            .chain(&self.uris)
            .chain(&self.ips)
            .cloned()
            .collect()
    }
}

/// Reads the facts of a leaf certificate.
pub fn leaf_facts(der: &[u8]) -> Result<LeafFacts, Error> {
    let cert =
        Certificate::from_der(der).map_err(|e| Error::Encoding(format!("certificate: {e}")))?;
    let tbs = cert.tbs_certificate();
    let (mut common_names, mut organizations, mut other_subject_attributes) =
        (Vec::new(), Vec::new(), Vec::new());
    for rdn in tbs.subject().as_ref().iter() {
        for atv in rdn.iter() {
            let text = || {
                atv.value
                    .decode_as::<der::asn1::Utf8StringRef>()
                    .map(|s| s.to_string())
                    .or_else(|_| {
                        atv.value
                            .decode_as::<der::asn1::PrintableStringRef>()
                            .map(|s| s.to_string())
                    })
                    .or_else(|_| {
                        atv.value
                            .decode_as::<der::asn1::Ia5StringRef>()
                            .map(|s| s.to_string())
                    })
                    .unwrap_or_default()
            };
            if atv.oid == const_oid::db::rfc4519::CN {
                common_names.push(text());
            } else if atv.oid == const_oid::db::rfc4519::O {
                organizations.push(text());
            } else {
                other_subject_attributes.push(atv.oid.to_string());
            }
        }
    }
    let (mut dns_names, mut uris, mut ips) = (Vec::new(), Vec::new(), Vec::new());
    if let Ok(Some((_, san))) = tbs.get_extension::<SubjectAltName>() {
        for g in san.0 {
            match g {
                GeneralName::DnsName(d) => dns_names.push(d.to_string()),
                GeneralName::UniformResourceIdentifier(u) => uris.push(u.to_string()),
                GeneralName::IpAddress(o) => {
                    let b = o.as_bytes();
                    let ip: Option<std::net::IpAddr> = match b.len() {
                        4 => <[u8; 4]>::try_from(b).ok().map(Into::into),
                        16 => <[u8; 16]>::try_from(b).ok().map(Into::into),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        ips.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let ekus = match tbs.get_extension::<ExtendedKeyUsage>() {
        Ok(Some((_, e))) => {
            e.0.iter()
                .map(|oid| {
                    if *oid == const_oid::db::rfc5280::ID_KP_CLIENT_AUTH {
                        "clientAuth".to_string()
                    } else if *oid == const_oid::db::rfc5280::ID_KP_SERVER_AUTH {
                        "serverAuth".to_string()
                    } else {
                        oid.to_string()
                    }
                })
                .collect()
        }
        _ => Vec::new(),
    };
    let spki = tbs.subject_public_key_info().to_der()?;
    let is_ca = tbs
        .get_extension::<x509_cert::ext::pkix::BasicConstraints>()
        .ok()
        .flatten()
        .is_some_and(|(_, b)| b.ca);
    let ku = tbs
        .get_extension::<x509_cert::ext::pkix::KeyUsage>()
        .ok()
        .flatten()
        .map(|(_, k)| k);
    Ok(LeafFacts {
        common_names,
        organizations,
        other_subject_attributes,
        is_ca,
        has_key_usage: ku.is_some(),
        digital_signature: ku.is_some_and(|k| k.digital_signature()),
        key_cert_sign: ku.is_some_and(|k| k.key_cert_sign()),
        dns_names,
        uris,
        ips,
        ekus,
        not_before: tbs.validity().not_before.to_unix_duration().as_secs() as i64,
        not_after: tbs.validity().not_after.to_unix_duration().as_secs() as i64,
        key: classify_spki(&spki)?,
        spki_der: spki,
        serial_hex: crate::issuer::serial_hex(tbs.serial_number()),
        fingerprint: sha256_hex(der),
    })
}

/// EKUs are the policy's to judge (`require_eku`), so path validation accepts any.
struct AnyEku;

impl ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, _: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

fn time(now: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(now.max(0) as u64))
}

fn algorithms() -> &'static [&'static dyn rustls::pki_types::SignatureVerificationAlgorithm] {
    rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all
}

/// The leaf and intermediates of a presented chain, as webpki wants them.
fn parse_chain(chain: &[Vec<u8>]) -> Result<(CertificateDer<'_>, Vec<CertificateDer<'_>>), String> {
    let leaf = CertificateDer::from(
        chain
            .first()
            .ok_or("no certificate was presented")?
            .as_slice(),
    );
    let intermediates = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    Ok((leaf, intermediates))
}

/// Validates the path from `chain[0]` (the leaf, then the intermediates the client sent) to
/// one of `anchors` at time `now`. Returns the index of the anchor reached, or why none was.
pub fn validate_path(chain: &[Vec<u8>], anchors: &[Vec<u8>], now: i64) -> Result<usize, String> {
    let (leaf_der, intermediates) = parse_chain(chain)?;
    let leaf = EndEntityCert::try_from(&leaf_der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let mut last = String::from("no trust anchor is configured");
    for (i, a) in anchors.iter().enumerate() {
        let a_der = CertificateDer::from(a.as_slice());
        let anchor = match webpki::anchor_from_trusted_cert(&a_der) {
            Ok(t) => t,
            Err(e) => {
                last = format!("trust anchor {i} does not parse: {e}");
                continue;
            }
        };
        match leaf.verify_for_usage(
            algorithms(),
            &[anchor],
            &intermediates,
            time(now),
            AnyEku,
            None,
            None,
        ) {
            Ok(_) => return Ok(i),
            Err(e) => last = describe(&e),
        }
    }
    Err(last)
}

fn describe(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => "it does not chain to a trusted anchor".into(),
        E::CertExpired { .. } => "a certificate of the chain has expired".into(),
        E::CertNotValidYet { .. } => "a certificate of the chain is not valid yet".into(),
        E::CaUsedAsEndEntity => "the leaf is a CA certificate".into(),
        E::NameConstraintViolation => "a name violates the issuer's name constraints".into(),
        E::PathLenConstraintViolated => "the chain exceeds a path length constraint".into(),
        E::InvalidSignatureForPublicKey => "a signature in the chain does not verify".into(),
        other => format!("path validation failed: {other:?}"),
    }
}

/// Checks every certificate of the chain below the anchor against `crls` (DER) at `now`. A
/// certificate listed is refused, and so is one whose issuer no given CRL covers, or whose
/// CRL has expired: revocation fails closed.
pub fn check_revocation(
    chain: &[Vec<u8>],
    anchor: &[u8],
    crls: &[Vec<u8>],
    now: i64,
) -> Result<(), String> {
    let parsed: Vec<webpki::CertRevocationList<'_>> = crls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            webpki::BorrowedCertRevocationList::from_der(c)
                .map(webpki::CertRevocationList::from)
                .map_err(|e| format!("CRL {i} does not parse: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<&webpki::CertRevocationList<'_>> = parsed.iter().collect();
    let options = RevocationOptionsBuilder::new(&refs)
        .map_err(|_| "no CRL is available".to_string())?
        // Every certificate of the path, not only the leaf: a revoked intermediate revokes
        // everything under it.
        .with_depth(RevocationCheckDepth::Chain)
        .with_status_policy(UnknownStatusPolicy::Deny)
        .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
        .build();
    let (leaf_der, intermediates) = parse_chain(chain)?;
    let leaf = EndEntityCert::try_from(&leaf_der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let a_der = CertificateDer::from(anchor);
    let anchor = webpki::anchor_from_trusted_cert(&a_der).map_err(|e| e.to_string())?;
    leaf.verify_for_usage(
        algorithms(),
        &[anchor],
        &intermediates,
        time(now),
        AnyEku,
        Some(options),
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::CertRevoked => "the certificate is revoked on a configured CRL".into(),
        webpki::Error::UnknownRevocationStatus => {
            "no configured CRL covers the certificate's issuer".into()
        }
        webpki::Error::CrlExpired { .. } => "a configured CRL has expired (fail closed)".into(),
        other => format!("revocation check failed: {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        CaParams, CertTemplate, KeySigner, LocalIssuer, RevocationReason, RevokedEntry, SanEntry,
        SoftwareKey, generate_p256_pkcs8_pem, make_ca_certificate,
    };
    use std::sync::Arc;

    fn key() -> Arc<SoftwareKey> {
        Arc::new(SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap())
    }

    fn ca_params(subject: &str, key: &SoftwareKey, now: i64, path_len: u8) -> CaParams {
        CaParams {
            subject: subject.into(),
            spki_der: key.public_key_der().to_vec(),
            not_before: now - 3600,
            not_after: now + 365 * 86_400,
            path_len: Some(path_len),
            crl_url: None,
            serial: None,
        }
    }

    /// Attack review, item 4: a leaf under an intermediate that the root's CRL revokes was
    /// accepted, because only the end entity was checked.
    #[test]
    fn a_revoked_intermediate_revokes_the_leaves_under_it() {
        let now = crate::now_unix();
        let root_key = key();
        let root_cert = make_ca_certificate(
            root_key.as_ref(),
            &ca_params("CN=Partner Root", &root_key, now, 1),
        )
        .unwrap();
        let root = LocalIssuer::new(root_key, vec![root_cert.der.clone()]).unwrap();
        let int_key = key();
        let int_cert = root
            .issue_ca(&ca_params("CN=Partner Issuing", &int_key, now, 0))
            .unwrap();
        let intermediate =
            LocalIssuer::new(int_key, vec![int_cert.der.clone(), root_cert.der.clone()]).unwrap();
        let leaf_key = key();
        let leaf = intermediate
            .issue(&CertTemplate {
                common_name: "ees1.example".into(),
                organization: None,
                sans: vec![SanEntry::Dns("ees1.example".into())],
                spki_der: leaf_key.public_key_der().to_vec(),
                now,
                validity_secs: 86_400,
                client_auth: true,
                server_auth: true,
                crl_url: None,
                csr_pem: None,
            })
            .unwrap();
        let chain = vec![leaf.der.clone(), int_cert.der.clone()];
        let int_crl = intermediate
            .sign_crl(1, now - 60, now + 86_400, &[])
            .unwrap();
        let root_crl =
            |revoked: &[RevokedEntry]| root.sign_crl(1, now - 60, now + 86_400, revoked).unwrap();
        assert_eq!(
            check_revocation(
                &chain,
                &root_cert.der,
                &[root_crl(&[]), int_crl.clone()],
                now
            ),
            Ok(())
        );
        let revoked = root_crl(&[RevokedEntry {
            serial_hex: int_cert.serial_hex.clone(),
            revoked_at: now - 60,
            reason: RevocationReason::KeyCompromise,
        }]);
        let why =
            check_revocation(&chain, &root_cert.der, &[revoked, int_crl.clone()], now).unwrap_err();
        assert!(why.contains("revoked"), "{why}");
        // Without the root's CRL, the intermediate's status is unknown: refused (fail closed).
        assert!(check_revocation(&chain, &root_cert.der, &[int_crl], now).is_err());
    }
}
