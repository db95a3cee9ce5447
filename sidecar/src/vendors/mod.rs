//! Vendor knowledge, one module per vendor behind [`VendorModule`]: where the key sits, the
//! operation catalogue, how to find the customer a call touches, a pre-flight cost estimate and
//! the vendor's own error envelope. Adding a vendor is one new file plus one line in
//! [`module_for`].
use std::{borrow::Cow, sync::OnceLock};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header::AUTHORIZATION};
use keybrake_api::{SecretString, Usd, Vendor, Verdict};

use crate::{
    path::{CheckedPath, template_matches_from},
    pricing::Prices,
};
use keybrake_api::audit::CostSource;

pub mod custom;
pub mod openai;
pub mod resend;
pub mod stripe;
pub mod twilio;

/// Longest `Authorization` header the sidecar reads; longer ones are refused unparsed.
pub const MAX_AUTH_HEADER_BYTES: usize = 4096;

/// One entry of a vendor's operation catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub name: &'static str,
    pub method: Method,
    /// `{name}` matches one path segment; `{Sid}.json` a segment ending in `.json`.
    pub path: &'static str,
}

impl Operation {
    pub const fn new(name: &'static str, method: Method, path: &'static str) -> Self {
        Operation { name, method, path }
    }
}

/// Where a vendor's SDK puts the API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthSlot {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// `Authorization: Bearer KEY`, or HTTP Basic with the key as the username (Stripe's curl
    /// examples use `-u sk_test_…:`).
    BearerOrBasicUser,
    /// HTTP Basic with the key as the password (Twilio: account SID as the username).
    BasicPassword,
}

/// The vault key as the agent presented it, plus the Basic username when there was one.
#[derive(Debug)]
pub struct Credential<'a> {
    pub token: Cow<'a, str>,
    pub basic_username: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("no Authorization header")]
    Missing,
    #[error("Authorization header too large")]
    TooLarge,
    #[error("Authorization header uses a scheme this vendor does not use")]
    WrongScheme,
    #[error("Authorization header is malformed")]
    Malformed,
}

impl CredentialError {
    pub const fn reason(self) -> &'static str {
        match self {
            CredentialError::Missing => "auth_missing",
            CredentialError::TooLarge => "auth_too_large",
            CredentialError::WrongScheme => "auth_wrong_scheme",
            CredentialError::Malformed => "auth_malformed",
        }
    }
}

/// Reads the vault key from the slot `slot` names.
pub fn extract_credential(
    slot: AuthSlot,
    headers: &HeaderMap,
) -> Result<Credential<'_>, CredentialError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(CredentialError::Missing)?;
    if values.next().is_some() {
        return Err(CredentialError::Malformed);
    }
    if value.len() > MAX_AUTH_HEADER_BYTES {
        return Err(CredentialError::TooLarge);
    }
    // `to_str` checks the value is visible ASCII (or tab) in one pass; the rest works on its
    // bytes with loops that do not stop early, so they run 16 bytes at a time (the `str`
    // searches — split, trim, contains — cost a pass each, through `memchr` calls).
    let text = value.to_str().map_err(|_| CredentialError::Malformed)?;
    let bytes = text.as_bytes();
    let space = bytes
        .iter()
        .position(|&b| b == b' ')
        .ok_or(CredentialError::Malformed)?;
    let scheme = &bytes[..space];
    let after = &bytes[space + 1..];
    let start = after.len() - after.trim_ascii_start().len();
    let end = after.trim_ascii_end().len();
    if start >= end || has_space(&after[start..end]) {
        return Err(CredentialError::Malformed);
    }
    // Byte offsets of ASCII: always on character boundaries.
    let rest = &text[space + 1 + start..space + 1 + end];
    let bearer = scheme.eq_ignore_ascii_case(b"bearer");
    let basic = scheme.eq_ignore_ascii_case(b"basic");
    match slot {
        AuthSlot::Bearer | AuthSlot::BearerOrBasicUser if bearer => Ok(Credential {
            token: Cow::Borrowed(rest),
            basic_username: None,
        }),
        AuthSlot::BearerOrBasicUser if basic => {
            let (user, _password) = decode_basic(rest)?;
            non_empty(user).map(|user| Credential {
                token: Cow::Owned(user),
                basic_username: None,
            })
        }
        AuthSlot::BasicPassword if basic => {
            let (user, password) = decode_basic(rest)?;
            non_empty(password).map(|password| Credential {
                token: Cow::Owned(password),
                basic_username: Some(user),
            })
        }
        _ if bearer || basic => Err(CredentialError::WrongScheme),
        _ => Err(CredentialError::WrongScheme),
    }
}

/// Whether `bytes` holds a space, without stopping at the first (so it runs on whole vectors).
/// `<[u8]>::contains` would do, through a `memchr` call: callgrind put that at +165 (+233 in
/// all) instructions per proxied call, for a token of ~50 bytes.
fn has_space(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(16);
    let mut found = false;
    for chunk in &mut chunks {
        found |= chunk.iter().fold(false, |any, &b| any | (b == b' '));
    }
    found
        | chunks
            .remainder()
            .iter()
            .fold(false, |any, &b| any | (b == b' '))
}

fn non_empty(s: String) -> Result<String, CredentialError> {
    if s.is_empty() {
        Err(CredentialError::Malformed)
    } else {
        Ok(s)
    }
}

fn decode_basic(encoded: &str) -> Result<(String, String), CredentialError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| CredentialError::Malformed)?;
    let text = String::from_utf8(raw).map_err(|_| CredentialError::Malformed)?;
    let (user, password) = text.split_once(':').ok_or(CredentialError::Malformed)?;
    Ok((user.to_owned(), password.to_owned()))
}

fn basic_header(user: &str, password: &str) -> String {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}").as_bytes());
    format!("Basic {encoded}")
}

/// The `Authorization` header sent upstream: the vendor secret in the vendor's slot.
///
/// Twilio secrets may be `ACCOUNT_SID:AUTH_TOKEN` (or `API_KEY_SID:API_KEY_SECRET`); a bare auth
/// token is paired with the username the agent sent (its account SID).
pub fn upstream_authorization(
    slot: AuthSlot,
    secret: &SecretString,
    presented: &Credential<'_>,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let value = match slot {
        AuthSlot::Bearer | AuthSlot::BearerOrBasicUser => {
            format!("Bearer {}", secret.expose())
        }
        AuthSlot::BasicPassword => match secret.expose().split_once(':') {
            Some((user, password)) => basic_header(user, password),
            None => basic_header(
                presented.basic_username.as_deref().unwrap_or_default(),
                secret.expose(),
            ),
        },
    };
    let mut header = HeaderValue::from_str(&value)?;
    header.set_sensitive(true);
    Ok(header)
}

/// What a request tells about the customers it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerScope {
    /// This kind of call touches no identifiable customer (e.g. a Stripe refund names a charge).
    NotApplicable,
    /// The call should name a customer but does not: with a customer allowlist, it is denied.
    Missing,
    /// Every customer the call touches (all must be allowed).
    Ids(Vec<String>),
}

impl CustomerScope {
    /// The audit row's `customer_scope_id` (several ids joined by ',').
    pub fn audit_value(&self) -> Option<String> {
        match self {
            CustomerScope::Ids(ids) if !ids.is_empty() => Some(ids.join(",")),
            _ => None,
        }
    }
}

/// A request as the vendor modules see it: method, the vendor-relative path (no prefix, no
/// query), the raw query, headers and the (bounded, fully read) body.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl RequestView<'_> {
    /// First value of a form field (`application/x-www-form-urlencoded` body, else the query).
    pub fn form_field(&self, name: &str) -> Option<String> {
        let from = |data: &[u8]| {
            url::form_urlencoded::parse(data)
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        if !self.body.is_empty()
            && !self.is_json()
            && let Some(v) = from(self.body)
        {
            return Some(v);
        }
        self.query.and_then(|q| from(q.as_bytes()))
    }

    pub fn is_json(&self) -> bool {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"))
            || self.body.first() == Some(&b'{')
            || self.body.first() == Some(&b'[')
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(self.body).ok()
    }
}

/// What the request alone says about a call's cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preflight {
    /// Held against `dailyUsdCap` and compared with `perCallUsdMax`: an upper bound where the
    /// request allows one, a documented pessimistic default where it does not (docs/verdicts.md,
    /// "Caps"), zero for calls that move no money.
    pub reserve: Usd,
    /// The expected cost when the response carries no price (Twilio segments, Resend
    /// recipients, a Stripe amount); `None` when only the response can tell.
    pub estimate: Option<Usd>,
    /// The model a generation request names (OpenAI).
    pub model: Option<String>,
    /// The agent asked for a streamed (SSE) response.
    pub stream: bool,
    /// The sidecar added `stream_options.include_usage`; the usage-only chunk it causes is not
    /// forwarded to the agent.
    pub strip_usage_chunk: bool,
}

impl Preflight {
    /// A call that moves no money.
    pub fn free() -> Self {
        Preflight {
            estimate: Some(Usd::ZERO),
            ..Preflight::default()
        }
    }

    /// A call whose cost the request tells: reserve and expect `amount`.
    pub fn priced(amount: Usd) -> Self {
        Preflight {
            reserve: amount,
            estimate: Some(amount),
            ..Preflight::default()
        }
    }
}

/// Which part of a response the sidecar observes (never the whole of it, never holding up
/// the bytes on their way to the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    None,
    /// The body's first `limit` bytes, parsed as JSON at the end (nothing if it was longer).
    Json {
        limit: usize,
    },
    /// Server-sent events: the last event carrying a `usage` object is kept.
    SseUsage {
        strip_usage_chunk: bool,
    },
}

/// A finished upstream response as the cost parsers see it.
#[derive(Debug, Clone, Copy)]
pub struct ResponseView<'a> {
    pub status: StatusCode,
    /// The captured JSON body, or for SSE the last event that carried usage. `None` when the
    /// body was not captured, too long, not JSON, or the stream ended early.
    pub json: Option<&'a serde_json::Value>,
}

/// What a response says about the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseCost {
    /// `None`: the call could not be priced; the ledger books the reservation (fail closed).
    pub cost: Option<Usd>,
    pub source: CostSource,
    /// The customer named by the response when the request named none (Stripe).
    pub customer: Option<String>,
    /// Vendor request id from the body when no header carries one (Resend's email id).
    pub vendor_request_id: Option<String>,
}

impl ResponseCost {
    pub fn parsed(cost: Usd) -> Self {
        ResponseCost {
            cost: Some(cost),
            source: CostSource::Parsed,
            customer: None,
            vendor_request_id: None,
        }
    }

    /// The pre-flight estimate (`none` when there is none).
    pub fn estimated(estimate: Option<Usd>) -> Self {
        ResponseCost {
            cost: estimate,
            source: match estimate {
                Some(c) if c > Usd::ZERO => CostSource::Estimated,
                _ => CostSource::None,
            },
            customer: None,
            vendor_request_id: None,
        }
    }

    /// Money may have moved but cannot be priced (unknown currency, no usage).
    pub fn unpriced() -> Self {
        ResponseCost {
            cost: None,
            source: CostSource::None,
            customer: None,
            vendor_request_id: None,
        }
    }
}

/// A denial rendered in the vendor's own error format.
#[derive(Debug, Clone)]
pub struct Denial {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    /// Extra headers that steer the vendor's SDK (e.g. "do not retry").
    pub headers: &'static [(&'static str, &'static str)],
}

/// Everything the sidecar knows about one vendor.
pub trait VendorModule: Send + Sync + 'static {
    fn vendor(&self) -> Vendor;
    fn auth_slot(&self) -> AuthSlot;
    /// Built-in operations; allow rules name these.
    fn operations(&self) -> &'static [Operation];
    /// Which customers this call touches (for the `customers` allowlist and the audit row).
    fn customer_scope(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
    ) -> CustomerScope;
    /// What the request says about the call's cost before it is sent: the amount held against
    /// the caps, and the expected cost for when the response does not tell.
    fn preflight(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
        prices: &Prices,
    ) -> Preflight;
    /// The request body to send upstream instead of the agent's, if the vendor module needs to
    /// change it (OpenAI: ask for usage on streamed responses).
    fn rewrite_request(&self, _preflight: &Preflight, _request: &RequestView<'_>) -> Option<Bytes> {
        None
    }
    /// How much of the response to observe for [`Self::response_cost`].
    fn capture(&self, _preflight: &Preflight) -> Capture {
        Capture::None
    }
    /// Cost, customer and request id from a successful (2xx) response.
    fn response_cost(
        &self,
        _operation: Option<&Operation>,
        preflight: &Preflight,
        _response: &ResponseView<'_>,
        _prices: &Prices,
    ) -> ResponseCost {
        ResponseCost::estimated(preflight.estimate)
    }
    /// The response header carrying the vendor's request id (audit `vendor_request_id`).
    fn request_id_header(&self) -> Option<&'static str> {
        None
    }
    /// Refuses (with the audit reason) a call whose operation is allowed but that would use the
    /// upstream secret beyond the key's scope; the verdict is `operation_denied`. Twilio: the
    /// account in the path must be the one the secret authenticates as.
    fn check_account(
        &self,
        _path: &str,
        _secret: &SecretString,
        _presented: &Credential<'_>,
    ) -> Result<(), &'static str> {
        Ok(())
    }
    /// Renders a refusal in the vendor's envelope so its SDK raises its native error.
    fn denial(&self, status: StatusCode, verdict: Verdict, message: &str) -> Denial;

    /// The catalogue operation a request is, if any: the first one whose method and template
    /// match.
    fn match_operation(&self, method: &Method, path: &str) -> Option<&'static Operation> {
        find_operation(
            catalogue_index(self.vendor(), self.operations()),
            method,
            path,
            count_slashes(path),
        )
    }

    /// [`Self::match_operation`] for a checked path (whose slashes are already counted).
    fn match_checked(&self, method: &Method, path: CheckedPath<'_>) -> Option<&'static Operation> {
        find_operation(
            catalogue_index(self.vendor(), self.operations()),
            method,
            path.as_str(),
            path.slashes(),
        )
    }
}

/// The first operation in `index` whose method and template match; the template is walked
/// only past the literal prefix the path was found to start with.
fn find_operation(
    index: &'static [IndexedOperation],
    method: &Method,
    path: &str,
    slashes: usize,
) -> Option<&'static Operation> {
    index
        .iter()
        .find(|i| {
            i.slashes == slashes
                && i.op.method == *method
                && path.starts_with(i.literal_prefix)
                && template_matches_from(
                    i.op.path.as_bytes(),
                    path.as_bytes(),
                    i.literal_prefix.len(),
                )
        })
        .map(|i| i.op)
}

/// A catalogue operation with two facts every path its template matches shares, so that most
/// operations are ruled out without walking the template: as many `/` (a `{name}` never spans
/// one), and the text before the first `{`.
#[derive(Debug)]
struct IndexedOperation {
    op: &'static Operation,
    slashes: usize,
    literal_prefix: &'static str,
}

fn count_slashes(s: &str) -> usize {
    s.bytes().filter(|b| *b == b'/').count()
}

/// `operations` (a vendor's fixed catalogue), indexed once per vendor.
fn catalogue_index(
    vendor: Vendor,
    operations: &'static [Operation],
) -> &'static [IndexedOperation] {
    static INDEXES: [OnceLock<Box<[IndexedOperation]>>; Vendor::ALL.len()] =
        [const { OnceLock::new() }; Vendor::ALL.len()];
    INDEXES[vendor as usize].get_or_init(|| {
        operations
            .iter()
            .map(|op| IndexedOperation {
                op,
                slashes: count_slashes(op.path),
                literal_prefix: op.path.split('{').next().unwrap_or(""),
            })
            .collect()
    })
}

static STRIPE: stripe::Stripe = stripe::Stripe;
static OPENAI: openai::OpenAi = openai::OpenAi;
static TWILIO: twilio::Twilio = twilio::Twilio;
static RESEND: resend::Resend = resend::Resend;
static CUSTOM: custom::Custom = custom::Custom;

/// The module for `vendor`.
pub fn module_for(vendor: Vendor) -> &'static dyn VendorModule {
    match vendor {
        Vendor::Stripe => &STRIPE,
        Vendor::Openai => &OPENAI,
        Vendor::Twilio => &TWILIO,
        Vendor::Resend => &RESEND,
        Vendor::Custom => &CUSTOM,
    }
}

/// A JSON string literal (quotes included) for hand-built envelopes.
pub(crate) fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// "do not retry" hints for denials that retrying cannot fix; the rate limit is retryable.
pub(crate) fn retry_hint(
    verdict: Verdict,
    name: &'static str,
) -> &'static [(&'static str, &'static str)] {
    // Each vendor's SDK honours its own header; both tables are static so nothing allocates.
    match (verdict, name) {
        (Verdict::RateLimited | Verdict::PolicyStale, "stripe") => {
            &[("stripe-should-retry", "true")]
        }
        (_, "stripe") => &[("stripe-should-retry", "false")],
        (Verdict::RateLimited | Verdict::PolicyStale, "openai") => &[("x-should-retry", "true")],
        (_, "openai") => &[("x-should-retry", "false")],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::template_matches;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn bearer_is_read() {
        let h = headers("Bearer vault_key_abc");
        let c = extract_credential(AuthSlot::Bearer, &h).unwrap();
        assert_eq!(c.token, "vault_key_abc");
        let h = headers("bearer vault_key_abc");
        assert!(extract_credential(AuthSlot::Bearer, &h).is_ok());
        // Blanks around the token are trimmed; the scheme ends at the first space.
        let h = headers("Bearer  \tvault_key_abc \t");
        let c = extract_credential(AuthSlot::Bearer, &h).unwrap();
        assert_eq!(c.token, "vault_key_abc");
    }

    #[test]
    fn basic_password_slot_for_twilio() {
        let h = headers(&format!("Basic {}", b64("AC123:vault_key_abc")));
        let c = extract_credential(AuthSlot::BasicPassword, &h).unwrap();
        assert_eq!(c.token, "vault_key_abc");
        assert_eq!(c.basic_username.as_deref(), Some("AC123"));
        let h = headers(&format!("Basic {}", b64("vault_key_abc:")));
        assert_eq!(
            extract_credential(AuthSlot::BasicPassword, &h).unwrap_err(),
            CredentialError::Malformed
        );
    }

    #[test]
    fn basic_user_slot_for_stripe() {
        let h = headers(&format!("Basic {}", b64("vault_key_abc:")));
        let c = extract_credential(AuthSlot::BearerOrBasicUser, &h).unwrap();
        assert_eq!(c.token, "vault_key_abc");
    }

    #[test]
    fn bad_headers_are_classified() {
        let none = HeaderMap::new();
        assert_eq!(
            extract_credential(AuthSlot::Bearer, &none).unwrap_err(),
            CredentialError::Missing
        );
        for (value, err) in [
            ("Bearer", CredentialError::Malformed),
            ("Bearer ", CredentialError::Malformed),
            ("Bearer a b", CredentialError::Malformed),
            ("Bearer \t", CredentialError::Malformed),
            ("Bearer\tabc", CredentialError::Malformed),
            ("Bearer abc\u{e9}", CredentialError::Malformed),
            ("Token abc", CredentialError::WrongScheme),
            ("Basic dmF1bHQ6eA==", CredentialError::WrongScheme),
        ] {
            assert_eq!(
                extract_credential(AuthSlot::Bearer, &headers(value)).unwrap_err(),
                err,
                "{value}"
            );
        }
        assert_eq!(
            extract_credential(AuthSlot::BasicPassword, &headers("Bearer x")).unwrap_err(),
            CredentialError::WrongScheme
        );
        assert_eq!(
            extract_credential(AuthSlot::BasicPassword, &headers("Basic !!!")).unwrap_err(),
            CredentialError::Malformed
        );
        let huge = format!("Bearer {}", "a".repeat(MAX_AUTH_HEADER_BYTES));
        assert_eq!(
            extract_credential(AuthSlot::Bearer, &headers(&huge)).unwrap_err(),
            CredentialError::TooLarge
        );
        let mut two = headers("Bearer a");
        two.append(AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(
            extract_credential(AuthSlot::Bearer, &two).unwrap_err(),
            CredentialError::Malformed
        );
    }

    #[test]
    fn upstream_header_carries_the_secret_in_the_vendor_slot() {
        let presented = Credential {
            token: Cow::Borrowed("vault_key_x"),
            basic_username: Some("AC1".into()),
        };
        let secret = SecretString::new("sk_test_1");
        let h = upstream_authorization(AuthSlot::Bearer, &secret, &presented).unwrap();
        assert_eq!(h, "Bearer sk_test_1");
        assert!(h.is_sensitive());
        let h = upstream_authorization(
            AuthSlot::BasicPassword,
            &SecretString::new("tok"),
            &presented,
        )
        .unwrap();
        assert_eq!(h.to_str().unwrap(), format!("Basic {}", b64("AC1:tok")));
        let h = upstream_authorization(
            AuthSlot::BasicPassword,
            &SecretString::new("AC9:tok"),
            &presented,
        )
        .unwrap();
        assert_eq!(h.to_str().unwrap(), format!("Basic {}", b64("AC9:tok")));
    }

    #[test]
    fn every_vendor_denial_keeps_the_verdict_status() {
        for vendor in Vendor::ALL {
            let module = module_for(vendor);
            assert_eq!(module.vendor(), vendor);
            for verdict in Verdict::ALL.into_iter().filter(|v| !v.is_allow()) {
                let status = StatusCode::from_u16(verdict.http_status()).unwrap();
                let d = module.denial(status, verdict, "denied by keybrake");
                assert_eq!(d.status, status);
                let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
                assert!(
                    body.to_string().contains("denied by keybrake"),
                    "{vendor} {verdict}: {body}"
                );
            }
        }
    }

    #[test]
    fn indexed_operation_matching_agrees_with_a_plain_scan() {
        let methods = [Method::GET, Method::POST, Method::DELETE, Method::PUT];
        for vendor in Vendor::ALL {
            let module = module_for(vendor);
            // Every template filled in, plus near misses: a segment more or less, a trailing
            // slash, an empty placeholder, another prefix.
            let mut paths = vec!["/".to_owned(), "".to_owned(), "/v1".to_owned()];
            for op in module.operations() {
                let filled: String = op
                    .path
                    .split('/')
                    .map(|seg| match seg.find('}') {
                        Some(close) if seg.starts_with('{') => format!("x1{}", &seg[close + 1..]),
                        _ => seg.to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("/");
                paths.push(format!("{filled}/"));
                paths.push(format!("{filled}/extra"));
                paths.push(filled.rsplit_once('/').map_or("", |(a, _)| a).to_owned());
                paths.push(op.path.replace("{id}", "").replace("{Sid}", ""));
                paths.push(format!("/v2{filled}"));
                paths.push(filled);
            }
            for method in &methods {
                for path in &paths {
                    let plain = module
                        .operations()
                        .iter()
                        .find(|op| op.method == *method && template_matches(op.path, path));
                    assert_eq!(
                        module.match_operation(method, path).map(|o| o.name),
                        plain.map(|o| o.name),
                        "{vendor} {method} {path}"
                    );
                }
            }
            // Every operation is found by a path made from its own template (or an earlier
            // one of the same shape).
            for op in module.operations() {
                let filled = op.path.replace("{id}", "x1");
                if !filled.contains('{') {
                    assert!(
                        module.match_operation(&op.method, &filled).is_some(),
                        "{filled}"
                    );
                }
            }
        }
    }
}
