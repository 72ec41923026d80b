//! A domain's third-party trust: its anchors and CRLs, loaded in one place for the daemon,
//! `policy lint`, `policy explain` and `policy diff`.

/// A CRL a domain checks third-party certificates against.
pub enum CrlSource {
    File {
        name: String,
        der: Vec<u8>,
    },
    /// Fetched over HTTPS and kept for five minutes.
    Url {
        url: String,
        client: crate::client::HttpsClient,
        cache: tokio::sync::Mutex<Option<(Vec<u8>, std::time::Instant)>>,
    },
}

/// What a domain trusts for third-party EES certificates, loaded at start.
pub struct ThirdPartyTrust {
    /// (configured file, DER) of each trust anchor.
    pub anchors: Vec<(String, Vec<u8>)>,
    pub crls: Vec<CrlSource>,
    /// Counts the changes of fetched CRLs, so that verdicts taken before one are not reused.
    crl_epoch: std::sync::atomic::AtomicU64,
}

impl ThirdPartyTrust {
    /// Fetches the CRLs that are due and returns the epoch of the CRLs now in force (a CRL
    /// that cannot be fetched leaves the epoch: the next check fails closed on it anyway).
    pub async fn refresh_crls(&self) -> u64 {
        use std::sync::atomic::Ordering;
        if self.crls.iter().any(|c| matches!(c, CrlSource::Url { .. })) {
            let _ = self.crls().await;
        }
        self.crl_epoch.load(Ordering::SeqCst)
    }

    /// The CRLs, fetching what is due; any that cannot be had makes the check fail closed.
    pub async fn crls(&self) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        for c in &self.crls {
            match c {
                CrlSource::File { der, .. } => out.push(der.clone()),
                CrlSource::Url { url, client, cache } => {
                    let mut cache = cache.lock().await;
                    if let Some((der, at)) = cache.as_ref()
                        && at.elapsed() < std::time::Duration::from_secs(300)
                    {
                        out.push(der.clone());
                        continue;
                    }
                    let r = client
                        .request("GET", url, &[], None)
                        .await
                        .map_err(|e| format!("CRL {url} could not be fetched: {e}"))?;
                    if r.status != 200 {
                        return Err(format!("CRL {url} could not be fetched: HTTP {}", r.status));
                    }
                    if cache.as_ref().is_none_or(|(old, _)| *old != r.body) {
                        self.crl_epoch
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    *cache = Some((r.body.clone(), std::time::Instant::now()));
                    out.push(r.body);
                }
            }
        }
        Ok(out)
    }
}

impl ThirdPartyTrust {
    /// Loads what `[domains.D.third_party]` trusts: its anchors (every one a CA certificate)
    /// and its CRLs (files read now; https URLs fetched when due, trusting `fetch_roots` and
    /// the domain's own anchors).
    pub fn load(
        domain: &str,
        tp: &ecs_policy::ThirdPartyPolicy,
        fetch_roots: &[u8],
    ) -> Result<ThirdPartyTrust, String> {
        let key = format!("domains.{domain}.third_party");
        let anchors = read_anchors(domain, tp)?;
        if tp.accept && anchors.is_empty() {
            return Err(format!(
                "{key}.trust_anchors: accept = true needs at least one trust anchor"
            ));
        }
        let mut roots = fetch_roots.to_vec();
        for (_, der) in &anchors {
            roots.extend_from_slice(ecs_ca_backends::der_to_pem(der, "CERTIFICATE").as_bytes());
        }
        let mut crls = Vec::new();
        for c in &tp.crls {
            if c.starts_with("https://") {
                let client = crate::client::HttpsClient::new(
                    &roots,
                    None,
                    crate::client::HttpVersion::Http1,
                )
                .map_err(|e| format!("{key}.crls: {c}: {e}"))?;
                crls.push(CrlSource::Url {
                    url: c.clone(),
                    client,
                    cache: tokio::sync::Mutex::new(None),
                });
            } else if c.starts_with("http://") {
                return Err(format!("{key}.crls: {c}: give a file or an https:// URL"));
            } else {
                crls.push(CrlSource::File {
                    name: c.clone(),
                    der: read_crl_file(c).map_err(|e| format!("{key}.crls: {e}"))?,
                });
            }
        }
        Ok(ThirdPartyTrust {
            anchors,
            crls,
            crl_epoch: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

/// The certificates of one trust-anchor file (PEM, one or more), each checked to be a CA.
pub fn read_anchor_file(path: &str) -> Result<Vec<Vec<u8>>, String> {
    use der::Decode;
    let pem = crate::files::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let ders = ecs_ca_backends::pem_chain_to_der(&pem).map_err(|e| format!("{path}: {e}"))?;
    for der in &ders {
        let cert = x509_cert::Certificate::from_der(der).map_err(|e| format!("{path}: {e}"))?;
        let is_ca = cert
            .tbs_certificate()
            .get_extension::<x509_cert::ext::pkix::BasicConstraints>()
            .ok()
            .flatten()
            .is_some_and(|(_, b)| b.ca);
        if !is_ca {
            return Err(format!("{path}: not a CA certificate"));
        }
    }
    Ok(ders)
}

/// Every trust anchor of a domain, as (configured file, DER); the first file that cannot be
/// read, parsed, or is not a CA is an error naming the key.
pub fn read_anchors(
    domain: &str,
    tp: &ecs_policy::ThirdPartyPolicy,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut anchors = Vec::new();
    for path in &tp.trust_anchors {
        let ders = read_anchor_file(path)
            .map_err(|e| format!("domains.{domain}.third_party.trust_anchors: {e}"))?;
        anchors.extend(ders.into_iter().map(|d| (path.clone(), d)));
    }
    Ok(anchors)
}

/// A CRL file, DER or PEM.
pub fn read_crl_file(path: &str) -> Result<Vec<u8>, String> {
    let bytes = crate::files::read(path).map_err(|e| format!("{path}: {e}"))?;
    match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN") => {
            ecs_ca_backends::pem_to_der(text, "X509 CRL").map_err(|e| format!("{path}: {e}"))
        }
        _ => Ok(bytes),
    }
}

/// The policy's name for a key kind (`None`: a size no `key_types` entry names).
pub fn key_type(kind: ecs_ca_backends::KeyKind) -> Option<ecs_policy::KeyType> {
    use ecs_ca_backends::KeyKind;
    use ecs_policy::KeyType;
    match kind {
        KeyKind::P256 => Some(KeyType::P256),
        KeyKind::P384 => Some(KeyType::P384),
        KeyKind::Ed25519 => Some(KeyType::Ed25519),
        KeyKind::Rsa(2048) => Some(KeyType::Rsa2048),
        KeyKind::Rsa(3072) => Some(KeyType::Rsa3072),
        KeyKind::Rsa(4096) => Some(KeyType::Rsa4096),
        KeyKind::Rsa(_) => None,
    }
}

/// One third-party chain to judge, and what it is judged with besides the policy.
pub struct ChainCase<'a> {
    /// The leaf, then the intermediates (and possibly the anchor) as presented or stored.
    pub chain: &'a [Vec<u8>],
    /// The domain's anchors, as (configured file, DER).
    pub anchors: &'a [(String, Vec<u8>)],
    /// The domain's CRLs when it lists any; `Err` when they cannot be had (fails closed).
    pub crls: Option<Result<Vec<Vec<u8>>, String>>,
    pub token_issuer: &'a str,
    pub ees_id: &'a str,
    pub endpoint: ecs_policy::EndpointFacts<'a>,
    pub requested_expiry: Option<i64>,
    pub secret_token_requested: bool,
    pub now: i64,
}

/// What a domain's third-party policy says of a chain.
pub struct Judgement {
    pub leaf: ecs_ca_backends::chain::LeafFacts,
    pub decision: ecs_policy::Decision,
    /// The DER of the trust anchor the chain validated to.
    pub anchor: Option<Vec<u8>>,
}

/// The one place a third-party chain is judged: path validation to the domain's anchors,
/// the CRLs of every certificate of the chain, then every third-party rule of the policy.
/// Used at onboarding, at every authentication with the certificate, and by `policy
/// explain` and `policy diff`. `Err` when the leaf does not parse.
pub fn judge(
    domain_name: &str,
    domain: &ecs_policy::DomainPolicy,
    case: ChainCase<'_>,
) -> Result<Judgement, String> {
    let leaf = ecs_ca_backends::chain::leaf_facts(&case.chain[0])
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let ders: Vec<Vec<u8>> = case.anchors.iter().map(|(_, d)| d.clone()).collect();
    let path = ecs_ca_backends::chain::validate_path(case.chain, &ders, case.now);
    let anchor = path.as_ref().ok().map(|i| ders[*i].clone());
    let revocation = match (&path, case.crls) {
        (Ok(i), Some(crls)) => Some(crls.and_then(|crls| {
            ecs_ca_backends::chain::check_revocation(case.chain, &ders[*i], &crls, case.now)
        })),
        _ => None,
    };
    let leaf_names = leaf.names();
    let description = leaf.key.describe();
    let decision = domain.decide_third_party(
        domain_name,
        &ecs_policy::ThirdPartyFacts {
            token_issuer: case.token_issuer,
            ees_id: case.ees_id,
            endpoint: case.endpoint,
            path: path.map(|i| case.anchors[i].0.clone()),
            leaf_ekus: &leaf.ekus,
            leaf_allows_signing: !leaf.has_key_usage || leaf.digital_signature,
            leaf_names: &leaf_names,
            leaf_not_before: leaf.not_before,
            leaf_not_after: leaf.not_after,
            key_type: key_type(leaf.key.kind),
            key_description: &description,
            revocation,
            requested_expiry: case.requested_expiry,
            secret_token_requested: case.secret_token_requested,
            now: case.now,
        },
    );
    Ok(Judgement {
        leaf,
        decision,
        anchor,
    })
}
