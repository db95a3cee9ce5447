//! Twilio: HTTP Basic (account SID : key), form-encoded requests,
//! `{"code","message","more_info","status"}` envelope.
use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{Usd, Vendor, Verdict};

use super::{
    AuthSlot, Capture, CustomerScope, Denial, Operation, Preflight, RequestView, ResponseCost,
    ResponseView, VendorModule, json_string,
};
use crate::pricing::Prices;

pub struct Twilio;

const OPERATIONS: &[Operation] = &[
    Operation::new(
        "messages.create",
        Method::POST,
        "/2010-04-01/Accounts/{AccountSid}/Messages.json",
    ),
    Operation::new(
        "messages.list",
        Method::GET,
        "/2010-04-01/Accounts/{AccountSid}/Messages.json",
    ),
    Operation::new(
        "messages.retrieve",
        Method::GET,
        "/2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json",
    ),
    Operation::new(
        "calls.create",
        Method::POST,
        "/2010-04-01/Accounts/{AccountSid}/Calls.json",
    ),
];

/// Twilio's `price` field: a negative decimal string (`"-0.00750"`, money leaving the account),
/// recorded as its absolute value. `None` when absent or null (not yet rated).
pub fn parse_price(value: &serde_json::Value) -> Option<Usd> {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let text = text.trim();
    let magnitude = text.strip_prefix('-').unwrap_or(text);
    // Usd keeps six decimals; Twilio prices carry at most five.
    magnitude.parse().ok()
}

/// SMS segments for `body`: GSM-7 fits 160 characters (153 per part when split), anything else
/// is UCS-2 at 70 (67 per part).
pub fn sms_segments(body: &str) -> u64 {
    const GSM7: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà^{}\\[~]|€";
    let gsm = body.chars().all(|c| GSM7.contains(c));
    let units: u64 = if gsm {
        body.chars()
            .map(|c| if "^{}\\[~]|€".contains(c) { 2 } else { 1 })
            .sum()
    } else {
        body.encode_utf16().count() as u64
    };
    let (single, part) = if gsm { (160, 153) } else { (70, 67) };
    if units <= single {
        1
    } else {
        units.div_ceil(part)
    }
}

impl VendorModule for Twilio {
    fn vendor(&self) -> Vendor {
        Vendor::Twilio
    }

    fn auth_slot(&self) -> AuthSlot {
        AuthSlot::BasicPassword
    }

    fn operations(&self) -> &'static [Operation] {
        OPERATIONS
    }

    fn customer_scope(&self, _: Option<&Operation>, request: &RequestView<'_>) -> CustomerScope {
        match request.form_field("To").filter(|to| !to.is_empty()) {
            Some(to) => CustomerScope::Ids(vec![to]),
            None => CustomerScope::Missing,
        }
    }

    fn preflight(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
        prices: &Prices,
    ) -> Preflight {
        match operation.map(|op| op.name) {
            Some("messages.create") => {
                let segments = sms_segments(&request.form_field("Body").unwrap_or_default());
                Preflight::priced(prices.twilio.usd_per_segment.mul_div_ceil(segments, 1))
            }
            // Voice calls are billed per minute after they end: not priced here (documented).
            Some(_) => Preflight::free(),
            None => Preflight::default(),
        }
    }

    fn capture(&self, _preflight: &Preflight) -> Capture {
        Capture::Json { limit: 64 * 1024 }
    }

    fn response_cost(
        &self,
        operation: Option<&Operation>,
        preflight: &Preflight,
        response: &ResponseView<'_>,
        _prices: &Prices,
    ) -> ResponseCost {
        if operation.map(|op| op.name) != Some("messages.create") {
            return ResponseCost::estimated(preflight.estimate);
        }
        let message = response.json;
        let usd_unit = message
            .and_then(|m| m.get("price_unit"))
            .and_then(serde_json::Value::as_str)
            .is_none_or(|unit| unit.eq_ignore_ascii_case("usd"));
        match message.and_then(|m| m.get("price")).and_then(parse_price) {
            Some(price) if usd_unit => ResponseCost::parsed(price),
            // Not rated yet (the usual answer at send time), or rated in another currency.
            _ => ResponseCost::estimated(preflight.estimate),
        }
    }

    fn request_id_header(&self) -> Option<&'static str> {
        Some("twilio-request-id")
    }

    fn denial(&self, status: StatusCode, verdict: Verdict, message: &str) -> Denial {
        // twilio-python raises TwilioRestException(status, code, msg) for any status >= 400.
        let code = match status.as_u16() {
            401 => 20003,
            403 => 20403,
            429 => 20429,
            402 => 20005,
            503 => 20503,
            _ => 20001,
        };
        let body = format!(
            r#"{{"code":{code},"message":{message},"more_info":"https://github.com/keybrake/keybrake/blob/main/docs/verdicts.md#{verdict}","status":{status}}}"#,
            message = json_string(message),
            verdict = verdict.as_str(),
            status = status.as_u16(),
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

    use super::*;

    #[test]
    fn segments() {
        assert_eq!(sms_segments("hello"), 1);
        assert_eq!(sms_segments(&"a".repeat(160)), 1);
        assert_eq!(sms_segments(&"a".repeat(161)), 2);
        assert_eq!(sms_segments(&"é".repeat(160)), 1);
        assert_eq!(sms_segments(&"ж".repeat(71)), 2);
    }

    #[test]
    fn customer_is_the_to_number() {
        let post = Method::POST;
        let path = "/2010-04-01/Accounts/AC1/Messages.json";
        let op = Twilio.match_operation(&post, path);
        assert_eq!(op.unwrap().name, "messages.create");
        let h = HeaderMap::new();
        let body = b"To=%2B15551234567&From=%2B15550000000&Body=hi";
        let r = RequestView {
            method: &post,
            path,
            query: None,
            headers: &h,
            body,
        };
        assert_eq!(
            Twilio.customer_scope(op, &r),
            CustomerScope::Ids(vec!["+15551234567".into()])
        );
        assert_eq!(
            Twilio.preflight(op, &r, &Prices::default()),
            Preflight::priced(Usd::from_micros(8_300))
        );
        let r = RequestView {
            body: b"Body=hi",
            ..r
        };
        assert_eq!(Twilio.customer_scope(op, &r), CustomerScope::Missing);
    }

    #[test]
    fn prices_are_negative_strings() {
        let v = |s: &str| serde_json::Value::String(s.into());
        assert_eq!(parse_price(&v("-0.00750")), Some(Usd::from_micros(7_500)));
        assert_eq!(parse_price(&v("0.0079")), Some(Usd::from_micros(7_900)));
        assert_eq!(parse_price(&serde_json::Value::Null), None);
        assert_eq!(parse_price(&v("n/a")), None);
    }

    #[test]
    fn envelope_is_twilios() {
        let d = Twilio.denial(StatusCode::UNAUTHORIZED, Verdict::KeyUnknown, "unknown");
        let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(v["code"], 20003);
        assert_eq!(v["status"], 401);
        assert_eq!(v["message"], "unknown");
    }
}
