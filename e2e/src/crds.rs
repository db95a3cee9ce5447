//! Installing the committed CRDs (`crds/*.yaml`) and waiting until the apiserver serves them.
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde::Deserialize;

use crate::error::HarnessError;

/// Deadline for a CRD to become Established.
pub const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository's `crds/` directory (the generated, committed YAML).
pub fn crds_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds"))
}

/// Every CustomResourceDefinition in `crds/*.yaml`, sorted by file name.
pub fn load_crds() -> Result<Vec<CustomResourceDefinition>, HarnessError> {
    let dir = crds_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(HarnessError::io(format!("read {}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut crds = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(HarnessError::io(format!("read {}", file.display())))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .map_err(|e| HarnessError::Crd(format!("{}: {e}", file.display())))?;
            if value.is_null() {
                continue;
            }
            let crd: CustomResourceDefinition = serde_yaml::from_value(value)
                .map_err(|e| HarnessError::Crd(format!("{}: {e}", file.display())))?;
            crds.push(crd);
        }
    }
    if crds.is_empty() {
        return Err(HarnessError::Crd(format!("no CRDs in {}", dir.display())));
    }
    Ok(crds)
}

/// Server-side-applies every CRD in `crds/` and waits (watching, with a deadline) until each is
/// Established. Idempotent: call it from every test that needs the CRDs. Returns their names.
pub async fn install_crds(client: &Client) -> Result<Vec<String>, HarnessError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("keybrake-e2e").force();
    let mut names = Vec::new();
    for crd in load_crds()? {
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or_else(|| HarnessError::Crd("a CRD without metadata.name".into()))?;
        api.patch(&name, &params, &Patch::Apply(&crd)).await?;
        names.push(name);
    }
    for name in &names {
        let established = await_condition(api.clone(), name, conditions::is_crd_established());
        match tokio::time::timeout(CRD_ESTABLISHED_TIMEOUT, established).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(HarnessError::Crd(format!("watching {name}: {err}"))),
            Err(_) => {
                let conditions = api
                    .get(name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .map(|c| format!("{c:?}"))
                    .unwrap_or_default();
                return Err(HarnessError::Crd(format!(
                    "{name} not Established within {} s; conditions: {conditions}",
                    CRD_ESTABLISHED_TIMEOUT.as_secs()
                )));
            }
        }
    }
    Ok(names)
}
