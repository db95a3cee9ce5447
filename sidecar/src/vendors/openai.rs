//! OpenAI: Bearer key, JSON requests, `{"error": {"message","type","param","code"}}` envelope.
use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{Usd, Vendor, Verdict};

use super::{
    AuthSlot, CustomerScope, Denial, Operation, RequestView, VendorModule, json_string, retry_hint,
};

pub struct OpenAi;

const OPERATIONS: &[Operation] = &[
    Operation::new(
        "chat.completions.create",
        Method::POST,
        "/v1/chat/completions",
    ),
    Operation::new("responses.create", Method::POST, "/v1/responses"),
    Operation::new("responses.retrieve", Method::GET, "/v1/responses/{id}"),
    Operation::new("embeddings.create", Method::POST, "/v1/embeddings"),
    Operation::new("completions.create", Method::POST, "/v1/completions"),
    Operation::new("moderations.create", Method::POST, "/v1/moderations"),
    Operation::new("models.list", Method::GET, "/v1/models"),
    Operation::new("models.retrieve", Method::GET, "/v1/models/{model}"),
];

/// Pessimistic default price per output token when a request caps its output, used until the
/// audit/cost work supplies a per-model price table: $60 per million tokens.
const DEFAULT_MICROS_PER_OUTPUT_TOKEN: i64 = 60;

impl VendorModule for OpenAi {
    fn vendor(&self) -> Vendor {
        Vendor::Openai
    }

    fn auth_slot(&self) -> AuthSlot {
        AuthSlot::Bearer
    }

    fn operations(&self) -> &'static [Operation] {
        OPERATIONS
    }

    fn customer_scope(&self, _: Option<&Operation>, _: &RequestView<'_>) -> CustomerScope {
        CustomerScope::NotApplicable
    }

    fn preflight_cost(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
    ) -> Option<Usd> {
        match operation.map(|op| op.name) {
            Some("chat.completions.create" | "responses.create" | "completions.create") => {}
            _ => return None,
        }
        let body = request.json()?;
        let max_tokens = ["max_completion_tokens", "max_output_tokens", "max_tokens"]
            .iter()
            .find_map(|field| body.get(field).and_then(serde_json::Value::as_u64))?;
        Some(Usd::from_micros(DEFAULT_MICROS_PER_OUTPUT_TOKEN).mul_div_ceil(max_tokens, 1))
    }

    fn preflight_is_cost_estimate(&self) -> bool {
        false
    }

    fn request_id_header(&self) -> Option<&'static str> {
        Some("x-request-id")
    }

    fn denial(&self, status: StatusCode, verdict: Verdict, message: &str) -> Denial {
        // The SDKs map 401 → AuthenticationError, 403 → PermissionDeniedError, 429 →
        // RateLimitError, other statuses → APIStatusError; they honour x-should-retry.
        let kind = match verdict {
            Verdict::KeyUnknown | Verdict::KeyRevoked | Verdict::KeyExpired => {
                "invalid_request_error"
            }
            Verdict::PerCallCap | Verdict::DailyCap => "insufficient_quota",
            Verdict::RateLimited => "rate_limit_error",
            Verdict::PolicyStale => "server_error",
            _ => "permission_error",
        };
        let body = format!(
            r#"{{"error":{{"message":{message},"type":"{kind}","param":null,"code":"{code}"}}}}"#,
            message = json_string(message),
            code = verdict.as_str(),
        );
        Denial {
            status,
            content_type: "application/json",
            body: Bytes::from(body),
            headers: retry_hint(verdict, "openai"),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    #[test]
    fn catalogue_and_preflight() {
        let post = Method::POST;
        let op = OpenAi.match_operation(&post, "/v1/chat/completions");
        assert_eq!(op.unwrap().name, "chat.completions.create");
        assert_eq!(
            OpenAi
                .match_operation(&Method::GET, "/v1/models")
                .unwrap()
                .name,
            "models.list"
        );
        let h = HeaderMap::new();
        let body = br#"{"model":"gpt-4o","max_tokens":1000,"messages":[]}"#;
        let r = RequestView {
            method: &post,
            path: "/v1/chat/completions",
            query: None,
            headers: &h,
            body,
        };
        assert_eq!(OpenAi.preflight_cost(op, &r), Some("0.06".parse().unwrap()));
        let r = RequestView {
            body: br#"{"model":"gpt-4o"}"#,
            ..r
        };
        assert_eq!(OpenAi.preflight_cost(op, &r), None);
    }

    #[test]
    fn envelope_is_openais() {
        let d = OpenAi.denial(StatusCode::FORBIDDEN, Verdict::OperationDenied, "no");
        let v: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(v["error"]["code"], "operation_denied");
        assert!(v["error"]["param"].is_null());
        assert_eq!(d.headers, &[("x-should-retry", "false")]);
    }
}
