//! Signing backends, the local X.509 issuer and CRL building for the ECS.
//!
//! Two layers, as in step-ca: a *key backend* hands out a [`KeySigner`] (today the software
//! PKCS#8 key; the PKCS#11 token is another implementation of the same trait), and the
//! [`LocalIssuer`] builds certificates and CRLs from an approved template with `x509-cert`
//! and signs them with any signer. Every certificate's signature is verified against the
//! issuing certificate's key before it leaves the issuer, and the key is matched against the
//! issuing certificate when it is loaded (Boulder's habit of distrusting its own signer).
//!
//! This crate must not know about EES registrations, tokens or HTTP routes: it receives names,
//! a public key and a validity, and returns DER.
#![forbid(unsafe_code)]

pub mod ceremony;
pub mod cfssl;
pub mod chain;
mod csr;
mod error;
/// The fuzz targets' entry points, with a published test key: not in a production build.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod issuer;
mod key;
pub mod pkcs11;
mod software;

pub use csr::{CsrInfo, build_csr, parse_csr};
pub use error::Error;
pub use issuer::{
    BACKDATE_SECS, CaParams, CertIssuer, CertTemplate, IssuedCert, LocalIssuer, PreparedCert,
    RevocationReason, RevokedEntry, SanEntry, cert_serial_hex, make_ca_certificate, now_unix,
    serial_hex, sha256_hex, time_ordered, verify_cert_signed_by,
};
pub use key::{
    KeyKind, KeySigner, PublicKeyInfo, SigAlg, SignatureChecker, classify_spki, verify_signature,
};
pub use software::{SoftwareKey, generate_p256_pkcs8_pem};

/// Decodes the first PEM block of `pem` with the expected label.
pub fn pem_to_der(pem: &str, label: &str) -> Result<Vec<u8>, Error> {
    let (found, der) = der::pem::decode_vec(pem.trim().as_bytes())
        .map_err(|e| Error::Encoding(format!("not PEM: {e}")))?;
    if found != label {
        return Err(Error::Encoding(format!(
            "PEM block is {found:?}, expected {label:?}"
        )));
    }
    Ok(der)
}

/// Encodes DER as one PEM block.
pub fn der_to_pem(der: &[u8], label: &str) -> String {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der)
        .expect("PEM encoding of a byte string cannot fail")
}

/// Splits a PEM bundle into the DER of each `CERTIFICATE` block, in order.
pub fn pem_chain_to_der(pem: &str) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN ") {
        let end_marker = "-----END CERTIFICATE-----";
        let end = rest[start..]
            .find(end_marker)
            .ok_or_else(|| Error::Encoding("unterminated PEM block".into()))?
            + start
            + end_marker.len();
        out.push(pem_to_der(&rest[start..end], "CERTIFICATE")?);
        rest = &rest[end..];
    }
    if out.is_empty() {
        return Err(Error::Encoding("no CERTIFICATE block".into()));
    }
    Ok(out)
}
