//! Resend: Bearer key, JSON requests, `{"statusCode","name","message"}` envelope.
use std::collections::BTreeSet;

use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{Vendor, Verdict};

use super::{
    AuthSlot, Capture, CustomerScope, Denial, Operation, Preflight, RequestView, ResponseCost,
    ResponseView, VendorModule, json_string,
};
use crate::pricing::Prices;

pub struct Resend;

const OPERATIONS: &[Operation] = &[
    Operation::new("emails.send", Method::POST, "/emails"),
    Operation::new("emails.batch", Method::POST, "/emails/batch"),
    Operation::new("emails.retrieve", Method::GET, "/emails/{id}"),
    Operation::new("domains.list", Method::GET, "/domains"),
];

/// Every recipient address (`to`, `cc`, `bcc`; string or list) of one email object.
fn recipients(email: &serde_json::Value, out: &mut Vec<String>) {
    for field in ["to", "cc", "bcc"] {
        match email.get(field) {
            Some(serde_json::Value::String(s)) => out.push(s.clone()),
            Some(serde_json::Value::Array(items)) => {
                out.extend(items.iter().filter_map(|v| v.as_str().map(str::to_owned)))
            }
            _ => {}
        }
    }
}

fn all_recipients(request: &RequestView<'_>) -> Vec<String> {
    let mut out = Vec::new();
    match request.json() {
        Some(serde_json::Value::Array(emails)) => {
            emails.iter().for_each(|e| recipients(e, &mut out))
        }
        Some(email) => recipients(&email, &mut out),
        None => {}
    }
    out
}

/// The domain of `Name <user@Example.com>` or `user@example.com`, lower-cased.
fn domain_of(address: &str) -> Option<String> {
    let address = match (address.rfind('<'), address.rfind('>')) {
        (Some(open), Some(close)) if open < close => &address[open + 1..close],
        _ => address,
    };
    let (_, domain) = address.trim().rsplit_once('@')?;
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

impl VendorModule for Resend {
    fn vendor(&self) -> Vendor {
        Vendor::Resend
    }

    fn auth_slot(&self) -> AuthSlot {
        AuthSlot::Bearer
    }

    fn operations(&self) -> &'static [Operation] {
        OPERATIONS
    }

    fn customer_scope(&self, _: Option<&Operation>, request: &RequestView<'_>) -> CustomerScope {
        let addresses = all_recipients(request);
        if addresses.is_empty() {
            return CustomerScope::Missing;
        }
        let mut domains = BTreeSet::new();
        for address in &addresses {
            match domain_of(address) {
                Some(d) => domains.insert(d),
                // An address we cannot read cannot be proven to be allowed.
                None => return CustomerScope::Missing,
            };
        }
        CustomerScope::Ids(domains.into_iter().collect())
    }

    fn preflight(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
        prices: &Prices,
    ) -> Preflight {
        match operation.map(|op| op.name) {
            Some("emails.send" | "emails.batch") => {
                let n = all_recipients(request).len() as u64;
                Preflight::priced(prices.resend.usd_per_email.mul_div_ceil(n, 1))
            }
            Some(_) => Preflight::free(),
            None => Preflight::default(),
        }
    }

    fn capture(&self, _preflight: &Preflight) -> Capture {
        Capture::Json { limit: 64 * 1024 }
    }

    fn response_cost(
        &self,
        _operation: Option<&Operation>,
        preflight: &Preflight,
        response: &ResponseView<'_>,
        _prices: &Prices,
    ) -> ResponseCost {
        // Resend returns no price: the cost is recipients × the configured rate.
        let mut cost = ResponseCost::estimated(preflight.estimate);
        // `{"id": …}` for one email, `{"data": [{"id": …}, …]}` for a batch (first id).
        cost.vendor_request_id = response.json.and_then(|v| {
            v.get("id")
                .or_else(|| v.get("data")?.get(0)?.get("id"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        });
        cost
    }

    fn request_id_header(&self) -> Option<&'static str> {
        Some("x-request-id")
    }

    fn denial(&self, status: StatusCode, verdict: Verdict, message: &str) -> Denial {
        // Resend's SDKs pick the exception by status + `name`: 401 missing_api_key →
        // MissingApiKeyError, 403 invalid_api_key → InvalidApiKeyError, 429 → RateLimitError;
        // anything else → ResendError.
        let name = match verdict {
            Verdict::KeyUnknown | Verdict::KeyRevoked | Verdict::KeyExpired => "missing_api_key",
            Verdict::KeySuspended | Verdict::OperationDenied | Verdict::CustomerDenied => {
                "invalid_api_key"
            }
            Verdict::RateLimited => "rate_limit_exceeded",
            Verdict::PerCallCap | Verdict::DailyCap => "daily_quota_exceeded",
            Verdict::PolicyStale | Verdict::Allow => "application_error",
        };
        let body = format!(
            r#"{{"statusCode":{status},"name":"{name}","message":{message}}}"#,
            status = status.as_u16(),
            message = json_string(message),
        );
        Denial {
            status,
            content_type: "application/json",
            body: Bytes::from(body),
            headers: &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use keybrake_api::Usd;

    use super::*;

    #[test]
    fn recipient_domains_are_the_customer_scope() {
        let post = Method::POST;
        let h = HeaderMap::new();
        let body = br#"{"from":"a@me.dev","to":["x@Acme.com","Y <y@acme.com>"],"cc":"z@other.io","subject":"s","html":"h"}"#;
        let r = RequestView {
            method: &post,
            path: "/emails",
            query: None,
            headers: &h,
            body,
        };
        let op = Resend.match_operation(&post, "/emails");
        assert_eq!(
            Resend.customer_scope(op, &r),
            CustomerScope::Ids(vec!["acme.com".into(), "other.io".into()])
        );
        assert_eq!(
            Resend.preflight(op, &r, &Prices::default()),
            Preflight::priced(Usd::from_micros(2_700))
        );
        let batch = br#"[{"to":"a@one.com"},{"to":["b@two.com"]}]"#;
        let r = RequestView {
            path: "/emails/batch",
            body: batch,
            ..r
        };
        assert_eq!(
            Resend.customer_scope(Resend.match_operation(&post, "/emails/batch"), &r),
            CustomerScope::Ids(vec!["one.com".into(), "two.com".into()])
        );
        let r = RequestView {
            body: br#"{"to":"not-an-address"}"#,
            ..r
        };
        assert_eq!(Resend.customer_scope(None, &r), CustomerScope::Missing);
    }

    #[test]
    fn envelope_is_resends() {
        let d = Resend.denial(StatusCode::PAYMENT_REQUIRED, Verdict::DailyCap, "cap");
        let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(v["statusCode"], 402);
        assert_eq!(v["name"], "daily_quota_exceeded");
    }
}
