//! The policy audits: `ecsd policy lint`, `explain` and `diff`, and live reload, on the
//! example configuration and on a running `ecsd`.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = ecsd().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples/ecs.toml")
        .display()
        .to_string()
}

#[test]
fn the_example_configuration_lints_clean_and_explains_its_decisions() {
    let (code, out, err) = run(&["policy", "lint", &example()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "clean");

    let (code, out, _) = run(&[
        "policy",
        "explain",
        "--config",
        &example(),
        "--domain",
        "ecsp-a",
        "--ees-id",
        "ees1.edn1.ecsp-a.example",
        "--token-issuer",
        "ecsp-a-as",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["allowed"], json!(true));
    assert_eq!(v["approval"]["backend"], json!("issuing"));
    let rules: Vec<&str> = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        rules[..4],
        [
            "domains.ecsp-a.token_issuers",
            "domains.ecsp-a.ees_ids",
            "domains.ecsp-a.endpoint_names",
            "domains.ecsp-a.key_types"
        ]
    );

    // Endpoint names and addresses: inside the domain's rules, allowed; outside, or the ECS's
    // own name, refused by the rule that decided.
    let explain_endpoint = |endpoint: &str| {
        let (code, out, err) = run(&[
            "policy",
            "explain",
            "--config",
            &example(),
            "--domain",
            "ecsp-a",
            "--ees-id",
            "ees1.edn1.ecsp-a.example",
            "--token-issuer",
            "ecsp-a-as",
            "--endpoint",
            endpoint,
            "--format",
            "json",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    for (endpoint, refused_by) in [
        ("ees1.edn2.ecsp-a.example", None),
        ("10.20.3.4", None),
        ("https://ees1.edn1.ecsp-a.example/api", None),
        ("ees1.ecsp-b.example", Some("domains.ecsp-a.endpoint_names")),
        ("ecs.mno.example", Some("domains.ecsp-a.endpoint_names")),
        (
            "https://ecs.mno.example/",
            Some("domains.ecsp-a.endpoint_names"),
        ),
        ("127.0.0.1", Some("domains.ecsp-a.endpoint_addresses")),
        ("10.30.0.1", Some("domains.ecsp-a.endpoint_addresses")),
    ] {
        let v = explain_endpoint(endpoint);
        match refused_by {
            None => assert_eq!(v["allowed"], json!(true), "{endpoint}: {v}"),
            Some(rule) => {
                assert_eq!(v["allowed"], json!(false), "{endpoint}: {v}");
                assert_eq!(v["refusal"]["rule"], json!(rule), "{endpoint}: {v}");
                assert_eq!(v["refusal"]["cause"], json!("POLICY_REJECTED"));
            }
        }
    }

    // Domain A's token issuer does not onboard into domain B.
    let (_, out, _) = run(&[
        "policy",
        "explain",
        "--config",
        &example(),
        "--domain",
        "ecsp-b",
        "--ees-id",
        "ees1.ecsp-b.example",
        "--token-issuer",
        "ecsp-a-as",
    ]);
    assert!(out.contains("FAIL domains.ecsp-b.token_issuers"), "{out}");
    assert!(
        out.contains("decision: REFUSED POLICY_REJECTED by domains.ecsp-b.token_issuers"),
        "{out}"
    );
}

#[test]
fn lint_names_every_problem_an_auditor_wants() {
    let init = initialised();
    let dir = &init.dir;
    let leaf = dir.path().join("leaf.pem");
    ecs_daemon::testing::openssl_self_signed(
        dir.path(),
        "leaf",
        "/CN=leaf",
        &["-addext", "basicConstraints=critical,CA:FALSE"],
    );
    let cfg = dir.path().join("ecs.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace(
        "key_types = [\"p256\",",
        "key_types = [\"rsa2048\", \"p256\",",
    );
    text.push_str(&format!(
        "\n[backends.spare]\nkind = \"software\"\nkey = \"keys/issuing-ca.key\"\ncert = \"keys/issuing-ca.pem\"\n\
         [domains.ecsp-x]\ntoken_issuers = []\nees_ids = [\"ees*.example\"]\nbackend = \"soft\"\ncert_validity = \"400d\"\n\
         [domains.ecsp-x.third_party]\naccept = true\ntrust_anchors = [\"{}\"]\n",
        leaf.display()
    ));
    std::fs::write(&cfg, text).unwrap();
    let (code, out, _) = run(&["policy", "lint", "--format", "json", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "an anchor that is not a CA is an error: {out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let has = |severity: &str, key: &str, text: &str| {
        v["findings"].as_array().unwrap().iter().any(|f| {
            f["severity"] == json!(severity)
                && f["key"] == json!(key)
                && f["message"].as_str().unwrap_or("").contains(text)
        })
    };
    assert!(
        has("warning", "domains.default.key_types", "rsa2048"),
        "{out}"
    );
    assert!(
        has("warning", "domains.ecsp-x.ees_ids", "overlaps"),
        "{out}"
    );
    assert!(
        has("warning", "domains.ecsp-x.token_issuers", "no token issuer"),
        "{out}"
    );
    assert!(
        has("warning", "domains.ecsp-x.cert_validity", "398 days"),
        "{out}"
    );
    assert!(has("warning", "backends.spare", "no domain uses"), "{out}");
    assert!(
        has(
            "error",
            "domains.ecsp-x.third_party.trust_anchors",
            "not a CA"
        ),
        "{out}"
    );
    // serve refuses what lint calls an error, naming the key.
    let (code, _, err) = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("domains.ecsp-x.third_party.trust_anchors"),
        "{err}"
    );
}

/// A CSR made by openssl with an RSA 2048 key.
fn rsa_csr(dir: &Path) -> String {
    let (ok, out) = openssl(
        &[
            "req", "-new", "-nodes", "-subj", "/CN=x", "-newkey", "rsa:2048", "-keyout", "rsa.key",
            "-out", "rsa.csr",
        ],
        dir,
    );
    assert!(ok, "{out}");
    std::fs::read_to_string(dir.join("rsa.csr")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_shows_what_a_change_would_do_and_reload_applies_it() {
    let ecs = Ecs::start();
    ecs.register("ees-keep.a.example").await;
    let dropped = ecs.register("ees-drop.b.example").await;
    let id = "ees-rsa.a.example";
    let r = ecs
        .post(
            Some(&ecs.token(id)),
            &registration_body(id, &rsa_csr(ecs.dir.path())),
        )
        .await;
    assert_problem(&r, 400, "WEAK_KEY");

    // The proposal: only *.a.example, and RSA 2048 allowed.
    let current = std::fs::read_to_string(ecs.config_path()).unwrap();
    let proposed = current
        .replace("ees_ids = [\"*\"]", "ees_ids = [\"*.a.example\"]")
        .replace(
            "key_types = [\"p256\",",
            "key_types = [\"rsa2048\", \"p256\",",
        );
    let proposed_path = ecs.dir.path().join("proposed.toml");
    std::fs::write(&proposed_path, &proposed).unwrap();
    // The daemon holds the store: diff goes through its admin API.
    let (code, out, err) = run(&[
        "policy",
        "diff",
        "--config",
        ecs.config_path().to_str().unwrap(),
        "--proposed",
        proposed_path.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let d: Value = serde_json::from_str(&out).unwrap();
    let change = |rule: &str| {
        d["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == json!(rule))
            .map(|r| r["change"].clone())
    };
    assert_eq!(change("domains.default.key_types"), Some(json!("loosened")));
    assert_eq!(change("domains.default.ees_ids"), Some(json!("changed")));
    let gone = d["no_longer_admitted"].as_array().unwrap();
    assert_eq!(gone.len(), 1, "{out}");
    assert_eq!(gone[0]["registration_id"], json!(dropped.id));
    assert_eq!(gone[0]["rule"], json!("domains.default.ees_ids"));
    let admitted = d["now_admitted"].as_array().unwrap();
    assert_eq!(admitted.len(), 1, "{out}");
    assert_eq!(admitted[0]["ees_id"], json!(id));
    assert_eq!(
        admitted[0]["refused_by"],
        json!("domains.default.key_types")
    );

    // Reload: an invalid file keeps the running policy and says why.
    let still = "ees-still.b.example";
    let still_token = ecs.token(still);
    std::fs::write(
        ecs.config_path(),
        current.replace("cert_validity = \"30d\"", "cert_validity = \"forever\""),
    )
    .unwrap();
    let (status, body) = ecs.control("POST", "/admin/v1/policy/reload");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("forever"), "{body}");
    let r = ecs
        .post(
            Some(&still_token),
            &registration_body(still, &Key::new().csr(still)),
        )
        .await;
    assert_eq!(
        r.status,
        201,
        "the running policy stays: {}",
        String::from_utf8_lossy(&r.body)
    );

    // A valid one is swapped in at once, and recorded with both hashes.
    std::fs::write(ecs.config_path(), &proposed).unwrap();
    let (status, body) = ecs.control("POST", "/admin/v1/policy/reload");
    assert_eq!(status, 200, "{body}");
    let hashes: Value = serde_json::from_str(&body).unwrap();
    let id = "ees-new.b.example";
    let r = ecs
        .post(
            Some(&ecs.token(id)),
            &registration_body(id, &Key::new().csr(id)),
        )
        .await;
    assert_problem(&r, 403, "POLICY_REJECTED");
    let (intact, records) = ecs.audit();
    assert!(intact);
    let reload = records
        .iter()
        .rev()
        .find(|r| r["action"] == json!("policy_reload") && r["outcome"] == json!("accepted"))
        .unwrap();
    assert!(
        reload["detail"]
            .as_str()
            .unwrap()
            .contains(hashes["oldPolicyHash"].as_str().unwrap())
    );
    assert_eq!(records.last().unwrap()["policy_hash"], hashes["policyHash"]);
    assert!(
        records
            .iter()
            .any(|r| r["action"] == json!("policy_reload") && r["outcome"] == json!("refused"))
    );

    // SIGHUP does the same.
    std::fs::write(ecs.config_path(), &current).unwrap();
    hup(&ecs);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = ecs
            .post(
                Some(&ecs.token(id)),
                &registration_body(id, &Key::new().csr(id)),
            )
            .await;
        if r.status == 201 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn hup(ecs: &Ecs) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &ecs.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Attack review, items 10 and 11: a reload that changed `[limits]` answered
/// `reloaded: true` but applied nothing; and after a reload under which `ees_ids` no longer
/// admitted an EES, PATCH still extended its `expTime`.
#[tokio::test]
async fn a_reload_is_applied_whole_or_refused_and_changes_apply_the_new_policy() {
    let ecs = Ecs::start_with(|c| {
        *c = c.replace(
            "ees_ids = [\"*\"]",
            "ees_ids = [\"*.a.example\", \"*.b.example\"]",
        );
    });
    let e = ecs.register("ees1.a.example").await;
    let current = std::fs::read_to_string(ecs.config_path()).unwrap();

    std::fs::write(
        ecs.config_path(),
        format!("{current}\n[limits]\nmax_connections = 7\n"),
    )
    .unwrap();
    let (status, body) = ecs.control("POST", "/admin/v1/policy/reload");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("[limits]"), "{body}");

    std::fs::write(ecs.config_path(), current.replace("\"*.a.example\", ", "")).unwrap();
    let (status, body) = ecs.control("POST", "/admin/v1/policy/reload");
    assert_eq!(status, 200, "{body}");
    let patch = json!({ "expTime": "2099-01-01T00:00:00Z" });
    let r = ecs
        .client_as(&e)
        .request(
            "PATCH",
            &e.location,
            &[("content-type", "application/merge-patch+json")],
            Some(patch.to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_problem(&r, 403, "POLICY_REJECTED");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("domains.default.ees_ids")
    );
}

/// `policy diff` takes the proposed ECS's own names into account (they are never an EES's);
/// when it cannot read them it says so, instead of taking them as none.
#[test]
fn diff_says_when_it_cannot_read_the_proposed_ecss_own_names() {
    let init = initialised();
    let dir = &init.dir;
    let current = dir.path().join("ecs.toml");
    let text = std::fs::read_to_string(&current).unwrap();
    let proposed = dir.path().join("proposed.toml");
    std::fs::write(
        &proposed,
        text.replacen(
            "[server]\n",
            "[server]\ntls_cert = \"missing.pem\"\ntls_key = \"missing.key\"\n",
            1,
        ),
    )
    .unwrap();
    let out = ecsd()
        .args(["policy", "diff", "--config"])
        .arg(&current)
        .arg("--proposed")
        .arg(&proposed)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("server.tls_cert"), "{stderr}");
}
