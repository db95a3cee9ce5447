//! Turns a [`Plan`] into an RFC 6902 JSON patch against the pod as the apiserver sent it.
//! Only `add` operations on paths the plan owns: the patch never rewrites a user's container or
//! list wholesale, so fields this crate's types do not know survive untouched.
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use serde_json::Value;

use crate::outcome::InjectionFailure;
use crate::plan::Plan;

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn to_value(value: &impl Serialize) -> Result<Value, InjectionFailure> {
    serde_json::to_value(value).map_err(|e| InjectionFailure::PatchEncoding(e.to_string()))
}

struct Ops(Vec<PatchOperation>);

impl Ops {
    fn add(&mut self, path: PointerBuf, value: Value) {
        self.0
            .push(PatchOperation::Add(AddOperation { path, value }));
    }

    /// Adds the whole list when the field is absent, otherwise appends (or prepends) each item.
    fn extend_list(&mut self, exists: bool, path: &[&str], items: Vec<Value>, at_front: bool) {
        if items.is_empty() {
            return;
        }
        if !exists {
            self.add(pointer(path), Value::Array(items));
            return;
        }
        if at_front {
            // Insert in reverse at index 0 so the items end up first and in order.
            for item in items.into_iter().rev() {
                let mut tokens = path.to_vec();
                tokens.push("0");
                self.add(pointer(&tokens), item);
            }
        } else {
            for item in items {
                let mut tokens = path.to_vec();
                tokens.push("-");
                self.add(pointer(&tokens), item);
            }
        }
    }

    fn extend_map<'a>(
        &mut self,
        exists: bool,
        path: &[&str],
        entries: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) {
        let entries: Vec<_> = entries.into_iter().collect();
        if !exists {
            let map = entries
                .into_iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            self.add(pointer(path), Value::Object(map));
            return;
        }
        for (key, value) in entries {
            let mut tokens = path.to_vec();
            tokens.push(key);
            self.add(pointer(&tokens), Value::String(value.clone()));
        }
    }
}

pub fn build_patch(pod: &Pod, plan: &Plan) -> Result<Patch, InjectionFailure> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops = Ops(Vec::new());

    ops.extend_map(
        pod.metadata.annotations.is_some(),
        &["metadata", "annotations"],
        &plan.annotations,
    );
    ops.extend_map(
        pod.metadata.labels.is_some(),
        &["metadata", "labels"],
        &plan.labels,
    );
    // First, so other init containers that call vendors can already use it.
    ops.extend_list(
        spec.init_containers.is_some(),
        &["spec", "initContainers"],
        vec![to_value(&plan.sidecar)?],
        true,
    );
    ops.extend_list(
        spec.volumes.is_some(),
        &["spec", "volumes"],
        plan.volumes
            .iter()
            .map(to_value)
            .collect::<Result<_, _>>()?,
        false,
    );
    for (index, env) in &plan.agent_env {
        let index_token = index.to_string();
        let container = &spec.containers[*index];
        ops.extend_list(
            container.env.is_some(),
            &["spec", "containers", &index_token, "env"],
            env.iter().map(to_value).collect::<Result<_, _>>()?,
            false,
        );
    }
    Ok(Patch(ops.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_with_slashes_are_escaped() {
        assert_eq!(
            pointer(&["metadata", "annotations", "keybrake.dev/injected"]).as_str(),
            "/metadata/annotations/keybrake.dev~1injected"
        );
    }
}
