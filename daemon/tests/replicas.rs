//! Several `ecsd` replicas on one PostgreSQL database (a private cluster started by each
//! test): one ECS, whichever replica a request reaches, and nothing acknowledged lost when
//! one of them dies.

mod common;

use common::*;
use ecs_daemon::testing::postgres::Postgres;
use std::time::{Duration, Instant};
use x509_parser::prelude::*;

async fn get(ecs: &Ecs, as_ees: &Ees, location: &str) -> ecs_daemon::client::Response {
    ecs.client_as(as_ees)
        .request("GET", location, &[], None)
        .await
        .unwrap()
}

/// The registration's path, on any replica (the Location names the public URL).
fn on(ecs: &Ecs, ees: &Ees) -> String {
    let path = ees.location.split_once("/eecs-").unwrap().1;
    ecs.url(&format!("/eecs-{path}"))
}

fn serial_of(ees: &Ees) -> Vec<u8> {
    let der = ecs_ca_backends::pem_chain_to_der(&ees.cert_pem).unwrap();
    let (_, c) = X509Certificate::from_der(&der[0]).unwrap();
    c.raw_serial().to_vec()
}

/// POSTs `n` registrations of `ees_id` at once, request `i` through replica `i % len` with
/// `token(i)`: the number of 201s; every other answer must be refused with `cause`.
async fn race(
    replicas: &[Ecs],
    n: usize,
    ees_id: &str,
    token: impl Fn(usize) -> String,
    cause: &str,
) -> usize {
    let mut tasks = Vec::new();
    for i in 0..n {
        let ecs = &replicas[i % replicas.len()];
        let (url, client, token) = (ecs.url(API), ecs.client(), token(i));
        let body = registration_body(ees_id, &Key::new().csr("x"));
        tasks.push(tokio::spawn(async move {
            let body = body.to_string().into_bytes();
            post_to(&client, &url, Some(&token), "application/json", body)
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    for t in tasks {
        let resp = t.await.unwrap();
        match resp.status {
            201 => created += 1,
            _ => assert_problem(&resp, 403, cause),
        }
    }
    created
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_are_one_ecs() {
    let pg = Postgres::start();
    let r = Ecs::replicas(&pg, 2);
    let (a, b) = (&r[0], &r[1]);

    // Made on one, served by the other to its owner only.
    let owner = a.register("ees-one.ecsp.example").await;
    let other = b.register("ees-two.ecsp.example").await;
    assert_eq!(get(b, &owner, &on(b, &owner)).await.status, 200);
    assert_problem(
        &get(b, &other, &on(b, &owner)).await,
        403,
        "NOT_REGISTRATION_OWNER",
    );

    // A token spent on one is spent on the other.
    let token = a.token("ees-three.ecsp.example");
    let body = registration_body("ees-three.ecsp.example", &Key::new().csr("x"));
    assert_eq!(a.post(Some(&token), &body).await.status, 201);
    let body = registration_body("ees-three.ecsp.example", &Key::new().csr("x"));
    assert_problem(&b.post(Some(&token), &body).await, 403, "TOKEN_REPLAYED");

    // 16 concurrent uses of one token over both: exactly one 201.
    let token = a.token("ees-race.ecsp.example");
    let created = race(
        &r,
        16,
        "ees-race.ecsp.example",
        |_| token.clone(),
        "TOKEN_REPLAYED",
    )
    .await;
    assert_eq!(created, 1);

    // 8 concurrent registrations of one EES ID, distinct tokens, over both: one 201.
    let created = race(
        &r,
        8,
        "ees-same.ecsp.example",
        |i| r[i % 2].token("ees-same.ecsp.example"),
        "EES_ALREADY_REGISTERED",
    )
    .await;
    assert_eq!(created, 1);

    // DELETE through one: refused at once on the other, and on the other's CRL (well
    // within 5 s: the count of revocations changed), with a larger cRLNumber.
    let before = a.crl_at("/pki/v1/crl").await;
    let (_, c1) = CertificateRevocationList::from_der(&before).unwrap();
    let gone = a.register("ees-gone.ecsp.example").await;
    let r_del = b
        .client_as(&gone)
        .request("DELETE", &on(b, &gone), &[], None)
        .await
        .unwrap();
    assert_eq!(r_del.status, 204);
    assert_problem(
        &get(a, &gone, &on(a, &gone)).await,
        404,
        "REGISTRATION_NOT_FOUND",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = a.crl_at("/pki/v1/crl").await;
        let (_, c2) = CertificateRevocationList::from_der(&after).unwrap();
        let listed = c2
            .iter_revoked_certificates()
            .any(|e| e.raw_serial() == serial_of(&gone).as_slice());
        if listed {
            assert!(c2.crl_number().unwrap() > c1.crl_number().unwrap());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not on the other replica's CRL in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One audit log: every replica's records in one chain, read from PostgreSQL while
    // both run.
    let (intact, records) = a.audit();
    assert!(intact, "audit verify failed");
    let registered = records
        .iter()
        .filter(|r| r["action"] == "register" && r["outcome"] == "accepted")
        .count();
    assert_eq!(registered, 6, "{records:?}");
    let (intact_b, records_b) = b.audit();
    assert!(intact_b);
    assert_eq!(records_b.len(), records.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_acknowledged_registration() {
    let pg = Postgres::start();
    let mut r = Ecs::replicas(&pg, 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (url, client, root) = (
            r[w % 2].url(API),
            r[w % 2].client(),
            r[w % 2].root_pem.clone(),
        );
        let tokens: Vec<String> = (0..40)
            .map(|i| r[w % 2].token(&format!("ees-{w}-{i}.ecsp.example")))
            .collect();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let _ = root;
            let mut acknowledged = Vec::new();
            for (i, token) in tokens.into_iter().enumerate() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let ees_id = format!("ees-{w}-{i}.ecsp.example");
                let key = Key::new();
                let body = registration_body(&ees_id, &key.csr(&ees_id));
                let body = body.to_string().into_bytes();
                let resp = post_to(&client, &url, Some(&token), "application/json", body).await;
                match resp {
                    Ok(resp) if resp.status == 201 => {
                        acknowledged.push(Ees::from_response(&resp, key))
                    }
                    // The replica died under it: no answer, or not a 201.
                    _ => {}
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    r[1].kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let survivor = &r[0];
    assert!(
        all.len() >= 8,
        "too little load to mean anything: {}",
        all.len()
    );
    for ees in &all {
        let resp = get(survivor, ees, &on(survivor, ees)).await;
        assert_eq!(resp.status, 200, "{} lost", ees.id);
    }
    let (intact, _) = survivor.audit();
    assert!(intact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_is_a_503_and_its_return_needs_no_restart() {
    let pg = Postgres::start();
    let r = Ecs::replicas(&pg, 1);
    let ecs = &r[0];
    let before = ecs.register("ees-before.ecsp.example").await;

    pg.stop("fast");
    let body = registration_body("ees-during.ecsp.example", &Key::new().csr("x"));
    let resp = ecs
        .post(Some(&ecs.token("ees-during.ecsp.example")), &body)
        .await;
    assert_problem(&resp, 503, "STORAGE_UNAVAILABLE");
    assert!(resp.header("retry-after").is_some());
    let (status, why) = admin_get(ecs.admin_port, "/readyz").unwrap();
    assert_eq!(status, 503, "{why}");

    pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let key = Key::new();
        let body = registration_body("ees-after.ecsp.example", &key.csr("x"));
        let resp = ecs
            .post(Some(&ecs.token("ees-after.ecsp.example")), &body)
            .await;
        if resp.status == 201 {
            break Ees::from_response(&resp, key);
        }
        assert_problem(&resp, 503, "STORAGE_UNAVAILABLE");
        assert!(
            Instant::now() < deadline,
            "not serving again 20 s after PostgreSQL returned"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(admin_get(ecs.admin_port, "/readyz").unwrap().0, 200);
    assert!(ecs.running(), "the daemon restarted or died");
    for ees in [&before, &after] {
        assert_eq!(get(ecs, ees, &ees.location).await.status, 200);
    }
    // Nothing of the refused registration was kept.
    let (intact, records) = ecs.audit();
    assert!(intact);
    assert!(
        !records
            .iter()
            .any(|r| r["ees_id"] == "ees-during.ecsp.example" && r["outcome"] == "accepted"),
        "{records:?}"
    );
}

/// Moving up: a single ECS on the embedded default, backed up, restored into PostgreSQL by
/// the documented commands, then two replicas on it serving what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_ecs_moves_up_to_replicas_on_postgresql() {
    let mut ecs = Ecs::start();
    let mut before = Vec::new();
    for i in 0..4 {
        before.push(ecs.register(&format!("ees-up-{i}.ecsp.example")).await);
    }
    assert!(ecs.terminate().success());
    let file = ecs.dir.path().join("move.jsonl");
    let (ok, out) = output(
        ecs.command()
            .args(["store", "backup", "--config"])
            .arg(ecs.config_path())
            .arg("--out")
            .arg(&file),
    );
    assert!(ok, "{out}");

    let pg = Postgres::start();
    ecs.use_postgres(&pg, &pg.create_database());
    let (ok, out) = output(
        ecs.command()
            .args(["store", "restore", "--config"])
            .arg(ecs.config_path())
            .arg("--from")
            .arg(&file),
    );
    assert!(ok, "{out}");
    assert!(out.contains("(postgres)"), "{out}");
    ecs.restart();
    let second = ecs.replica();
    for replica in [&ecs, &second] {
        for ees in &before {
            assert_eq!(get(replica, ees, &on(replica, ees)).await.status, 200);
        }
    }
    // The one chain goes on from where the SQLite store left it.
    second.register("ees-up-after.ecsp.example").await;
    let (intact, records) = ecs.audit();
    assert!(intact);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["action"] == "register" && r["outcome"] == "accepted")
            .count(),
        5
    );
}
