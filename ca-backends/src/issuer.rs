//! The local issuer: certificates and CRLs built from an approved template, signed by any
//! [`KeySigner`], and checked before they leave.

use crate::{Error, KeySigner, SigAlg, SignatureChecker, verify_signature};
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use const_oid::db::rfc5280;
use der::asn1::{BitString, Ia5String, OctetString};
use der::{Decode, Encode};
use spki::{AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier, EncodePublicKey};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::{Certificate, TbsCertificate};
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, CrlDistributionPoints, CrlNumber, CrlReason,
    ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

/// How long before "now" a certificate's `notBefore` is set, so that a peer whose clock is a
/// little behind accepts it at once.
pub const BACKDATE_SECS: i64 = 300;

/// One subjectAltName entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanEntry {
    Dns(String),
    Ip(IpAddr),
    Uri(String),
}

/// What the RA approved: everything that goes into a certificate except the issuer's part.
#[derive(Debug, Clone)]
pub struct CertTemplate {
    pub common_name: String,
    pub organization: Option<String>,
    pub sans: Vec<SanEntry>,
    /// The subject's public key, DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// The decision time, seconds since the epoch.
    pub now: i64,
    /// Requested lifetime; capped at the issuing CA's `notAfter`.
    pub validity_secs: u64,
    pub client_auth: bool,
    pub server_auth: bool,
    /// The URL of the issuing CA's CRL, put in cRLDistributionPoints.
    pub crl_url: Option<String>,
    /// The EES's CSR as it arrived, for issuers that forward it (the passthrough).
    pub csr_pem: Option<String>,
}

/// A certificate that left the issuer, with the facts the store keeps about it.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub der: Vec<u8>,
    /// Lower-case hex of the serial's DER content bytes.
    pub serial_hex: String,
    /// SHA-256 of the DER, lower-case hex.
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// CRL reason codes the ECS uses, named as RFC 5280 names them (in records, ceremony files
/// and messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    Superseded,
    CessationOfOperation,
}

impl RevocationReason {
    /// The RFC 5280 name: `unspecified`, `keyCompromise`, `superseded`,
    /// `cessationOfOperation`.
    pub fn name(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
        }
    }

    /// The reason an RFC 5280 name names, if it is one the ECS uses.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            RevocationReason::Unspecified,
            RevocationReason::KeyCompromise,
            RevocationReason::Superseded,
            RevocationReason::CessationOfOperation,
        ]
        .into_iter()
        .find(|r| r.name() == name)
    }

    fn crl_reason(self) -> CrlReason {
        match self {
            RevocationReason::Unspecified => CrlReason::Unspecified,
            RevocationReason::KeyCompromise => CrlReason::KeyCompromise,
            RevocationReason::Superseded => CrlReason::Superseded,
            RevocationReason::CessationOfOperation => CrlReason::CessationOfOperation,
        }
    }
}

/// One entry of a CRL.
#[derive(Debug, Clone)]
pub struct RevokedEntry {
    pub serial_hex: String,
    pub revoked_at: i64,
    pub reason: RevocationReason,
}

/// Parameters of a CA certificate (used by `ecsd init`, and later the key ceremony).
#[derive(Debug, Clone)]
pub struct CaParams {
    pub subject: String,
    pub spki_der: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub path_len: Option<u8>,
    /// Where this CA's issuer publishes its CRL (cRLDistributionPoints), if anywhere.
    pub crl_url: Option<String>,
    /// Serial octets (e.g. from the HSM's RNG); absent: 20 octets from the OS CSPRNG.
    pub serial: Option<Vec<u8>>,
}

/// Something that issues certificates for approved templates and signs its CA's CRL: the
/// local issuer over any [`KeySigner`] today; an external CA behind a passthrough is another.
pub trait CertIssuer: Send + Sync {
    /// Issues an end-entity certificate from an approved template. May block.
    fn issue(&self, t: &CertTemplate) -> Result<IssuedCert, Error>;
    /// The chain returned with each certificate: issuing CA first, up to the root.
    fn chain_der(&self) -> &[Vec<u8>];
    /// Signs a CRL of the issuing CA. May block.
    fn sign_crl(
        &self,
        number: u64,
        this_update: i64,
        next_update: i64,
        revoked: &[RevokedEntry],
    ) -> Result<Vec<u8>, Error>;
    /// Whether the issuer can sign now; `Err` says why not. May block (a probe).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    /// Whether a revocation recorded by the ECS reaches relying parties (on this issuer's
    /// CRL). An external CA without a revocation API answers false.
    fn revocation_published(&self) -> bool {
        true
    }
    /// The key that signs in this process and the checker of its signatures, when one does
    /// (an external CA signs elsewhere).
    fn signer(&self) -> Option<(&dyn KeySigner, &SignatureChecker)> {
        None
    }
}

impl CertIssuer for LocalIssuer {
    fn issue(&self, t: &CertTemplate) -> Result<IssuedCert, Error> {
        LocalIssuer::issue(self, t)
    }
    fn chain_der(&self) -> &[Vec<u8>] {
        LocalIssuer::chain_der(self)
    }
    fn sign_crl(
        &self,
        number: u64,
        this_update: i64,
        next_update: i64,
        revoked: &[RevokedEntry],
    ) -> Result<Vec<u8>, Error> {
        LocalIssuer::sign_crl(self, number, this_update, next_update, revoked)
    }
    fn ready(&self) -> Result<(), String> {
        self.signer.ready()
    }
    fn signer(&self) -> Option<(&dyn KeySigner, &SignatureChecker)> {
        Some((self.signer.as_ref(), &self.checker))
    }
}

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

/// An issuing CA: its key (any backend) and its certificate chain.
pub struct LocalIssuer {
    signer: Arc<dyn KeySigner>,
    /// Checks each signature the signer makes, with the key parsed once.
    checker: SignatureChecker,
    ca: Certificate,
    chain_der: Vec<Vec<u8>>,
    ca_not_after: i64,
    rng: SystemRandom,
    /// What every certificate takes from the issuing CA, read once from it.
    issuer_name: Name,
    issuer_ski: Option<Vec<u8>>,
    /// The CRL distribution point extension, encoded at the first issuance that names its
    /// URL (an issuer's backend names one URL, known at start).
    crl_pointer: std::sync::OnceLock<(String, Extension)>,
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("subject", &self.ca.tbs_certificate().subject().to_string())
            .finish_non_exhaustive()
    }
}

impl LocalIssuer {
    /// Builds an issuer from a signer and its chain (issuing CA first, up to the root).
    ///
    /// Refuses a key that does not belong to the issuing certificate, an issuing certificate
    /// that is not a CA, and a chain whose links do not verify.
    pub fn new(signer: Arc<dyn KeySigner>, chain_der: Vec<Vec<u8>>) -> Result<Self, Error> {
        let first = chain_der
            .first()
            .ok_or_else(|| Error::Encoding("empty CA chain".into()))?;
        let ca = Certificate::from_der(first)
            .map_err(|e| Error::Encoding(format!("issuing CA certificate: {e}")))?;
        let ca_spki = ca.tbs_certificate().subject_public_key_info().to_der()?;
        if ca_spki != signer.public_key_der() {
            return Err(Error::KeyMismatch(
                "the private key does not belong to the issuing CA certificate".into(),
            ));
        }
        let is_ca = ca
            .tbs_certificate()
            .get_extension::<BasicConstraints>()
            .ok()
            .flatten()
            .is_some_and(|(_, bc)| bc.ca);
        if !is_ca {
            return Err(Error::Encoding(
                "the issuing certificate is not a CA (basicConstraints cA is not true)".into(),
            ));
        }
        for pair in chain_der.windows(2) {
            verify_cert_signed_by(&pair[0], &pair[1]).map_err(|_| {
                Error::Encoding("CA chain: a certificate is not signed by the next one".into())
            })?;
        }
        let ca_not_after = unix(ca.tbs_certificate().validity().not_after);
        let checker = SignatureChecker::new(
            signer.public_key_der(),
            &signer.algorithm().algorithm_identifier().oid,
        )?;
        Ok(LocalIssuer {
            checker,
            signer,
            issuer_name: ca.tbs_certificate().subject().clone(),
            issuer_ski: ski_of(&ca),
            ca,
            chain_der,
            ca_not_after,
            rng: SystemRandom::new(),
            crl_pointer: std::sync::OnceLock::new(),
        })
    }

    /// The chain, issuing CA first.
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain_der
    }

    /// The issuing CA's `notAfter`, seconds since the epoch.
    pub fn ca_not_after(&self) -> i64 {
        self.ca_not_after
    }

    /// Issues an end-entity certificate from an approved template.
    pub fn issue(&self, t: &CertTemplate) -> Result<IssuedCert, Error> {
        let not_before = t.now - BACKDATE_SECS;
        let not_after = not_before
            .saturating_add(t.validity_secs.min(i64::MAX as u64) as i64)
            .min(self.ca_not_after);
        if not_after <= t.now {
            return Err(Error::Signing(
                "the issuing CA expires before a certificate could be valid".into(),
            ));
        }
        let mut subject = Vec::new();
        if let Some(o) = &t.organization {
            subject.push(("O", o.as_str()));
        }
        subject.push(("CN", t.common_name.as_str()));
        let subject = name_of(&subject)?;

        let mut sans = Vec::new();
        for s in &t.sans {
            sans.push(match s {
                SanEntry::Dns(d) => GeneralName::DnsName(ia5(d)?),
                SanEntry::Uri(u) => GeneralName::UniformResourceIdentifier(ia5(u)?),
                SanEntry::Ip(ip) => GeneralName::from(*ip),
            });
        }
        let mut eku = Vec::new();
        if t.client_auth {
            eku.push(rfc5280::ID_KP_CLIENT_AUTH);
        }
        if t.server_auth {
            eku.push(rfc5280::ID_KP_SERVER_AUTH);
        }
        let mut ext = vec![
            extension(
                &BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
                true,
            )?,
            extension(&KeyUsage(KeyUsages::DigitalSignature.into()), true)?,
            extension(&ExtendedKeyUsage(eku), false)?,
        ];
        if !sans.is_empty() {
            ext.push(extension(&SubjectAltName(sans), false)?);
        }
        if let Some(url) = &t.crl_url {
            ext.push(self.crl_pointer(url)?);
        }
        self.sign_certificate(subject, &t.spki_der, not_before, not_after, ext)
    }

    /// The CRL distribution point extension for `url`: the one encoded before when it names
    /// the same URL.
    fn crl_pointer(&self, url: &str) -> Result<Extension, Error> {
        let encode = || Ok::<_, Error>(extension(&crl_distribution_points(url)?, false)?);
        match self.crl_pointer.get() {
            Some((known, ext)) if known == url => Ok(ext.clone()),
            Some(_) => encode(),
            None => {
                let ext = encode()?;
                let _ = self.crl_pointer.set((url.to_string(), ext.clone()));
                Ok(ext)
            }
        }
    }

    /// Issues a subordinate CA certificate with this issuer's key (the ceremony's
    /// intermediate, and `ecsd init`'s issuing CA under its root).
    pub fn issue_ca(&self, p: &CaParams) -> Result<IssuedCert, Error> {
        let prepared = self.prepare_ca(p)?;
        sign_prepared(self.signer.as_ref(), self.signer.public_key_der(), prepared)
    }

    /// The TBS of a subordinate CA certificate, ready to be linted and signed.
    pub fn prepare_ca(&self, p: &CaParams) -> Result<PreparedCert, Error> {
        let subject = parse_subject(&p.subject)?;
        let mut ext = ca_extensions(p.path_len)?;
        if let Some(url) = &p.crl_url {
            ext.push(extension(&crl_distribution_points(url)?, false)?);
        }
        prepare(
            self.signer.algorithm(),
            Profile {
                subject,
                issuer: Some(self.issuer_name.clone()),
                extensions: ext,
                issuer_ski: self.issuer_ski.clone(),
            },
            &p.spki_der,
            p.not_before,
            p.not_after,
            self.signer.public_key_der(),
            p.serial.as_deref(),
            &self.rng,
        )
    }

    fn sign_certificate(
        &self,
        subject: Name,
        spki_der: &[u8],
        not_before: i64,
        not_after: i64,
        extensions: Vec<Extension>,
    ) -> Result<IssuedCert, Error> {
        let prepared = prepare(
            self.signer.algorithm(),
            Profile {
                subject,
                issuer: Some(self.issuer_name.clone()),
                extensions,
                issuer_ski: self.issuer_ski.clone(),
            },
            spki_der,
            not_before,
            not_after,
            self.signer.public_key_der(),
            None,
            &self.rng,
        )?;
        sign_checked(self.signer.as_ref(), &self.checker, prepared)
    }

    /// The signer of this issuer.
    pub fn signer(&self) -> &dyn KeySigner {
        self.signer.as_ref()
    }

    /// The issuing CA certificate.
    pub fn ca_certificate(&self) -> &Certificate {
        &self.ca
    }

    /// Builds and signs a CRL of this issuer.
    pub fn sign_crl(
        &self,
        number: u64,
        this_update: i64,
        next_update: i64,
        revoked: &[RevokedEntry],
    ) -> Result<Vec<u8>, Error> {
        let mut entries: Vec<RevokedCert> = Vec::with_capacity(revoked.len());
        for r in revoked {
            let serial = hex::decode(&r.serial_hex)
                .map_err(|_| Error::Encoding(format!("serial {:?} is not hex", r.serial_hex)))?;
            entries.push(RevokedCert {
                serial_number: SerialNumber::new(&serial)?,
                revocation_date: time_of(r.revoked_at)?,
                crl_entry_extensions: Some(vec![extension(&r.reason.crl_reason(), false)?]),
            });
        }
        let aki = AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(
                ski_of(&self.ca).unwrap_or_else(|| ski_bytes(self.signer.public_key_der())),
            )?),
            ..Default::default()
        };
        let alg = self.signer.algorithm().algorithm_identifier();
        let tbs = TbsCertList {
            version: x509_cert::Version::V2,
            signature: alg.clone(),
            issuer: self.ca.tbs_certificate().subject().clone(),
            this_update: time_of(this_update)?,
            next_update: Some(time_of(next_update)?),
            revoked_certificates: (!entries.is_empty()).then_some(entries),
            crl_extensions: Some(vec![
                extension(&aki, false)?,
                extension(&CrlNumber::try_from(number)?, false)?,
            ]),
        };
        let tbs_der = tbs.to_der()?;
        let signature = self.signer.sign(&tbs_der)?;
        verify_signature(self.signer.public_key_der(), &alg.oid, &tbs_der, &signature).map_err(
            |_| Error::Signing("the signer produced a CRL signature that does not verify".into()),
        )?;
        let crl = CertificateList {
            tbs_cert_list: tbs,
            signature_algorithm: alg,
            signature: BitString::from_bytes(&signature)?,
        };
        Ok(crl.to_der()?)
    }
}

/// Makes a self-signed CA certificate (a root) with `signer`.
pub fn make_ca_certificate(signer: &dyn KeySigner, p: &CaParams) -> Result<IssuedCert, Error> {
    let prepared = prepare_root(signer, p)?;
    sign_prepared(signer, signer.public_key_der(), prepared)
}

/// The TBS of a self-signed CA certificate, ready to be linted and signed.
pub fn prepare_root(signer: &dyn KeySigner, p: &CaParams) -> Result<PreparedCert, Error> {
    let subject = parse_subject(&p.subject)?;
    if p.spki_der != signer.public_key_der() {
        return Err(Error::KeyMismatch("a root signs its own key".into()));
    }
    let mut ext = ca_extensions(p.path_len)?;
    if let Some(url) = &p.crl_url {
        ext.push(extension(&crl_distribution_points(url)?, false)?);
    }
    prepare(
        signer.algorithm(),
        Profile {
            subject,
            issuer: None,
            extensions: ext,
            issuer_ski: None,
        },
        &p.spki_der,
        p.not_before,
        p.not_after,
        signer.public_key_der(),
        p.serial.as_deref(),
        &SystemRandom::new(),
    )
}

/// A subject written most significant first, as people and OpenSSL write it
/// (`C=FI, O=Example MNO, CN=Example ECS Root CA`), or in RFC 4514 order when it starts with
/// `CN=`.
fn parse_subject(s: &str) -> Result<Name, Error> {
    let parts: Vec<&str> = split_unescaped(s, ',').into_iter().map(str::trim).collect();
    let rfc4514 = parts
        .first()
        .is_some_and(|p| p.to_ascii_uppercase().starts_with("CN="));
    let ordered: Vec<&str> = if rfc4514 || parts.len() == 1 {
        parts
    } else {
        parts.into_iter().rev().collect()
    };
    Name::from_str(&ordered.join(",")).map_err(|e| Error::Encoding(format!("subject {s:?}: {e}")))
}

fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            c if c == sep && !escaped => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
    }
    out.push(&s[start..]);
    out
}

fn ca_extensions(path_len: Option<u8>) -> Result<Vec<Extension>, Error> {
    Ok(vec![
        extension(
            &BasicConstraints {
                ca: true,
                path_len_constraint: path_len,
            },
            true,
        )?,
        extension(&KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign), true)?,
    ])
}

/// A TBSCertificate, encoded, with what the store keeps about it: what gets linted is
/// exactly what gets signed.
#[derive(Debug, Clone)]
pub struct PreparedCert {
    pub tbs_der: Vec<u8>,
    pub algorithm: AlgorithmIdentifierOwned,
    pub serial_hex: String,
    pub not_before: i64,
    pub not_after: i64,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    alg: SigAlg,
    profile: Profile,
    spki_der: &[u8],
    not_before: i64,
    not_after: i64,
    issuer_spki: &[u8],
    serial: Option<&[u8]>,
    rng: &SystemRandom,
) -> Result<PreparedCert, Error> {
    let spki = spki::SubjectPublicKeyInfoOwned::from_der(spki_der)
        .map_err(|e| Error::Encoding(format!("subject public key: {e}")))?;
    let serial = match serial {
        Some(bytes) => serial_from(bytes)?,
        None => random_serial(rng)?,
    };
    let serial_hex = serial_hex(&serial);
    let validity = Validity::new(time_of(not_before)?, time_of(not_after)?);
    let mut builder = CertificateBuilder::new(profile, serial, validity, spki)
        .map_err(|e| Error::Encoding(e.to_string()))?;
    let keypair = SignerKeypair {
        spki: issuer_spki.to_vec(),
        alg,
    };
    let tbs_der = builder
        .finalize(&keypair)
        .map_err(|e| Error::Encoding(e.to_string()))?;
    Ok(PreparedCert {
        tbs_der,
        algorithm: alg.algorithm_identifier(),
        serial_hex,
        not_before,
        not_after,
    })
}

/// Signs a prepared TBS with `signer`, verifies the signature with `issuer_spki` (distrust
/// the signer: an HSM that answers garbage is caught here), and assembles the certificate.
pub fn sign_prepared(
    signer: &dyn KeySigner,
    issuer_spki: &[u8],
    p: PreparedCert,
) -> Result<IssuedCert, Error> {
    sign_checked(
        signer,
        &SignatureChecker::new(issuer_spki, &p.algorithm.oid)?,
        p,
    )
}

/// [`sign_prepared`] with the issuer's key already parsed into `checker`.
pub fn sign_checked(
    signer: &dyn KeySigner,
    checker: &SignatureChecker,
    p: PreparedCert,
) -> Result<IssuedCert, Error> {
    let signature = signer.sign(&p.tbs_der)?;
    checker.verify(&p.tbs_der, &signature).map_err(|_| {
        Error::Signing("the signer produced a signature that does not verify".into())
    })?;
    let der = assemble(&p.tbs_der, &p.algorithm, &signature)?;
    Ok(IssuedCert {
        fingerprint: sha256_hex(&der),
        der,
        serial_hex: p.serial_hex,
        not_before: p.not_before,
        not_after: p.not_after,
    })
}

/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }` around
/// TBS bytes exactly as prepared.
pub fn assemble(
    tbs_der: &[u8],
    alg: &AlgorithmIdentifierOwned,
    signature: &[u8],
) -> Result<Vec<u8>, Error> {
    #[derive(der::Sequence)]
    struct Cert<'a> {
        tbs: der::asn1::AnyRef<'a>,
        alg: AlgorithmIdentifierOwned,
        sig: BitString,
    }
    Ok(Cert {
        tbs: der::asn1::AnyRef::from_der(tbs_der)?,
        alg: alg.clone(),
        sig: BitString::from_bytes(signature)?,
    }
    .to_der()?)
}

fn serial_from(bytes: &[u8]) -> Result<SerialNumber, Error> {
    let mut b = bytes.iter().copied().take(20).collect::<Vec<u8>>();
    if b.len() < 8 {
        return Err(Error::Encoding("a serial needs at least 64 bits".into()));
    }
    b[0] &= 0x7f;
    if b[0] == 0 {
        b[0] = 1;
    }
    Ok(SerialNumber::new(&b)?)
}

/// Verifies that `cert_der` is signed by the key of `issuer_der`.
pub fn verify_cert_signed_by(cert_der: &[u8], issuer_der: &[u8]) -> Result<(), Error> {
    let cert = Certificate::from_der(cert_der)?;
    let issuer = Certificate::from_der(issuer_der)?;
    let tbs = cert.tbs_certificate().to_der()?;
    let spki = issuer
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()?;
    let sig = cert
        .signature()
        .as_bytes()
        .ok_or_else(|| Error::Encoding("signature is not whole bytes".into()))?;
    verify_signature(&spki, &cert.signature_algorithm().oid, &tbs, sig)
}

/// A serial as records keep it and lookups find it: its INTEGER octets, lower-case hex.
pub fn serial_hex(serial: &SerialNumber) -> String {
    hex::encode(serial.as_bytes())
}

/// The serial of a DER certificate as [`serial_hex`] writes it; `None` if it is not one.
pub fn cert_serial_hex(der: &[u8]) -> Option<String> {
    let cert = Certificate::from_der(der).ok()?;
    Some(serial_hex(cert.tbs_certificate().serial_number()))
}

/// A serial of 20 octets from [`time_ordered`]: 14 of them from the CSPRNG (112 bits; the
/// CA/Browser Forum asks for at least 64). The first octet is 0x01 until 2039 and stays below
/// 0x80 (a positive number, never a leading zero) for millennia.
fn random_serial(rng: &SystemRandom) -> Result<SerialNumber, Error> {
    Ok(SerialNumber::new(&time_ordered::<20>(rng)?)?)
}

/// `N` octets that sort by when they were made: the milliseconds since the epoch in the
/// first 6, big-endian, then `N - 6` from `rng`. Identifiers made together are neighbours
/// in a store's indexes, where random ones would each rewrite an index page of their own.
pub fn time_ordered<const N: usize>(rng: &SystemRandom) -> Result<[u8; N], Error> {
    const { assert!(N > 6, "room for randomness after the milliseconds") };
    let mut bytes = [0u8; N];
    rng.fill(&mut bytes[6..])
        .map_err(|_| Error::Signing("the OS random generator failed".into()))?;
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::Signing("the clock is before 1970".into()))?
        .as_millis() as u64;
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Ok(bytes)
}

/// A name from (attribute, value) pairs, most significant first. Values go in as hex DER
/// UTF8Strings so no character of an EES ID can change the name's structure.
fn name_of(attrs: &[(&str, &str)]) -> Result<Name, Error> {
    let mut parts = Vec::new();
    for (attr, value) in attrs.iter().rev() {
        let utf8 = der::asn1::Utf8StringRef::new(value)?.to_der()?;
        parts.push(format!("{attr}=#{}", hex::encode(utf8)));
    }
    Name::from_str(&parts.join(",")).map_err(Error::from)
}

fn ia5(s: &str) -> Result<Ia5String, Error> {
    Ia5String::new(s).map_err(|_| Error::Encoding(format!("{s:?} is not IA5 (ASCII)")))
}

fn crl_distribution_points(url: &str) -> Result<CrlDistributionPoints, Error> {
    Ok(CrlDistributionPoints(vec![DistributionPoint {
        distribution_point: Some(DistributionPointName::FullName(vec![
            GeneralName::UniformResourceIdentifier(ia5(url)?),
        ])),
        reasons: None,
        crl_issuer: None,
    }]))
}

fn extension<T: const_oid::AssociatedOid + Encode>(
    value: &T,
    critical: bool,
) -> der::Result<Extension> {
    Ok(Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der()?)?,
    })
}

/// RFC 5280 §4.2.1.2 method (1): SHA-1 of the subjectPublicKey bits.
fn ski_bytes(spki_der: &[u8]) -> Vec<u8> {
    let bits = spki::SubjectPublicKeyInfoRef::from_der(spki_der)
        .map(|s| s.subject_public_key.raw_bytes().to_vec())
        .unwrap_or_default();
    digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &bits)
        .as_ref()
        .to_vec()
}

fn ski_of(cert: &Certificate) -> Option<Vec<u8>> {
    cert.tbs_certificate()
        .get_extension::<SubjectKeyIdentifier>()
        .ok()
        .flatten()
        .map(|(_, ski)| ski.0.as_bytes().to_vec())
}

fn time_of(unix_secs: i64) -> Result<Time, Error> {
    let t = UNIX_EPOCH + Duration::from_secs(unix_secs.max(0) as u64);
    Ok(Time::try_from(t)?)
}

fn unix(t: Time) -> i64 {
    t.to_system_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Seconds since the epoch now; only for callers outside the decision path.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Our certificate profile for x509-cert's builder: the RA decided every extension; the
/// profile adds only the key identifiers.
struct Profile {
    subject: Name,
    /// `None` for a self-signed certificate.
    issuer: Option<Name>,
    extensions: Vec<Extension>,
    issuer_ski: Option<Vec<u8>>,
}

impl BuilderProfile for Profile {
    fn get_issuer(&self, subject: &Name) -> Name {
        self.issuer.clone().unwrap_or_else(|| subject.clone())
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        spk: spki::SubjectPublicKeyInfoRef<'_>,
        issuer_spk: spki::SubjectPublicKeyInfoRef<'_>,
        _tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let ski = ski_bytes(&spk.to_der()?);
        let aki = self
            .issuer_ski
            .clone()
            .unwrap_or_else(|| ski_bytes(&issuer_spk.to_der().unwrap_or_default()));
        let mut out = self.extensions.clone();
        out.push(extension(
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(aki)?),
                ..Default::default()
            },
            false,
        )?);
        out.push(extension(
            &SubjectKeyIdentifier(OctetString::new(ski)?),
            false,
        )?);
        Ok(out)
    }
}

/// What x509-cert's builder needs to know of the signer: its public key and algorithm. The
/// signature itself is made by [`KeySigner::sign`], which may be an HSM round trip.
struct SignerKeypair {
    spki: Vec<u8>,
    alg: SigAlg,
}

#[derive(Clone)]
struct SpkiDer(Vec<u8>);

impl EncodePublicKey for SpkiDer {
    fn to_public_key_der(&self) -> spki::Result<der::Document> {
        Ok(der::Document::try_from(self.0.as_slice())?)
    }
}

impl signature::Keypair for SignerKeypair {
    type VerifyingKey = SpkiDer;
    fn verifying_key(&self) -> SpkiDer {
        SpkiDer(self.spki.clone())
    }
}

impl DynSignatureAlgorithmIdentifier for SignerKeypair {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(self.alg.algorithm_identifier())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SoftwareKey, generate_p256_pkcs8_pem};
    use x509_parser::prelude::*;

    fn key() -> Arc<SoftwareKey> {
        Arc::new(SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap())
    }

    /// A root and an issuing CA, as `ecsd init` makes them.
    pub(crate) fn test_issuer(now: i64) -> LocalIssuer {
        let root_key = key();
        let root = make_ca_certificate(
            root_key.as_ref(),
            &CaParams {
                subject: "CN=Test Root".into(),
                spki_der: root_key.public_key_der().to_vec(),
                not_before: now - 10,
                not_after: now + 10 * 365 * 86_400,
                path_len: Some(1),
                crl_url: None,
                serial: None,
            },
        )
        .unwrap();
        let root_issuer = LocalIssuer::new(root_key, vec![root.der.clone()]).unwrap();
        let ca_key = key();
        let ca = root_issuer
            .issue_ca(&CaParams {
                subject: "CN=Test Issuing CA".into(),
                spki_der: ca_key.public_key_der().to_vec(),
                not_before: now - 10,
                not_after: now + 5 * 365 * 86_400,
                path_len: Some(0),
                crl_url: None,
                serial: None,
            })
            .unwrap();
        LocalIssuer::new(ca_key, vec![ca.der, root.der]).unwrap()
    }

    #[test]
    fn an_ees_certificate_follows_the_profile() {
        let now = now_unix();
        let issuer = test_issuer(now);
        let ees = key();
        let cert = issuer
            .issue(&CertTemplate {
                common_name: "ees1.edn1.ecsp-a.example".into(),
                organization: Some("ecsp-a".into()),
                sans: vec![
                    SanEntry::Dns("ees1.edn1.ecsp-a.example".into()),
                    SanEntry::Ip("192.0.2.1".parse().unwrap()),
                    SanEntry::Uri("https://ees1.example/x".into()),
                ],
                spki_der: ees.public_key_der().to_vec(),
                now,
                validity_secs: 30 * 86_400,
                client_auth: true,
                server_auth: true,
                crl_url: Some("https://127.0.0.1:8443/pki/v1/crl".into()),
                csr_pem: None,
            })
            .unwrap();
        let (_, x) = X509Certificate::from_der(&cert.der).unwrap();
        assert_eq!(x.version(), X509Version::V3);
        assert_eq!(x.raw_serial().len(), 20);
        assert_eq!(x.raw_serial_as_string().replace(':', ""), cert.serial_hex);
        // A presented certificate's serial is read back the way the record wrote it.
        assert_eq!(
            cert_serial_hex(&cert.der).as_deref(),
            Some(&*cert.serial_hex)
        );
        assert_eq!(cert_serial_hex(b"not a certificate"), None);
        assert_eq!(
            x.subject().to_string(),
            "O=ecsp-a, CN=ees1.edn1.ecsp-a.example"
        );
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_encipherment());
        let eku = x.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.client_auth && eku.value.server_auth);
        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 3);
        assert!(
            x.get_extension_unique(&oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
                .unwrap()
                .is_some()
        );
        assert!(
            x.get_extension_unique(&oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
                .unwrap()
                .is_some()
        );
        assert!(
            x.get_extension_unique(&oid_registry::OID_X509_EXT_CRL_DISTRIBUTION_POINTS)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            x.validity().not_after.timestamp() - x.validity().not_before.timestamp(),
            30 * 86_400
        );
        verify_cert_signed_by(&cert.der, &issuer.chain_der()[0]).unwrap();
    }

    #[test]
    fn each_certificate_points_at_the_crl_its_template_names() {
        let now = now_unix();
        let issuer = test_issuer(now);
        let crl_uri = |url: Option<&str>| {
            let cert = issuer
                .issue(&CertTemplate {
                    common_name: "ees1.example".into(),
                    organization: None,
                    sans: vec![],
                    spki_der: key().public_key_der().to_vec(),
                    now,
                    validity_secs: 86_400,
                    client_auth: true,
                    server_auth: false,
                    crl_url: url.map(str::to_string),
                    csr_pem: None,
                })
                .unwrap();
            let (_, x) = X509Certificate::from_der(&cert.der).unwrap();
            x.get_extension_unique(&oid_registry::OID_X509_EXT_CRL_DISTRIBUTION_POINTS)
                .unwrap()
                .map(|e| format!("{:?}", e.parsed_extension()))
        };
        let a = crl_uri(Some("https://ecs-a.example/pki/v1/crl")).unwrap();
        assert!(a.contains("https://ecs-a.example/pki/v1/crl"), "{a}");
        // Encoded once and kept; another URL is never given the first one's extension.
        assert_eq!(
            crl_uri(Some("https://ecs-a.example/pki/v1/crl")).unwrap(),
            a
        );
        let b = crl_uri(Some("https://ecs-b.example/pki/v1/crl")).unwrap();
        assert!(b.contains("https://ecs-b.example/pki/v1/crl"), "{b}");
        assert_eq!(crl_uri(None), None);
    }

    #[test]
    fn serials_are_positive_and_sort_in_issue_order() {
        let rng = SystemRandom::new();
        let mut last = String::new();
        for _ in 0..3 {
            let serial = random_serial(&rng).unwrap();
            let bytes = serial.as_bytes();
            assert_eq!(bytes.len(), 20);
            assert!(bytes[0] > 0 && bytes[0] < 0x80, "{bytes:02x?}");
            let ms = u64::from_be_bytes([
                0, 0, bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5],
            ]);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            assert!(
                now - ms < 1_000,
                "the first 6 octets are the issue time in ms"
            );
            let hex = hex::encode(bytes);
            assert!(hex > last, "{hex} after {last}");
            last = hex;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn validity_never_passes_the_issuing_ca() {
        let now = now_unix();
        let issuer = test_issuer(now);
        let cert = issuer
            .issue(&CertTemplate {
                common_name: "x".into(),
                organization: None,
                sans: vec![],
                spki_der: key().public_key_der().to_vec(),
                now,
                validity_secs: 100 * 365 * 86_400,
                client_auth: true,
                server_auth: false,
                crl_url: None,
                csr_pem: None,
            })
            .unwrap();
        assert_eq!(cert.not_after, issuer.ca_not_after());
    }

    #[test]
    fn a_key_that_is_not_the_cas_is_refused() {
        let now = now_unix();
        let issuer = test_issuer(now);
        let err = LocalIssuer::new(key(), issuer.chain_der().to_vec()).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch(_)));
    }

    #[test]
    fn the_crl_lists_revoked_serials_with_reasons() {
        let now = now_unix();
        let issuer = test_issuer(now);
        let der = issuer
            .sign_crl(
                7,
                now,
                now + 86_400,
                &[RevokedEntry {
                    serial_hex: "01ab".into(),
                    revoked_at: now - 5,
                    reason: RevocationReason::CessationOfOperation,
                }],
            )
            .unwrap();
        let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
        assert_eq!(crl.crl_number().map(|n| n.to_string()), Some("7".into()));
        let revoked: Vec<_> = crl.iter_revoked_certificates().collect();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].raw_serial(), &[0x01, 0xab]);
        assert_eq!(
            revoked[0].reason_code().map(|r| r.1.0),
            Some(5),
            "cessationOfOperation"
        );
    }
}
