//! HTTP: the EES-facing API, the admin surfaces, the TLS profile, and the guard that closes
//! connections which ask nothing. Everything here turns bytes into calls of
//! `crate::registration` and back; no registration logic lives here.

pub mod admin;
pub mod api;
pub mod idle;
pub mod tls;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};

type Body = Full<Bytes>;

pub(crate) fn response(status: u16, content_type: &str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !content_type.is_empty() {
        r.headers_mut().insert(
            CONTENT_TYPE,
            content_type.parse().expect("static content type"),
        );
    }
    r
}
