//! Flags of the sidecar-injection webhook and their translation into
//! `keybrake_inject::InjectionConfig`. Pure and validated at startup: a bad flag stops the
//! controller instead of producing pods that cannot start.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use k8s_openapi::api::core::v1::ResourceRequirements;
use keybrake_inject::InjectionConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct InjectionFlags {
    /// Sidecar image to inject. Setting it turns the injection webhook on.
    #[arg(long, env = "KEYBRAKE_SIDECAR_IMAGE", requires = "controller_url")]
    pub sidecar_image: Option<String>,
    /// Where the webhook listens (HTTPS, `POST /inject`), when `--sidecar-image` is set.
    #[arg(long, default_value = "0.0.0.0:9443", requires = "sidecar_image")]
    pub webhook_addr: SocketAddr,
    /// imagePullPolicy of the injected sidecar (default: the cluster's).
    #[arg(long, requires = "sidecar_image", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_pull_policy: Option<String>,
    /// Resources of the injected sidecar, as JSON `ResourceRequirements`
    /// (`{"requests":{"cpu":"50m"},"limits":{"memory":"128Mi"}}`).
    #[arg(long, requires = "sidecar_image")]
    pub sidecar_resources: Option<String>,
    /// Stream URL injected sidecars connect to (`https://<service>.<namespace>.svc:8443`).
    #[arg(long, requires = "sidecar_image")]
    pub controller_url: Option<String>,
    /// Namespaces never injected (comma-separated), besides kube-system and the controller's own.
    #[arg(long, value_delimiter = ',', requires = "sidecar_image")]
    pub inject_excluded_namespaces: Vec<String>,
    /// How long an injected sidecar trusts its policy without the controller (`30s`, `2m`).
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "sidecar_image")]
    pub staleness_bound: Duration,
    /// Connections an injected sidecar opens at once to one vendor (`--upstream-max-connections`;
    /// 0 = no cap). Unset: the sidecar's default (64). A pod's annotation
    /// `keybrake.dev/upstream-max-connections` wins.
    #[arg(long, requires = "sidecar_image")]
    pub sidecar_upstream_max_connections: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("--sidecar-resources is not valid ResourceRequirements JSON: {0}")]
    Resources(String),
    #[error(transparent)]
    Config(#[from] keybrake_inject::ConfigError),
}

/// A Go-style duration, as the chart's schema accepts: `500ms`, `30s`, `1.5m`, `1h30m`
/// (units ns, us, ms, s, m, h).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?}: expected a duration like 30s, 500ms, 1m30s");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let value: f64 = number.parse().map_err(|_| bad())?;
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| bad())?;
        rest = next;
    }
    Ok(total)
}

impl InjectionFlags {
    /// `None` when injection is off (no `--sidecar-image`).
    pub fn injection_config(
        &self,
        controller_namespace: &str,
        ca_configmap: &str,
    ) -> Result<Option<InjectionConfig>, FlagError> {
        let Some(image) = &self.sidecar_image else {
            return Ok(None);
        };
        let mut config = InjectionConfig::new(
            image.clone(),
            self.controller_url.clone().unwrap_or_default(),
        );
        config.image_pull_policy = self.sidecar_pull_policy.clone();
        if let Some(json) = &self.sidecar_resources {
            config.resources = serde_json::from_str::<ResourceRequirements>(json)
                .map_err(|e| FlagError::Resources(e.to_string()))?;
        }
        config.ca_bundle_configmap = ca_configmap.to_owned();
        config.staleness_bound = self.staleness_bound;
        config.upstream_max_connections = self.sidecar_upstream_max_connections;
        let mut excluded: BTreeSet<String> = self
            .inject_excluded_namespaces
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        excluded.insert("kube-system".into());
        excluded.insert(controller_namespace.to_owned());
        config.excluded_namespaces = excluded;
        config.validate()?;
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        flags: InjectionFlags,
    }

    fn parse(args: &[&str]) -> Result<InjectionFlags, clap::Error> {
        Cli::try_parse_from(std::iter::once("controller").chain(args.iter().copied()))
            .map(|c| c.flags)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn chart_flags_build_the_injection_config() {
        let flags = parse(&[
            "--sidecar-image=ghcr.io/keybrake/sidecar:0.1.0",
            "--sidecar-pull-policy=IfNotPresent",
            r#"--sidecar-resources={"limits":{"memory":"128Mi"},"requests":{"cpu":"50m","memory":"32Mi"}}"#,
            "--controller-url=https://keybrake-controller.keybrake-system.svc:8443",
            "--inject-excluded-namespaces=kube-system,keybrake-system,istio-system",
            "--staleness-bound=45s",
            "--sidecar-upstream-max-connections=128",
        ])
        .unwrap();
        let config = flags
            .injection_config("keybrake-system", "keybrake-ca")
            .unwrap()
            .unwrap();
        assert_eq!(config.sidecar_image, "ghcr.io/keybrake/sidecar:0.1.0");
        assert_eq!(config.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(config.staleness_bound, Duration::from_secs(45));
        assert_eq!(config.upstream_max_connections, Some(128));
        assert_eq!(
            config.resources.requests.unwrap()["cpu"].0,
            "50m".to_string()
        );
        assert_eq!(
            config.excluded_namespaces.into_iter().collect::<Vec<_>>(),
            vec!["istio-system", "keybrake-system", "kube-system"]
        );
        assert_eq!(config.ca_bundle_configmap, "keybrake-ca");
    }

    #[test]
    fn injection_is_off_without_an_image_and_bad_flags_are_refused() {
        let off = parse(&[]).unwrap();
        assert!(off.injection_config("ns", "keybrake-ca").unwrap().is_none());
        // Sidecar flags without an image would do nothing: refused.
        assert!(parse(&["--controller-url=https://c:8443"]).is_err());
        assert!(parse(&["--webhook-addr=127.0.0.1:9443"]).is_err());
        assert!(parse(&["--staleness-bound=10s"]).is_err());
        assert!(parse(&["--sidecar-upstream-max-connections=8"]).is_err());
        let huge_cap = parse(&[
            "--sidecar-image=img",
            "--controller-url=https://c:8443",
            "--sidecar-upstream-max-connections=1000001",
        ])
        .unwrap();
        assert!(matches!(
            huge_cap.injection_config("ns", "keybrake-ca"),
            Err(FlagError::Config(_))
        ));
        // An image without a controller to connect to: refused.
        assert!(parse(&["--sidecar-image=img"]).is_err());
        assert!(parse(&["--sidecar-image=img", "--sidecar-pull-policy=Sometimes"]).is_err());
        let bad_url = parse(&["--sidecar-image=img", "--controller-url=http://c:8443"]).unwrap();
        assert!(matches!(
            bad_url.injection_config("ns", "keybrake-ca"),
            Err(FlagError::Config(_))
        ));
        let bad_json = parse(&[
            "--sidecar-image=img",
            "--controller-url=https://c:8443",
            "--sidecar-resources={",
        ])
        .unwrap();
        assert!(matches!(
            bad_json.injection_config("ns", "keybrake-ca"),
            Err(FlagError::Resources(_))
        ));
    }
}
