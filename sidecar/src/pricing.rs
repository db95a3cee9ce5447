//! Prices and exchange rates the sidecar uses to turn vendor calls into dollars: OpenAI per-model
//! token prices, the Stripe currency rate table, Twilio's per-segment and Resend's per-email
//! rates, and the pessimistic reservations for calls whose cost the request does not bound.
//!
//! Built-in defaults ([`Prices::default`]) are list prices at the time of writing; `--prices FILE`
//! (YAML or JSON, any subset of the fields) replaces them. Pure data and arithmetic: no I/O
//! except [`Prices::load`].
use std::{collections::BTreeMap, path::Path};

use keybrake_api::Usd;
use serde::Deserialize;

/// Micro-dollar price of one unit of something, per million units (OpenAI's price sheets).
const PER_MILLION: u64 = 1_000_000;

/// One model's token prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelPrice {
    pub input: Usd,
    /// Cached prompt tokens (a subset of the prompt tokens) are billed at this rate. Defaults to
    /// the input price when a file omits it.
    #[serde(default)]
    pub cached_input: Option<Usd>,
    pub output: Usd,
}

impl ModelPrice {
    const fn new(input: i64, cached_input: i64, output: i64) -> Self {
        // Arguments in micro-dollars per million tokens.
        ModelPrice {
            input: Usd::from_micros(input),
            cached_input: Some(Usd::from_micros(cached_input)),
            output: Usd::from_micros(output),
        }
    }

    pub fn cached(&self) -> Usd {
        self.cached_input.unwrap_or(self.input)
    }
}

/// Token counts from an OpenAI `usage` object. `cached` is part of `prompt`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct OpenAiPrices {
    /// Model name (or a prefix of dated names: `gpt-4o` prices `gpt-4o-2024-08-06`) → prices.
    pub models: BTreeMap<String, ModelPrice>,
    /// Output tokens reserved for a generation request that sets no max tokens.
    pub unbounded_output_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct StripePrices {
    /// Lower-case ISO currency → USD per one major unit (`eur: "1.08"`). USD is always 1.
    /// A currency missing here is never counted as USD: its cost is recorded as `none`.
    pub usd_per_unit: BTreeMap<String, Usd>,
    /// Reserved for a money-moving call whose amount cannot be priced before it is sent (no
    /// `amount`, or a currency without a rate).
    pub unbounded_reserve: Usd,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TwilioPrices {
    pub usd_per_segment: Usd,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ResendPrices {
    pub usd_per_email: Usd,
}

/// Every price table, as `--prices` files spell them (camelCase keys).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Prices {
    pub openai: OpenAiPrices,
    pub stripe: StripePrices,
    pub twilio: TwilioPrices,
    pub resend: ResendPrices,
}

impl Default for OpenAiPrices {
    fn default() -> Self {
        let models = [
            ("gpt-4o", ModelPrice::new(2_500_000, 1_250_000, 10_000_000)),
            ("gpt-4o-mini", ModelPrice::new(150_000, 75_000, 600_000)),
            ("gpt-4.1", ModelPrice::new(2_000_000, 500_000, 8_000_000)),
            ("gpt-4.1-mini", ModelPrice::new(400_000, 100_000, 1_600_000)),
            ("gpt-4.1-nano", ModelPrice::new(100_000, 25_000, 400_000)),
            ("o1", ModelPrice::new(15_000_000, 7_500_000, 60_000_000)),
            ("o3-mini", ModelPrice::new(1_100_000, 550_000, 4_400_000)),
            ("text-embedding-3-small", ModelPrice::new(20_000, 20_000, 0)),
            (
                "text-embedding-3-large",
                ModelPrice::new(130_000, 130_000, 0),
            ),
        ];
        OpenAiPrices {
            models: models
                .into_iter()
                .map(|(name, price)| (name.to_owned(), price))
                .collect(),
            unbounded_output_tokens: 16_384,
        }
    }
}

impl Default for StripePrices {
    fn default() -> Self {
        // No built-in exchange rates: rates move daily, and a stale default would silently
        // misprice. Operators who charge in other currencies configure them.
        StripePrices {
            usd_per_unit: BTreeMap::new(),
            unbounded_reserve: Usd::from_micros(100 * 1_000_000),
        }
    }
}

impl Default for TwilioPrices {
    fn default() -> Self {
        TwilioPrices {
            usd_per_segment: Usd::from_micros(8_300),
        }
    }
}

impl Default for ResendPrices {
    fn default() -> Self {
        ResendPrices {
            usd_per_email: Usd::from_micros(900),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PricesError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: String, message: String },
}

impl Prices {
    /// Reads a YAML or JSON price file (JSON is YAML). Sections a file omits keep the defaults.
    pub fn load(path: &Path) -> Result<Prices, PricesError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| PricesError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PricesError::Parse {
            path: shown,
            message,
        })
    }

    pub fn parse(text: &[u8]) -> Result<Prices, String> {
        serde_yaml::from_slice(text).map_err(|e| e.to_string())
    }

    /// The price of `model`: exact name, else the longest configured prefix followed by `-`
    /// (dated snapshots), else `None`.
    pub fn model_price(&self, model: &str) -> Option<ModelPrice> {
        let models = &self.openai.models;
        if let Some(p) = models.get(model) {
            return Some(*p);
        }
        models
            .iter()
            .filter(|(name, _)| {
                model
                    .strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('-'))
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| *p)
    }

    /// An unknown model is priced at the most expensive configured rate of each kind, never $0.
    pub fn model_price_or_worst(&self, model: Option<&str>) -> ModelPrice {
        model
            .and_then(|m| self.model_price(m))
            .unwrap_or_else(|| self.worst_model_price())
    }

    pub fn worst_model_price(&self) -> ModelPrice {
        let models = self.openai.models.values();
        let max = |f: fn(&ModelPrice) -> Usd| models.clone().map(f).max();
        // An empty table still must not price calls at $0: fall back to the built-in maxima.
        let fallback = ModelPrice::new(15_000_000, 15_000_000, 60_000_000);
        ModelPrice {
            input: max(|p| p.input).unwrap_or(fallback.input),
            cached_input: Some(max(|p| p.cached()).unwrap_or(fallback.cached())),
            output: max(|p| p.output).unwrap_or(fallback.output),
        }
    }

    /// Dollars for `usage` at `price`, rounded up to the micro-dollar.
    pub fn token_cost(price: &ModelPrice, usage: TokenUsage) -> Usd {
        let cached = usage.cached.min(usage.prompt);
        let uncached = usage.prompt - cached;
        price
            .input
            .mul_div_ceil(uncached, PER_MILLION)
            .saturating_add(price.cached().mul_div_ceil(cached, PER_MILLION))
            .saturating_add(price.output.mul_div_ceil(usage.completion, PER_MILLION))
    }

    /// USD for a Stripe amount in `currency`'s minor unit, or `None` without a rate.
    pub fn stripe_usd(&self, amount_minor: i64, currency: &str) -> Option<Usd> {
        let currency = currency.to_ascii_lowercase();
        let amount = u64::try_from(amount_minor).ok()?;
        let rate = if currency == "usd" {
            Usd::from_micros(1_000_000)
        } else {
            *self.stripe.usd_per_unit.get(&currency)?
        };
        Some(rate.mul_div_ceil(amount, 10u64.pow(currency_exponent(&currency))))
    }
}

/// Decimal places of a currency's minor unit as Stripe counts amounts
/// (<https://docs.stripe.com/currencies#zero-decimal>, `#three-decimal`).
pub fn currency_exponent(currency: &str) -> u32 {
    const ZERO_DECIMAL: &[&str] = &[
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
        "xaf", "xof", "xpf",
    ];
    const THREE_DECIMAL: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];
    let c = currency.to_ascii_lowercase();
    if ZERO_DECIMAL.contains(&c.as_str()) {
        0
    } else if THREE_DECIMAL.contains(&c.as_str()) {
        3
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(s: &str) -> Usd {
        s.parse().unwrap()
    }

    #[test]
    fn currency_exponents_follow_stripe() {
        let mut p = Prices::default();
        assert_eq!(p.stripe_usd(5000, "usd"), Some(usd("50")));
        assert_eq!(p.stripe_usd(5000, "USD"), Some(usd("50")));
        // No rate: never counted as dollars.
        assert_eq!(p.stripe_usd(5000, "jpy"), None);
        p.stripe.usd_per_unit.insert("jpy".into(), usd("0.0067"));
        p.stripe.usd_per_unit.insert("kwd".into(), usd("3.25"));
        p.stripe.usd_per_unit.insert("eur".into(), usd("1.08"));
        // ¥5000 is 5000 yen, not 50.
        assert_eq!(p.stripe_usd(5000, "jpy"), Some(usd("33.5")));
        // 1.500 KWD is 1500 fils.
        assert_eq!(p.stripe_usd(1500, "kwd"), Some(usd("4.875")));
        assert_eq!(p.stripe_usd(1000, "eur"), Some(usd("10.8")));
        assert_eq!(p.stripe_usd(-1, "usd"), None);
    }

    #[test]
    fn models_match_exactly_or_by_dated_prefix() {
        let p = Prices::default();
        assert_eq!(p.model_price("gpt-4o").unwrap().output, usd("10"));
        // Longest prefix wins: gpt-4o-mini, not gpt-4o.
        assert_eq!(
            p.model_price("gpt-4o-mini-2024-07-18").unwrap().output,
            usd("0.6")
        );
        assert_eq!(
            p.model_price("gpt-4o-2024-08-06").unwrap().input,
            usd("2.5")
        );
        assert!(p.model_price("gpt-4omni").is_none());
        assert!(p.model_price("mystery-model").is_none());
        let worst = p.model_price_or_worst(Some("mystery-model"));
        assert_eq!(worst.output, usd("60"));
        assert_eq!(worst.input, usd("15"));
        assert!(worst.output > Usd::ZERO);
    }

    #[test]
    fn cached_tokens_are_inside_prompt_tokens() {
        let p = Prices::default().model_price("gpt-4o").unwrap();
        let cost = Prices::token_cost(
            &p,
            TokenUsage {
                prompt: 2000,
                cached: 1000,
                completion: 500,
            },
        );
        // 1000 × 2.50/M + 1000 × 1.25/M + 500 × 10/M = 0.0025 + 0.00125 + 0.005
        assert_eq!(cost, usd("0.00875"));
    }

    #[test]
    fn files_override_sections_and_keep_the_rest() {
        let p = Prices::parse(
            br#"
openai:
  models:
    my-model: {input: "1", output: "2"}
stripe:
  usdPerUnit: {eur: "1.10"}
twilio:
  usdPerSegment: "0.0100"
"#,
        )
        .unwrap();
        assert_eq!(p.model_price("my-model").unwrap().cached(), usd("1"));
        assert!(
            p.model_price("gpt-4o").is_none(),
            "models replace the table"
        );
        assert_eq!(p.openai.unbounded_output_tokens, 16_384);
        assert_eq!(p.stripe_usd(100, "eur"), Some(usd("1.1")));
        assert_eq!(p.twilio.usd_per_segment, usd("0.01"));
        assert_eq!(p.resend.usd_per_email, Usd::from_micros(900));
        let json = Prices::parse(br#"{"resend": {"usdPerEmail": "0.001"}}"#).unwrap();
        assert_eq!(json.resend.usd_per_email, usd("0.001"));
        assert!(
            Prices::parse(b"openai: {modles: {}}").is_err(),
            "typos fail"
        );
    }
}
