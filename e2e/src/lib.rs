//! A real Kubernetes control plane (etcd + kube-apiserver, no kubelet) on loopback for
//! Keybrake's end-to-end tests, and the helpers those tests share.
//!
//! The binaries come from `make e2e-deps` (`e2e/scripts/build-k8s.sh`), cached under
//! `$KEYBRAKE_CACHE/bin` (default `~/.cache/keybrake/bin`) at the versions in [`binaries`]. If they
//! are missing, everything here fails (never skips) with "run `make e2e-deps`".
//!
//! # Using it from a test (any crate: add `keybrake-e2e` as a dev-dependency)
//!
//! ```no_run
//! use keybrake_api::VaultKey;
//! use keybrake_e2e::{TestNamespace, install_crds, run};
//!
//! # async fn example() {
//! // First use in this test binary starts the shared plane (a few seconds); later tests reuse it.
//! let ns = TestNamespace::new("my-test").await; // fresh namespace `my-test-xxxxxx`
//! install_crds(&ns.client()).await.unwrap(); // applies crds/, waits for Established
//! let keys = ns.api::<VaultKey>(); // kube::Api in that namespace (admin)
//! let listed = keys.list(&Default::default()).await.unwrap();
//! assert!(listed.items.is_empty());
//! // kubectl against the same plane and namespace:
//! let out = run(ns.kubectl().args(["get", "vk"])).expect_success();
//! # let _ = out;
//! # }
//! ```
//!
//! # The API
//!
//! - [`shared_plane()`] → `&'static ControlPlane`: one plane per test binary, started on first use,
//!   stopped when the process exits (even on panic or SIGKILL: each component runs under a guard
//!   that stops it when this process's end of a pipe closes, see `process.rs`). With `KEYBRAKE_E2E_REUSE_CLUSTER=1` ([`REUSE_CLUSTER_ENV`]) it attaches instead
//!   to the plane `make cluster` left running, found via `KUBECONFIG` (`source target/e2e/env`).
//! - [`ControlPlane`]: [`start`](ControlPlane::start) a private plane (dropped = stopped), or
//!   [`attach`](ControlPlane::attach). Accessors: `server_url()` (`https://127.0.0.1:PORT`),
//!   `kubeconfig()`, `ca_pem()`, `admin_token()` (a `system:masters` user),
//!   `service_account_issuer()`, `client()` (new admin `kube::Client`; make one per runtime),
//!   `client_as(user, groups)` (impersonation, for RBAC tests), `kube_config()`,
//!   `kubectl()`/`helm()` (`std::process::Command` preset for this plane), `log_tail(component)`,
//!   `startup()` (spawn → ready timings), `binaries()`.
//! - [`TestNamespace`]: `new(prefix).await` on the shared plane, `create(&plane, prefix)` on any
//!   plane; `name()`, `client()`, `api::<K>()`, `kubectl()` (with `--namespace`),
//!   `service_account(name)`, `service_account_token(sa, audience)` (TokenRequest; verify with a
//!   TokenReview like the controller does).
//! - [`install_crds`]`(&client)`: server-side-applies `crds/*.yaml`, waits for Established.
//! - [`run`] / [`run_with_stdin`] → [`CommandOutput`] with `expect_success()` /
//!   `expect_failure()` that print the command line and both streams when they fail.
//! - [`fixtures`]: the setup most tests repeat (namespace with CRDs, upstream Secret, Stripe
//!   VaultKey, minted token, status waits, a ready controller, the sidecar binary in controller
//!   mode, one agent call); [`processes`]: the controller process, its TLS, `poll`.
//! - [`TestCa`]: issue loopback server certificates (e.g. for a webhook registered with
//!   `clientConfig.url: https://127.0.0.1:PORT/...` and `caBundle` = base64 of `ca.cert_pem()`)
//!   and client certificates.
//!
//! # What the plane is
//!
//! etcd (`--unsafe-no-fsync`) and kube-apiserver on free loopback ports; a fresh CA and serving
//! certificate; a token-auth file with the admin token; an ECDSA service-account signing key
//! (TokenRequest and TokenReview work); RBAC authorization; admission webhooks enabled; the
//! `ServiceAccount` admission plugin disabled so Pods can be created without token Secrets. There
//! is no kubelet, scheduler or controller-manager: Pods stay Pending, namespaces never finish
//! deleting (hence one fresh namespace per test) and nothing garbage-collects owned objects.
#![forbid(unsafe_code)]

pub mod binaries;
mod command;
mod crds;
mod error;
pub mod fixtures;
mod namespace;
pub mod pki;
mod plane;
mod process;
pub mod processes;
mod shared;

pub use binaries::{ETCD_VERSION, HELM_VERSION, K8S_VERSION, K8sBinaries, cache_dir};
pub use command::{CommandOutput, run, run_with_stdin};
pub use crds::{CRD_ESTABLISHED_TIMEOUT, crds_dir, install_crds, load_crds};
pub use error::HarnessError;
pub use namespace::{TEST_NAMESPACE_LABEL, TestNamespace};
pub use pki::{CertifiedKey, TestCa};
pub use plane::{ControlPlane, KEEP_DIR_ENV, PlaneOptions, StartupTimings};
pub use shared::{REUSE_CLUSTER_ENV, shared_plane};
