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
    let spki_der = crate::key::canonical_spki(&spki_der).map_err(|e| match e {
        Error::Encoding(m) => Error::InvalidCsr(m),
        other => other,
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

    /// A CSR with any SubjectPublicKeyInfo, "signed" with the given bytes.
    fn forged_csr(
        spki: spki::SubjectPublicKeyInfoOwned,
        alg: spki::AlgorithmIdentifierOwned,
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> String {
        use std::str::FromStr;
        use x509_cert::request::{CertReqInfo, Version};
        let info = CertReqInfo {
            version: Version::V1,
            subject: x509_cert::name::Name::from_str("CN=ees1.example").unwrap(),
            public_key: spki,
            attributes: Default::default(),
        };
        let info_der = info.to_der().unwrap();
        let req = CertReq {
            info,
            algorithm: alg,
            signature: der::asn1::BitString::from_bytes(&sign(&info_der)).unwrap(),
        };
        crate::der_to_pem(&req.to_der().unwrap(), "CERTIFICATE REQUEST")
    }

    /// Attack review, item 5: CSRs whose Ed25519 key is of small order, "signed" with
    /// R = identity and S = 0 (which verifies for any message), were certified.
    #[test]
    fn small_order_and_non_canonical_ed25519_keys_are_refused() {
        let ed25519 = spki::AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc8410::ID_ED_25519,
            parameters: None,
        };
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut order_2 = [0xffu8; 32];
        order_2[0] = 0xec;
        order_2[31] = 0x7f;
        let mut non_canonical = [0xffu8; 32];
        non_canonical[0] = 0xf0;
        non_canonical[31] = 0x7f;
        let mut identity_signed_bit = identity;
        identity_signed_bit[31] |= 0x80;
        for key in [
            identity,
            order_2,
            identity_signed_bit,
            [0u8; 32],
            non_canonical,
        ] {
            let spki = spki::SubjectPublicKeyInfoOwned {
                algorithm: ed25519.clone(),
                subject_public_key: der::asn1::BitString::from_bytes(&key).unwrap(),
            };
            // R = the identity point, S = 0.
            let pem = forged_csr(spki, ed25519.clone(), |_| {
                let mut sig = vec![0u8; 64];
                sig[0] = 1;
                sig
            });
            match parse_csr(&pem) {
                Err(Error::InvalidCsr(why)) => {
                    assert!(why.contains("Ed25519"), "{why}")
                }
                other => panic!("{key:02x?}: {other:?}"),
            }
        }
    }

    /// Attack review, item 18: a P-256 key sent compressed is certified uncompressed.
    #[test]
    fn a_compressed_p256_key_is_certified_uncompressed() {
        use crate::KeySigner;
        let key = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap();
        let uncompressed = spki::SubjectPublicKeyInfoOwned::from_der(key.public_key_der()).unwrap();
        let point =
            p256::PublicKey::from_sec1_bytes(uncompressed.subject_public_key.raw_bytes()).unwrap();
        let compressed = p256::elliptic_curve::sec1::ToSec1Point::to_sec1_point(&point, true);
        let spki = spki::SubjectPublicKeyInfoOwned {
            algorithm: uncompressed.algorithm.clone(),
            subject_public_key: der::asn1::BitString::from_bytes(compressed.as_bytes()).unwrap(),
        };
        let pem = forged_csr(spki, key.algorithm().algorithm_identifier(), |m| {
            key.sign(m).unwrap()
        });
        let info = parse_csr(&pem).unwrap();
        assert_eq!(info.spki_der, key.public_key_der());
    }

    #[test]
    fn rsa_keys_with_an_insane_exponent_or_modulus_are_refused() {
        let rsa = spki::AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::RSA_ENCRYPTION,
            parameters: Some(der::asn1::Null.into()),
        };
        let mut odd_modulus = vec![0xc5u8; 256];
        odd_modulus[255] = 0x01;
        let mut even_modulus = odd_modulus.clone();
        even_modulus[255] = 0x02;
        for (n, e) in [
            (&odd_modulus, vec![1u8]),
            (&odd_modulus, vec![0x01, 0x00, 0x00]),
            (&even_modulus, vec![0x01, 0x00, 0x01]),
        ] {
            let key = der::Encode::to_der(&RsaKey {
                n: der::asn1::UintRef::new(n).unwrap(),
                e: der::asn1::UintRef::new(&e).unwrap(),
            })
            .unwrap();
            let spki = spki::SubjectPublicKeyInfoOwned {
                algorithm: rsa.clone(),
                subject_public_key: der::asn1::BitString::from_bytes(&key).unwrap(),
            };
            let der = spki.to_der().unwrap();
            assert!(
                matches!(crate::classify_spki(&der), Err(Error::Encoding(_))),
                "e = {e:02x?}"
            );
        }
        let good = der::Encode::to_der(&RsaKey {
            n: der::asn1::UintRef::new(&odd_modulus).unwrap(),
            e: der::asn1::UintRef::new(&[1, 0, 1]).unwrap(),
        })
        .unwrap();
        let spki = spki::SubjectPublicKeyInfoOwned {
            algorithm: rsa,
            subject_public_key: der::asn1::BitString::from_bytes(&good).unwrap(),
        };
        assert_eq!(
            crate::classify_spki(&spki.to_der().unwrap()).unwrap().kind,
            KeyKind::Rsa(2048)
        );
    }

    #[derive(der::Sequence)]
    struct RsaKey<'a> {
        n: der::asn1::UintRef<'a>,
        e: der::asn1::UintRef<'a>,
    }
}
