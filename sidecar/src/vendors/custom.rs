//! `custom`: any HTTP API with a Bearer key. No catalogue (allow rules use method + path), no
//! customer knowledge (a customer allowlist therefore denies every call), a plain JSON envelope.
use bytes::Bytes;
use http::StatusCode;
use keybrake_api::{Vendor, Verdict};

use super::{
    AuthSlot, CustomerScope, Denial, Operation, Preflight, RequestView, VendorModule, json_string,
};
use crate::pricing::Prices;

pub struct Custom;

impl VendorModule for Custom {
    fn vendor(&self) -> Vendor {
        Vendor::Custom
    }

    fn auth_slot(&self) -> AuthSlot {
        AuthSlot::Bearer
    }

    fn operations(&self) -> &'static [Operation] {
        &[]
    }

    fn customer_scope(&self, _: Option<&Operation>, _: &RequestView<'_>) -> CustomerScope {
        CustomerScope::Missing
    }

    /// Unpriced: the sidecar knows nothing of a custom API's prices. A daily cap still stops
    /// these calls once priced calls have used it up.
    fn preflight(&self, _: Option<&Operation>, _: &RequestView<'_>, _: &Prices) -> Preflight {
        Preflight::default()
    }

    fn denial(&self, status: StatusCode, verdict: Verdict, message: &str) -> Denial {
        let body = format!(
            r#"{{"error":{{"code":"{code}","message":{message},"status":{status}}}}}"#,
            code = verdict.as_str(),
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
