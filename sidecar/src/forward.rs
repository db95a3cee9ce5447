//! The upstream side: the TLS settings for upstream connections (pooled in
//! [`crate::upstream_pool`]), where a key's calls go, and the header rules for both directions.
use std::path::Path;

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Uri, header,
    uri::{Authority, PathAndQuery, Scheme},
};

use crate::upstream_pool::UpstreamKey;

/// The header every sidecar response carries.
pub const VERDICT_HEADER: &str = "keybrake-verdict";
/// [`VERDICT_HEADER`] as a ready `HeaderName` (inserting by `&str` validates the name again on
/// every call).
pub static VERDICT_HEADER_NAME: HeaderName = HeaderName::from_static(VERDICT_HEADER);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading extra CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("extra CA file {0} holds no PEM certificate")]
    CaFileEmpty(String),
    #[error("adding a CA certificate: {0}")]
    BadCertificate(#[from] rustls::Error),
    #[error("no trusted roots: the platform store is empty and no extra CA file was given")]
    NoRoots,
}

/// TLS for upstream connections: the platform's roots plus an optional extra PEM bundle (tests,
/// private upstreams), HTTP/1.1 only. (Plain `http://` is used only where a key's base URL
/// says so.)
pub fn upstream_tls_config(
    extra_ca_file: Option<&Path>,
) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // Platform bundles sometimes carry certificates rustls refuses; skip those, keep the rest.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca_file {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| ClientError::CaFile {
            path: shown.clone(),
            source,
        })?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|source| ClientError::CaFile {
                path: shown.clone(),
                source,
            })?;
            roots.add(cert)?;
            added += 1;
        }
        if added == 0 {
            return Err(ClientError::CaFileEmpty(shown));
        }
    }
    if roots.is_empty() {
        return Err(ClientError::NoRoots);
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// A key's upstream base URL, parsed once when the key is loaded: every call then only
/// appends its path and query instead of formatting and re-parsing the whole URL.
#[derive(Debug, Clone)]
pub struct UpstreamBase {
    /// Which pooled connections serve this upstream.
    key: UpstreamKey,
    /// The base URL's path without its trailing `/` (usually empty).
    path_prefix: Box<str>,
    /// `Host` for requests to this upstream (the client would otherwise format it per call).
    host: HeaderValue,
}

impl UpstreamBase {
    /// `None` unless `base_url` is an absolute URL without query or fragment.
    pub fn parse(base_url: &str) -> Option<Self> {
        let uri: Uri = base_url.parse().ok()?;
        let parts = uri.into_parts();
        let path_and_query = parts.path_and_query;
        if path_and_query
            .as_ref()
            .is_some_and(|pq| pq.query().is_some())
        {
            return None;
        }
        let path = path_and_query.as_ref().map_or("", |pq| pq.path());
        let scheme = parts.scheme?;
        let authority: Authority = parts.authority?;
        // `http://` only when the base URL says so; nothing else is spoken upstream.
        let https = match scheme.as_str() {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        // What the client would send: the host, plus the port unless it is the scheme's default.
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_owned(),
        };
        Some(UpstreamBase {
            host: HeaderValue::from_str(&host).ok()?,
            key: UpstreamKey::new(https, authority),
            path_prefix: path.trim_end_matches('/').into(),
        })
    }

    /// The `Host` header value for this upstream.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The pool key of this upstream's connections.
    pub fn key(&self) -> &UpstreamKey {
        &self.key
    }

    /// The request target sent on a connection to this upstream (origin-form): base path +
    /// vendor path + query. `None` if that is not a valid URI.
    pub fn target(&self, path: &str, query: Option<&str>) -> Option<Uri> {
        let mut target = String::with_capacity(
            self.path_prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        target.push_str(&self.path_prefix);
        target.push_str(path);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        let path_and_query = PathAndQuery::from_maybe_shared(Bytes::from(target)).ok()?;
        Some(Uri::from(path_and_query))
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy-only ones.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// Whether `name` is one of [`HOP_BY_HOP`]: by length first, so the usual header costs one
/// comparison instead of nine.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    let n = name.as_str();
    match n.len() {
        2 => n == "te",
        7 => n == "trailer" || n == "upgrade",
        10 => n == "connection" || n == "keep-alive",
        16 => n == "proxy-connection",
        17 => n == "transfer-encoding",
        18 => n == "proxy-authenticate",
        19 => n == "proxy-authorization",
        _ => false,
    }
}

fn connection_listed(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
    })
}

/// Turns the agent's request headers, in place, into the headers sent upstream: minus
/// hop-by-hop, every `keybrake-*` header, framing (recomputed) and `Accept-Encoding` (so
/// responses arrive as plain text the cost parser can read), `Expect` and `Cookie`; with the
/// agent's credentials replaced by the vendor secret in the vendor's auth slot and `Host` by the
/// upstream's.
///
/// In place because hyper hands a connection's last written header map back to it for parsing
/// the next message: reusing the agent's map keeps header maps circulating between the agent's
/// and the upstream's connections with the room they have grown, instead of allocating one per
/// call (and growing the response's map for the verdict header).
pub fn to_upstream_request_headers(
    headers: &mut HeaderMap,
    authorization: HeaderValue,
    host: HeaderValue,
) {
    // The usual call carries one `Authorization`, at most one `Host` and nothing to drop: one
    // pass finds that out, and the two values are then swapped in place (no hashing, no
    // lookups). Anything else takes the general path below.
    let (mut authorizations, mut hosts, mut droppable) = (0, 0, false);
    // `iter` visits every value (a repeated header counts once per value).
    for (name, _) in headers.iter() {
        if name == header::AUTHORIZATION {
            authorizations += 1;
        } else if name == header::HOST {
            hosts += 1;
        } else if is_hop_by_hop(name) || always_dropped(name) {
            droppable = true;
            break;
        }
    }
    if !droppable && authorizations == 1 && hosts <= 1 {
        let (mut authorization, mut host) = (Some(authorization), Some(host));
        for (name, value) in headers.iter_mut() {
            if name == header::AUTHORIZATION {
                *value = authorization.take().expect("one Authorization value");
            } else if name == header::HOST {
                *value = host.take().expect("one Host value");
            }
        }
        if let Some(host) = host {
            headers.insert(header::HOST, host);
        }
        return;
    }
    let has_connection = headers.contains_key(header::CONNECTION);
    // Usually nothing but `Authorization` and `Host` goes, and `insert` below replaces those
    // (every value of them): collect the others (no allocation unless there are some).
    let mut dropped: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name)
            || (has_connection && connection_listed(headers, name))
            || always_dropped(name)
        {
            dropped.push(name.clone());
        }
    }
    for name in &dropped {
        headers.remove(name);
    }
    headers.insert(header::AUTHORIZATION, authorization);
    headers.insert(header::HOST, host);
}

/// Request headers never forwarded besides hop-by-hop ones: the sidecar's own, framing
/// (recomputed), `Accept-Encoding`, `Expect` and `Cookie`.
fn always_dropped(name: &HeaderName) -> bool {
    name.as_str().starts_with("keybrake-")
        || name == header::CONTENT_LENGTH
        || name == header::ACCEPT_ENCODING
        || name == header::EXPECT
        || name == header::COOKIE
}

/// Strips hop-by-hop headers from an upstream response (framing is hyper's business).
pub fn clean_response_headers(headers: &mut HeaderMap) {
    // Usually there is nothing to remove: one pass over the few headers instead of a lookup
    // per hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(listed.iter()) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_base_joins_path_and_query() {
        let stripe = UpstreamBase::parse("https://api.stripe.com").unwrap();
        assert_eq!(
            stripe.target("/v1/charges", Some("limit=3")).unwrap(),
            "/v1/charges?limit=3"
        );
        assert!(stripe.key().https());
        assert_eq!(stripe.key().authority(), "api.stripe.com");
        assert_eq!(
            stripe.key(),
            UpstreamBase::parse("https://API.stripe.com/v2")
                .unwrap()
                .key(),
            "one pool per scheme and authority"
        );
        assert_ne!(
            stripe.key(),
            UpstreamBase::parse("http://api.stripe.com").unwrap().key()
        );
        assert_eq!(stripe.host(), "api.stripe.com");
        let based = UpstreamBase::parse("http://127.0.0.1:9/base/").unwrap();
        assert_eq!(based.target("/emails", None).unwrap(), "/base/emails");
        assert!(!based.key().https());
        assert_eq!(based.host(), "127.0.0.1:9");
        assert_eq!(
            UpstreamBase::parse("http://127.0.0.1:9/")
                .unwrap()
                .target("/v1/x", None)
                .unwrap(),
            "/v1/x"
        );
        assert_eq!(
            UpstreamBase::parse("https://h:443").unwrap().host(),
            "h",
            "default port not repeated in Host"
        );
        assert!(stripe.target("/v1/a b", None).is_none());
        for bad in [
            "api.stripe.com/v1",
            "/v1",
            "http://h/x?q=1",
            "not a url",
            "ftp://h/",
        ] {
            assert!(UpstreamBase::parse(bad).is_none(), "{bad} was accepted");
        }
    }

    #[test]
    fn hop_by_hop_check_matches_the_list() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for other in [
            "content-type",
            "authorization",
            "tE-x",
            "connections",
            "idempotency-key",
            "x-upgrade",
            "proxy-authorizatio",
        ] {
            let name = HeaderName::from_bytes(other.as_bytes()).unwrap();
            assert!(!is_hop_by_hop(&name), "{other}");
        }
    }

    #[test]
    fn request_headers_lose_credentials_and_keybrake_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer vault_key_x"),
        );
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dmF1bHRfa2V5X3k6"),
        );
        h.insert("keybrake-debug", HeaderValue::from_static("1"));
        h.insert("Keybrake-Verdict", HeaderValue::from_static("allow"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:15001"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic abc"),
        );
        h.insert("idempotency-key", HeaderValue::from_static("k1"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert(header::COOKIE, HeaderValue::from_static("session=1"));
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.append(header::TE, HeaderValue::from_static("trailers"));
        h.append("accept", HeaderValue::from_static("a/b"));
        h.append("accept", HeaderValue::from_static("c/d"));
        to_upstream_request_headers(
            &mut h,
            HeaderValue::from_static("Bearer sk_test_1"),
            HeaderValue::from_static("api.stripe.com"),
        );
        assert_eq!(h.get(header::AUTHORIZATION).unwrap(), "Bearer sk_test_1");
        assert_eq!(h.get_all(header::AUTHORIZATION).iter().count(), 1);
        assert_eq!(h.get(header::HOST).unwrap(), "api.stripe.com");
        assert_eq!(h.get_all(header::HOST).iter().count(), 1);
        assert_eq!(h.get("idempotency-key").unwrap(), "k1");
        assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "application/json");
        assert_eq!(
            h.get_all("accept").iter().count(),
            2,
            "repeated headers kept"
        );
        for gone in [
            "keybrake-debug",
            "keybrake-verdict",
            "connection",
            "x-secret-hop",
            "proxy-authorization",
            "content-length",
            "accept-encoding",
            "expect",
            "cookie",
            "transfer-encoding",
            "te",
        ] {
            assert!(h.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(h.len(), 6, "{h:?}");
        assert!(!format!("{h:?}").contains("vault_key"));
        assert!(!format!("{h:?}").contains("dmF1bHRfa2V5X3k6"));
    }

    #[test]
    fn credential_and_host_are_swapped_whatever_their_count() {
        let swapped = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(*name, HeaderValue::from_static(value));
            }
            to_upstream_request_headers(
                &mut h,
                HeaderValue::from_static("Bearer sk"),
                HeaderValue::from_static("up:1"),
            );
            h
        };
        let only = |h: &HeaderMap, name: HeaderName, value: &str| {
            let values: Vec<_> = h.get_all(&name).iter().collect();
            assert_eq!(values, [value], "{name}: {h:?}");
        };
        for pairs in [
            // No Host (HTTP/1.0): added.
            &[("authorization", "Bearer vault_key_a"), ("accept", "*/*")][..],
            // Two Host values, two credentials, a credential named in Connection.
            &[("host", "a"), ("host", "b"), ("authorization", "Bearer v")][..],
            &[
                ("authorization", "Bearer v"),
                ("authorization", "Basic w"),
                ("host", "a"),
            ][..],
            &[
                ("host", "a"),
                ("authorization", "Bearer v"),
                ("connection", "authorization"),
            ][..],
            // No credential at all.
            &[("host", "a")][..],
        ] {
            let h = swapped(pairs);
            only(&h, header::AUTHORIZATION, "Bearer sk");
            only(&h, header::HOST, "up:1");
            assert!(!format!("{h:?}").contains("vault_key"));
        }
        assert_eq!(
            swapped(&[
                ("authorization", "Bearer v"),
                ("accept", "a"),
                ("accept", "b")
            ])
            .get_all("accept")
            .iter()
            .count(),
            2
        );
    }

    #[test]
    fn request_headers_of_a_plain_call_keep_their_map() {
        // The usual call: only the credential and Host change, nothing is removed.
        let mut h = HeaderMap::with_capacity(8);
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:15001"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer vault_key_x"),
        );
        h.insert(header::USER_AGENT, HeaderValue::from_static("sdk/1"));
        let room = h.capacity();
        to_upstream_request_headers(
            &mut h,
            HeaderValue::from_static("Bearer sk"),
            HeaderValue::from_static("h:8080"),
        );
        assert_eq!(h.len(), 3);
        assert_eq!(h.capacity(), room);
        assert_eq!(h.get(header::AUTHORIZATION).unwrap(), "Bearer sk");
        assert_eq!(h.get(header::HOST).unwrap(), "h:8080");
        assert_eq!(h.get(header::USER_AGENT).unwrap(), "sdk/1");
    }

    #[test]
    fn response_headers_lose_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("request-id", HeaderValue::from_static("req_1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        clean_response_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("request-id"));
    }
}
