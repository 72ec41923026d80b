use thiserror::Error;

/// What can go wrong in a backend or the issuer. The daemon maps each variant to one
/// contract cause (`INVALID_CSR`, `WEAK_KEY`, `BACKEND_UNAVAILABLE`, or an internal error).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The CSR cannot be parsed or its signature (proof of possession) fails.
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    /// A key algorithm or size this crate does not handle at all.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// A private key does not belong to the certificate it is configured with.
    #[error("key mismatch: {0}")]
    KeyMismatch(String),
    /// The signer cannot sign now (HSM away, external CA down); worth retrying later.
    #[error("signing backend unavailable: {0}")]
    Unavailable(String),
    /// The signer produced something that does not verify, or signing failed for good.
    #[error("signing failed: {0}")]
    Signing(String),
    /// An external CA answered, but not with a certificate the ECS may deliver.
    #[error("{0}")]
    BadCertificate(String),
    /// A configuration fault the operator must fix (module path, PIN, missing key).
    #[error("{0}")]
    Config(String),
    /// DER, PEM or X.509 encoding problem in configured or generated material.
    #[error("encoding: {0}")]
    Encoding(String),
}

impl From<der::Error> for Error {
    fn from(e: der::Error) -> Self {
        Error::Encoding(e.to_string())
    }
}
