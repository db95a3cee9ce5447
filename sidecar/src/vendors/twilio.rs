//! Twilio: HTTP Basic (account SID : key), form-encoded requests,
//! `{"code","message","more_info","status"}` envelope. Every REST path names the account it
//! acts on (`/2010-04-01/Accounts/{AccountSid}/…`); a parent account's credentials also work
//! on its subaccounts, so the sidecar only lets a key act on the account its secret names.
use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{SecretString, Usd, Vendor, Verdict};

use super::{
    AuthSlot, Capture, Credential, CustomerScope, Denial, Operation, Preflight, RequestView,
    ResponseCost, ResponseView, VendorModule, json_string,
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

/// Audit reason: the path names another account than the upstream secret's.
pub const ACCOUNT_MISMATCH: &str = "account_mismatch";
/// Audit reason: the upstream credential is an API key (`SK…:secret`, or a bare secret with a
/// non-`AC` username), which does not say which account it belongs to, so the path's account
/// cannot be checked (fail closed; write the Secret as `ACCOUNT_SID:AUTH_TOKEN`).
pub const ACCOUNT_UNVERIFIABLE: &str = "account_unverifiable";

/// The `{AccountSid}` a path acts on (`/2010-04-01/Accounts/{AccountSid}/…`, or
/// `/2010-04-01/Accounts/{AccountSid}.json` for the account itself); `None` for paths that are
/// not under one account.
pub fn path_account(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/2010-04-01/Accounts/")?;
    let segment = rest.split('/').next().unwrap_or(rest);
    Some(segment.strip_suffix(".json").unwrap_or(segment))
}

/// The Basic username the sidecar sends upstream (see [`super::upstream_authorization`]): the
/// user part of a `USER:PASSWORD` secret, else the username the agent sent.
fn upstream_username<'a>(secret: &'a SecretString, presented: &'a Credential<'_>) -> &'a str {
    match secret.expose().split_once(':') {
        Some((user, _)) => user,
        None => presented.basic_username.as_deref().unwrap_or_default(),
    }
}

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

    fn check_account(
        &self,
        path: &str,
        secret: &SecretString,
        presented: &Credential<'_>,
    ) -> Result<(), &'static str> {
        let Some(account) = path_account(path) else {
            return Ok(());
        };
        let username = upstream_username(secret, presented);
        if !username.starts_with("AC") {
            return Err(ACCOUNT_UNVERIFIABLE);
        }
        if username == account {
            Ok(())
        } else {
            Err(ACCOUNT_MISMATCH)
        }
    }

    fn denial(&self, status: StatusCode, _verdict: Verdict, message: &str) -> Denial {
        // twilio-python raises TwilioRestException(status, code, msg) for any status >= 400.
        let code = match status.as_u16() {
            401 => 20003,
            403 => 20403,
            429 => 20429,
            402 => 20005,
            503 => 20503,
            _ => 20001,
        };
        // `more_info` is Twilio's page for the code, as in Twilio's own envelope; the verdict
        // travels in the message and the `keybrake-verdict` header.
        let body = format!(
            r#"{{"code":{code},"message":{message},"more_info":"https://www.twilio.com/docs/errors/{code}","status":{status}}}"#,
            message = json_string(message),
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
    use std::borrow::Cow;

    use http::HeaderMap;

    use super::*;

    const OURS: &str = "AC0123456789abcdef0123456789abcdef";
    const OTHER: &str = "ACffffffffffffffffffffffffffffffff";

    fn presented(username: &str) -> Credential<'static> {
        Credential {
            token: Cow::Borrowed("vault_key_x"),
            basic_username: Some(username.to_owned()),
        }
    }

    /// A concrete path of every catalogue operation, acting on `account`.
    fn operation_paths(account: &str) -> Vec<String> {
        OPERATIONS
            .iter()
            .map(|op| {
                op.path
                    .replace("{AccountSid}", account)
                    .replace("{Sid}", "SM0123")
            })
            .collect()
    }

    #[test]
    fn path_account_is_the_segment_after_accounts() {
        assert_eq!(
            path_account(&format!("/2010-04-01/Accounts/{OURS}/Messages.json")),
            Some(OURS)
        );
        assert_eq!(
            path_account(&format!("/2010-04-01/Accounts/{OURS}.json")),
            Some(OURS)
        );
        assert_eq!(
            path_account(&format!("/2010-04-01/Accounts/{OURS}")),
            Some(OURS)
        );
        assert_eq!(path_account("/2010-04-01/Accounts.json"), None);
        assert_eq!(path_account("/v1/Services"), None);
    }

    #[test]
    fn every_operation_is_refused_on_another_account() {
        let sid_secret = SecretString::new(format!("{OURS}:upstream_token"));
        let bare_secret = SecretString::new("upstream_token");
        for op in OPERATIONS {
            let ours = op
                .path
                .replace("{AccountSid}", OURS)
                .replace("{Sid}", "SM1");
            let other = op
                .path
                .replace("{AccountSid}", OTHER)
                .replace("{Sid}", "SM1");
            assert_eq!(
                Twilio.match_operation(&op.method, &other).map(|o| o.name),
                Some(op.name)
            );
            // SID:TOKEN secret: the agent's username does not matter, the secret's SID does.
            for username in [OURS, OTHER] {
                let agent = presented(username);
                assert_eq!(
                    Twilio.check_account(&ours, &sid_secret, &agent),
                    Ok(()),
                    "{ours}"
                );
                assert_eq!(
                    Twilio.check_account(&other, &sid_secret, &agent),
                    Err(ACCOUNT_MISMATCH),
                    "{other} as {username}"
                );
            }
            // Bare token: upstream authenticates as the agent's SID, so the path must be it
            // (a parent SID + its token would reach a subaccount's path otherwise).
            let agent = presented(OURS);
            assert_eq!(Twilio.check_account(&ours, &bare_secret, &agent), Ok(()));
            assert_eq!(
                Twilio.check_account(&other, &bare_secret, &agent),
                Err(ACCOUNT_MISMATCH)
            );
        }
        assert_eq!(operation_paths(OURS).len(), OPERATIONS.len());
    }

    #[test]
    fn api_key_secrets_cannot_vouch_for_an_account() {
        let api_key = SecretString::new("SK0123456789abcdef0123456789abcdef:key_secret");
        for path in operation_paths(OURS) {
            assert_eq!(
                Twilio.check_account(&path, &api_key, &presented(OURS)),
                Err(ACCOUNT_UNVERIFIABLE),
                "{path}"
            );
        }
        let bare = SecretString::new("key_secret");
        let path = &operation_paths(OURS)[0];
        assert_eq!(
            Twilio.check_account(path, &bare, &presented("SK0123")),
            Err(ACCOUNT_UNVERIFIABLE)
        );
        // Paths outside an account (allowed only by an explicit method + path rule) pass.
        assert_eq!(
            Twilio.check_account("/2010-04-01/Accounts.json", &api_key, &presented(OURS)),
            Ok(())
        );
    }

    #[test]
    fn account_refusal_is_twilios_permission_error() {
        let status = StatusCode::from_u16(Verdict::OperationDenied.http_status()).unwrap();
        let d = Twilio.denial(status, Verdict::OperationDenied, "account_mismatch");
        let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(
            (v["status"].as_u64(), v["code"].as_u64()),
            (Some(403), Some(20403))
        );
    }

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
        assert_eq!(v["more_info"], "https://www.twilio.com/docs/errors/20003");
    }
}
