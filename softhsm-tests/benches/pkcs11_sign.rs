//! Signing through the PKCS#11 backend against calling `C_Sign` directly on the same
//! SoftHSM token, with 1 and 2 threads, in one run: `cargo bench -p softhsm-tests`.
//! Prints the rates and the ratio (target: backend ≥ 85% of direct at 2 threads).

use ecs_ca_backends::KeySigner;
use ecs_ca_backends::pkcs11::{
    self, AuthPin, Pkcs11Config, Pkcs11Key, Pkcs11Uri, find_private_key, find_token, login,
};
use softhsm_tests::{HSM_PIN, MODULE, SoftHsm};
use std::path::Path;
use std::time::{Duration, Instant};

const SECONDS: f64 = 3.0;

fn rate(threads: usize, work: impl Fn() + Sync) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(SECONDS);
    let total: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0;
                    while Instant::now() < until {
                        work();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / SECONDS
}

fn main() {
    let hsm = SoftHsm::new();
    // SAFETY: set before any thread exists and before the module is initialised.
    unsafe { std::env::set_var("SOFTHSM2_CONF", hsm.conf()) };
    hsm.init_token("ecs-ca", HSM_PIN);
    let file = format!(
        "type = \"key\"\n[hsm]\nmodule = \"{MODULE}\"\ntoken = \"ecs-ca\"\npin = \"env:ECS_HSM_PIN\"\n[key]\nlabel = \"bench-key\"\ntype = \"p256\"\n[outputs]\npublic_key = \"out/bench.pub.pem\"\ntranscript = \"out/bench.json\"\n"
    );
    let out = hsm.ceremony("key.toml", &file, &[("ECS_HSM_PIN", HSM_PIN)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spki = ecs_ca_backends::pem_to_der(
        &std::fs::read_to_string(hsm.path().join("out/bench.pub.pem")).unwrap(),
        "PUBLIC KEY",
    )
    .unwrap();

    let backend = Pkcs11Key::open(Pkcs11Config {
        name: "bench".into(),
        module: MODULE.into(),
        uri: Pkcs11Uri::parse("pkcs11:token=ecs-ca;object=bench-key").unwrap(),
        pin: AuthPin::from(HSM_PIN),
        max_sessions: 4,
        rsa_pss: false,
        expected_spki: spki,
    })
    .unwrap();
    let tbs = vec![0x5a; 600]; // about the size of an EES certificate's TBS

    // Direct: one session per thread, the digest precomputed, raw C_Sign in a tight loop.
    let ctx = pkcs11::module(Path::new(MODULE)).unwrap();
    let slot = find_token(
        &ctx,
        &Pkcs11Uri::parse("pkcs11:token=ecs-ca;object=bench-key").unwrap(),
    )
    .unwrap()
    .unwrap();
    let digest = [7u8; 32];
    let direct = |threads: usize| {
        let sessions: Vec<_> = (0..threads)
            .map(|_| {
                let s = ctx.open_ro_session(slot).unwrap();
                login(&s, &AuthPin::from(HSM_PIN)).unwrap();
                let k = find_private_key(&s, Some("bench-key"), None)
                    .unwrap()
                    .unwrap();
                std::sync::Mutex::new((s, k))
            })
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let per_thread: Vec<_> = sessions.iter().collect();
        rate(threads, || {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % per_thread.len();
            let guard = per_thread[i].lock().unwrap();
            guard
                .0
                .sign(&cryptoki::mechanism::Mechanism::Ecdsa, guard.1, &digest)
                .unwrap();
        })
    };
    let through = |threads: usize| {
        rate(threads, || {
            backend.sign(&tbs).unwrap();
        })
    };

    println!("PKCS#11 signing on SoftHSM (P-256), {SECONDS} s per figure");
    println!("{:<40} {:>12} {:>12}", "", "1 thread", "2 threads");
    let (d1, d2) = (direct(1), direct(2));
    let (b1, b2) = (through(1), through(2));
    println!(
        "{:<40} {:>10.0}/s {:>10.0}/s",
        "direct C_Sign (digest given)", d1, d2
    );
    println!(
        "{:<40} {:>10.0}/s {:>10.0}/s",
        "backend sign (SHA-256 + C_Sign + DER)", b1, b2
    );
    println!(
        "{:<40} {:>11.0}% {:>11.0}%",
        "backend / direct",
        100.0 * b1 / d1,
        100.0 * b2 / d2
    );
}
