//! Static files the public listeners serve: the browser client at `GET /edgeplex.js` and, when
//! `[demo] enabled`, the demo page at `GET /`. Both are embedded at compile time from
//! `clients/js/`, so the binary needs no files beside it and the module always matches the edge
//! that serves it.
//!
//! This file owns their caching headers: a strong ETag computed once per process (SHA-256 of the
//! body), `If-None-Match` answered 304, and `Access-Control-Allow-Origin: *` on the module so any
//! site can `import` it (it is public code and carries no credentials).

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};

use crate::web::{Body, full_body, text};

/// Browsers reuse the module for five minutes without asking, then revalidate with the ETag
/// (a 304 costs a few bytes). Short, because an upgraded edge should reach pages within minutes;
/// not zero, because a page load should not refetch 20 KB. No `immutable`: the URL has no
/// version in it.
const MAX_AGE_SECS: u32 = 300;

pub struct Asset {
    body: Bytes,
    etag: HeaderValue,
    content_type: &'static str,
    cors: bool,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str, cors: bool) -> Asset {
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Asset {
            body: Bytes::from_static(body.as_bytes()),
            etag: HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header"),
            content_type,
            cors,
        }
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    pub fn etag(&self) -> &HeaderValue {
        &self.etag
    }
}

/// `clients/js/edgeplex.js`.
pub static CLIENT_JS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../clients/js/edgeplex.js"),
        "text/javascript; charset=utf-8",
        true,
    )
});

/// `clients/js/demo.html`, which imports `/edgeplex.js` from the edge serving it.
pub static DEMO_HTML: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../clients/js/demo.html"),
        "text/html; charset=utf-8",
        false,
    )
});

/// Answers GET and HEAD for `asset`: 304 when `If-None-Match` names its ETag, else the body.
pub fn serve<B>(req: &Request<B>, asset: &Asset) -> Response<Body> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    let fresh = if_none_match(req.headers(), &asset.etag);
    let body = if fresh || head {
        Bytes::new()
    } else {
        asset.body.clone()
    };
    let mut r = Response::new(full_body(body));
    let h = r.headers_mut();
    h.insert(header::ETAG, asset.etag.clone());
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={MAX_AGE_SECS}")).expect("ascii"),
    );
    if asset.cors {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    if fresh {
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return r;
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if head {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
    }
    r
}

/// Whether `If-None-Match` names `etag` (or is `*`). RFC 9110 §13.1.2 compares weakly here, so
/// a `W/` prefix a proxy added still matches.
fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let etag = etag.as_bytes();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.trim_start_matches("W/").as_bytes() == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(headers: &[(&str, &str)], method: Method) -> Response<Body> {
        let mut req = Request::builder().method(method).uri("/edgeplex.js");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        serve(&req.body(()).unwrap(), &CLIENT_JS)
    }

    #[test]
    fn the_module_is_small_and_served_with_cors_cache_control_and_an_etag() {
        assert!(
            CLIENT_JS.len() <= 20 * 1024,
            "edgeplex.js is {} bytes; the limit is 20 KB unminified",
            CLIENT_JS.len()
        );
        let r = get(&[], Method::GET);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["cache-control"], "public, max-age=300");
        assert_eq!(
            h["etag"].as_bytes().len(),
            66,
            "a quoted strong tag: SHA-256 in hex"
        );
    }

    #[test]
    fn if_none_match_answers_304_and_head_sends_no_body() {
        let tag = CLIENT_JS.etag().to_str().unwrap().to_string();
        let r = get(
            &[("if-none-match", &format!("\"x\", W/{tag}"))],
            Method::GET,
        );
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(r.headers()["etag"], tag.as_str());
        let r = get(&[("if-none-match", "\"other\"")], Method::GET);
        assert_eq!(r.status(), StatusCode::OK);
        let r = get(&[], Method::HEAD);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["content-length"],
            CLIENT_JS.len().to_string().as_str()
        );
        assert_eq!(
            get(&[], Method::POST).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
