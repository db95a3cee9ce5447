//! Twilio paths name the account they act on; a parent account's credentials also work on its
//! subaccounts. Through the real sidecar against the fake Twilio: every catalogue operation
//! aimed at another account is refused as `operation_denied` (403, Twilio code 20403) before
//! the upstream is reached, with `account_mismatch` in the audit row, whichever username the
//! agent sends; the same call on the secret's own account goes through.
mod common;

use common::*;
use keybrake_api::{KeyGrant, SecretString, Vendor, Verdict};
use keybrake_sidecar::Freshness;

const OTHER_ACCOUNT: &str = "ACffffffffffffffffffffffffffffffff";

/// (operation, method, path template, form body) for every Twilio catalogue operation.
const OPERATIONS: &[(&str, &str, &str, &str)] = &[
    (
        "messages.create",
        "POST",
        "/2010-04-01/Accounts/{AccountSid}/Messages.json",
        "To=%2B15550001111&From=%2B15559990000&Body=hello",
    ),
    (
        "messages.list",
        "GET",
        "/2010-04-01/Accounts/{AccountSid}/Messages.json",
        "",
    ),
    (
        "messages.retrieve",
        "GET",
        "/2010-04-01/Accounts/{AccountSid}/Messages/SM0123456789abcdef0123456789abcdef.json",
        "",
    ),
    (
        "calls.create",
        "POST",
        "/2010-04-01/Accounts/{AccountSid}/Calls.json",
        "To=%2B15550001111&From=%2B15559990000&Url=http%3A%2F%2Fx",
    ),
];

fn twilio_grant(name: &str, token: &str, base_url: &str, secret: &str) -> KeyGrant {
    let mut g = grant(name, token, Vendor::Twilio, base_url);
    g.upstream_secret = SecretString::new(secret);
    g.allow = OPERATIONS.iter().map(|(op_name, ..)| op(op_name)).collect();
    g
}

async fn twilio_call(
    h: &Harness,
    method: &str,
    path: &str,
    form: &str,
    username: &str,
    token: &str,
) -> RawResponse {
    let request = request(
        method,
        &format!("/twilio{path}"),
        &[
            ("Authorization", &basic(username, token)),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    );
    raw(h.proxy, &request).await.expect("a response")
}

#[tokio::test]
async fn every_operation_on_another_account_is_refused_before_the_upstream() {
    let fakes = Fakes::start().await;
    let sid_token = "vault_key_twilio_sid_secret";
    let bare_token = "vault_key_twilio_bare_secret";
    let grants = vec![
        twilio_grant("sid", sid_token, &fakes.twilio.url(), TWILIO_SECRET),
        // A bare auth token: upstream authenticates as the agent's username.
        twilio_grant(
            "bare",
            bare_token,
            &fakes.twilio.url(),
            TWILIO_SECRET.split_once(':').unwrap().1,
        ),
    ];
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(grants)).await;

    for (op_name, method, template, form) in OPERATIONS {
        let other = template.replace("{AccountSid}", OTHER_ACCOUNT);
        for (token, username) in [
            (sid_token, TWILIO_SID),
            (sid_token, OTHER_ACCOUNT),
            (bare_token, TWILIO_SID),
        ] {
            let before = fakes.twilio.request_count();
            let res = twilio_call(&h, method, &other, form, username, token).await;
            let what = format!("{op_name} on another account as {username}");
            assert_eq!(
                res.status,
                403,
                "{what}: {}",
                String::from_utf8_lossy(&res.body)
            );
            assert_eq!(res.verdict(), Verdict::OperationDenied.as_str(), "{what}");
            let body = res.json();
            assert_eq!(body["code"], 20403, "{what}: {body}");
            assert_eq!(body["status"], 403, "{what}: {body}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .contains("account_mismatch"),
                "{what}: {body}"
            );
            assert_eq!(
                fakes.twilio.request_count(),
                before,
                "{what} reached Twilio"
            );
            let row = h.next_row().await;
            assert_eq!(row.policy_verdict, Verdict::OperationDenied, "{what}");
            assert_eq!(row.verdict_reason.as_deref(), Some("account_mismatch"));
            assert_eq!(row.operation.as_deref(), Some(*op_name), "{what}");
        }
    }

    // The secret's own account: the call is forwarded (the fake answers for any operation).
    let (_, method, template, form) = OPERATIONS[0];
    let ours = template.replace("{AccountSid}", TWILIO_SID);
    for token in [sid_token, bare_token] {
        let before = fakes.twilio.request_count();
        let res = twilio_call(&h, method, &ours, form, TWILIO_SID, token).await;
        assert_eq!(res.verdict(), "allow");
        assert_eq!(fakes.twilio.request_count(), before + 1);
    }
}

#[tokio::test]
async fn an_api_key_secret_cannot_vouch_for_the_account() {
    let fakes = Fakes::start().await;
    let token = "vault_key_twilio_api_key";
    let grants = vec![twilio_grant(
        "apikey",
        token,
        &fakes.twilio.url(),
        "SK0123456789abcdef0123456789abcdef:api_key_secret",
    )];
    let mut h = Harness::start(Freshness::AlwaysFresh, Some(grants)).await;
    let (_, method, template, form) = OPERATIONS[0];
    let ours = template.replace("{AccountSid}", TWILIO_SID);
    let res = twilio_call(&h, method, &ours, form, TWILIO_SID, token).await;
    assert_eq!((res.status, res.verdict()), (403, "operation_denied"));
    assert_eq!(fakes.twilio.request_count(), 0);
    let row = h.next_row().await;
    assert_eq!(row.verdict_reason.as_deref(), Some("account_unverifiable"));
}
