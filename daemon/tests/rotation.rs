//! Rotating the ECS's CAs as docs/operations.md ("Rotating keys and certificates") says:
//! a new issuing CA (here under a new root, which is the root rotation too) becomes the
//! domain's backend, the old one stays configured and keeps publishing its CRL, and every
//! registration moves over at its next re-key.

mod common;

use common::*;
use serde_json::json;
use x509_parser::prelude::*;

fn issuer_cn(ees_cert_pem: &str) -> String {
    let der = ecs_ca_backends::pem_chain_to_der(ees_cert_pem).unwrap();
    let (_, c) = X509Certificate::from_der(&der[0]).unwrap();
    c.issuer().to_string()
}

fn serial_of(ees: &Ees) -> Vec<u8> {
    let der = ecs_ca_backends::pem_chain_to_der(&ees.cert_pem).unwrap();
    let (_, c) = X509Certificate::from_der(&der[0]).unwrap();
    c.raw_serial().to_vec()
}

/// (issuer, revoked serials with their reason codes) of the CRL at `path`.
async fn crl(ecs: &Ecs, path: &str) -> (String, Vec<(Vec<u8>, u8)>) {
    let der = ecs.crl_at(path).await;
    let (_, c) = CertificateRevocationList::from_der(&der).unwrap();
    let entries = c
        .iter_revoked_certificates()
        .map(|e| {
            (
                e.raw_serial().to_vec(),
                e.reason_code().map(|r| r.1.0).unwrap_or(0),
            )
        })
        .collect();
    (c.issuer().to_string(), entries)
}

fn sighup(ecs: &Ecs) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &ecs.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test]
async fn a_new_issuing_ca_takes_over_while_the_old_one_keeps_publishing_its_crl() {
    let ecs = Ecs::start();
    let pid = ecs.pid();
    let kept = ecs.register("ees-kept.ecsp.example").await;
    let ended = ecs.register("ees-ended.ecsp.example").await;
    let old_issuer = issuer_cn(&kept.cert_pem);

    // The new hierarchy, made offline (openssl here; a key ceremony in production).
    let keys = ecs.dir.path().join("keys");
    let ext = keys.join("ca.ext");
    std::fs::write(
        &ext,
        "basicConstraints = critical, CA:TRUE, pathlen:0\nkeyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
    )
    .unwrap();
    for args in [
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "root2.key",
        ][..],
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root2.key",
            "-out",
            "root2.pem",
            "-subj",
            "/O=ECSP A/CN=ECS Root CA 2",
            "-days",
            "3650",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "issuing2.key",
        ],
        &[
            "req",
            "-new",
            "-key",
            "issuing2.key",
            "-out",
            "issuing2.csr",
            "-subj",
            "/O=ECSP A/CN=ECS Issuing CA 2",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "issuing2.csr",
            "-CA",
            "root2.pem",
            "-CAkey",
            "root2.key",
            "-CAcreateserial",
            "-out",
            "issuing2.pem",
            "-days",
            "1825",
            "-extfile",
            "ca.ext",
        ],
    ] {
        let (ok, out) = openssl(args, &keys);
        assert!(ok, "openssl {args:?}: {out}");
    }
    let chain = [
        std::fs::read_to_string(keys.join("issuing2.pem")).unwrap(),
        std::fs::read_to_string(keys.join("root2.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(keys.join("issuing2-chain.pem"), chain).unwrap();
    std::fs::remove_file(keys.join("root2.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        keys.join("issuing2.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // A reload that would move the default backend (the server certificate's and
    // /pki/v1/crl's, server.tls_backend) is refused, and the running backends stay.
    let original = std::fs::read_to_string(ecs.config_path()).unwrap();
    ecs.edit_config(|t| {
        *t = t.replace("tls_backend = \"soft\"\n", "tls_backend = \"soft2\"\n");
        t.push_str(
            "\n[backends.soft2]\nkind = \"software\"\nkey = \"keys/issuing2.key\"\ncert = \"keys/issuing2-chain.pem\"\n",
        );
    });
    sighup(&ecs);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ecs.log().contains("policy reload refused") {
        assert!(std::time::Instant::now() < deadline, "{}", ecs.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ecs.log().contains("[server] changed"), "{}", ecs.log());
    std::fs::write(ecs.config_path(), original).unwrap();

    // The rotation, on a reload without a restart: the domain issues with the new CA; the
    // old one stays, publishing its CRL (and, as tls_backend, still certifying the server).
    ecs.edit_config(|t| {
        *t = t.replacen("[domains.default]\n", "[domains.default]\nbackend = \"soft2\"\n", 1);
        let domain = t.find("[domains.default]").unwrap();
        let line = t[domain..].find("\nbackend = \"soft\"\n").unwrap() + domain;
        t.replace_range(line..line + "\nbackend = \"soft\"\n".len(), "\n");
        t.push_str(
            "\n[backends.soft2]\nkind = \"software\"\nkey = \"keys/issuing2.key\"\ncert = \"keys/issuing2-chain.pem\"\n",
        );
    });
    sighup(&ecs);

    // New registrations: the new CA, as soon as the reload is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0;
    let fresh = loop {
        n += 1;
        let e = ecs.register(&format!("ees-fresh-{n}.ecsp.example")).await;
        if issuer_cn(&e.cert_pem).contains("ECS Issuing CA 2") {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not rotated:\n{}",
            ecs.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(ecs.pid(), pid, "restarted");
    let r = ecs
        .client_as(&fresh)
        .request("GET", &fresh.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Registrations from before authenticate as they did.
    let r = ecs
        .client_as(&kept)
        .request("GET", &kept.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // A re-key moves a registration to the new CA; the superseded certificate goes on the
    // old CA's CRL.
    let key = Key::new();
    let put = json!({"eesProf": kept.body["eesProf"], "onboarding": {"csr": key.csr("x")}});
    let r = ecs
        .client_as(&kept)
        .request(
            "PUT",
            &kept.location,
            &[("content-type", "application/json")],
            Some(put.to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rekeyed = r.json()["onboarding"]["eesCert"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(issuer_cn(&rekeyed).contains("ECS Issuing CA 2"));

    // A certificate of the old CA revoked after the rotation: on the old CA's CRL too.
    let r = ecs
        .client_as(&ended)
        .request("DELETE", &ended.location, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);

    let (issuer, old_entries) = crl(&ecs, "/pki/v1/crl").await;
    assert_eq!(issuer, old_issuer);
    assert!(
        old_entries.contains(&(serial_of(&kept), 4)),
        "{old_entries:?}"
    );
    assert!(
        old_entries.contains(&(serial_of(&ended), 5)),
        "{old_entries:?}"
    );
    let (issuer2, new_entries) = crl(&ecs, "/pki/v1/crl/soft2").await;
    assert!(issuer2.contains("ECS Issuing CA 2"), "{issuer2}");
    assert!(new_entries.is_empty());
    let (intact, _) = ecs.audit();
    assert!(intact);
}
