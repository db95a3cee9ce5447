//! One control plane per test binary, started on first use.
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::plane::ControlPlane;

/// Set to `1` to run tests against the plane `make cluster` left running (found through
/// `KUBECONFIG`, which must be the harness-written one from `source target/e2e/env`) instead of
/// starting one per test binary.
pub const REUSE_CLUSTER_ENV: &str = "KEYBRAKE_E2E_REUSE_CLUSTER";

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The process-wide plane: started once per test binary (or attached, see
/// [`REUSE_CLUSTER_ENV`]), stopped when the process exits — even on panic or SIGKILL. Blocks
/// while starting; panics with what to run if the binaries are missing. Every caller gets the
/// same plane, so isolate tests by namespace ([`crate::TestNamespace`]).
pub fn shared_plane() -> &'static ControlPlane {
    let plane = SHARED.get_or_init(|| {
        let result = if std::env::var(REUSE_CLUSTER_ENV).is_ok_and(|v| v == "1") {
            match std::env::var_os("KUBECONFIG") {
                Some(path) => ControlPlane::attach(&PathBuf::from(path)),
                None => Err(crate::HarnessError::Reuse(format!(
                    "{REUSE_CLUSTER_ENV}=1 but KUBECONFIG is unset: run `make cluster && source \
                     target/e2e/env`"
                ))),
            }
        } else {
            ControlPlane::start()
        };
        match result {
            Ok(plane) => {
                match plane.startup() {
                    Some(t) => eprintln!(
                        "keybrake-e2e: control plane at {} ready in {} ms (etcd {} ms, \
                         kube-apiserver {} ms)",
                        plane.server_url(),
                        t.total.as_millis(),
                        t.etcd.as_millis(),
                        t.apiserver.as_millis()
                    ),
                    None => eprintln!(
                        "keybrake-e2e: reusing control plane at {}",
                        plane.server_url()
                    ),
                }
                Ok(plane)
            }
            Err(err) => Err(err.to_string()),
        }
    });
    match plane {
        Ok(plane) => plane,
        Err(err) => panic!("keybrake e2e control plane unavailable: {err}"),
    }
}
