//! OpenAI: Bearer key, JSON requests, `{"error": {"message","type","param","code"}}` envelope.
use bytes::Bytes;
use http::{Method, StatusCode};
use keybrake_api::{Usd, Vendor, Verdict};

use super::{
    AuthSlot, Capture, CustomerScope, Denial, Operation, Preflight, RequestView, ResponseCost,
    ResponseView, VendorModule, json_string, retry_hint,
};
use crate::pricing::{Prices, TokenUsage};

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

/// Operations that generate tokens (priced by prompt + output tokens).
const GENERATION: &[&str] = &[
    "chat.completions.create",
    "responses.create",
    "completions.create",
];

/// Largest response captured for its `usage` (a non-streamed completion).
const JSON_CAPTURE_LIMIT: usize = 1 << 20;

/// Token counts from a `usage` object: Chat Completions (`prompt_tokens`, `completion_tokens`,
/// `prompt_tokens_details.cached_tokens`) or Responses (`input_tokens`, `output_tokens`,
/// `input_tokens_details.cached_tokens`). Embeddings report prompt tokens only.
pub fn token_usage(usage: &serde_json::Value) -> Option<TokenUsage> {
    let count = |a: &str, b: &str| {
        usage
            .get(a)
            .or_else(|| usage.get(b))
            .and_then(serde_json::Value::as_u64)
    };
    let prompt = count("prompt_tokens", "input_tokens")?;
    let completion = count("completion_tokens", "output_tokens").unwrap_or(0);
    let cached = ["prompt_tokens_details", "input_tokens_details"]
        .iter()
        .find_map(|d| usage.get(d)?.get("cached_tokens")?.as_u64())
        .unwrap_or(0);
    Some(TokenUsage {
        prompt,
        cached,
        completion,
    })
}

/// The `usage` (and `model`) of a response object, a stream chunk, or a Responses API event
/// (`{"type":"response.completed","response":{...}}`).
fn usage_and_model(json: &serde_json::Value) -> Option<(&serde_json::Value, Option<&str>)> {
    let holder = if json.get("usage").is_some_and(serde_json::Value::is_object) {
        json
    } else {
        json.get("response")
            .filter(|r| r.get("usage").is_some_and(serde_json::Value::is_object))?
    };
    Some((
        holder.get("usage")?,
        holder.get("model").and_then(serde_json::Value::as_str),
    ))
}

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

    fn preflight(
        &self,
        operation: Option<&Operation>,
        request: &RequestView<'_>,
        prices: &Prices,
    ) -> Preflight {
        let Some(name) = operation.map(|op| op.name) else {
            return Preflight::default();
        };
        let body = request.json();
        let field = |f: &str| body.as_ref().and_then(|b| b.get(f));
        let model = field("model")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let price = prices.model_price_or_worst(model.as_deref());
        // Every byte of the request as a prompt token: an upper bound for text prompts.
        let prompt_bound = request.body.len() as u64;
        let reserve = if GENERATION.contains(&name) {
            let max_output = ["max_completion_tokens", "max_output_tokens", "max_tokens"]
                .iter()
                .find_map(|f| field(f).and_then(serde_json::Value::as_u64))
                .unwrap_or(prices.openai.unbounded_output_tokens);
            let choices = field("n")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(1)
                .max(1);
            Prices::token_cost(
                &price,
                TokenUsage {
                    prompt: prompt_bound,
                    cached: 0,
                    completion: max_output.saturating_mul(choices),
                },
            )
        } else if name == "embeddings.create" {
            Prices::token_cost(
                &price,
                TokenUsage {
                    prompt: prompt_bound,
                    ..TokenUsage::default()
                },
            )
        } else {
            return Preflight::free();
        };
        let stream = field("stream").and_then(serde_json::Value::as_bool) == Some(true);
        // Chat/legacy completions only report usage on a stream when asked to; the Responses
        // API always does (in `response.completed`).
        let asked = field("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(serde_json::Value::as_bool)
            == Some(true);
        Preflight {
            reserve,
            estimate: None,
            model,
            stream,
            strip_usage_chunk: stream && !asked && name != "responses.create",
        }
    }

    fn rewrite_request(&self, preflight: &Preflight, request: &RequestView<'_>) -> Option<Bytes> {
        if !preflight.strip_usage_chunk {
            return None;
        }
        let mut body = request.json()?;
        let object = body.as_object_mut()?;
        let options = object
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        options
            .as_object_mut()?
            .insert("include_usage".into(), serde_json::Value::Bool(true));
        serde_json::to_vec(&body).ok().map(Bytes::from)
    }

    fn capture(&self, preflight: &Preflight) -> Capture {
        if preflight.stream {
            Capture::SseUsage {
                strip_usage_chunk: preflight.strip_usage_chunk,
            }
        } else {
            Capture::Json {
                limit: JSON_CAPTURE_LIMIT,
            }
        }
    }

    fn response_cost(
        &self,
        _operation: Option<&Operation>,
        preflight: &Preflight,
        response: &ResponseView<'_>,
        prices: &Prices,
    ) -> ResponseCost {
        if preflight.reserve == Usd::ZERO && preflight.estimate == Some(Usd::ZERO) {
            return ResponseCost::estimated(preflight.estimate);
        }
        let Some((usage, model)) = response.json.and_then(usage_and_model) else {
            // No usage (stream cut short, body too long): the reservation is booked.
            return ResponseCost::unpriced();
        };
        let Some(tokens) = token_usage(usage) else {
            return ResponseCost::unpriced();
        };
        // The response names the exact snapshot; fall back to the request's model.
        let price = model
            .and_then(|m| prices.model_price(m))
            .unwrap_or_else(|| prices.model_price_or_worst(preflight.model.as_deref()));
        ResponseCost::parsed(Prices::token_cost(&price, tokens))
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
        let prices = Prices::default();
        let body = br#"{"model":"gpt-4o","max_tokens":1000,"messages":[]}"#;
        let r = RequestView {
            method: &post,
            path: "/v1/chat/completions",
            query: None,
            headers: &h,
            body,
        };
        // 1000 output tokens at $10/M + 51 body bytes as prompt tokens at $2.50/M.
        let p = OpenAi.preflight(op, &r, &prices);
        let prompt = Usd::from_micros(2_500_000).mul_div_ceil(body.len() as u64, 1_000_000);
        assert_eq!(p.reserve, Usd::from_micros(10_000).saturating_add(prompt));
        assert_eq!(p.estimate, None);
        assert!(!p.stream);
        // No max tokens, unknown model: the pessimistic default at the worst rate, never $0.
        let r = RequestView {
            body: br#"{"model":"mystery","stream":true}"#,
            ..r
        };
        let p = OpenAi.preflight(op, &r, &prices);
        let worst = prices.worst_model_price();
        assert!(p.reserve >= worst.output.mul_div_ceil(16_384, 1_000_000));
        assert!(p.stream && p.strip_usage_chunk);
        let rewritten = OpenAi.rewrite_request(&p, &r).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&rewritten).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "mystery");
        let r = RequestView {
            body: br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
            ..r
        };
        let p = OpenAi.preflight(op, &r, &prices);
        assert!(p.stream && !p.strip_usage_chunk);
        assert!(OpenAi.rewrite_request(&p, &r).is_none());
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
