//! `ecsd ees …`: a reference EES client that speaks only the wire contract, so it works
//! against any ECS that follows it. It keeps its state in one folder:
//!
//! | file | what |
//! | --- | --- |
//! | `key.pem` | the EES's private key (0600) |
//! | `cert.pem` | the EES certificate |
//! | `chain.pem` | the issuing CA chain |
//! | `ca.pem` | the root the ECS's TLS certificate is checked against |
//! | `registration.json` | registration ID, location, the profile as registered |
//! | `secret-token` | the Secret_token, when one was issued (0600) |

use crate::client::{HttpVersion, HttpsClient, Response};
use ecs_ca_backends::{SoftwareKey, build_csr, generate_p256_pkcs8_pem};
use serde_json::{Value, json};
use std::fs;
use std::path::{Path, PathBuf};

/// What `ees register` sends.
pub struct RegisterArgs {
    pub url: String,
    pub ca: PathBuf,
    pub token: String,
    pub ees_id: String,
    pub prov_id: Option<String>,
    pub endpoint: Value,
    pub exp_time: Option<String>,
    pub secret_token: bool,
    pub out: PathBuf,
}

fn write_secret(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Turns an error answer into one line: status, cause and detail.
fn refused(what: &str, r: &Response) -> String {
    let p = r.json();
    format!(
        "{what} refused: {} {} — {}",
        r.status,
        p.get("cause").and_then(Value::as_str).unwrap_or("?"),
        p.get("detail").and_then(Value::as_str).unwrap_or("")
    )
}

fn save_result(dir: &Path, body: &Value, key_pem: Option<&str>) -> Result<(), String> {
    let ob = &body["onboarding"];
    let cert = ob["eesCert"]
        .as_str()
        .ok_or("the answer has no onboarding.eesCert")?;
    let chain: String = ob["certChain"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(k) = key_pem {
        write_secret(&dir.join("key.pem"), k.as_bytes())?;
    }
    write_public(&dir.join("cert.pem"), cert.as_bytes())?;
    write_public(&dir.join("chain.pem"), chain.as_bytes())?;
    if let Some(t) = ob["secretToken"].as_str() {
        write_secret(&dir.join("secret-token"), t.as_bytes())?;
    }
    Ok(())
}

/// Registers an EES: makes a P-256 key pair and CSR, POSTs, saves what comes back.
pub async fn register(a: RegisterArgs) -> Result<Value, String> {
    fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let roots = read(&a.ca)?;
    let key_pem = generate_p256_pkcs8_pem().map_err(|e| e.to_string())?;
    let key = SoftwareKey::from_pkcs8_pem(&key_pem).map_err(|e| e.to_string())?;
    let csr = build_csr(&key, &a.ees_id).map_err(|e| e.to_string())?;
    let mut prof = json!({ "eesId": a.ees_id, "endPt": a.endpoint, "eecRegConf": false });
    if let Some(p) = &a.prov_id {
        prof["provId"] = json!(p);
    }
    let mut body = json!({
        "eesProf": prof,
        "onboarding": { "csr": csr, "secretToken": a.secret_token },
    });
    if let Some(t) = &a.exp_time {
        body["expTime"] = json!(t);
    }
    let client = HttpsClient::new(&roots, None, HttpVersion::Http2).map_err(|e| e.to_string())?;
    let url = format!(
        "{}/eecs-eesregistration/v1/registrations",
        a.url.trim_end_matches('/')
    );
    let auth = format!("Bearer {}", a.token);
    let r = client
        .request(
            "POST",
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 201 {
        return Err(refused("registration", &r));
    }
    let answer = r.json();
    let location = r.header("location").unwrap_or_default().to_string();
    save_result(&a.out, &answer, Some(&key_pem))?;
    write_public(&a.out.join("ca.pem"), &roots)?;
    let state = json!({
        "registrationId": answer["onboarding"]["registrationId"],
        "location": location,
        "eesProf": answer["eesProf"],
        "expTime": answer["expTime"],
    });
    write_public(
        &a.out.join("registration.json"),
        serde_json::to_string_pretty(&state)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(state)
}

struct Saved {
    dir: PathBuf,
    state: Value,
    roots: Vec<u8>,
}

impl Saved {
    fn load(dir: &Path) -> Result<Self, String> {
        let state: Value = serde_json::from_slice(&read(&dir.join("registration.json"))?)
            .map_err(|e| format!("{}/registration.json: {e}", dir.display()))?;
        Ok(Saved {
            dir: dir.to_path_buf(),
            state,
            roots: read(&dir.join("ca.pem"))?,
        })
    }

    fn location(&self) -> &str {
        self.state["location"].as_str().unwrap_or_default()
    }

    fn client(&self) -> Result<HttpsClient, String> {
        let cert = read(&self.dir.join("cert.pem"))?;
        let key = read(&self.dir.join("key.pem"))?;
        HttpsClient::new(&self.roots, Some((&cert, &key)), HttpVersion::Http2)
            .map_err(|e| e.to_string())
    }
}

/// `GET` the registration.
pub async fn show(dir: &Path) -> Result<Value, String> {
    let s = Saved::load(dir)?;
    let r = s
        .client()?
        .request("GET", s.location(), &[], None)
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(refused("read", &r));
    }
    Ok(r.json())
}

/// `PUT` the profile again, with a new `expTime` when given.
pub async fn update(dir: &Path, exp_time: Option<String>) -> Result<Value, String> {
    let s = Saved::load(dir)?;
    let mut body = json!({ "eesProf": s.state["eesProf"] });
    if let Some(t) = exp_time {
        body["expTime"] = json!(t);
    }
    let r = s
        .client()?
        .request(
            "PUT",
            s.location(),
            &[("content-type", "application/json")],
            Some(body.to_string().into_bytes()),
        )
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(refused("update", &r));
    }
    let answer = r.json();
    let mut state = s.state.clone();
    state["expTime"] = answer["expTime"].clone();
    write_public(
        &dir.join("registration.json"),
        serde_json::to_string_pretty(&state)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(answer)
}

/// Re-keys: a new key pair and CSR in a `PUT`, authenticated by the current certificate or,
/// when `with_secret_token`, by the saved Secret_token (lost key or expired certificate).
pub async fn rekey(dir: &Path, with_secret_token: bool) -> Result<Value, String> {
    let s = Saved::load(dir)?;
    let key_pem = generate_p256_pkcs8_pem().map_err(|e| e.to_string())?;
    let key = SoftwareKey::from_pkcs8_pem(&key_pem).map_err(|e| e.to_string())?;
    let ees_id = s.state["eesProf"]["eesId"].as_str().unwrap_or_default();
    let csr = build_csr(&key, ees_id).map_err(|e| e.to_string())?;
    let body = json!({ "eesProf": s.state["eesProf"], "onboarding": { "csr": csr } });
    let (client, auth) = if with_secret_token {
        let token = String::from_utf8(read(&dir.join("secret-token"))?)
            .map_err(|_| "secret-token is not text".to_string())?;
        (
            HttpsClient::new(&s.roots, None, HttpVersion::Http2).map_err(|e| e.to_string())?,
            Some(format!("Bearer {}", token.trim())),
        )
    } else {
        (s.client()?, None)
    };
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    let r = client
        .request(
            "PUT",
            s.location(),
            &headers,
            Some(body.to_string().into_bytes()),
        )
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(refused("re-key", &r));
    }
    let answer = r.json();
    save_result(dir, &answer, Some(&key_pem))?;
    Ok(answer)
}

/// `DELETE` the registration.
pub async fn deregister(dir: &Path) -> Result<(), String> {
    let s = Saved::load(dir)?;
    let r = s
        .client()?
        .request("DELETE", s.location(), &[], None)
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 204 {
        return Err(refused("de-registration", &r));
    }
    Ok(())
}
