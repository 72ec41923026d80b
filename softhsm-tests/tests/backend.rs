//! The `pkcs11` backend in a real `ecsd` over a real SoftHSM2 token: the full life, the
//! pool under concurrency, and every fault the issue names.

use ecs_daemon::client::{HttpVersion, HttpsClient, Response};
use softhsm_tests::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

const API: &str = "/eecs-eesregistration/v1/registrations";

async fn post(
    ecsd: &Ecsd,
    client: &HttpsClient,
    token: &str,
    body: &serde_json::Value,
) -> Response {
    let auth = format!("Bearer {token}");
    client
        .request(
            "POST",
            &format!("{}{API}", ecsd.base()),
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await
        .unwrap()
}

fn wait_ready(ecsd: &Ecsd, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = ecsd.admin("/readyz");
        if status == want || Instant::now() > deadline {
            assert_eq!(status, want, "{body}\n{}", ecsd.log());
            return body;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ees_onboards_with_a_certificate_signed_inside_the_token() {
    let hsm = hsm_with_ca();
    let mut ecsd = Ecsd::configure(&hsm, true, "");
    assert!(ecsd.start(), "{}", ecsd.log());
    wait_ready(&ecsd, 200);
    let client = HttpsClient::new(&ecsd.server_root(true), None, HttpVersion::Http2).unwrap();

    let (body, _) = registration("ees1.edn1.ecsp-a.example");
    let r = post(
        &ecsd,
        &client,
        &ecsd.token("ees1.edn1.ecsp-a.example"),
        &body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let d = ecsd.dir.path().to_path_buf();
    let d = d.as_path();
    let ob = &r.json()["onboarding"];
    std::fs::write(d.join("leaf.pem"), ob["eesCert"].as_str().unwrap()).unwrap();
    std::fs::write(d.join("chain.pem"), ob["certChain"][0].as_str().unwrap()).unwrap();
    std::fs::copy(hsm.path().join("out/root.pem"), d.join("root.hsm.pem")).unwrap();
    let (ok, out) = openssl(
        &[
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            "root.hsm.pem",
            "-untrusted",
            "chain.pem",
            "leaf.pem",
        ],
        d,
    );
    assert!(ok, "{out}");

    // 64 registrations from 16 clients, all signed through the session pool, all valid.
    let ecsd = Arc::new(ecsd);
    let issuing =
        ecs_ca_backends::pem_to_der(ob["certChain"][0].as_str().unwrap(), "CERTIFICATE").unwrap();
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (ecsd, client, issuing) = (ecsd.clone(), client.clone(), issuing.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..4 {
                let id = format!("ees-{c}-{i}.ecsp-a.example");
                let (body, _) = registration(&id);
                let r = post(&ecsd, &client, &ecsd.token(&id), &body).await;
                assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
                let pem = r.json()["onboarding"]["eesCert"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let der = ecs_ca_backends::pem_to_der(&pem, "CERTIFICATE").unwrap();
                ecs_ca_backends::verify_cert_signed_by(&der, &issuing).unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The CRL is signed in the token too.
    let r = client
        .request("GET", &format!("{}/pki/v1/crl", ecsd.base()), &[], None)
        .await
        .unwrap();
    std::fs::write(d.join("crl.der"), &r.body).unwrap();
    let (ok, out) = openssl(
        &[
            "crl",
            "-in",
            "crl.der",
            "-inform",
            "DER",
            "-CAfile",
            "chain.pem",
            "-noout",
        ],
        d,
    );
    assert!(ok && out.contains("verify OK"), "{out}");
    assert!(
        hsm.list_private_keys("ecs-ca", HSM_PIN)
            .contains("never extractable")
    );
}

#[test]
fn start_up_faults_name_what_is_wrong() {
    let hsm = hsm_with_ca();
    // (what, configuration edit, PIN, expected in the error)
    let cases: [(&str, (&str, &str), &str, &str); 4] = [
        (
            "module path",
            (MODULE, "/nonexistent/libpkcs11.so"),
            HSM_PIN,
            "/nonexistent/libpkcs11.so",
        ),
        ("wrong PIN", ("", ""), "97531864", "PIN"),
        (
            "no such key",
            ("object=issuing-key", "object=nope"),
            HSM_PIN,
            "no such private key",
        ),
        (
            "key is not the certificate's",
            ("keys/hsm-chain.pem", "keys/root-only.pem"),
            HSM_PIN,
            "not the issuing certificate's",
        ),
    ];
    for (what, (from, to), pin, expect) in cases {
        let mut ecsd = Ecsd::configure(&hsm, false, "");
        std::fs::copy(
            hsm.path().join("out/root.pem"),
            ecsd.dir.path().join("keys/root-only.pem"),
        )
        .unwrap();
        let path = ecsd.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            if from.is_empty() {
                text
            } else {
                text.replace(from, to)
            },
        )
        .unwrap();
        ecsd.pin = pin.into();
        assert!(!ecsd.start(), "{what}: started anyway");
        let log = ecsd.log();
        let last = log.lines().last().unwrap_or("");
        assert!(
            last.contains("backends.hsm") && last.contains(expect),
            "{what}: {log}"
        );
        assert!(!log.contains("97531864"), "{what}: the PIN is in the log");
    }
    // One wrong-PIN start tried the PIN once: the token is not locked.
    assert!(
        hsm.list_private_keys("ecs-ca", HSM_PIN)
            .contains("issuing-key")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_absent_at_start_is_found_later_without_restart() {
    let hsm = hsm_with_ca();
    let token = hsm.token_dir("ecs-ca");
    let away = hsm.path().join("away");
    std::fs::rename(&token, &away).unwrap();
    let mut ecsd = Ecsd::configure(&hsm, false, "");
    assert!(ecsd.start(), "{}", ecsd.log());
    let why = wait_ready(&ecsd, 503);
    assert!(why.contains("backend hsm"), "{why}");
    let client = HttpsClient::new(&ecsd.server_root(false), None, HttpVersion::Http1).unwrap();
    let id = "ees-late.ecsp-a.example";
    let (body, _) = registration(id);
    let onboarding_token = ecsd.token(id);
    let r = post(&ecsd, &client, &onboarding_token, &body).await;
    assert_eq!(
        (r.status, r.json()["cause"].clone()),
        (503, serde_json::json!("BACKEND_UNAVAILABLE"))
    );
    assert!(r.header("retry-after").is_some());

    std::fs::rename(&away, &token).unwrap();
    wait_ready(&ecsd, 200);
    // Nothing was stored for the refused request: the same token registers now.
    let r = post(&ecsd, &client, &onboarding_token, &body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pulled_mid_run_fails_one_request_and_comes_back() {
    let hsm = hsm_with_ca();
    let mut ecsd = Ecsd::configure(&hsm, false, "");
    assert!(ecsd.start(), "{}", ecsd.log());
    wait_ready(&ecsd, 200);
    let client = HttpsClient::new(&ecsd.server_root(false), None, HttpVersion::Http1).unwrap();
    let (body, _) = registration("ees-a.ecsp-a.example");
    let r = post(&ecsd, &client, &ecsd.token("ees-a.ecsp-a.example"), &body).await;
    assert_eq!(r.status, 201);

    // Pull the token while sessions are open and logged in.
    let token = hsm.token_dir("ecs-ca");
    let away = hsm.path().join("away");
    std::fs::rename(&token, &away).unwrap();
    let id = "ees-b.ecsp-a.example";
    let (body, _) = registration(id);
    let onboarding_token = ecsd.token(id);
    let r = post(&ecsd, &client, &onboarding_token, &body).await;
    assert_eq!(
        (r.status, r.json()["cause"].clone()),
        (503, serde_json::json!("BACKEND_UNAVAILABLE")),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    wait_ready(&ecsd, 503);

    std::fs::rename(&away, &token).unwrap();
    wait_ready(&ecsd, 200);
    let r = post(&ecsd, &client, &onboarding_token, &body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let (_, metrics) = ecsd.admin("/metrics");
    assert!(
        metrics.contains("ecs_backend_ready{backend=\"hsm\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ecs_backend_errors_total{backend=\"hsm\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_issuing_key_in_the_token_signs_with_rsassa_pss() {
    let hsm = hsm_with_ca();
    // A second issuing CA in the token, RSA 3072, certified by the root.
    let file = intermediate_ceremony()
        .replace(
            "label = \"issuing-key\"\ntype = \"p256\"",
            "label = \"issuing-rsa\"\ntype = \"rsa3072\"",
        )
        .replace("out/ca", "out/rsa");
    let out = hsm.ceremony("rsa.toml", &file, &pins());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ecsd = Ecsd::configure(&hsm, false, "rsa_signature = \"pss\"\n");
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(hsm.path().join("out/rsa.pem")).unwrap(),
        std::fs::read_to_string(hsm.path().join("out/root.pem")).unwrap()
    );
    std::fs::write(ecsd.dir.path().join("keys/hsm-chain.pem"), chain).unwrap();
    let path = ecsd.config_path();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("object=issuing-key", "object=issuing-rsa");
    std::fs::write(&path, text).unwrap();
    assert!(ecsd.start(), "{}", ecsd.log());
    wait_ready(&ecsd, 200);
    let client = HttpsClient::new(&ecsd.server_root(false), None, HttpVersion::Http1).unwrap();
    let id = "ees-rsa.ecsp-a.example";
    let (body, _) = registration(id);
    let r = post(&ecsd, &client, &ecsd.token(id), &body).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let d = ecsd.dir.path();
    let ob = &r.json()["onboarding"];
    std::fs::write(d.join("leaf.pem"), ob["eesCert"].as_str().unwrap()).unwrap();
    std::fs::write(d.join("chain.pem"), ob["certChain"][0].as_str().unwrap()).unwrap();
    std::fs::copy(hsm.path().join("out/root.pem"), d.join("root.hsm.pem")).unwrap();
    let (_, text) = openssl(&["x509", "-in", "leaf.pem", "-noout", "-text"], d);
    assert!(text.contains("Signature Algorithm: rsassaPss"), "{text}");
    let (ok, out) = openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root.hsm.pem",
            "-untrusted",
            "chain.pem",
            "leaf.pem",
        ],
        d,
    );
    assert!(ok, "{out}");
}
