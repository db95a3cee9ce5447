//! Stripe: Bearer key (or Basic username), form-encoded requests, `{"error": {...}}` envelope.
use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{Usd, Vendor, Verdict};

use super::{
    AuthSlot, CustomerScope, Denial, Operation, RequestView, VendorModule, json_string, retry_hint,
};
use crate::path::template_capture;

pub struct Stripe;

const OPERATIONS: &[Operation] = &[
    Operation::new("charges.create", Method::POST, "/v1/charges"),
    Operation::new("charges.retrieve", Method::GET, "/v1/charges/{id}"),
    Operation::new("charges.list", Method::GET, "/v1/charges"),
    Operation::new("charges.capture", Method::POST, "/v1/charges/{id}/capture"),
    Operation::new("refunds.create", Method::POST, "/v1/refunds"),
    Operation::new("refunds.retrieve", Method::GET, "/v1/refunds/{id}"),
    Operation::new("refunds.list", Method::GET, "/v1/refunds"),
    Operation::new("customers.create", Method::POST, "/v1/customers"),
    Operation::new("customers.retrieve", Method::GET, "/v1/customers/{id}"),
    Operation::new("customers.update", Method::POST, "/v1/customers/{id}"),
    Operation::new("customers.delete", Method::DELETE, "/v1/customers/{id}"),
    Operation::new("customers.list", Method::GET, "/v1/customers"),
    Operation::new(
        "payment_intents.create",
        Method::POST,
        "/v1/payment_intents",
    ),
    Operation::new(
        "payment_intents.retrieve",
        Method::GET,
        "/v1/payment_intents/{id}",
    ),
    Operation::new(
        "payment_intents.update",
        Method::POST,
        "/v1/payment_intents/{id}",
    ),
    Operation::new(
        "payment_intents.confirm",
        Method::POST,
        "/v1/payment_intents/{id}/confirm",
    ),
    Operation::new(
        "payment_intents.capture",
        Method::POST,
        "/v1/payment_intents/{id}/capture",
    ),
    Operation::new(
        "payment_intents.cancel",
        Method::POST,
        "/v1/payment_intents/{id}/cancel",
    ),
    Operation::new("payment_intents.list", Method::GET, "/v1/payment_intents"),
    Operation::new("balance.retrieve", Method::GET, "/v1/balance"),
];

/// Operations that act on behalf of one customer and must name it when the key has a customer
/// allowlist. Others (a refund names a charge) are checked when they do name one.
const CUSTOMER_BOUND: &[&str] = &[
    "charges.create",
    "charges.list",
    "customers.retrieve",
    "customers.update",
    "customers.delete",
    "customers.list",
    "payment_intents.create",
    "payment_intents.list",
];

/// Stripe amounts are in the currency's minor unit; only USD is priced here (two decimals).
/// Other currencies need the rate table of the audit/cost work and yield no estimate.
fn usd_amount(request: &RequestView<'_>) -> Option<Usd> {
    let currency = request.form_field("currency")?;
    if !currency.eq_ignore_ascii_case("usd") {
        return None;
    }
    let cents: i64 = request.form_field("amount")?.parse().ok()?;
    (cents >= 0).then(|| Usd::from_cents(cents))
}

impl VendorModule for Stripe {
    fn vendor(&self) -> Vendor {
        Vendor::Stripe
    }

    fn auth_slot(&self) -> AuthSlot {
        AuthSlot::BearerOrBasicUser
    }

    fn operations(&self) -> &'static [Operation] {
        OPERATIONS
    }

    fn customer_scope(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
    ) -> CustomerScope {
        if let Some(id) = template_capture("/v1/customers/{id}", request.path, "id")
            .or_else(|| template_capture("/v1/customers/{id}/{rest}", request.path, "id"))
        {
            return CustomerScope::Ids(vec![id.to_owned()]);
        }
        if let Some(customer) = request.form_field("customer").filter(|c| !c.is_empty()) {
            return CustomerScope::Ids(vec![customer]);
        }
        match operation {
            Some(op) if !CUSTOMER_BOUND.contains(&op.name) => CustomerScope::NotApplicable,
            _ => CustomerScope::Missing,
        }
    }

    fn preflight_cost(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
    ) -> Option<Usd> {
        match operation.map(|op| op.name) {
            Some("charges.create" | "payment_intents.create" | "refunds.create") => {
                usd_amount(request)
            }
            _ => None,
        }
    }

    fn request_id_header(&self) -> Option<&'static str> {
        Some("request-id")
    }

    fn denial(&self, status: StatusCode, verdict: Verdict, message: &str) -> Denial {
        // Stripe's SDKs pick the exception from the status (401 AuthenticationError, 403
        // PermissionError, 402 CardError, 429 RateLimitError) and read error.code/message.
        let kind = match verdict {
            Verdict::PerCallCap | Verdict::DailyCap => "card_error",
            Verdict::PolicyStale => "api_error",
            _ => "invalid_request_error",
        };
        let body = format!(
            r#"{{"error":{{"type":"{kind}","code":"{code}","message":{message},"doc_url":"https://github.com/keybrake/keybrake/blob/main/docs/verdicts.md"}}}}"#,
            code = verdict.as_str(),
            message = json_string(message),
        );
        Denial {
            status,
            content_type: "application/json",
            body: Bytes::from(body),
            headers: retry_hint(verdict, "stripe"),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    fn view<'a>(
        method: &'a Method,
        path: &'a str,
        body: &'a [u8],
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query: None,
            headers,
            body,
        }
    }

    #[test]
    fn catalogue_names_the_design_operations() {
        let s = Stripe;
        assert_eq!(
            s.match_operation(&Method::POST, "/v1/charges")
                .unwrap()
                .name,
            "charges.create"
        );
        assert_eq!(
            s.match_operation(&Method::POST, "/v1/refunds")
                .unwrap()
                .name,
            "refunds.create"
        );
        assert_eq!(
            s.match_operation(&Method::GET, "/v1/customers/cus_1")
                .unwrap()
                .name,
            "customers.retrieve"
        );
        assert_eq!(
            s.match_operation(&Method::POST, "/v1/payment_intents")
                .unwrap()
                .name,
            "payment_intents.create"
        );
        assert!(s.match_operation(&Method::DELETE, "/v1/charges").is_none());
    }

    #[test]
    fn customer_comes_from_form_or_path() {
        let h = HeaderMap::new();
        let post = Method::POST;
        let get = Method::GET;
        let ch = Stripe.match_operation(&post, "/v1/charges");
        let r = view(
            &post,
            "/v1/charges",
            b"amount=500&currency=usd&customer=cus_123",
            &h,
        );
        assert_eq!(
            Stripe.customer_scope(ch, &r),
            CustomerScope::Ids(vec!["cus_123".into()])
        );
        let r = view(&post, "/v1/charges", b"amount=500&currency=usd", &h);
        assert_eq!(Stripe.customer_scope(ch, &r), CustomerScope::Missing);
        let rf = Stripe.match_operation(&post, "/v1/refunds");
        let r = view(&post, "/v1/refunds", b"charge=ch_1", &h);
        assert_eq!(Stripe.customer_scope(rf, &r), CustomerScope::NotApplicable);
        let r = view(&get, "/v1/customers/cus_9", b"", &h);
        let op = Stripe.match_operation(&get, "/v1/customers/cus_9");
        assert_eq!(
            Stripe.customer_scope(op, &r),
            CustomerScope::Ids(vec!["cus_9".into()])
        );
        // Not in the catalogue and names no customer: fail closed.
        let r = view(&get, "/v1/invoices", b"", &h);
        assert_eq!(Stripe.customer_scope(None, &r), CustomerScope::Missing);
    }

    #[test]
    fn preflight_prices_usd_amounts_only() {
        let h = HeaderMap::new();
        let post = Method::POST;
        let op = Stripe.match_operation(&post, "/v1/charges");
        let r = view(&post, "/v1/charges", b"amount=5000&currency=usd", &h);
        assert_eq!(
            Stripe.preflight_cost(op, &r),
            Some("50.00".parse().unwrap())
        );
        let r = view(&post, "/v1/charges", b"amount=5000&currency=jpy", &h);
        assert_eq!(Stripe.preflight_cost(op, &r), None);
    }

    #[test]
    fn envelope_is_stripes() {
        let d = Stripe.denial(StatusCode::UNAUTHORIZED, Verdict::KeyRevoked, "revoked");
        let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "key_revoked");
        assert_eq!(v["error"]["message"], "revoked");
    }
}
