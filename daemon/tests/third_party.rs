//! Solution #12 step 4 over HTTPS: a third-party client certificate presented in the TLS
//! handshake becomes the EES certificate only if the ECSP domain's policy trusts it.

mod common;

use common::*;
use ecs_ca_backends::{
    CaParams, CertTemplate, KeySigner, LocalIssuer, RevocationReason, RevokedEntry, SanEntry,
    SoftwareKey, der_to_pem, generate_p256_pkcs8_pem, make_ca_certificate,
};
use ecs_daemon::client::{HttpVersion, HttpsClient};
use serde_json::json;
use std::sync::Arc;

fn ca(name: &str) -> LocalIssuer {
    let now = now();
    let key = Arc::new(SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap());
    let cert = make_ca_certificate(
        key.as_ref(),
        &CaParams {
            subject: format!("CN={name}"),
            spki_der: key.public_key_der().to_vec(),
            not_before: now - 30 * 86_400,
            not_after: now + 3650 * 86_400,
            path_len: Some(0),
            crl_url: None,
            serial: None,
        },
    )
    .unwrap();
    LocalIssuer::new(key, vec![cert.der]).unwrap()
}

/// A leaf from `issuer`, changed by `edit`; returns (certificate PEM, key PEM, serial).
fn leaf(issuer: &LocalIssuer, edit: impl Fn(&mut CertTemplate)) -> (String, String, String) {
    let key_pem = generate_p256_pkcs8_pem().unwrap();
    let key = SoftwareKey::from_pkcs8_pem(&key_pem).unwrap();
    let mut t = CertTemplate {
        common_name: ID.into(),
        organization: None,
        sans: vec![SanEntry::Dns(ID.into())],
        spki_der: key.public_key_der().to_vec(),
        now: now(),
        validity_secs: 90 * 86_400,
        client_auth: true,
        server_auth: true,
        crl_url: None,
        csr_pem: None,
    };
    edit(&mut t);
    let c = issuer.issue(&t).unwrap();
    (
        der_to_pem(&c.der, "CERTIFICATE"),
        key_pem.to_string(),
        c.serial_hex,
    )
}

const ID: &str = "ees-tp.ecsp.example";

fn root_pem(i: &LocalIssuer) -> String {
    der_to_pem(&i.chain_der()[0], "CERTIFICATE")
}

#[tokio::test]
async fn a_trusted_partner_certificate_is_accepted_and_every_rule_refuses_with_its_name() {
    let partner = ca("Partner Root");
    let rogue = ca("Rogue Root");
    let other_domain = ca("Domain B Root");
    let revoked = leaf(&partner, |_| {});
    let now = now();
    let crl = partner
        .sign_crl(
            1,
            now - 60,
            now + 86_400,
            &[RevokedEntry {
                serial_hex: revoked.2.clone(),
                revoked_at: now - 60,
                reason: RevocationReason::KeyCompromise,
            }],
        )
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let f = |n: &str| files.path().join(n).display().to_string();
    std::fs::write(f("partner-root.pem"), root_pem(&partner)).unwrap();
    std::fs::write(f("b-root.pem"), root_pem(&other_domain)).unwrap();
    std::fs::write(f("partner.crl"), &crl).unwrap();
    let (p, b, c) = (f("partner-root.pem"), f("b-root.pem"), f("partner.crl"));
    let ecs = Ecs::start_with(move |cfg| {
        cfg.push_str(&format!(
            "\n[domains.default.third_party]\naccept = true\ntrust_anchors = [\"{p}\"]\nrequire_eku = [\"clientAuth\"]\nnames_must_match = true\nmax_validity = \"398d\"\ncrls = [\"{c}\"]\n\
             \n[domains.ecsp-b]\ntoken_issuers = [\"dev\"]\nees_ids = [\"*\"]\n[domains.ecsp-b.third_party]\naccept = true\ntrust_anchors = [\"{b}\"]\n"
        ));
    });
    let body = json!({
        "eesProf": { "eesId": ID, "endPt": { "fqdn": ID }, "eecRegConf": false },
        "onboarding": { "thirdPartyCert": true, "secretToken": true }
    });
    let post = async |cert: Option<&(String, String, String)>| {
        let client = match cert {
            Some((c, k, _)) => HttpsClient::new(
                &ecs.root_pem,
                Some((c.as_bytes(), k.as_bytes())),
                HttpVersion::Http1,
            )
            .unwrap(),
            None => ecs.client(),
        };
        ecs.post_as(
            &client,
            Some(&ecs.token(ID)),
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
    };

    let r = post(None).await;
    assert_problem(&r, 401, "CLIENT_CERT_REQUIRED");
    let cases = [
        (
            "rogue issuer",
            leaf(&rogue, |_| {}),
            "third_party.trust_anchors",
        ),
        (
            "another domain's anchor",
            leaf(&other_domain, |_| {}),
            "third_party.trust_anchors",
        ),
        (
            "expired leaf",
            leaf(&partner, |t| {
                t.now = now - 10 * 86_400;
                t.validity_secs = 86_400
            }),
            "third_party.trust_anchors",
        ),
        (
            "no clientAuth",
            leaf(&partner, |t| t.client_auth = false),
            "third_party.require_eku",
        ),
        (
            "other names",
            leaf(&partner, |t| {
                t.common_name = "bank.example".into();
                t.sans = vec![SanEntry::Dns("bank.example".into())]
            }),
            "third_party.names_must_match",
        ),
        // Attack review, item 8: the CN is never a name (RFC 9525); it named the EES here.
        (
            "the eesId in the CN only",
            leaf(&partner, |t| {
                t.common_name = ID.into();
                t.sans = vec![SanEntry::Dns("bank.example".into())]
            }),
            "third_party.names_must_match",
        ),
        (
            "too long",
            leaf(&partner, |t| t.validity_secs = 500 * 86_400),
            "third_party.max_validity",
        ),
        ("revoked on the CRL", revoked, "third_party.crls"),
    ];
    for (what, cert, rule) in &cases {
        let r = post(Some(cert)).await;
        assert_problem(&r, 403, "UNTRUSTED_CLIENT_CERT");
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(
            detail.contains(&format!("domains.default.{rule}")),
            "{what}: {detail}"
        );
    }

    // The partner's good certificate: accepted as this EES's certificate.
    let good = leaf(&partner, |_| {});
    let r = post(Some(&good)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let ob = r.json()["onboarding"].clone();
    assert_eq!(ob["certSource"], json!("THIRD_PARTY"));
    assert_eq!(ob["eesCert"], json!(good.0));
    assert_eq!(ob["certChain"], json!([root_pem(&partner)]));
    assert!(ob["secretToken"].is_string());
    // It authenticates the registration afterwards.
    let ees = Ees {
        id: ob["registrationId"].as_str().unwrap().into(),
        location: r.header("location").unwrap().into(),
        cert_pem: good.0.clone(),
        key_pem: good.1.clone(),
        body: r.json(),
    };
    let got = ecs
        .client_as(&ees)
        .request("GET", &ees.location, &[], None)
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["onboarding"]["certSource"], json!("THIRD_PARTY"));

    // A domain's anchor never admits another domain's EES: domain B trusts its own root only.
    let id = "ees-b.ecsp.example";
    let b_leaf = leaf(&partner, |t| {
        t.common_name = id.into();
        t.sans = vec![SanEntry::Dns(id.into())]
    });
    let client = HttpsClient::new(
        &ecs.root_pem,
        Some((b_leaf.0.as_bytes(), b_leaf.1.as_bytes())),
        HttpVersion::Http1,
    )
    .unwrap();
    let body_b = json!({
        "eesProf": { "eesId": id, "endPt": { "fqdn": id }, "provId": "ecsp-b", "eecRegConf": false },
        "onboarding": { "thirdPartyCert": true }
    });
    let r = ecs
        .post_as(
            &client,
            Some(&ecs.token_with(id, Some("ecsp-b"))),
            "application/json",
            body_b.to_string().into_bytes(),
        )
        .await;
    assert_problem(&r, 403, "UNTRUSTED_CLIENT_CERT");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("domains.ecsp-b.third_party.trust_anchors")
    );

    let (intact, records) = ecs.audit();
    assert!(intact);
    assert!(
        records
            .iter()
            .any(|r| r["rule"] == json!("domains.default.third_party.crls"))
    );
}

/// Attack review, item 2: after the partner revoked the leaf (or the domain withdrew its
/// trust) and the policy was reloaded, the registration still answered GET and PATCH with the
/// certificate, and a PUT with a CSR turned it into an ECS-issued one. The third-party
/// certificate is now judged by the policy in force at every authentication.
#[tokio::test]
async fn a_revoked_or_withdrawn_third_party_certificate_stops_authenticating() {
    let partner = ca("Partner Root");
    let files = tempfile::tempdir().unwrap();
    let f = |n: &str| files.path().join(n).display().to_string();
    std::fs::write(f("partner-root.pem"), root_pem(&partner)).unwrap();
    let now = now();
    let write_crl = |revoked: &[&str]| {
        let entries: Vec<RevokedEntry> = revoked
            .iter()
            .map(|s| RevokedEntry {
                serial_hex: s.to_string(),
                revoked_at: now - 60,
                reason: RevocationReason::KeyCompromise,
            })
            .collect();
        let crl = partner
            .sign_crl(revoked.len() as u64 + 1, now - 60, now + 86_400, &entries)
            .unwrap();
        std::fs::write(f("partner.crl"), &crl).unwrap();
    };
    write_crl(&[]);
    let (p, c) = (f("partner-root.pem"), f("partner.crl"));
    let ecs = Ecs::start_with(move |cfg| {
        cfg.push_str(&format!(
            "\n[domains.default.third_party]\naccept = true\ntrust_anchors = [\"{p}\"]\ncrls = [\"{c}\"]\n"
        ))
    });

    let register = async |id: &str| {
        let cert = leaf(&partner, |t| {
            t.common_name = id.into();
            t.sans = vec![SanEntry::Dns(id.into())];
        });
        let client = HttpsClient::new(
            &ecs.root_pem,
            Some((cert.0.as_bytes(), cert.1.as_bytes())),
            HttpVersion::Http1,
        )
        .unwrap();
        let body = json!({
            "eesProf": { "eesId": id, "endPt": { "fqdn": id }, "eecRegConf": false },
            "onboarding": { "thirdPartyCert": true }
        });
        let r = ecs
            .post_as(
                &client,
                Some(&ecs.token(id)),
                "application/json",
                body.to_string().into_bytes(),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        (
            Ees {
                id: r.json()["onboarding"]["registrationId"]
                    .as_str()
                    .unwrap()
                    .into(),
                location: r.header("location").unwrap().into(),
                cert_pem: cert.0.clone(),
                key_pem: cert.1.clone(),
                body: r.json(),
            },
            cert.2,
        )
    };
    let (revoked, revoked_serial) = register("ees-revoked.ecsp.example").await;
    let (withdrawn, _) = register("ees-withdrawn.ecsp.example").await;
    for e in [&revoked, &withdrawn] {
        let r = ecs
            .client_as(e)
            .request("GET", &e.location, &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let reload = || {
        let (status, body) = ecs.control("POST", "/admin/v1/policy/reload");
        assert_eq!(status, 200, "{body}");
    };

    // The partner revokes one leaf; the policy is reloaded.
    write_crl(&[&revoked_serial]);
    reload();
    let rekey = |e: &Ees| {
        let key = Key::new();
        let mut body = e.body.clone();
        body["onboarding"] = json!({ "csr": key.csr("ees-revoked.ecsp.example") });
        body
    };
    let client = ecs.client_as(&revoked);
    for (method, body) in [
        ("GET", None),
        ("PATCH", Some(json!({ "expTime": "2099-01-01T00:00:00Z" }))),
        ("PUT", Some(rekey(&revoked))),
    ] {
        let (ct, bytes) = match (&body, method) {
            (Some(b), "PATCH") => (
                "application/merge-patch+json",
                Some(b.to_string().into_bytes()),
            ),
            (Some(b), _) => ("application/json", Some(b.to_string().into_bytes())),
            (None, _) => ("application/json", None),
        };
        let r = client
            .request(method, &revoked.location, &[("content-type", ct)], bytes)
            .await
            .unwrap();
        assert_problem(&r, 403, "UNTRUSTED_CLIENT_CERT");
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains("third_party.crls"), "{method}: {detail}");
    }
    // The other certificate is not revoked: it still works.
    let r = ecs
        .client_as(&withdrawn)
        .request("GET", &withdrawn.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // The domain withdraws its acceptance of third-party certificates.
    let cfg_path = ecs.config_path();
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("accept = true", "accept = false")).unwrap();
    reload();
    let r = ecs
        .client_as(&withdrawn)
        .request("GET", &withdrawn.location, &[], None)
        .await
        .unwrap();
    assert_problem(&r, 403, "UNTRUSTED_CLIENT_CERT");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("third_party.accept")
    );
    let (intact, _) = ecs.audit();
    assert!(intact);
}

/// Attack review, items 6 and 16: a relative `crls` path resolved against the working
/// directory, not the configuration's folder; and swapping the content of a CRL or trust
/// anchor file then reloading left the policy hash unchanged, so audit records could not tie
/// a decision to the policy that made it.
#[tokio::test]
async fn the_policy_hash_covers_the_files_it_reads_and_crl_paths_are_relative_to_the_config() {
    let partner = ca("Partner Root");
    let crl = |n: u64| {
        partner
            .sign_crl(n, now() - 60, now() + 86_400, &[])
            .unwrap()
    };
    let root = root_pem(&partner);
    let ecs = Ecs::start_with_files(
        &[
            ("partner-root.pem", root.as_bytes()),
            ("partner.crl", &crl(1)),
        ],
        |cfg| {
            cfg.push_str(
                "\n[domains.default.third_party]\naccept = true\ntrust_anchors = [\"partner-root.pem\"]\ncrls = [\"partner.crl\"]\n",
            )
        },
    );
    let dir = ecs.config_path().parent().unwrap().to_path_buf();
    let reload = || {
        let (status, body) = ecs.control("POST", "/admin/v1/policy/reload");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["policyHash"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = reload();
    assert_eq!(reload(), first, "nothing changed: the same hash");
    std::fs::write(dir.join("partner.crl"), crl(2)).unwrap();
    let second = reload();
    assert_ne!(second, first, "a new CRL file content is a new policy");
    std::fs::write(dir.join("partner-root.pem"), root_pem(&ca("Other Root"))).unwrap();
    assert_ne!(
        reload(),
        second,
        "a new trust anchor file content is a new policy"
    );
}

/// Attack review, item 13: a third-party certificate already registered for one eesId,
/// presented for a second, answered 500 (a serial collision); and once its registration had
/// ended, the certificate could never register again.
#[tokio::test]
async fn one_third_party_certificate_serves_one_active_registration_at_a_time() {
    let partner = ca("Partner Root");
    let root = root_pem(&partner);
    let ecs = Ecs::start_with_files(&[("partner-root.pem", root.as_bytes())], |cfg| {
        cfg.push_str(
            "\n[domains.default.third_party]\naccept = true\ntrust_anchors = [\"partner-root.pem\"]\n",
        )
    });
    let (a, b) = ("ees-a.ecsp.example", "ees-b.ecsp.example");
    let cert = leaf(&partner, |t| {
        t.common_name = a.into();
        t.sans = vec![SanEntry::Dns(a.into()), SanEntry::Dns(b.into())];
    });
    let client = HttpsClient::new(
        &ecs.root_pem,
        Some((cert.0.as_bytes(), cert.1.as_bytes())),
        HttpVersion::Http1,
    )
    .unwrap();
    let register = async |id: &str| {
        let body = json!({
            "eesProf": { "eesId": id, "endPt": { "fqdn": id }, "eecRegConf": false },
            "onboarding": { "thirdPartyCert": true }
        });
        ecs.post_as(
            &client,
            Some(&ecs.token(id)),
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
    };
    let first = register(a).await;
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let r = register(b).await;
    assert_problem(&r, 403, "UNTRUSTED_CLIENT_CERT");

    // Once the first registration has ended, the certificate may onboard again.
    let location = first.header("location").unwrap().to_string();
    let r = client
        .request("DELETE", &location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let second = register(b).await;
    assert_eq!(
        second.status,
        201,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    let r = client
        .request("GET", second.header("location").unwrap(), &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["eesProf"]["eesId"], json!(b));
    let r = client.request("GET", &location, &[], None).await.unwrap();
    assert_eq!(r.status, 404);
    // Presented on another EES's registration, it is recognised as bound to its own.
    let other = ecs.register("ees-issued.ecsp.example").await;
    let r = client
        .request("GET", &other.location, &[], None)
        .await
        .unwrap();
    assert_refusal(
        &r,
        403,
        "NOT_REGISTRATION_OWNER",
        "bound to another registration",
    );
}
