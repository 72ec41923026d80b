//! The seam between the issuer and whatever holds the issuing key.

use crate::Error;
use aws_lc_rs::signature::{
    self as sig, ParsedPublicKey, UnparsedPublicKey, VerificationAlgorithm,
};
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5912, rfc8410};
use der::{Decode, Reader, SliceReader, asn1::UintRef};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoRef};

/// The kind of a public key: the facts the domain policy's `key_types` rule needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    P256,
    P384,
    Ed25519,
    /// RSA with the modulus size in bits.
    Rsa(usize),
}

/// The signature algorithm an issuing key signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigAlg {
    EcdsaP256Sha256,
    EcdsaP384Sha384,
    Ed25519,
    RsaPkcs1Sha256,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt.
    RsaPssSha256,
}

/// RSASSA-PSS-params for SHA-256 / MGF1-SHA-256 / salt 32 (RFC 4055), DER.
const PSS_SHA256_PARAMS: [u8; 54] = [
    0x30, 0x34, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
    0x01, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
    0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0xa2, 0x03, 0x02, 0x01, 0x20,
];

impl SigAlg {
    /// The X.509 `AlgorithmIdentifier` of this algorithm.
    pub fn algorithm_identifier(self) -> AlgorithmIdentifierOwned {
        if self == SigAlg::RsaPssSha256 {
            return AlgorithmIdentifierOwned {
                oid: rfc5912::ID_RSASSA_PSS,
                parameters: Some(der::Any::from_der(&PSS_SHA256_PARAMS).expect("valid DER")),
            };
        }
        let (oid, null_params) = match self {
            SigAlg::EcdsaP256Sha256 => (rfc5912::ECDSA_WITH_SHA_256, false),
            SigAlg::EcdsaP384Sha384 => (rfc5912::ECDSA_WITH_SHA_384, false),
            SigAlg::Ed25519 => (rfc8410::ID_ED_25519, false),
            // RFC 4055: the parameters of sha256WithRSAEncryption are an explicit NULL.
            SigAlg::RsaPkcs1Sha256 => (rfc5912::SHA_256_WITH_RSA_ENCRYPTION, true),
            SigAlg::RsaPssSha256 => unreachable!("handled above"),
        };
        AlgorithmIdentifierOwned {
            oid,
            parameters: null_params.then(|| der::asn1::Null.into()),
        }
    }
}

/// A key that signs certificates and CRLs. The software key and the PKCS#11 token key are
/// two implementations; nothing above this trait knows where the key lives.
///
/// `sign` may block (an HSM round trip): callers run it off the async reactor.
pub trait KeySigner: Send + Sync {
    /// The key's SubjectPublicKeyInfo, DER.
    fn public_key_der(&self) -> &[u8];
    /// The algorithm `sign` produces.
    fn algorithm(&self) -> SigAlg;
    /// Signs `message` (the whole TBS, hashing included), returning the signature as it goes
    /// into the certificate's BIT STRING (DER `Ecdsa-Sig-Value` for ECDSA).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error>;
    /// Whether the key can sign now; `Err` says why not (an HSM being probed).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What a public key is, for policy (`key_types`) and for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyInfo {
    pub kind: KeyKind,
}

impl PublicKeyInfo {
    /// A human description such as `ECDSA P-256` or `RSA 2048`.
    pub fn describe(&self) -> String {
        match self.kind {
            KeyKind::P256 => "ECDSA P-256".into(),
            KeyKind::P384 => "ECDSA P-384".into(),
            KeyKind::Ed25519 => "Ed25519".into(),
            KeyKind::Rsa(bits) => format!("RSA {bits}"),
        }
    }
}

/// A SubjectPublicKeyInfo and its key's bytes.
fn spki_parts(spki_der: &[u8]) -> Result<(SubjectPublicKeyInfoRef<'_>, &[u8]), Error> {
    let spki = SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|e| Error::Encoding(format!("public key does not parse: {e}")))?;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| Error::Encoding("public key bit string is not whole bytes".into()))?;
    Ok((spki, key))
}

/// Classifies a SubjectPublicKeyInfo and checks the key itself is well formed (an EC point
/// on its curve, an RSA modulus that parses).
pub fn classify_spki(spki_der: &[u8]) -> Result<PublicKeyInfo, Error> {
    let (spki, key) = spki_parts(spki_der)?;
    let oid = spki.algorithm.oid;
    let kind = if oid == rfc5912::ID_EC_PUBLIC_KEY {
        let curve: ObjectIdentifier = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as().ok())
            .ok_or_else(|| Error::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == rfc5912::SECP_256_R_1 {
            p256::PublicKey::from_sec1_bytes(key)
                .map_err(|_| Error::Encoding("P-256 point is not on the curve".into()))?;
            KeyKind::P256
        } else if curve == rfc5912::SECP_384_R_1 {
            if key.len() != 97 || key[0] != 4 {
                return Err(Error::Encoding(
                    "P-384 point is not an uncompressed point".into(),
                ));
            }
            KeyKind::P384
        } else {
            return Err(Error::UnsupportedKey(format!(
                "EC curve {curve} is not supported"
            )));
        }
    } else if oid == rfc8410::ID_ED_25519 {
        let key: &[u8; 32] = key
            .try_into()
            .map_err(|_| Error::Encoding("Ed25519 key is not 32 bytes".into()))?;
        check_ed25519_point(key)?;
        KeyKind::Ed25519
    } else if oid == rfc5912::RSA_ENCRYPTION {
        KeyKind::Rsa(rsa_modulus_bits(key)?)
    } else {
        return Err(Error::UnsupportedKey(format!(
            "public key algorithm {oid} is not supported"
        )));
    };
    Ok(PublicKeyInfo { kind })
}

/// The encodings of the Ed25519 points of small order (1, 2, 4 and 8), and the
/// non-canonical encodings of two of them (y = p, p + 1), with the sign bit cleared. A
/// signature by such a "key" (R = identity, S = 0) verifies for every message, so it proves
/// possession of nothing (the list libsodium checks in `ge25519_has_small_order`).
const ED25519_SMALL_ORDER: [[u8; 32]; 7] = {
    let mut y_p_minus_1 = [0xff; 32];
    y_p_minus_1[0] = 0xec;
    y_p_minus_1[31] = 0x7f;
    let mut y_p = y_p_minus_1;
    y_p[0] = 0xed;
    let mut y_p_plus_1 = y_p_minus_1;
    y_p_plus_1[0] = 0xee;
    let mut one = [0; 32];
    one[0] = 1;
    [
        [0; 32],
        one,
        [
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef,
            0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88,
            0x6d, 0x53, 0xfc, 0x05,
        ],
        [
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10,
            0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77,
            0x92, 0xac, 0x03, 0x7a,
        ],
        y_p_minus_1,
        y_p,
        y_p_plus_1,
    ]
};

/// Refuses Ed25519 keys of small order and keys whose y coordinate is not canonical (y ≥ p).
fn check_ed25519_point(key: &[u8; 32]) -> Result<(), Error> {
    let mut y = *key;
    y[31] &= 0x7f;
    if ED25519_SMALL_ORDER.contains(&y) {
        return Err(Error::Encoding(
            "Ed25519 key is a point of small order: it can prove possession of nothing".into(),
        ));
    }
    // p = 2^255 - 19: y is non-canonical when its top 250 bits are all ones and the lowest
    // byte is at least 0xed.
    if y[31] == 0x7f && y[1..31].iter().all(|b| *b == 0xff) && y[0] >= 0xed {
        return Err(Error::Encoding(
            "Ed25519 key is not canonically encoded (y >= p)".into(),
        ));
    }
    Ok(())
}

/// The modulus size of an RSA public key, after the checks any sane key passes: an odd
/// modulus, and an odd public exponent from 3 to 2^256 (RFC 8017, NIST SP 800-89 §5.3.3).
fn rsa_modulus_bits(key: &[u8]) -> Result<usize, Error> {
    let bad = |e: der::Error| Error::Encoding(format!("RSA key does not parse: {e}"));
    let mut reader = SliceReader::new(key).map_err(bad)?;
    let (n, e) = reader
        .sequence(|r| {
            let n = UintRef::decode(r)?;
            let e = UintRef::decode(r)?;
            Ok((n.as_bytes().to_vec(), e.as_bytes().to_vec()))
        })
        .map_err(bad)?;
    if n.last().is_none_or(|b| b % 2 == 0) {
        return Err(Error::Encoding("RSA modulus is even".into()));
    }
    let e_small = e.len() == 1 && e[0] < 3;
    if e_small || e.len() > 32 || e.last().is_none_or(|b| b % 2 == 0) {
        return Err(Error::Encoding(
            "RSA public exponent is not an odd number from 3 to 2^256".into(),
        ));
    }
    let first = *n.first().unwrap_or(&0);
    Ok(n.len() * 8 - first.leading_zeros() as usize)
}

/// The SubjectPublicKeyInfo in the form the ECS certifies: a P-256 point given compressed is
/// written uncompressed (RFC 5480 §2.2: uncompressed is the form every implementation
/// supports); every other key is returned as given.
pub fn canonical_spki(spki_der: &[u8]) -> Result<Vec<u8>, Error> {
    use der::Encode;
    let (spki, key) = spki_parts(spki_der)?;
    let is_p256 = spki.algorithm.oid == rfc5912::ID_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
            == Some(rfc5912::SECP_256_R_1);
    if !is_p256 || key.first() == Some(&4) {
        return Ok(spki_der.to_vec());
    }
    let point = p256::PublicKey::from_sec1_bytes(key)
        .map_err(|_| Error::Encoding("P-256 point is not on the curve".into()))?;
    let uncompressed = p256::elliptic_curve::sec1::ToSec1Point::to_sec1_point(&point, false);
    let out = spki::SubjectPublicKeyInfoOwned {
        algorithm: der::referenced::RefToOwned::ref_to_owned(&spki.algorithm),
        subject_public_key: der::asn1::BitString::from_bytes(uncompressed.as_bytes())?,
    };
    Ok(out.to_der()?)
}

/// Verifies `signature` over `message` with the key in `spki_der`, for the X.509 signature
/// algorithm `alg` (an OID as found in a CSR, certificate or CRL).
pub fn verify_signature(
    spki_der: &[u8],
    alg: &ObjectIdentifier,
    message: &[u8],
    signature: &[u8],
) -> Result<(), Error> {
    let (algorithm, key) = verification_algorithm(spki_der, alg)?;
    UnparsedPublicKey::new(algorithm, key)
        .verify(message, signature)
        .map_err(|_| Error::Signing("signature does not verify".into()))
}

/// One key, parsed once, that checks many signatures of one algorithm: the issuing CA's,
/// checked after each signature its signer makes (the signer is distrusted).
pub struct SignatureChecker {
    key: ParsedPublicKey,
}

impl std::fmt::Debug for SignatureChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureChecker").finish_non_exhaustive()
    }
}

impl SignatureChecker {
    /// The checker of signatures by the key in `spki_der` with the X.509 algorithm `alg`.
    pub fn new(spki_der: &[u8], alg: &ObjectIdentifier) -> Result<Self, Error> {
        let (algorithm, key) = verification_algorithm(spki_der, alg)?;
        let key = ParsedPublicKey::new(algorithm, key)
            .map_err(|e| Error::UnsupportedKey(format!("the public key does not parse: {e}")))?;
        Ok(SignatureChecker { key })
    }

    /// What [`verify_signature`] answers for this key and algorithm.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), Error> {
        self.key
            .verify_sig(message, signature)
            .map_err(|_| Error::Signing("signature does not verify".into()))
    }
}

/// The verification algorithm for a key and an X.509 signature algorithm, and the key's
/// bits as that algorithm reads them.
fn verification_algorithm<'k>(
    spki_der: &'k [u8],
    alg: &ObjectIdentifier,
) -> Result<(&'static dyn VerificationAlgorithm, &'k [u8]), Error> {
    let info = classify_spki(spki_der)?;
    let spki = SubjectPublicKeyInfoRef::from_der(spki_der)?;
    let key = spki.subject_public_key.raw_bytes();
    let algorithm: &'static dyn VerificationAlgorithm = match (info.kind, *alg) {
        (KeyKind::P256, a) if a == rfc5912::ECDSA_WITH_SHA_256 => &sig::ECDSA_P256_SHA256_ASN1,
        (KeyKind::P256, a) if a == rfc5912::ECDSA_WITH_SHA_384 => &sig::ECDSA_P256_SHA384_ASN1,
        (KeyKind::P384, a) if a == rfc5912::ECDSA_WITH_SHA_256 => &sig::ECDSA_P384_SHA256_ASN1,
        (KeyKind::P384, a) if a == rfc5912::ECDSA_WITH_SHA_384 => &sig::ECDSA_P384_SHA384_ASN1,
        (KeyKind::Ed25519, a) if a == rfc8410::ID_ED_25519 => &sig::ED25519,
        // Legacy-size verification so that a short RSA key is reported as a weak key by the
        // policy rather than as a bad signature.
        (KeyKind::Rsa(_), a) if a == rfc5912::SHA_256_WITH_RSA_ENCRYPTION => {
            &sig::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY
        }
        (KeyKind::Rsa(_), a) if a == rfc5912::SHA_384_WITH_RSA_ENCRYPTION => {
            &sig::RSA_PKCS1_2048_8192_SHA384
        }
        (KeyKind::Rsa(_), a) if a == rfc5912::SHA_512_WITH_RSA_ENCRYPTION => {
            &sig::RSA_PKCS1_1024_8192_SHA512_FOR_LEGACY_USE_ONLY
        }
        // PSS is verified as SHA-256 with MGF1-SHA-256, the parameters this crate writes; a
        // signature made with other parameters does not verify (fails closed).
        (KeyKind::Rsa(_), a) if a == rfc5912::ID_RSASSA_PSS => &sig::RSA_PSS_2048_8192_SHA256,
        (kind, a) => {
            return Err(Error::UnsupportedKey(format!(
                "signature algorithm {a} with a {} key is not supported",
                PublicKeyInfo { kind }.describe()
            )));
        }
    };
    Ok((algorithm, key))
}
