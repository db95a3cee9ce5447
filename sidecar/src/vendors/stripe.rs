//! Stripe: Bearer key (or Basic username), form-encoded requests, `{"error": {...}}` envelope.
use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{Usd, Vendor, Verdict};

use super::{
    AuthSlot, Capture, CustomerScope, Denial, Operation, Preflight, RequestView, ResponseCost,
    ResponseView, VendorModule, json_string, retry_hint,
};
use crate::path::template_capture;
use crate::pricing::Prices;

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

/// Operations that fix an amount of money: counted once, where the amount is set. Confirming
/// or capturing a payment intent created through the sidecar does not count it again.
const MONEY_MOVING: &[&str] = &["charges.create", "payment_intents.create", "refunds.create"];

/// Dollars for the request's `amount` (in the currency's minor unit) in `currency`.
fn request_usd(request: &RequestView<'_>, prices: &Prices) -> Option<Usd> {
    let currency = request.form_field("currency")?;
    let amount: i64 = request.form_field("amount")?.parse().ok()?;
    prices.stripe_usd(amount, &currency)
}

/// The `customer` of a Stripe object: an id, or an expanded object with one.
fn customer_of(object: &serde_json::Value) -> Option<String> {
    match object.get("customer")? {
        serde_json::Value::String(id) => Some(id.clone()),
        serde_json::Value::Object(o) => o.get("id")?.as_str().map(str::to_owned),
        _ => None,
    }
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

    fn preflight(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
        prices: &Prices,
    ) -> Preflight {
        match operation.map(|op| op.name) {
            Some(name) if MONEY_MOVING.contains(&name) => match request_usd(request, prices) {
                Some(amount) => Preflight::priced(amount),
                // No amount (a full refund) or a currency without a rate: hold the default.
                None => Preflight {
                    reserve: prices.stripe.unbounded_reserve,
                    ..Preflight::default()
                },
            },
            // Reads, customers, confirm/capture (counted at create).
            Some(_) => Preflight::free(),
            // Outside the catalogue (allowed by method + path): unpriced.
            None => Preflight::default(),
        }
    }

    fn capture(&self, _preflight: &Preflight) -> Capture {
        // Stripe objects are small; the customer can come from any of them.
        Capture::Json { limit: 64 * 1024 }
    }

    fn response_cost(
        &self,
        operation: Option<&Operation>,
        preflight: &Preflight,
        response: &ResponseView<'_>,
        prices: &Prices,
    ) -> ResponseCost {
        let money = operation.is_some_and(|op| MONEY_MOVING.contains(&op.name));
        let Some(object) = response.json else {
            return ResponseCost::estimated(preflight.estimate);
        };
        let mut cost = if money {
            let amount = object.get("amount").and_then(serde_json::Value::as_i64);
            let currency = object.get("currency").and_then(serde_json::Value::as_str);
            match (amount, currency) {
                (Some(amount), Some(currency)) => match prices.stripe_usd(amount, currency) {
                    Some(usd) => ResponseCost::parsed(usd),
                    // Never counted as dollars without a rate.
                    None => ResponseCost::unpriced(),
                },
                _ => ResponseCost::estimated(preflight.estimate),
            }
        } else {
            ResponseCost::estimated(preflight.estimate)
        };
        cost.customer = customer_of(object);
        cost
    }

    fn request_id_header(&self) -> Option<&'static str> {
        Some("request-id")
    }

    fn denial(&self, status: StatusCode, verdict: Verdict, message: &str) -> Denial {
        // Stripe's SDKs pick the exception from the status (401 AuthenticationError, 403
        // PermissionError, 402 CardError, 429 RateLimitError) and read error.code/message.
        // No doc_url: Stripe sends one only for its own error codes, and these are Keybrake's.
        let kind = match verdict {
            Verdict::PerCallCap | Verdict::DailyCap => "card_error",
            Verdict::PolicyStale => "api_error",
            _ => "invalid_request_error",
        };
        let body = format!(
            r#"{{"error":{{"type":"{kind}","code":"{code}","message":{message}}}}}"#,
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
    fn preflight_prices_amounts_in_their_currency() {
        let h = HeaderMap::new();
        let post = Method::POST;
        let mut prices = Prices::default();
        let op = Stripe.match_operation(&post, "/v1/charges");
        let r = view(&post, "/v1/charges", b"amount=5000&currency=usd", &h);
        assert_eq!(
            Stripe.preflight(op, &r, &prices),
            Preflight::priced("50.00".parse().unwrap())
        );
        // No JPY rate: hold the pessimistic default, expect nothing.
        let r = view(&post, "/v1/charges", b"amount=5000&currency=jpy", &h);
        let p = Stripe.preflight(op, &r, &prices);
        assert_eq!(p.reserve, prices.stripe.unbounded_reserve);
        assert_eq!(p.estimate, None);
        prices
            .stripe
            .usd_per_unit
            .insert("jpy".into(), "0.0067".parse().unwrap());
        assert_eq!(
            Stripe.preflight(op, &r, &prices).estimate,
            Some("33.5".parse().unwrap())
        );
        let get = Method::GET;
        let op = Stripe.match_operation(&get, "/v1/balance");
        let r = view(&get, "/v1/balance", b"", &h);
        assert_eq!(Stripe.preflight(op, &r, &prices), Preflight::free());
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
