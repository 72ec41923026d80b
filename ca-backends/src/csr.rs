//! PKCS#10 requests: only the public key is taken, after the proof of possession holds.

use crate::{Error, PublicKeyInfo, classify_spki, verify_signature};
use der::{Decode, Encode, Reader, SliceReader, asn1::AnyRef};
use x509_cert::request::CertReq;

/// What the ECS takes from a CSR: the public key and what kind it is. Names, extensions and
/// validity in the CSR are ignored by design (`contract/api.md` §2.1).
#[derive(Debug, Clone)]
pub struct CsrInfo {
    /// The SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    pub key: PublicKeyInfo,
}

/// Parses a PEM PKCS#10 request and verifies its self-signature (proof of possession).
///
/// Errors: [`Error::InvalidCsr`] when it does not parse or the signature fails;
/// [`Error::UnsupportedKey`] when the key is of an algorithm the ECS does not handle.
pub fn parse_csr(pem: &str) -> Result<CsrInfo, Error> {
    let trimmed = pem.trim();
    let (label, der) = der::pem::decode_vec(trimmed.as_bytes())
        .map_err(|e| Error::InvalidCsr(format!("not PEM: {e}")))?;
    if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
        return Err(Error::InvalidCsr(format!(
            "PEM block is {label:?}, expected \"CERTIFICATE REQUEST\""
        )));
    }
    let req = CertReq::from_der(&der)
        .map_err(|e| Error::InvalidCsr(format!("not a PKCS#10 request: {e}")))?;
    // The signature covers the bytes as sent; take them raw instead of re-encoding.
    let info_der = raw_first_element(&der)
        .map_err(|e| Error::InvalidCsr(format!("not a PKCS#10 request: {e}")))?;
    let spki_der = req
        .info
        .public_key
        .to_der()
        .map_err(|e| Error::InvalidCsr(format!("public key does not encode: {e}")))?;
    // A malformed key is a bad CSR; a well-formed key of an unsupported kind is for the
    // policy to call weak.
    let key = classify_spki(&spki_der).map_err(|e| match e {
        Error::Encoding(m) => Error::InvalidCsr(m),
        other => other,
    })?;
    let signature = req
        .signature
        .as_bytes()
        .ok_or_else(|| Error::InvalidCsr("signature bit string is not whole bytes".into()))?;
    verify_signature(&spki_der, &req.algorithm.oid, &info_der, signature).map_err(|e| match e {
        Error::UnsupportedKey(m) => Error::InvalidCsr(m),
        _ => Error::InvalidCsr("signature does not verify: no proof of possession".into()),
    })?;
    Ok(CsrInfo { spki_der, key })
}

fn raw_first_element(der: &[u8]) -> der::Result<Vec<u8>> {
    let mut reader = SliceReader::new(der)?;
    reader.sequence(|r| {
        let info = AnyRef::decode(r)?;
        // Skip the rest: CertReq::from_der already checked it.
        let _ = AnyRef::decode(r)?;
        let _ = AnyRef::decode(r)?;
        info.to_der()
    })
}

/// Builds a PEM PKCS#10 request signed by `key`, with subject `CN=<common_name>`: what an
/// EES (the reference client, the tests, the load generator) sends.
pub fn build_csr(key: &dyn crate::KeySigner, common_name: &str) -> Result<String, Error> {
    use std::str::FromStr;
    use x509_cert::request::{CertReqInfo, Version};
    let subject = x509_cert::name::Name::from_str(&format!(
        "CN=#{}",
        hex::encode(der::asn1::Utf8StringRef::new(common_name)?.to_der()?)
    ))?;
    let info = CertReqInfo {
        version: Version::V1,
        subject,
        public_key: spki::SubjectPublicKeyInfoOwned::from_der(key.public_key_der())?,
        attributes: Default::default(),
    };
    let info_der = info.to_der()?;
    let signature = key.sign(&info_der)?;
    let req = CertReq {
        info,
        algorithm: key.algorithm().algorithm_identifier(),
        signature: der::asn1::BitString::from_bytes(&signature)?,
    };
    Ok(crate::der_to_pem(&req.to_der()?, "CERTIFICATE REQUEST"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyKind, SoftwareKey, generate_p256_pkcs8_pem};

    #[test]
    fn a_csr_round_trips_and_a_tampered_one_fails() {
        let key = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap();
        let pem = build_csr(&key, "ees1.edn1.ecsp-a.example").unwrap();
        let info = parse_csr(&pem).unwrap();
        assert_eq!(info.key.kind, KeyKind::P256);
        assert_eq!(info.spki_der, crate::KeySigner::public_key_der(&key));

        // Change the subject inside the signed part: the proof of possession must fail.
        let mut der = crate::pem_to_der(&pem, "CERTIFICATE REQUEST").unwrap();
        let at = der.windows(4).position(|w| w == b"ees1").unwrap();
        der[at] = b'f';
        let tampered = crate::der_to_pem(&der, "CERTIFICATE REQUEST");
        assert!(matches!(parse_csr(&tampered), Err(Error::InvalidCsr(_))));
        assert!(matches!(parse_csr("garbage"), Err(Error::InvalidCsr(_))));
    }
}
