//! The TS 29.558 `EESRegistration` body with the `onboarding` extension: parsed from JSON,
//! checked field by field, each fault named by its JSON pointer and contract cause.
//!
//! The profile is kept as the JSON the EES sent (3GPP adds attributes release by release);
//! only what the ECS acts on is read out and validated.

use crate::problem::{ApiError, Cause};
use ecs_policy::{RequestedName, UriHost, is_fqdn};
use serde_json::{Map, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// RFC 5280's upper bound for a commonName, which carries the EES ID.
pub const MAX_EES_ID_LEN: usize = 64;

/// The endpoint of an EES (`EndPoint`: exactly one form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Fqdn(String),
    Ipv4(Vec<Ipv4Addr>),
    Ipv6(Vec<Ipv6Addr>),
    Uri(String),
}

/// A validated `eesProf`.
#[derive(Debug, Clone)]
pub struct Profile {
    pub json: Value,
    pub ees_id: String,
    pub prov_id: Option<String>,
    pub endpoint: Endpoint,
}

impl Profile {
    /// The names the EES asks its certificate to carry (`contract/api.md` §6). They are a
    /// request only: the domain's policy approves each, and the certificate carries what it
    /// approved (`ecs_policy::Approval::names`).
    pub fn requested_names(&self) -> Vec<RequestedName> {
        match &self.endpoint {
            Endpoint::Fqdn(f) => vec![RequestedName::Dns(f.clone())],
            Endpoint::Ipv4(a) => a.iter().map(|ip| RequestedName::Ip((*ip).into())).collect(),
            Endpoint::Ipv6(a) => a.iter().map(|ip| RequestedName::Ip((*ip).into())).collect(),
            Endpoint::Uri(u) => vec![RequestedName::Uri {
                uri: u.clone(),
                host: uri_host(u),
            }],
        }
    }

    /// Whether the eesId goes into the certificate as a dNSName as well.
    pub fn ees_id_is_fqdn(&self) -> bool {
        is_fqdn(&self.ees_id)
    }
}

/// The host of a URI's authority (`scheme://[userinfo@]host[:port]/...`), if it has one.
fn uri_host(uri: &str) -> Option<UriHost> {
    let (_, rest) = uri.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    if host.is_empty() {
        return None;
    }
    Some(match host.parse::<IpAddr>() {
        Ok(ip) => UriHost::Ip(ip),
        Err(_) => UriHost::Dns(host.to_string()),
    })
}

/// The `onboarding` object of a request.
#[derive(Debug, Clone, Default)]
pub struct OnboardingRequest {
    pub csr: Option<String>,
    pub third_party_cert: bool,
    pub secret_token: bool,
}

/// A validated `EESRegistration` request body.
#[derive(Debug, Clone)]
pub struct RegistrationBody {
    pub profile: Profile,
    pub exp_time: Option<i64>,
    pub supp_feat: Option<String>,
    pub onboarding: Option<OnboardingRequest>,
}

/// Parses a JSON body into an object, or `INVALID_MSG_FORMAT`.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            Cause::InvalidMsgFormat,
            "the body is not a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            Cause::InvalidMsgFormat,
            format!("the body is not JSON: {e}"),
        )),
    }
}

fn shape(pointer: &str, expected: &str) -> ApiError {
    ApiError::param(
        Cause::InvalidMsgFormat,
        pointer,
        format!("must be {expected}"),
    )
}

fn incorrect(pointer: &str, reason: impl Into<String>) -> ApiError {
    ApiError::param(Cause::MandatoryIeIncorrect, pointer, reason)
}

fn missing(pointer: &str) -> ApiError {
    ApiError::param(Cause::MandatoryIeMissing, pointer, "is missing")
}

/// Validates a whole `EESRegistration` (+ `onboarding`) object. `now` bounds `expTime`.
pub fn parse_registration(
    obj: &Map<String, Value>,
    now: i64,
) -> Result<RegistrationBody, ApiError> {
    let prof = match obj.get("eesProf") {
        None | Some(Value::Null) => return Err(missing("/eesProf")),
        Some(p) => p,
    };
    let profile = parse_profile(prof)?;
    let exp_time = match obj.get("expTime") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_time("/expTime", s, now)?),
        Some(_) => return Err(shape("/expTime", "a date-time string")),
    };
    let supp_feat = match obj.get("suppFeat") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().all(|c| c.is_ascii_hexdigit()) => Some(s.clone()),
        Some(Value::String(_)) => return Err(incorrect("/suppFeat", "must be hexadecimal")),
        Some(_) => return Err(shape("/suppFeat", "a string")),
    };
    let onboarding = match obj.get("onboarding") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(parse_onboarding(o)?),
        Some(_) => return Err(shape("/onboarding", "an object")),
    };
    Ok(RegistrationBody {
        profile,
        exp_time,
        supp_feat,
        onboarding,
    })
}

/// Validates an `expTime`: RFC 3339, and in the future.
pub fn parse_time(pointer: &str, s: &str, now: i64) -> Result<i64, ApiError> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|_| incorrect(pointer, "is not an RFC 3339 date-time"))?
        .unix_timestamp();
    if t <= now {
        return Err(incorrect(pointer, "is not in the future"));
    }
    Ok(t)
}

fn parse_onboarding(o: &Map<String, Value>) -> Result<OnboardingRequest, ApiError> {
    let csr = match o.get("csr") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(shape("/onboarding/csr", "a PEM string")),
    };
    let flag = |name: &str| match o.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(shape(&format!("/onboarding/{name}"), "a boolean")),
    };
    Ok(OnboardingRequest {
        csr,
        third_party_cert: flag("thirdPartyCert")?,
        secret_token: flag("secretToken")?,
    })
}

/// Validates an `EESProfile`.
pub fn parse_profile(prof: &Value) -> Result<Profile, ApiError> {
    let p = prof
        .as_object()
        .ok_or_else(|| shape("/eesProf", "an object"))?;
    let ees_id = match p.get("eesId") {
        None | Some(Value::Null) => return Err(missing("/eesProf/eesId")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(shape("/eesProf/eesId", "a string")),
    };
    if ees_id.is_empty() {
        return Err(incorrect("/eesProf/eesId", "is empty"));
    }
    if ees_id.chars().count() > MAX_EES_ID_LEN {
        return Err(incorrect(
            "/eesProf/eesId",
            format!("is longer than {MAX_EES_ID_LEN} characters, the most a certificate CN holds"),
        ));
    }
    if ees_id.chars().any(|c| c.is_control()) {
        return Err(incorrect("/eesProf/eesId", "contains control characters"));
    }
    // `c.example.` and `c.example` are one name in a certificate: one spelling only, so that
    // two registrations can never carry the same name.
    if ees_id.ends_with('.') {
        return Err(incorrect(
            "/eesProf/eesId",
            "ends with a dot: write the name without the trailing dot",
        ));
    }
    let endpoint = match p.get("endPt") {
        None | Some(Value::Null) => return Err(missing("/eesProf/endPt")),
        Some(Value::Object(e)) => parse_endpoint(e)?,
        Some(_) => return Err(shape("/eesProf/endPt", "an object")),
    };
    match p.get("eecRegConf") {
        None | Some(Value::Null) => return Err(missing("/eesProf/eecRegConf")),
        Some(Value::Bool(_)) => {}
        Some(_) => return Err(shape("/eesProf/eecRegConf", "a boolean")),
    }
    let prov_id = match p.get("provId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(incorrect("/eesProf/provId", "must be 1 to 256 characters"));
        }
        Some(_) => return Err(shape("/eesProf/provId", "a string")),
    };
    for list in ["easIds", "appLocs", "svcContSupp", "svcContSuppExt1"] {
        match p.get(list) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if !a.is_empty() => {}
            Some(Value::Array(_)) => {
                return Err(incorrect(
                    &format!("/eesProf/{list}"),
                    "needs at least one item",
                ));
            }
            Some(_) => return Err(shape(&format!("/eesProf/{list}"), "an array")),
        }
    }
    for (i, v) in p
        .get("easIds")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if !v.is_string() {
            return Err(shape(&format!("/eesProf/easIds/{i}"), "a string"));
        }
    }
    for obj in ["svcArea", "ednInfoSets", "easBdlInfos", "easInstInfo"] {
        if let Some(v) = p.get(obj)
            && !v.is_object()
            && !v.is_null()
        {
            return Err(shape(&format!("/eesProf/{obj}"), "an object"));
        }
    }
    Ok(Profile {
        json: prof.clone(),
        ees_id,
        prov_id,
        endpoint,
    })
}

fn parse_endpoint(e: &Map<String, Value>) -> Result<Endpoint, ApiError> {
    let forms: Vec<&str> = ["fqdn", "ipv4Addrs", "ipv6Addrs", "uri"]
        .into_iter()
        .filter(|k| e.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    match forms.as_slice() {
        [] => Err(incorrect(
            "/eesProf/endPt",
            "needs one of fqdn, ipv4Addrs, ipv6Addrs, uri",
        )),
        [one] => {
            let ptr = format!("/eesProf/endPt/{one}");
            let v = &e[*one];
            match *one {
                "fqdn" => {
                    let f = v.as_str().ok_or_else(|| shape(&ptr, "a string"))?;
                    if !is_fqdn(f) {
                        return Err(incorrect(&ptr, "is not a fully qualified domain name"));
                    }
                    Ok(Endpoint::Fqdn(f.to_string()))
                }
                "uri" => {
                    let u = v.as_str().ok_or_else(|| shape(&ptr, "a string"))?;
                    if !is_uri(u) {
                        return Err(incorrect(&ptr, "is not an absolute URI"));
                    }
                    Ok(Endpoint::Uri(u.to_string()))
                }
                "ipv4Addrs" => Ok(Endpoint::Ipv4(addr_list(v, &ptr)?)),
                _ => Ok(Endpoint::Ipv6(addr_list(v, &ptr)?)),
            }
        }
        _ => Err(incorrect(
            "/eesProf/endPt",
            format!(
                "has {} forms ({}); exactly one is allowed",
                forms.len(),
                forms.join(", ")
            ),
        )),
    }
}

fn addr_list<T: std::str::FromStr>(v: &Value, ptr: &str) -> Result<Vec<T>, ApiError> {
    let a = v.as_array().ok_or_else(|| shape(ptr, "an array"))?;
    if a.is_empty() {
        return Err(incorrect(ptr, "needs at least one address"));
    }
    if a.len() > 16 {
        return Err(incorrect(ptr, "has more than 16 addresses"));
    }
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            let s = x
                .as_str()
                .ok_or_else(|| shape(&format!("{ptr}/{i}"), "a string"))?;
            s.parse()
                .map_err(|_| incorrect(&format!("{ptr}/{i}"), "is not an IP address"))
        })
        .collect()
}

fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && s.len() <= 2048
        && s.chars().all(|c| c.is_ascii_graphic())
}

/// RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Result<RegistrationBody, ApiError> {
        parse_registration(v.as_object().unwrap(), 1_000)
    }

    fn example() -> Value {
        json!({
            "eesProf": { "eesId": "ees1.edn1.ecsp-a.example", "endPt": { "fqdn": "ees1.edn1.ecsp-a.example" },
                         "provId": "ecsp-a", "eecRegConf": false },
            "expTime": "2027-01-01T00:00:00Z",
            "onboarding": { "csr": "PEM", "secretToken": true }
        })
    }

    #[test]
    fn the_contract_example_parses() {
        let b = body(example()).unwrap();
        assert_eq!(b.profile.ees_id, "ees1.edn1.ecsp-a.example");
        assert_eq!(b.profile.prov_id.as_deref(), Some("ecsp-a"));
        assert_eq!(b.exp_time, Some(1_798_761_600));
        assert!(b.onboarding.unwrap().secret_token);
        assert_eq!(
            b.profile.requested_names(),
            vec![RequestedName::Dns("ees1.edn1.ecsp-a.example".into())]
        );
        assert!(b.profile.ees_id_is_fqdn());
    }

    #[test]
    fn each_fault_has_its_cause_and_pointer() {
        type Case = (Box<dyn Fn(&mut Value)>, &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("eesProf");
                }),
                "MANDATORY_IE_MISSING",
                "/eesProf",
            ),
            (
                Box::new(|v| {
                    v["eesProf"].as_object_mut().unwrap().remove("eesId");
                }),
                "MANDATORY_IE_MISSING",
                "/eesProf/eesId",
            ),
            (
                Box::new(|v| {
                    v["eesProf"].as_object_mut().unwrap().remove("endPt");
                }),
                "MANDATORY_IE_MISSING",
                "/eesProf/endPt",
            ),
            (
                Box::new(|v| {
                    v["eesProf"].as_object_mut().unwrap().remove("eecRegConf");
                }),
                "MANDATORY_IE_MISSING",
                "/eesProf/eecRegConf",
            ),
            (
                Box::new(|v| v["eesProf"]["eesId"] = json!(5)),
                "INVALID_MSG_FORMAT",
                "/eesProf/eesId",
            ),
            (
                Box::new(|v| v["eesProf"]["eecRegConf"] = json!("no")),
                "INVALID_MSG_FORMAT",
                "/eesProf/eecRegConf",
            ),
            (
                Box::new(|v| v["eesProf"]["endPt"]["ipv4Addrs"] = json!(["192.0.2.1"])),
                "MANDATORY_IE_INCORRECT",
                "/eesProf/endPt",
            ),
            (
                Box::new(|v| v["eesProf"]["endPt"] = json!({"fqdn": "not a name"})),
                "MANDATORY_IE_INCORRECT",
                "/eesProf/endPt/fqdn",
            ),
            (
                Box::new(|v| v["eesProf"]["endPt"] = json!({"ipv4Addrs": ["300.1.1.1"]})),
                "MANDATORY_IE_INCORRECT",
                "/eesProf/endPt/ipv4Addrs/0",
            ),
            (
                Box::new(|v| v["eesProf"]["endPt"] = json!({})),
                "MANDATORY_IE_INCORRECT",
                "/eesProf/endPt",
            ),
            (
                Box::new(|v| v["eesProf"]["eesId"] = json!("x".repeat(65))),
                "MANDATORY_IE_INCORRECT",
                "/eesProf/eesId",
            ),
            (
                Box::new(|v| v["expTime"] = json!("tomorrow")),
                "MANDATORY_IE_INCORRECT",
                "/expTime",
            ),
            (
                Box::new(|v| v["expTime"] = json!("1970-01-01T00:00:00Z")),
                "MANDATORY_IE_INCORRECT",
                "/expTime",
            ),
            (
                Box::new(|v| v["onboarding"]["secretToken"] = json!("yes")),
                "INVALID_MSG_FORMAT",
                "/onboarding/secretToken",
            ),
        ];
        for (change, cause, pointer) in cases {
            let mut v = example();
            change(&mut v);
            let e = body(v).unwrap_err();
            assert_eq!(e.cause.code(), cause, "{pointer}: {}", e.detail);
            assert_eq!(e.invalid_params[0].0, pointer);
        }
    }

    #[test]
    fn addresses_and_uris_are_requested_names() {
        let mut v = example();
        v["eesProf"]["endPt"] = json!({"ipv6Addrs": ["2001:db8::1"]});
        v["eesProf"]["eesId"] = json!("ees-7");
        let b = body(v).unwrap();
        assert_eq!(
            b.profile.requested_names(),
            vec![RequestedName::Ip("2001:db8::1".parse().unwrap())]
        );
        assert!(!b.profile.ees_id_is_fqdn());
        for (uri, host) in [
            (
                "https://u:p@Ees1.example:8443/x",
                Some(UriHost::Dns("Ees1.example".into())),
            ),
            (
                "https://[2001:db8::2]/api",
                Some(UriHost::Ip("2001:db8::2".parse().unwrap())),
            ),
            ("urn:ees:1", None),
        ] {
            assert_eq!(uri_host(uri), host, "{uri}");
        }
    }

    #[test]
    fn an_ees_id_has_one_spelling() {
        let mut v = example();
        v["eesProf"]["eesId"] = json!("c.example.");
        let e = body(v).unwrap_err();
        assert_eq!(e.cause.code(), "MANDATORY_IE_INCORRECT");
    }

    #[test]
    fn merge_patch_follows_rfc7396() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge_patch(&mut t, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }
}
