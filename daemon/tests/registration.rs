//! Contract tests of `contract/api.md` §2–§6 against a real `ecsd` over HTTPS.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Value, json};
use std::sync::Arc;
use x509_parser::prelude::*;

fn pem_der(pem: &str) -> Vec<u8> {
    ecs_ca_backends::pem_to_der(pem, "CERTIFICATE").unwrap()
}

#[tokio::test]
async fn onboarding_issues_a_certificate_that_follows_the_profile() {
    let ecs = Ecs::start();
    let ees_id = "ees1.edn1.ecsp-a.example";
    let key = Key::new();
    let mut body = registration_body(ees_id, &key.csr("ignored.example"));
    body["expTime"] = json!("2099-01-01T00:00:00Z");
    let r = ecs.post(Some(&ecs.token(ees_id)), &body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let ees = Ees::from_response(&r, key);
    let b = &ees.body;

    // Location names the registration; the ID carries at least 128 bits.
    assert_eq!(ees.location, ecs.url(&format!("{API}/{}", ees.id)));
    assert!(ees.id.len() >= 22, "{}", ees.id);
    // expTime is the ECS's decision: the proposal capped at max_registration (365 days).
    let exp = ::time::OffsetDateTime::parse(
        b["expTime"].as_str().unwrap(),
        &::time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    assert!((exp - (now() + 365 * 86_400)).abs() < 60, "{exp}");
    assert_eq!(b["eesProf"]["eesId"], json!(ees_id));
    let ob = &b["onboarding"];
    assert_eq!(ob["certSource"], json!("ECS_ISSUED"));
    assert_eq!(ob["authInfo"]["authMethod"], json!("TLS_CLIENT_CERT"));
    let secret = ees.secret_token().unwrap();
    assert!(secret.len() >= 43, "at least 256 bits: {secret}");

    let der = pem_der(&ees.cert_pem);
    assert_eq!(
        ob["authInfo"]["certFingerprint"],
        json!(ecs_ca_backends::sha256_hex(&der))
    );
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(cert.version(), X509Version::V3);
    let serial = cert.raw_serial();
    assert!(serial.len() >= 8 && serial.len() <= 20 && serial[0] & 0x80 == 0);
    // Names come from the registration, never from the CSR.
    assert_eq!(cert.subject().to_string(), format!("CN={ees_id}"));
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::DNSName(ees_id)]);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "digitalSignature only");
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.client_auth && eku.value.server_auth);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let crl_dp = cert
        .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_CRL_DISTRIBUTION_POINTS)
        .unwrap()
        .unwrap();
    let ParsedExtension::CRLDistributionPoints(dps) = crl_dp.parsed_extension() else {
        panic!("CRL DP does not parse")
    };
    let Some(DistributionPointName::FullName(names)) = &dps.points[0].distribution_point else {
        panic!("no full name")
    };
    assert_eq!(names[0], GeneralName::URI(&ecs.url("/pki/v1/crl")));
    let validity = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(validity, 30 * 86_400, "the domain's cert_validity");
    assert_eq!(
        ob["certExpTime"].as_str().unwrap(),
        ecs_daemon::clock::format_time(cert.validity().not_after.timestamp())
    );

    // The chain: issuing CA first, the root last; openssl agrees it all verifies.
    let chain: Vec<&str> = ob["certChain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        pem_der(chain[1]),
        pem_der(&String::from_utf8(ecs.root_pem.clone()).unwrap())
    );
    let d = ecs.dir.path();
    std::fs::write(d.join("leaf.pem"), &ees.cert_pem).unwrap();
    std::fs::write(d.join("issuing.pem"), chain[0]).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl(
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                "root.pem",
                "-untrusted",
                "issuing.pem",
                "leaf.pem",
            ],
            d,
        );
        assert!(ok, "{out}");
    }
}

#[tokio::test]
async fn every_refusal_has_the_contract_cause() {
    let ecs = Ecs::start();
    let key = Key::new();
    let id = "ees2.ecsp.example";
    let csr = key.csr(id);
    let good = registration_body(id, &csr);
    let token = ecs.token(id);

    // (description, token, content type, body, status, cause)
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut b = good.clone();
        f(&mut b);
        b.to_string().into_bytes()
    };
    let weak_rsa = openssl_csr(&ecs, &["-newkey", "rsa:2048"]);
    let weak_curve = openssl_csr(
        &ecs,
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
    );
    type Case<'a> = (&'a str, Option<String>, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "not JSON",
            Some(token.clone()),
            "application/json",
            b"{nope".to_vec(),
            400,
            "INVALID_MSG_FORMAT",
        ),
        (
            "not an object",
            Some(token.clone()),
            "application/json",
            b"[1]".to_vec(),
            400,
            "INVALID_MSG_FORMAT",
        ),
        (
            "no eesProf",
            Some(token.clone()),
            "application/json",
            edit(&|b| {
                b.as_object_mut().unwrap().remove("eesProf");
            }),
            400,
            "MANDATORY_IE_MISSING",
        ),
        (
            "no onboarding",
            Some(token.clone()),
            "application/json",
            edit(&|b| {
                b.as_object_mut().unwrap().remove("onboarding");
            }),
            400,
            "MANDATORY_IE_MISSING",
        ),
        (
            "two endpoint forms",
            Some(token.clone()),
            "application/json",
            edit(&|b| b["eesProf"]["endPt"]["uri"] = json!("https://x.example")),
            400,
            "MANDATORY_IE_INCORRECT",
        ),
        (
            "csr and thirdPartyCert",
            Some(token.clone()),
            "application/json",
            edit(&|b| b["onboarding"]["thirdPartyCert"] = json!(true)),
            400,
            "MANDATORY_IE_INCORRECT",
        ),
        (
            "bad expTime",
            Some(token.clone()),
            "application/json",
            edit(&|b| b["expTime"] = json!("soon")),
            400,
            "MANDATORY_IE_INCORRECT",
        ),
        (
            "CSR garbage",
            Some(token.clone()),
            "application/json",
            edit(&|b| {
                b["onboarding"]["csr"] = json!(
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                )
            }),
            400,
            "INVALID_CSR",
        ),
        (
            "CSR signed by another key",
            Some(token.clone()),
            "application/json",
            edit(&|b| b["onboarding"]["csr"] = json!(forged_csr(&csr))),
            400,
            "INVALID_CSR",
        ),
        (
            "RSA 2048 outside key_types",
            Some(token.clone()),
            "application/json",
            edit(&|b| b["onboarding"]["csr"] = json!(weak_rsa)),
            400,
            "WEAK_KEY",
        ),
        (
            "P-521 not supported",
            Some(token.clone()),
            "application/json",
            edit(&|b| b["onboarding"]["csr"] = json!(weak_curve)),
            400,
            "WEAK_KEY",
        ),
        (
            "no token",
            None,
            "application/json",
            good.to_string().into_bytes(),
            401,
            "INVALID_TOKEN",
        ),
        (
            "token for another EES",
            Some(ecs.token("other.example")),
            "application/json",
            good.to_string().into_bytes(),
            403,
            "EES_ID_MISMATCH",
        ),
        (
            "token provId differs",
            Some(ecs.token_with(id, Some("ecsp-b"))),
            "application/json",
            good.to_string().into_bytes(),
            403,
            "EES_ID_MISMATCH",
        ),
        (
            "unknown ECSP domain",
            Some(ecs.token_with(id, Some("ecsp-z"))),
            "application/json",
            edit(&|b| b["eesProf"]["provId"] = json!("ecsp-z")),
            403,
            "POLICY_REJECTED",
        ),
        (
            "third party without a client certificate",
            Some(token.clone()),
            "application/json",
            edit(&|b| {
                b["onboarding"] = json!({"thirdPartyCert": true});
            }),
            401,
            "CLIENT_CERT_REQUIRED",
        ),
        (
            "wrong content type",
            Some(token.clone()),
            "text/plain",
            good.to_string().into_bytes(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "over 64 KiB",
            Some(token.clone()),
            "application/json",
            vec![b' '; 64 * 1024 + 1],
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (what, token, ct, body, status, cause) in cases {
        let r = ecs.post_raw(token.as_deref(), ct, body).await;
        assert_eq!(
            (
                r.status,
                r.json()["cause"].as_str().unwrap_or("").to_string()
            ),
            (status, cause.to_string()),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        if cause == "INVALID_TOKEN" {
            assert!(
                r.header("www-authenticate")
                    .unwrap()
                    .contains("invalid_token"),
                "{what}"
            );
        }
    }
    let r = ecs
        .post(
            Some(&token),
            &edit(&|b| {
                b["eesProf"].as_object_mut().unwrap().remove("eesId");
            })
            .pipe_json(),
        )
        .await;
    assert_problem(&r, 400, "MANDATORY_IE_MISSING");
    assert_eq!(
        r.json()["invalidParams"][0]["param"],
        json!("/eesProf/eesId")
    );

    // Nothing was registered and the token is still good: it registers now.
    let r = ecs.post(Some(&token), &good).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // ... and only once.
    let r = ecs.post(Some(&token), &good).await;
    assert_problem(&r, 403, "TOKEN_REPLAYED");
    let r = ecs
        .post(
            Some(&ecs.token(id)),
            &registration_body(id, &Key::new().csr(id)),
        )
        .await;
    assert_problem(&r, 403, "EES_ALREADY_REGISTERED");

    // Every refusal is in the audit log with its cause, and the chain holds.
    let (intact, records) = ecs.audit();
    assert!(intact);
    let refused = records
        .iter()
        .filter(|r| r["outcome"] == json!("refused"))
        .count();
    assert!(refused >= 20, "{refused} refusals recorded");
    assert!(records.iter().any(
        |r| r["cause"] == json!("WEAK_KEY") && r["rule"] == json!("domains.default.key_types")
    ));
}

trait PipeJson {
    fn pipe_json(self) -> Value;
}

impl PipeJson for Vec<u8> {
    fn pipe_json(self) -> Value {
        serde_json::from_slice(&self).unwrap()
    }
}

/// A CSR made by openssl with `key_args` (e.g. an RSA 2048 or P-521 key).
fn openssl_csr(ecs: &Ecs, key_args: &[&str]) -> String {
    let dir = ecs.dir.path();
    let mut args = vec![
        "req", "-new", "-nodes", "-subj", "/CN=x", "-keyout", "k.pem", "-out", "r.pem",
    ];
    args.extend_from_slice(key_args);
    let (ok, out) = openssl(&args, dir);
    assert!(ok, "{out}");
    std::fs::read_to_string(dir.join("r.pem")).unwrap()
}

/// `csr` with its public key swapped for another's: the signature no longer proves
/// possession.
fn forged_csr(csr: &str) -> String {
    let mut der = ecs_ca_backends::pem_to_der(csr, "CERTIFICATE REQUEST").unwrap();
    let other = ecs_ca_backends::pem_to_der(&Key::new().csr("x"), "CERTIFICATE REQUEST").unwrap();
    // The 65-byte uncompressed point follows "03 42 00 04" in both.
    let find = |d: &[u8]| {
        d.windows(4)
            .position(|w| w == [0x03, 0x42, 0x00, 0x04])
            .unwrap()
            + 3
    };
    let (a, b) = (find(&der), find(&other));
    der[a..a + 65].copy_from_slice(&other[b..b + 65]);
    ecs_ca_backends::der_to_pem(&der, "CERTIFICATE REQUEST")
}

#[tokio::test]
async fn forged_and_misdirected_tokens_are_refused() {
    let ecs = Ecs::start();
    let id = "ees3.ecsp.example";
    let body = registration_body(id, &Key::new().csr(id));
    let es256 = || {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("dev-1".into());
        h
    };
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = ecs.claims(id);
        f(&mut c);
        c
    };
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    // HS256 with the issuer's public key (from its JWKS) as the HMAC secret.
    let jwks = std::fs::read(ecs.dir.path().join("keys/dev-token-issuer.jwks.json")).unwrap();
    let hs256 = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("dev-1".into());
        jsonwebtoken::encode(
            &h,
            &ecs.claims(id),
            &jsonwebtoken::EncodingKey::from_secret(&jwks),
        )
        .unwrap()
    };
    let foreign = {
        let pem = ecs_ca_backends::generate_p256_pkcs8_pem().unwrap();
        jsonwebtoken::encode(
            &es256(),
            &ecs.claims(id),
            &jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            ecs.token_claims(
                es256(),
                &with(&|c| {
                    c["exp"] = json!(now() - 120);
                    c["iat"] = json!(now() - 900);
                    c["nbf"] = json!(now() - 900);
                }),
            ),
        ),
        (
            "not yet valid",
            ecs.token_claims(es256(), &with(&|c| c["nbf"] = json!(now() + 300))),
        ),
        // Attack review, item 15: an unknown critical header parameter, and a token valid for
        // 100 years (whose ID would be kept as long), were accepted.
        (
            "unknown critical header",
            ecs.token_claims(
                {
                    let mut h = es256();
                    h.crit = Some(vec!["urn:example:must-understand".into()]);
                    h
                },
                &ecs.claims(id),
            ),
        ),
        (
            "a hundred years",
            ecs.token_claims(
                es256(),
                &with(&|c| c["exp"] = json!(now() + 100 * 365 * 86_400)),
            ),
        ),
        (
            "issued in the future",
            ecs.token_claims(es256(), &with(&|c| c["iat"] = json!(now() + 300))),
        ),
        (
            "wrong audience",
            ecs.token_claims(es256(), &with(&|c| c["aud"] = json!("another-ecs"))),
        ),
        (
            "untrusted issuer",
            ecs.token_claims(
                es256(),
                &with(&|c| c["iss"] = json!("https://evil.example")),
            ),
        ),
        (
            "no scope",
            ecs.token_claims(
                es256(),
                &with(&|c| {
                    c.as_object_mut().unwrap().remove("scope");
                }),
            ),
        ),
        (
            "other scope",
            ecs.token_claims(
                es256(),
                &with(&|c| c["scope"] = json!("eecs-eesregistration-admin other")),
            ),
        ),
        (
            "no jti",
            ecs.token_claims(
                es256(),
                &with(&|c| {
                    c.as_object_mut().unwrap().remove("jti");
                }),
            ),
        ),
        (
            "unknown kid",
            ecs.token_claims(
                {
                    let mut h = es256();
                    h.kid = Some("nope".into());
                    h
                },
                &ecs.claims(id),
            ),
        ),
        ("signed by another key", foreign),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&ecs.claims(id))
            ),
        ),
        ("HS256 keyed with the public key", hs256),
        ("garbage", "a.b.c".to_string()),
    ];
    for (what, token) in cases {
        let r = ecs.post(Some(&token), &body).await;
        assert_problem(&r, 401, "INVALID_TOKEN");
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .starts_with("Bearer error=\"invalid_token\""),
            "{what}"
        );
    }
    // The same claims, correctly signed, pass: the cases above failed for their fault only.
    let r = ecs
        .post(Some(&ecs.token_claims(es256(), &ecs.claims(id))), &body)
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn one_token_used_sixteen_times_at_once_creates_one_registration() {
    let ecs = std::sync::Arc::new(Ecs::start());
    let id = "ees4.ecsp.example";
    let token = ecs.token(id);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let ecs = ecs.clone();
        let token = token.clone();
        let body = registration_body(id, &Key::new().csr(id));
        tasks.push(tokio::spawn(
            async move { ecs.post(Some(&token), &body).await },
        ));
    }
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => created += 1,
            _ => assert_problem(&r, 403, "TOKEN_REPLAYED"),
        }
    }
    assert_eq!(created, 1);
    let (intact, records) = ecs.audit();
    assert!(intact);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["outcome"] == json!("accepted"))
            .count(),
        1
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r["cause"] == json!("TOKEN_REPLAYED"))
            .count(),
        15
    );
}

#[tokio::test]
async fn an_ees_reads_updates_rekeys_and_deregisters_with_its_certificate() {
    let ecs = Ecs::start();
    let a = ecs.register("ees-a.ecsp.example").await;
    let b = ecs.register("ees-b.ecsp.example").await;

    // No certificate: 401. Another registration's certificate: 403.
    let r = ecs
        .client()
        .request("GET", &a.location, &[], None)
        .await
        .unwrap();
    assert_problem(&r, 401, "CLIENT_CERT_REQUIRED");
    let r = ecs
        .client_as(&b)
        .request("GET", &a.location, &[], None)
        .await
        .unwrap();
    assert_refusal(
        &r,
        403,
        "NOT_REGISTRATION_OWNER",
        "bound to another registration",
    );
    let r = ecs
        .client_as(&a)
        .request("GET", &ecs.url(&format!("{API}/nope")), &[], None)
        .await
        .unwrap();
    assert_problem(&r, 404, "REGISTRATION_NOT_FOUND");

    let r = ecs
        .client_as(&a)
        .request("GET", &a.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["onboarding"]["registrationId"], json!(a.id));
    assert!(
        r.json()["onboarding"].get("secretToken").is_none(),
        "never returned again"
    );

    // PATCH (merge patch) changes the endpoint and expTime.
    let patch = json!({"eesProf": {"endPt": {"fqdn": "ees-a2.ecsp.example"}}, "expTime": "2099-06-01T00:00:00Z"});
    let r = ecs
        .client_as(&a)
        .request(
            "PATCH",
            &a.location,
            &[("content-type", "application/merge-patch+json")],
            Some(patch.to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["eesProf"]["endPt"]["fqdn"],
        json!("ees-a2.ecsp.example")
    );
    let r = ecs
        .client_as(&a)
        .request(
            "PATCH",
            &a.location,
            &[("content-type", "application/json")],
            Some(b"{}".to_vec()),
        )
        .await
        .unwrap();
    assert_problem(&r, 415, "UNSUPPORTED_MEDIA_TYPE");

    // PUT may not change the eesId.
    let mut prof = r_json_profile(&a);
    prof["eesId"] = json!("someone-else.example");
    let r = ecs
        .client_as(&a)
        .request(
            "PUT",
            &a.location,
            &[("content-type", "application/json")],
            Some(json!({"eesProf": prof}).to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_problem(&r, 403, "MANDATORY_IE_INCORRECT");

    // Re-key by CSR: a new certificate; the old one is revoked (superseded) and refused.
    let key2 = Key::new();
    let put = json!({"eesProf": r_json_profile(&a), "onboarding": {"csr": key2.csr("x")}});
    let r = ecs
        .client_as(&a)
        .request(
            "PUT",
            &a.location,
            &[("content-type", "application/json")],
            Some(put.to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let a2 = Ees {
        location: a.location.clone(),
        ..Ees::from_response(&with_location(r, &a.location), key2)
    };
    assert_ne!(a2.cert_pem, a.cert_pem);
    let r = ecs
        .client_as(&a)
        .request("GET", &a.location, &[], None)
        .await
        .unwrap();
    assert_refusal(&r, 403, "NOT_REGISTRATION_OWNER", "revoked (superseded)");
    let r = ecs
        .client_as(&a2)
        .request("GET", &a.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // Re-key with the Secret_token when the key is lost.
    let key3 = Key::new();
    let put = json!({"eesProf": r_json_profile(&a), "onboarding": {"csr": key3.csr("x")}});
    let bad = format!("Bearer {}", "x".repeat(43));
    let r = ecs
        .client()
        .request(
            "PUT",
            &a.location,
            &[
                ("content-type", "application/json"),
                ("authorization", &bad),
            ],
            Some(put.to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_problem(&r, 401, "INVALID_TOKEN");
    let good = format!("Bearer {}", a.secret_token().unwrap());
    let r = ecs
        .client()
        .request(
            "PUT",
            &a.location,
            &[
                ("content-type", "application/json"),
                ("authorization", &good),
            ],
            Some(put.to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let a3 = Ees::from_response(&with_location(r, &a.location), key3);

    // DELETE: 204, then 404, the certificate refused and every one of them on the CRL.
    let r = ecs
        .client_as(&a3)
        .request("DELETE", &a.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let r = ecs
        .client_as(&a3)
        .request("GET", &a.location, &[], None)
        .await
        .unwrap();
    assert_problem(&r, 404, "REGISTRATION_NOT_FOUND");
    let crl = ecs.crl_at("/pki/v1/crl").await;
    let (_, parsed) = CertificateRevocationList::from_der(&crl).unwrap();
    let reasons: Vec<(Vec<u8>, u8)> = parsed
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.reason_code().unwrap().1.0))
        .collect();
    for (ees, reason) in [(&a, 4u8), (&a2, 4), (&a3, 5)] {
        let der = pem_der(&ees.cert_pem);
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert!(
            reasons.contains(&(c.raw_serial().to_vec(), reason)),
            "{reasons:?}"
        );
    }
    // The other EES is untouched; its registration ID can be registered again.
    let r = ecs
        .client_as(&b)
        .request("GET", &b.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    ecs.register("ees-a.ecsp.example").await;
}

fn r_json_profile(e: &Ees) -> Value {
    e.body["eesProf"].clone()
}

fn with_location(
    mut r: ecs_daemon::client::Response,
    location: &str,
) -> ecs_daemon::client::Response {
    r.headers.insert("location", location.parse().unwrap());
    r
}

#[tokio::test]
async fn the_ca_chain_and_a_fresh_crl_are_published() {
    let ecs = Ecs::start();
    let r = ecs
        .client()
        .request("GET", &ecs.url("/pki/v1/ca"), &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/pem-certificate-chain")
    );
    let chain = ecs_ca_backends::pem_chain_to_der(&String::from_utf8(r.body).unwrap()).unwrap();
    assert_eq!(chain.len(), 2, "issuing CA, then root");
    let (_, issuing) = X509Certificate::from_der(&chain[0]).unwrap();

    let first = ecs.crl_at("/pki/v1/crl").await;
    let (_, c1) = CertificateRevocationList::from_der(&first).unwrap();
    assert_eq!(c1.issuer(), issuing.subject());
    assert!(c1.next_update().is_some());
    // A revocation makes a new CRL with a higher number.
    let e = ecs.register("ees-crl.ecsp.example").await;
    let r = ecs
        .client_as(&e)
        .request("DELETE", &e.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let second = ecs.crl_at("/pki/v1/crl").await;
    let (_, c2) = CertificateRevocationList::from_der(&second).unwrap();
    assert!(c2.crl_number().unwrap() > c1.crl_number().unwrap());
    assert_eq!(c2.iter_revoked_certificates().count(), 1);
    // openssl verifies it too.
    std::fs::write(ecs.dir.path().join("crl.der"), &second).unwrap();
    std::fs::write(
        ecs.dir.path().join("issuing.pem"),
        ecs_ca_backends::der_to_pem(&chain[0], "CERTIFICATE"),
    )
    .unwrap();
    let (ok, out) = openssl(
        &[
            "crl",
            "-in",
            "crl.der",
            "-inform",
            "DER",
            "-CAfile",
            "issuing.pem",
            "-noout",
        ],
        ecs.dir.path(),
    );
    assert!(ok && out.contains("verify OK"), "{out}");

    let r = ecs
        .client()
        .request("GET", &ecs.url("/nowhere"), &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = ecs
        .client()
        .request("GET", &ecs.url(API), &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
}

#[tokio::test]
async fn a_registration_past_its_exptime_is_implicitly_deregistered() {
    let ecs = Ecs::start_with(|c| {
        *c = c.replace("admin_listen", "sweep_interval = \"1s\"\nadmin_listen")
    });
    let soon = ecs_daemon::clock::format_time(now() + 2);
    let e = ecs
        .register_body("ees-exp.ecsp.example", |b| b["expTime"] = json!(soon))
        .await;
    let r = ecs
        .client_as(&e)
        .request("GET", &e.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let r = ecs
        .client_as(&e)
        .request("GET", &e.location, &[], None)
        .await
        .unwrap();
    assert_problem(&r, 404, "REGISTRATION_NOT_FOUND");
    let der = ecs.crl_at("/pki/v1/crl").await;
    let (_, parsed) = CertificateRevocationList::from_der(&der).unwrap();
    let revoked: Vec<_> = parsed.iter_revoked_certificates().collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        revoked[0].reason_code().unwrap().1.0,
        5,
        "cessationOfOperation"
    );
    let (intact, records) = ecs.audit();
    assert!(intact);
    assert!(records.iter().any(|r| r["action"] == json!("expire")));
}

/// A spent token, or an EES ID an active registration holds, is refused before the CSR and
/// the policy are judged (the order of checks in the API reference), so a replay learns
/// nothing from its body; and before anything is signed: no certificate exists that the
/// store never recorded.
#[tokio::test]
async fn a_replayed_token_or_a_taken_ees_id_is_refused_whatever_its_body_and_signs_nothing() {
    let ecs = Ecs::start();
    let id = "ees-once.ecsp.example";
    let issued = || {
        let (_, metrics) = admin_get(ecs.admin_port, "/metrics").unwrap();
        metrics
            .lines()
            .filter(|l| l.starts_with("ecs_issuance_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let token = ecs.token(id);
    let good = || registration_body(id, &Key::new().csr(id));
    let r = ecs.post(Some(&token), &good()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(issued(), 1);
    let broken_csr = registration_body(
        id,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    );
    for body in [good(), broken_csr] {
        let r = ecs.post(Some(&token), &body).await;
        assert_problem(&r, 403, "TOKEN_REPLAYED");
        let r = ecs.post(Some(&ecs.token(id)), &body).await;
        assert_problem(&r, 403, "EES_ALREADY_REGISTERED");
    }
    assert_eq!(issued(), 1, "a refused claim reached the signer");
}

#[tokio::test]
async fn the_admin_listener_reports_health_and_metrics() {
    let ecs = Ecs::start();
    ecs.register("ees-m.ecsp.example").await;
    let _ = ecs.post(None, &json!({})).await;
    assert_eq!(admin_get(ecs.admin_port, "/healthz").unwrap().0, 200);
    assert_eq!(admin_get(ecs.admin_port, "/readyz").unwrap().0, 200);
    let (status, metrics) = admin_get(ecs.admin_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            r#"ecs_registration_requests_total{action="register",cause="",outcome="accepted"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cause="INVALID_TOKEN",outcome="refused""#),
        "{metrics}"
    );
    assert!(metrics.contains("ecs_issuance_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("ecs_active_registrations 1"), "{metrics}");
    let store_bytes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ecs_store_bytes "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(store_bytes > 0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rekeys_are_serialised_and_every_certificate_is_revoked_at_the_end() {
    let ecs = Arc::new(Ecs::start());
    let a = ecs.register("ees-race.ecsp.example").await;
    let auth = format!("Bearer {}", a.secret_token().unwrap());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (ecs, auth, location, prof) = (
            ecs.clone(),
            auth.clone(),
            a.location.clone(),
            r_json_profile(&a),
        );
        tasks.push(tokio::spawn(async move {
            let key = Key::new();
            let put = json!({"eesProf": prof, "onboarding": {"csr": key.csr("x")}});
            let r = ecs
                .client()
                .request(
                    "PUT",
                    &location,
                    &[
                        ("content-type", "application/json"),
                        ("authorization", &auth),
                    ],
                    Some(put.to_string().into_bytes()),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            Ees::from_response(&with_location(r, &location), key)
        }));
    }
    let mut issued = vec![a];
    for t in tasks {
        issued.push(t.await.unwrap());
    }
    // Exactly one of them is current; it de-registers.
    let mut current = Vec::new();
    for e in &issued {
        let r = ecs
            .client_as(e)
            .request("GET", &e.location, &[], None)
            .await
            .unwrap();
        if r.status == 200 {
            current.push(e);
        }
    }
    assert_eq!(current.len(), 1);
    let r = ecs
        .client_as(current[0])
        .request("DELETE", &current[0].location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    // No certificate of the registration is left unrevoked.
    let der = ecs.crl_at("/pki/v1/crl").await;
    let (_, parsed) = CertificateRevocationList::from_der(&der).unwrap();
    let revoked: Vec<Vec<u8>> = parsed
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    for e in &issued {
        let der = pem_der(&e.cert_pem);
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        assert!(
            revoked.contains(&c.raw_serial().to_vec()),
            "a certificate was left unrevoked"
        );
    }
    assert_eq!(revoked.len(), issued.len());
}

/// Attack review, item 1: an EES with a valid token for its own name asked for a certificate
/// naming the ECS itself, loopback, or another domain's EES. Every endpoint name and address
/// is now authorised by its domain's policy; the certificate carries only approved names.
#[tokio::test]
async fn an_ees_gets_a_certificate_only_for_names_its_domain_approves() {
    let ecs = Ecs::start_with(|c| {
        *c = c.replace(
            "ees_ids = [\"*\"]",
            "ees_ids = [\"*.ecsp-a.example\"]\nendpoint_names = [\"*.edn1.ecsp-a.example\"]\nendpoint_addresses = [\"10.20.0.0/16\"]",
        );
    });
    let id = "evil.edn1.ecsp-a.example";
    let cases = [
        (json!({ "ipv4Addrs": ["127.0.0.1"] }), "endpoint_addresses"),
        (json!({ "ipv4Addrs": ["10.30.0.1"] }), "endpoint_addresses"),
        (json!({ "ipv6Addrs": ["::1"] }), "endpoint_addresses"),
        (json!({ "fqdn": "ecs.mno.example" }), "endpoint_names"),
        (json!({ "fqdn": "ees1.ecsp-b.example" }), "endpoint_names"),
        (
            json!({ "uri": "https://ecs.mno.example/api" }),
            "endpoint_names",
        ),
        (
            json!({ "uri": "https://127.0.0.1:8443/" }),
            "endpoint_addresses",
        ),
        (json!({ "uri": "urn:ees:evil" }), "endpoint_names"),
    ];
    for (endpoint, rule) in &cases {
        let key = Key::new();
        let mut body = registration_body(id, &key.csr(id));
        body["eesProf"]["endPt"] = endpoint.clone();
        let r = ecs.post(Some(&ecs.token(id)), &body).await;
        assert_problem(&r, 403, "POLICY_REJECTED");
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(
            detail.contains(&format!("domains.default.{rule}")),
            "{endpoint}: {detail}"
        );
    }
    // The ECS's own identifier is never an EES's name, even as an eesId its patterns admit.
    let own = "ecs.mno.example";
    let e = ecs
        .post(
            Some(&ecs.token(own)),
            &registration_body(own, &Key::new().csr(own)),
        )
        .await;
    assert_problem(&e, 403, "POLICY_REJECTED");

    // Inside the rules: the certificate names exactly the approved endpoint and the eesId.
    let ok = ecs
        .register_body(id, |b| {
            b["eesProf"]["endPt"] = json!({ "ipv4Addrs": ["10.20.1.2"] });
        })
        .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), &ok.cert_pem).unwrap();
    let (done, text) = openssl(
        &[
            "x509",
            "-in",
            "cert.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        dir.path(),
    );
    assert!(done, "{text}");
    assert!(text.contains("IP Address:10.20.1.2"), "{text}");
    assert!(text.contains(&format!("DNS:{id}")), "{text}");
    assert!(
        !text.contains("127.0.0.1") && !text.contains("ecs.mno.example"),
        "{text}"
    );

    // Every refusal is in the audit log with its rule.
    let (intact, records) = ecs.audit();
    assert!(intact);
    let refused = records
        .iter()
        .filter(|r| r["cause"] == json!("POLICY_REJECTED"))
        .count();
    assert_eq!(refused, cases.len() + 1);
}

/// Attack review, item 12: malformed registration IDs (404) and wrong methods (405) left no
/// audit record. Every refusal is audited now, and a flood of identical ones is bounded: the
/// first of each minute one by one, the rest as one counted record.
#[tokio::test]
async fn every_refusal_is_audited_and_a_flood_is_counted_not_written_one_by_one() {
    let mut ecs = Ecs::start();
    let client = ecs.client();
    let r = client
        .request("GET", &ecs.url(&format!("{API}/a/b")), &[], None)
        .await
        .unwrap();
    assert_problem(&r, 404, "REGISTRATION_NOT_FOUND");
    let flood = 100;
    for _ in 0..flood {
        let r = client
            .request("POST", &ecs.url(&format!("{API}/some-id")), &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 405);
    }
    assert!(ecs.terminate().success());
    let (intact, records) = ecs.audit();
    assert!(intact);
    let by_cause = |cause: &str, action: Option<&str>| {
        records
            .iter()
            .filter(|r| r["cause"] == json!(cause))
            .filter(|r| action.is_none_or(|a| r["action"] == json!(a)))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(by_cause("REGISTRATION_NOT_FOUND", Some("get")).len(), 1);
    let one_by_one = by_cause("METHOD_NOT_ALLOWED", Some("request"));
    assert_eq!(
        one_by_one.len(),
        20,
        "the bound per address and cause per minute"
    );
    let counted = by_cause("METHOD_NOT_ALLOWED", Some("refusals_aggregated"));
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert!(
        counted[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{} more refusals", flood - 20)),
        "{}",
        counted[0]
    );
}

/// A PUT with `thirdPartyCert: true` was refused naming `third_party.accept`, even in a
/// domain that accepts third-party certificates: the audit record named a rule that did not
/// decide. It is refused naming none.
#[tokio::test]
async fn a_put_cannot_switch_to_a_third_party_certificate_and_blames_no_rule() {
    let ecs = Ecs::start();
    let e = ecs.register("ees-put-tp.ecsp.example").await;
    let mut body = e.body.clone();
    body["onboarding"] = json!({ "thirdPartyCert": true });
    let r = ecs
        .client_as(&e)
        .request(
            "PUT",
            &e.location,
            &[("content-type", "application/json")],
            Some(body.to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_problem(&r, 403, "POLICY_REJECTED");
    assert!(
        !r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("third_party.accept")
    );
    let (_, records) = ecs.audit();
    let refusal = records
        .iter()
        .rev()
        .find(|r| r["action"] == json!("update"))
        .unwrap();
    assert!(refusal.get("rule").is_none(), "{refusal}");
}
