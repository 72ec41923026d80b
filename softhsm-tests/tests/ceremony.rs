//! Key ceremonies against a real SoftHSM2 token: the artefacts, and every refusal.

use softhsm_tests::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn root_then_intermediate_produce_verified_artefacts_and_a_transcript() {
    let hsm = hsm_with_ca();
    let d = hsm.path();
    let (ok, out) = openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "out/root.pem",
            "out/ca.pem",
        ],
        d,
    );
    assert!(ok, "{out}");
    let (_, text) = openssl(&["x509", "-in", "out/root.pem", "-noout", "-text"], d);
    assert!(
        text.contains("Subject: C = FI, O = Example MNO, CN = Example ECS Root CA 2026"),
        "{text}"
    );
    assert!(
        text.contains("ASN1 OID: secp384r1") && text.contains("CA:TRUE, pathlen:1"),
        "{text}"
    );
    let (_, text) = openssl(&["x509", "-in", "out/ca.pem", "-noout", "-text"], d);
    assert!(
        text.contains("prime256v1") && text.contains("CA:TRUE, pathlen:0"),
        "{text}"
    );
    assert!(
        text.contains("Certificate Sign, CRL Sign") && text.contains("ecdsa-with-SHA384"),
        "{text}"
    );
    assert!(
        text.contains("URI:http://crl.mno.example/root.crl"),
        "{text}"
    );

    // The keys never leave the tokens.
    for (token, pin, label) in [
        ("ecs-root", ROOT_PIN, "root-2026"),
        ("ecs-ca", HSM_PIN, "issuing-key"),
    ] {
        let list = hsm.list_private_keys(token, pin);
        assert!(list.contains(label), "{list}");
        assert!(list.contains("never extractable"), "{list}");
        assert!(list.contains("Usage:      sign\n"), "sign only: {list}");
    }

    // The transcript ties the artefacts together.
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/ca.transcript.json")).unwrap()).unwrap();
    let file = std::fs::read(d.join("ca.toml")).unwrap();
    assert_eq!(
        t["config_sha256"],
        serde_json::json!(ecs_ca_backends::sha256_hex(&file))
    );
    let cert = ecs_ca_backends::pem_to_der(
        &std::fs::read_to_string(d.join("out/ca.pem")).unwrap(),
        "CERTIFICATE",
    )
    .unwrap();
    assert_eq!(
        t["certificate_sha256"],
        serde_json::json!(ecs_ca_backends::sha256_hex(&cert))
    );
    let public = ecs_ca_backends::pem_to_der(
        &std::fs::read_to_string(d.join("out/ca.pub.pem")).unwrap(),
        "PUBLIC KEY",
    )
    .unwrap();
    assert_eq!(
        t["public_key_sha256"],
        serde_json::json!(ecs_ca_backends::sha256_hex(&public))
    );
    assert_eq!(t["token_label"], serde_json::json!("ecs-ca"));
    assert!(
        t["lint"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["passed"] == serde_json::json!(true))
    );
    assert!(
        t["key_attributes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == &serde_json::json!(["Extractable", false]))
    );

    // A CRL signed by the root, and a bare key.
    let crl = format!(
        r#"type = "crl"
[hsm]
module = "{MODULE}"
[issuer]
token = "ecs-root"
pin = "env:ECS_ROOT_PIN"
key_label = "root-2026"
cert = "out/root.pem"
[crl]
number = 1
this_update = "2026-11-27T00:00:00Z"
next_update = "2027-11-27T00:00:00Z"
revoked = [{{ serial = "01ab", revoked_at = "2026-11-01T00:00:00Z", reason = "keyCompromise" }}]
[outputs]
crl = "out/root.crl"
transcript = "out/crl.transcript.json"
"#
    );
    let o = hsm.ceremony("crl.toml", &crl, &pins());
    assert!(o.status.success(), "{}", stderr(&o));
    let (ok, out) = openssl(
        &[
            "crl",
            "-in",
            "out/root.crl",
            "-inform",
            "DER",
            "-CAfile",
            "out/root.pem",
            "-noout",
            "-text",
        ],
        d,
    );
    assert!(
        ok && out.contains("Key Compromise") && out.contains("01AB"),
        "{out}"
    );
    let key = format!(
        "type = \"key\"\n[hsm]\nmodule = \"{MODULE}\"\ntoken = \"ecs-ca\"\npin = \"env:ECS_HSM_PIN\"\n[key]\nlabel = \"next-key\"\ntype = \"rsa3072\"\n[outputs]\npublic_key = \"out/next.pub.pem\"\ntranscript = \"out/next.transcript.json\"\n"
    );
    let o = hsm.ceremony("key.toml", &key, &pins());
    assert!(o.status.success(), "{}", stderr(&o));
    let (ok, out) = openssl(
        &[
            "pkey",
            "-pubin",
            "-in",
            "out/next.pub.pem",
            "-noout",
            "-text",
        ],
        d,
    );
    assert!(ok && out.contains("3072 bit"), "{out}");
}

#[test]
fn every_refusal_happens_before_anything_is_signed_or_overwritten() {
    let hsm = hsm_with_ca();
    let root = root_ceremony();
    let inter = intermediate_ceremony();
    // The same file writing elsewhere (only the [outputs] section changes).
    let fresh_outputs = |s: &str| {
        let (head, outputs) = s.split_once("[outputs]").unwrap();
        format!(
            "{head}[outputs]{}",
            outputs
                .replace("out/ca", "out/x")
                .replace("out/root", "out/y")
        )
    };
    // (what, file, expected in the error, exit code)
    let cases: Vec<(&str, String, &str, i32)> = vec![
        (
            "unknown key",
            root.replace("path_len = 1", "path_len = 1\npathlen = 1"),
            "pathlen",
            2,
        ),
        (
            "missing section",
            fresh_outputs(&root).replace(
                "[key]\nlabel = \"root-2026\"\nid = \"0a1b\"\ntype = \"p384\"\n",
                "",
            ),
            "needs [key]",
            2,
        ),
        (
            "output exists",
            root.replace("root-2026", "root-2027"),
            "exists",
            2,
        ),
        ("label exists", fresh_outputs(&root), "already exists", 2),
        (
            "bad time",
            fresh_outputs(&root).replace("2046-01-01T00:00:00Z", "someday"),
            "not_after",
            2,
        ),
        (
            "wrong PIN",
            fresh_outputs(&root)
                .replace("root-2026", "root-x")
                .replace("ECS_ROOT_PIN", "WRONG_PIN"),
            "PIN",
            2,
        ),
        (
            "PIN in the file",
            fresh_outputs(&root).replace("env:ECS_ROOT_PIN", "1111"),
            "never the secret itself",
            2,
        ),
        (
            "path length not below the issuer's",
            fresh_outputs(&inter)
                .replace("issuing-key", "issuing-2")
                .replace("path_len = 0", "path_len = 1"),
            "lint path length",
            2,
        ),
        (
            "validity outside the issuer's",
            fresh_outputs(&inter)
                .replace("issuing-key", "issuing-3")
                .replace("2036-01-01", "2050-01-01"),
            "lint validity within issuer",
            2,
        ),
        (
            "issuer key is not the issuer certificate's",
            fresh_outputs(&inter)
                .replace("issuing-key", "issuing-4")
                .replace("cert = \"out/root.pem\"", "cert = \"out/ca.pem\""),
            "does not belong to issuer.cert",
            2,
        ),
    ];
    let before = std::fs::read_dir(hsm.path().join("out")).unwrap().count();
    let env = [
        ("ECS_ROOT_PIN", ROOT_PIN),
        ("ECS_HSM_PIN", HSM_PIN),
        ("WRONG_PIN", "9999"),
    ];
    for (what, file, expect, code) in cases {
        let o = hsm.ceremony("refused.toml", &file, &env);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{what}: {err}");
        assert!(err.contains(expect), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
    }
    // Nothing was written by any refused ceremony.
    assert_eq!(
        std::fs::read_dir(hsm.path().join("out")).unwrap().count(),
        before
    );
    // No refusal generated a key: lint, PIN and issuer checks all come first.
    let list = hsm.list_private_keys("ecs-root", ROOT_PIN);
    assert!(
        !list.contains("root-x"),
        "a wrong PIN generates nothing: {list}"
    );
    let list = hsm.list_private_keys("ecs-ca", HSM_PIN);
    for label in ["issuing-2", "issuing-3", "issuing-4"] {
        assert!(!list.contains(label), "{label} was generated: {list}");
    }
}
