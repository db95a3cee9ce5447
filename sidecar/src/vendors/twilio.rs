//! Twilio: HTTP Basic (account SID : key), form-encoded requests,
//! `{"code","message","more_info","status"}` envelope.
use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{Usd, Vendor, Verdict};

use super::{AuthSlot, CustomerScope, Denial, Operation, RequestView, VendorModule, json_string};

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

/// US outbound SMS list price per segment, until the cost work makes it configurable.
const MICROS_PER_SEGMENT: i64 = 8_300;

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

    fn preflight_cost(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
    ) -> Option<Usd> {
        if operation.map(|op| op.name) != Some("messages.create") {
            return None;
        }
        let segments = sms_segments(&request.form_field("Body").unwrap_or_default());
        Some(Usd::from_micros(MICROS_PER_SEGMENT).mul_div_ceil(segments, 1))
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
        assert_eq!(Twilio.preflight_cost(op, &r), Some(Usd::from_micros(8_300)));
        let r = RequestView {
            body: b"Body=hi",
            ..r
        };
        assert_eq!(Twilio.customer_scope(op, &r), CustomerScope::Missing);
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
