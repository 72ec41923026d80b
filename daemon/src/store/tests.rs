//! One set of store tests, run on every engine.

use super::*;
use crate::config::{StorageConfig, StorageKind};

/// Every engine, each in its own temporary folder (PostgreSQL: its own database in this
/// test process's private cluster).
fn engines() -> Vec<(StorageKind, tempfile::TempDir, StorageConfig)> {
    [
        StorageKind::Sqlite,
        StorageKind::Sled,
        StorageKind::Postgres,
    ]
    .into_iter()
    .map(|kind| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = StorageConfig {
            kind,
            path: dir.path().join("store"),
            cache_mib: 8,
            ..Default::default()
        };
        if kind == StorageKind::Postgres {
            let pg = crate::testing::postgres::Postgres::shared();
            cfg.url = Some(pg.url(&pg.create_database()));
            let pw = dir.path().join("db-password");
            std::fs::write(&pw, crate::testing::postgres::PASSWORD).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
            cfg.password = Some(format!("file:{}", pw.display()));
        }
        (kind, dir, cfg)
    })
    .collect()
}

fn reg(id: &str, ees: &str, exp: i64) -> RegistrationRecord {
    RegistrationRecord {
        id: id.into(),
        state: RegState::Active,
        ees_id: ees.into(),
        prov_id: None,
        domain: "default".into(),
        backend: "soft".into(),
        profile: serde_json::json!({"eesId": ees}),
        exp_time: exp,
        supp_feat: None,
        created_at: 0,
        updated_at: 0,
        cert_source: CertSource::EcsIssued,
        current_cert: format!("s-{id}"),
        certs: vec![format!("s-{id}")],
        secret_token_hash: None,
        token_issuer: "dev".into(),
    }
}

fn cert(serial: &str, reg: &str) -> CertRecord {
    CertRecord {
        serial: serial.into(),
        registration_id: reg.into(),
        backend: "soft".into(),
        der: vec![0x30, 0x03, 0x02, 0x01, 0x01],
        fingerprint: format!("fp{serial}"),
        not_before: 0,
        not_after: 10,
        revoked: None,
        chain: Vec::new(),
    }
}

fn create(id: &str, ees: &str, jti: &str) -> Commit {
    Commit {
        registration: Some(reg(id, ees, 100)),
        claim_ees_id: true,
        new_certs: vec![cert(&format!("s-{id}"), id)],
        spend_token: Some(SpentToken {
            iss: "iss".into(),
            jti: jti.into(),
            exp: 50,
        }),
        audit: Some(AuditEvent::test("register")),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_refused_commit_writes_nothing() {
    for (kind, _dir, cfg) in engines() {
        let s = open(&cfg).await.unwrap();
        s.commit(create("r1", "ees1", "j1")).await.unwrap();
        // Same token: refused, and neither the registration nor the certificate appears.
        let err = s.commit(create("r2", "ees2", "j1")).await.unwrap_err();
        assert!(matches!(err, StoreError::TokenReplayed), "{kind:?}: {err}");
        assert!(s.registration("r2").await.unwrap().is_none(), "{kind:?}");
        assert!(s.cert("s-r2").await.unwrap().is_none(), "{kind:?}");
        // Same EES ID (another case) with another token: refused.
        let err = s.commit(create("r3", "EES1", "j3")).await.unwrap_err();
        assert!(
            matches!(err, StoreError::EesAlreadyRegistered),
            "{kind:?}: {err}"
        );
        assert!(!s.token_spent("iss", "j3").await.unwrap(), "{kind:?}");
        // A serial used twice: refused.
        let mut c = create("r4", "ees4", "j4");
        c.new_certs[0].serial = "s-r1".into();
        let err = s.commit(c).await.unwrap_err();
        assert!(
            matches!(err, StoreError::SerialCollision),
            "{kind:?}: {err}"
        );
        assert!(s.registration("r4").await.unwrap().is_none(), "{kind:?}");
        assert_eq!(s.audit_head().await.unwrap().0, 1, "{kind:?}");
    }
}

#[tokio::test]
async fn an_embedded_store_held_by_another_handle_is_refused_as_locked() {
    for (kind, _dir, cfg) in engines() {
        if kind == StorageKind::Postgres {
            continue;
        }
        let held = open(&cfg).await.unwrap();
        match open(&cfg).await {
            Err(StoreError::Locked(p)) => assert_eq!(p, cfg.path.display().to_string()),
            Err(e) => panic!("{kind:?}: {e:?}"),
            Ok(_) => panic!("{kind:?}: opened twice"),
        }
        drop(held);
        // Once the holder is gone the store opens, however soon (sled's threads let go of
        // its lock a moment after the handle is dropped).
        open(&cfg).await.unwrap();
    }
}

#[tokio::test]
async fn records_read_back_as_written_and_survive_a_reopen() {
    for (kind, _dir, cfg) in engines() {
        let s = open(&cfg).await.unwrap();
        let mut c = create("r1", "ees1", "j1");
        c.new_certs[0].chain = vec![vec![0x30, 3, 2, 1, 2], vec![0x30, 3, 2, 1, 3]];
        c.new_certs[0].backend = super::THIRD_PARTY.into();
        c.registration.as_mut().unwrap().cert_source = CertSource::ThirdParty;
        let written = s.commit(c).await.unwrap().unwrap();
        assert_eq!(written.seq, 1);
        let r = s.registration("r1").await.unwrap().unwrap();
        assert_eq!(r, reg_with(&reg("r1", "ees1", 100), CertSource::ThirdParty));
        let got = s.cert("s-r1").await.unwrap().unwrap();
        assert_eq!(
            got.chain,
            vec![vec![0x30, 3, 2, 1, 2], vec![0x30, 3, 2, 1, 3]],
            "{kind:?}"
        );
        assert_eq!(got.der, vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert_eq!(
            s.third_party_cert_by_fingerprint("fps-r1")
                .await
                .unwrap()
                .unwrap()
                .serial,
            "s-r1"
        );
        assert_eq!(
            s.active_registration_for("EES1").await.unwrap().as_deref(),
            Some("r1"),
            "{kind:?}"
        );
        drop(s);
        let s = open(&cfg).await.unwrap();
        assert_eq!(
            s.audit_records(1, 10).await.unwrap(),
            vec![written],
            "{kind:?}"
        );
        assert_eq!(s.counts().await.unwrap().active_registrations, 1);
        // An ECS-issued certificate is found by its serial, never by its fingerprint.
        s.commit(create("r2", "ees2", "j2")).await.unwrap();
        assert!(s.cert("s-r2").await.unwrap().is_some(), "{kind:?}");
        assert_eq!(
            s.third_party_cert_by_fingerprint("fps-r2").await.unwrap(),
            None,
            "{kind:?}"
        );
    }
}

fn reg_with(r: &RegistrationRecord, source: CertSource) -> RegistrationRecord {
    RegistrationRecord {
        cert_source: source,
        ..r.clone()
    }
}

#[tokio::test]
async fn expiry_index_revocation_and_crl_numbers() {
    for (kind, _dir, cfg) in engines() {
        let s = open(&cfg).await.unwrap();
        s.commit(create("r1", "ees1", "j1")).await.unwrap();
        assert_eq!(s.counts().await.unwrap().active_registrations, 1);
        assert!(s.due_expiries(99, 10).await.unwrap().is_empty(), "{kind:?}");
        assert_eq!(s.due_expiries(100, 10).await.unwrap(), vec!["r1"]);
        let mut r = s.registration("r1").await.unwrap().unwrap();
        r.state = RegState::Deregistered;
        s.commit(Commit {
            registration: Some(r),
            revocations: vec![(
                "s-r1".into(),
                Revocation {
                    at: 5,
                    reason: ecs_ca_backends::RevocationReason::CessationOfOperation,
                },
            )],
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(s.due_expiries(1000, 10).await.unwrap().is_empty());
        assert!(s.active_registration_for("ees1").await.unwrap().is_none());
        assert_eq!(s.counts().await.unwrap().active_registrations, 0);
        let revoked = s.revoked("soft").await.unwrap();
        assert_eq!(revoked.len(), 1, "{kind:?}");
        assert_eq!((revoked[0].0.as_str(), revoked[0].1.at), ("s-r1", 5));
        // The EES ID is free again once its registration ended.
        s.commit(create("r1b", "ees1", "j1b")).await.unwrap();

        assert_eq!(s.next_crl_number("soft").await.unwrap(), 1);
        assert_eq!(s.next_crl_number("soft").await.unwrap(), 2);
        for n in [7, 3] {
            s.commit(Commit {
                raise_crl_numbers: vec![("soft".into(), n)],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        assert_eq!(s.next_crl_number("soft").await.unwrap(), 8, "{kind:?}");
        assert_eq!(s.purge_spent_tokens(51).await.unwrap(), 2, "{kind:?}");
        assert!(!s.token_spent("iss", "j1").await.unwrap());

        // Bulk: applied in order, durable together; the count follows.
        s.commit_all(vec![create("r2", "ees2", "j2"), create("r3", "ees3", "j3")])
            .await
            .unwrap();
        assert_eq!(s.counts().await.unwrap().active_registrations, 3);
        drop(s);
        let s = open(&cfg).await.unwrap();
        assert_eq!(
            s.counts().await.unwrap().active_registrations,
            3,
            "{kind:?}"
        );
        assert_eq!(s.next_crl_number("soft").await.unwrap(), 9, "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_keep_every_rule_and_one_chain() {
    for (kind, _dir, cfg) in engines() {
        let s = open(&cfg).await.unwrap();
        // 40 registrations at once, two per EES ID, each with its own token: one of each
        // pair wins, and the chain holds exactly the winners, in one sequence.
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.commit(create(
                        &format!("r{i}"),
                        &format!("ees{}", i / 2),
                        &format!("j{i}"),
                    ))
                    .await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::EesAlreadyRegistered) => {}
                Err(e) => panic!("{kind:?}: {e}"),
            }
        }
        assert_eq!(won, 20, "{kind:?}");
        let records = all_audit_records(s.as_ref()).await.unwrap();
        assert_eq!(records.len(), 20, "{kind:?}");
        let head = s.audit_head().await.unwrap();
        crate::audit::verify_chain(&records, (head.0, &head.1)).unwrap();
        assert_eq!(
            all_active_registrations(s.as_ref()).await.unwrap().len(),
            20
        );
    }
}

#[tokio::test]
async fn dumps_come_in_pages_in_order() {
    for (kind, _dir, cfg) in engines() {
        let s = open(&cfg).await.unwrap();
        let commits = (0..25)
            .map(|i| create(&format!("r{i:02}"), &format!("ees{i}"), &format!("j{i}")))
            .collect();
        s.commit_all(commits).await.unwrap();
        let page = s.active_registrations("r09", 5).await.unwrap();
        let ids: Vec<&str> = page.iter().map(|(r, _)| r.id.as_str()).collect();
        assert_eq!(ids, ["r10", "r11", "r12", "r13", "r14"], "{kind:?}");
        let records = s.audit_records(20, 100).await.unwrap();
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [20, 21, 22, 23, 24, 25], "{kind:?}");
        assert_eq!(
            all_active_registrations(s.as_ref()).await.unwrap().len(),
            25
        );
    }
}

/// A store with a bit of everything: active, ended and revoked registrations, spent
/// tokens, a CRL number, a third-party chain and the audit chain.
async fn filled(s: &dyn Store) {
    for i in 0..30 {
        let mut c = create(&format!("r{i:02}"), &format!("ees{i}"), &format!("j{i}"));
        if i == 3 {
            c.new_certs[0].chain = vec![vec![0x30, 3, 2, 1, 2]];
        }
        s.commit(c).await.unwrap();
    }
    let mut r = s.registration("r05").await.unwrap().unwrap();
    r.state = RegState::Deregistered;
    s.commit(Commit {
        registration: Some(r),
        revocations: vec![(
            "s-r05".into(),
            Revocation {
                at: 9,
                reason: ecs_ca_backends::RevocationReason::KeyCompromise,
            },
        )],
        audit: Some(AuditEvent::test("deregister")),
        ..Default::default()
    })
    .await
    .unwrap();
    s.next_crl_number("soft").await.unwrap();
    s.next_crl_number("soft").await.unwrap();
}

async fn backup_to(s: &dyn Store, path: &std::path::Path) -> backup::Counts {
    let mut f = tokio::fs::File::create(path).await.unwrap();
    backup::write(s, "test", &mut f).await.unwrap()
}

#[tokio::test]
async fn a_backup_restores_into_every_engine_as_it_was() {
    for (from_kind, _d1, from_cfg) in engines() {
        let source = open(&from_cfg).await.unwrap();
        filled(source.as_ref()).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("backup.jsonl");
        let counts = backup_to(source.as_ref(), &file).await;
        assert_eq!(
            (
                counts.registrations,
                counts.audit_records,
                counts.crl_numbers
            ),
            (30, 31, 1)
        );
        for (to_kind, _d2, to_cfg) in engines() {
            let restored = restore_into(&to_cfg, &file).await.unwrap();
            assert_eq!(restored, counts, "{from_kind:?} -> {to_kind:?}");
            let target = open(&to_cfg).await.unwrap();
            assert_eq!(
                target.audit_head().await.unwrap(),
                source.audit_head().await.unwrap()
            );
            for id in ["r00", "r03", "r05", "r29"] {
                assert_eq!(
                    target.registration(id).await.unwrap(),
                    source.registration(id).await.unwrap(),
                    "{from_kind:?} -> {to_kind:?}: {id}"
                );
            }
            assert_eq!(
                target.cert("s-r03").await.unwrap(),
                source.cert("s-r03").await.unwrap()
            );
            assert_eq!(
                target.revoked("soft").await.unwrap(),
                source.revoked("soft").await.unwrap()
            );
            assert!(target.token_spent("iss", "j7").await.unwrap());
            assert_eq!(target.next_crl_number("soft").await.unwrap(), 3);
            // A restored store is a store: the next registration extends the same chain.
            target.commit(create("r99", "ees99", "j99")).await.unwrap();
            assert_eq!(target.audit_head().await.unwrap().0, 32);
            // And it is not empty any more: a second restore is refused.
            drop(target);
            let err = restore_into(&to_cfg, &file).await.unwrap_err();
            assert!(err.contains("not empty"), "{err}");
        }
    }
}

#[tokio::test]
async fn a_damaged_backup_is_refused_at_the_line_at_fault_and_writes_nothing() {
    let (_, _d, cfg) = engines().remove(0);
    let source = open(&cfg).await.unwrap();
    filled(source.as_ref()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    backup_to(source.as_ref(), &good).await;
    let text = std::fs::read_to_string(&good).unwrap();
    let lines: Vec<&str> = text.lines().collect();

    let edited = text.replacen("\"ees_id\":\"ees7\"", "\"ees_id\":\"evil7\"", 1);
    let cut = lines[..lines.len() - 5].join("\n") + "\n";
    let mut swapped = lines.clone();
    swapped.swap(4, 5);
    let swapped = swapped.join("\n") + "\n";
    let appended = format!("{text}{}\n", lines[3]);
    // A certificate that is not hex fails where it is read, however its digest was made.
    let not_hex = text.replacen("\"der_hex\":\"", "\"der_hex\":\"zz", 1);
    assert_ne!(not_hex, text);
    for (case, body, expect) in [
        (
            "edited",
            edited,
            "registration r07 does not match its digest",
        ),
        ("cut", cut, "cut short"),
        ("swapped", swapped, "line 5"),
        ("appended", appended, "appended"),
        ("not hex", not_hex, "line 2: not hex: "),
    ] {
        let bad = dir.path().join(format!("{case}.jsonl"));
        std::fs::write(&bad, body).unwrap();
        for (kind, _d2, to_cfg) in engines() {
            let err = restore_into(&to_cfg, &bad).await.unwrap_err();
            assert!(err.contains(expect), "{case} into {kind:?}: {err}");
            assert!(!to_cfg.path.exists(), "{case} into {kind:?} left a store");
            if !kind.embedded() {
                let s = open(&to_cfg).await.unwrap();
                must_be_empty(s.as_ref()).await.unwrap();
            }
        }
    }
}

/// `n` commits at once, commit `i` through store `i % len`: each one's outcome.
async fn commit_at_once(
    stores: &[Arc<dyn Store>],
    n: usize,
    commit: impl Fn(usize) -> Commit,
) -> Vec<Result<Option<AuditRecord>, StoreError>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (s, c) = (stores[i % stores.len()].clone(), commit(i));
            tokio::spawn(async move { s.commit(c).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Two replicas' stores on one PostgreSQL database, as two `ecsd` processes would have
/// them: every rule holds across them, and their audit records make one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_one_database_keep_every_rule_and_one_chain() {
    let (_, _dir, cfg) = engines()
        .into_iter()
        .find(|(k, _, _)| *k == StorageKind::Postgres)
        .unwrap();
    let replicas = [open(&cfg).await.unwrap(), open(&cfg).await.unwrap()];
    // 16 uses of one token split over both: one wins.
    let won = commit_at_once(&replicas, 16, |i| {
        create(&format!("t{i}"), &format!("tees{i}"), "one-token")
    })
    .await;
    assert!(
        won.iter()
            .all(|r| matches!(r, Ok(_) | Err(StoreError::TokenReplayed)))
    );
    assert_eq!(won.iter().filter(|r| r.is_ok()).count(), 1);
    // 8 registrations of one EES ID with distinct tokens: one wins.
    let won = commit_at_once(&replicas, 8, |i| {
        create(&format!("e{i}"), "one-ees", &format!("ej{i}"))
    })
    .await;
    assert!(
        won.iter()
            .all(|r| matches!(r, Ok(_) | Err(StoreError::EesAlreadyRegistered)))
    );
    assert_eq!(won.iter().filter(|r| r.is_ok()).count(), 1);
    // Two changes of one registration made from the same view: the second finds it
    // changed, whichever replica it goes through.
    let winner = replicas[0]
        .active_registration_for("one-ees")
        .await
        .unwrap()
        .unwrap();
    let seen = replicas[0].registration(&winner).await.unwrap().unwrap();
    let rekey = |new_serial: &str| {
        let mut r = seen.clone();
        r.current_cert = new_serial.into();
        r.certs.push(new_serial.into());
        Commit {
            expect_current: Some(seen.current_cert.clone()),
            registration: Some(r),
            new_certs: vec![cert(new_serial, &seen.id)],
            audit: Some(AuditEvent::test("update")),
            ..Default::default()
        }
    };
    replicas[1].commit(rekey("rekey-1")).await.unwrap();
    let err = replicas[0].commit(rekey("rekey-2")).await.unwrap_err();
    assert!(matches!(err, StoreError::Changed), "{err}");
    assert!(replicas[0].cert("rekey-2").await.unwrap().is_none());
    // CRL numbers strictly increase whichever replica asks.
    let mut numbers = Vec::new();
    for i in 0..6 {
        numbers.push(replicas[i % 2].next_crl_number("soft").await.unwrap());
    }
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6]);
    // Audit records written through both at once: one chain, no record lost.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = replicas[i % 2].clone();
            tokio::spawn(async move { s.record(AuditEvent::test("refusal")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // One chain, read through either.
    let records = all_audit_records(replicas[1].as_ref()).await.unwrap();
    assert_eq!(records.len(), 43);
    let head = replicas[0].audit_head().await.unwrap();
    crate::audit::verify_chain(&records, (head.0, &head.1)).unwrap();
}

/// TLS to the database is verified against `storage.tls_ca`: the right CA connects, another
/// CA is refused (never a fallback to plain text).
#[tokio::test]
async fn the_database_is_reached_over_tls_verified_against_tls_ca() {
    let pg = crate::testing::postgres::Postgres::start_with_tls();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("db-password");
    std::fs::write(&pw, crate::testing::postgres::PASSWORD).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = |ca: &str| StorageConfig {
        kind: StorageKind::Postgres,
        url: Some(pg.url(&pg.create_database())),
        password: Some(format!("file:{}", pw.display())),
        tls_ca: Some(pg.folder().join(ca)),
        ..Default::default()
    };
    let s = open(&cfg("db-ca.pem")).await.unwrap();
    s.commit(create("r1", "ees1", "j1")).await.unwrap();
    assert!(s.registration("r1").await.unwrap().is_some());
    let err = open(&cfg("other-ca.pem"))
        .await
        .err()
        .expect("another CA is refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}
