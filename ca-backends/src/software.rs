//! The software key backend: a PKCS#8 private key held in memory.

use crate::{Error, KeySigner, SigAlg};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair,
};
use std::fmt;
use zeroize::Zeroizing;

enum Inner {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// A PKCS#8 key (P-256, P-384, Ed25519 or RSA) that signs in process.
///
/// The key material stays inside aws-lc, which zeroizes it on drop; `Debug` never prints it.
pub struct SoftwareKey {
    inner: Inner,
    alg: SigAlg,
    spki_der: Vec<u8>,
    rng: SystemRandom,
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SoftwareKey {
    /// Loads a PEM `PRIVATE KEY` (PKCS#8).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, Error> {
        let der = Zeroizing::new(crate::pem_to_der(pem, "PRIVATE KEY")?);
        Self::from_pkcs8_der(&der)
    }

    /// Loads a DER PKCS#8 key, trying each supported algorithm.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, Error> {
        let (inner, alg) =
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der) {
                (Inner::Ecdsa(k), SigAlg::EcdsaP256Sha256)
            } else if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der) {
                (Inner::Ecdsa(k), SigAlg::EcdsaP384Sha384)
            } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                (Inner::Ed25519(k), SigAlg::Ed25519)
            } else if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
                (Inner::Rsa(k), SigAlg::RsaPkcs1Sha256)
            } else {
                return Err(Error::UnsupportedKey(
                    "not a PKCS#8 P-256, P-384, Ed25519 or RSA private key".into(),
                ));
            };
        let spki_der = match &inner {
            Inner::Ecdsa(k) => ec_spki(alg, k.public_key().as_ref()),
            Inner::Ed25519(k) => ed25519_spki(k.public_key().as_ref()),
            Inner::Rsa(k) => rsa_spki(k.public_key().as_ref()),
        };
        Ok(SoftwareKey {
            inner,
            alg,
            spki_der,
            rng: SystemRandom::new(),
        })
    }
}

impl SoftwareKey {
    /// Signs with RSASSA-PSS instead of PKCS#1 v1.5 (RSA keys only).
    pub fn with_rsa_pss(mut self) -> Result<Self, Error> {
        if !matches!(self.inner, Inner::Rsa(_)) {
            return Err(Error::Config(
                "rsa_signature = \"pss\" needs an RSA key".into(),
            ));
        }
        self.alg = SigAlg::RsaPssSha256;
        Ok(self)
    }
}

impl KeySigner for SoftwareKey {
    fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    fn algorithm(&self) -> SigAlg {
        self.alg
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let failed = |_| Error::Signing("software key refused to sign".into());
        match &self.inner {
            Inner::Ecdsa(k) => Ok(k
                .sign(&self.rng, message)
                .map_err(failed)?
                .as_ref()
                .to_vec()),
            Inner::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Inner::Rsa(k) => {
                let mut out = vec![0; k.public_modulus_len()];
                let encoding = if self.alg == SigAlg::RsaPssSha256 {
                    &RSA_PSS_SHA256
                } else {
                    &RSA_PKCS1_SHA256
                };
                k.sign(encoding, &self.rng, message, &mut out)
                    .map_err(failed)?;
                Ok(out)
            }
        }
    }
}

fn spki_der(alg: spki::AlgorithmIdentifierOwned, key: &[u8]) -> Vec<u8> {
    use der::Encode;
    spki::SubjectPublicKeyInfoOwned {
        algorithm: alg,
        subject_public_key: der::asn1::BitString::from_bytes(key).expect("key fits a bit string"),
    }
    .to_der()
    .expect("SPKI encodes")
}

fn ec_spki(alg: SigAlg, point: &[u8]) -> Vec<u8> {
    use const_oid::db::rfc5912;
    let curve = if alg == SigAlg::EcdsaP256Sha256 {
        rfc5912::SECP_256_R_1
    } else {
        rfc5912::SECP_384_R_1
    };
    spki_der(
        spki::AlgorithmIdentifierOwned {
            oid: rfc5912::ID_EC_PUBLIC_KEY,
            parameters: Some(der::Any::from(curve)),
        },
        point,
    )
}

fn ed25519_spki(key: &[u8]) -> Vec<u8> {
    spki_der(
        spki::AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc8410::ID_ED_25519,
            parameters: None,
        },
        key,
    )
}

fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    spki_der(
        spki::AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::RSA_ENCRYPTION,
            parameters: Some(der::asn1::Null.into()),
        },
        pkcs1,
    )
}

/// Generates a new P-256 key as a PEM `PRIVATE KEY` (PKCS#8), from the OS CSPRNG.
/// The PEM is wiped from memory when dropped.
pub fn generate_p256_pkcs8_pem() -> Result<Zeroizing<String>, Error> {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
        .map_err(|_| Error::Signing("key generation failed".into()))?;
    Ok(Zeroizing::new(crate::der_to_pem(
        doc.as_ref(),
        "PRIVATE KEY",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{classify_spki, verify_signature};

    #[test]
    fn generated_key_signs_and_verifies() {
        let key = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap();
        assert_eq!(key.algorithm(), SigAlg::EcdsaP256Sha256);
        let info = classify_spki(key.public_key_der()).unwrap();
        assert_eq!(info.describe(), "ECDSA P-256");
        let sig = key.sign(b"tbs").unwrap();
        let oid = key.algorithm().algorithm_identifier().oid;
        verify_signature(key.public_key_der(), &oid, b"tbs", &sig).unwrap();
        assert!(verify_signature(key.public_key_der(), &oid, b"other", &sig).is_err());
    }

    #[test]
    fn garbage_is_not_a_key() {
        assert!(SoftwareKey::from_pkcs8_der(b"nope").is_err());
        assert!(
            SoftwareKey::from_pkcs8_pem(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            )
            .is_err()
        );
    }
}

#[cfg(test)]
mod rsa_tests {
    use super::*;
    use crate::verify_signature;
    use aws_lc_rs::encoding::AsDer;

    #[test]
    fn an_rsa_key_signs_pkcs1_or_pss_and_each_verifies_as_what_it_says() {
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der = kp.as_der().unwrap();
        for pss in [false, true] {
            let mut key = SoftwareKey::from_pkcs8_der(der.as_ref()).unwrap();
            if pss {
                key = key.with_rsa_pss().unwrap();
            }
            let alg = key.algorithm().algorithm_identifier();
            let sig = key.sign(b"tbs").unwrap();
            verify_signature(key.public_key_der(), &alg.oid, b"tbs", &sig).unwrap();
            assert_eq!(alg.oid == const_oid::db::rfc5912::ID_RSASSA_PSS, pss);
        }
        let ec = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap();
        assert!(ec.with_rsa_pss().is_err());
    }
}
