//! The Prometheus rules file format (`groups:` → `rules:`), as promtool reads it.
use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub groups: Vec<Group>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    #[serde(default)]
    pub interval: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub record: Option<String>,
    #[serde(default)]
    pub alert: Option<String>,
    pub expr: String,
    #[serde(default, rename = "for")]
    pub pending_for: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl RuleFile {
    pub fn parse(yaml: &str) -> Result<RuleFile, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.groups.iter().flat_map(|g| g.rules.iter())
    }

    pub fn recorded_names(&self) -> Vec<&str> {
        self.rules().filter_map(|r| r.record.as_deref()).collect()
    }

    pub fn alerts(&self) -> impl Iterator<Item = (&str, &Rule)> {
        self.rules()
            .filter_map(|r| r.alert.as_deref().map(|name| (name, r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_and_alerts() {
        let file = RuleFile::parse(
            "groups:\n- name: g\n  rules:\n  - record: a:b\n    expr: sum(x)\n  - alert: A\n    expr: a:b > 1\n    for: 3m\n    labels: {severity: critical}\n    annotations: {summary: s}\n",
        )
        .unwrap();
        assert_eq!(file.recorded_names(), ["a:b"]);
        let (name, alert) = file.alerts().next().unwrap();
        assert_eq!((name, alert.pending_for.as_deref()), ("A", Some("3m")));
        assert_eq!(alert.labels["severity"], "critical");
    }

    #[test]
    fn rejects_misspelt_fields() {
        assert!(
            RuleFile::parse(
                "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: x\n    fro: 3m\n"
            )
            .is_err()
        );
    }
}
