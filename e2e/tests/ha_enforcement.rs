//! Two controller replicas: `status.enforcement` counts the sidecars of every replica, not only
//! the leader's. Real kube-apiserver + etcd (the shared plane), two keybrake-controller
//! processes, real keybrake-sidecar processes streaming from one replica each.
use std::path::Path;

use k8s_openapi::api::coordination::v1::Lease;
use keybrake_api::{Phase, VaultKey};
use keybrake_e2e::{
    TestNamespace,
    fixtures::{
        self, SidecarProcess, condition, create_key, put_upstream_secret, sa_token, set_state,
        wait_status,
    },
    processes::{ControllerProcess, ControllerTls},
};
use kube::{ResourceExt, api::ListParams};
use serde_json::json;

const KEY: &str = "ha-count";
const UPSTREAM_VALUE: &str = "sk_test_ha_enforcement";

/// A sidecar process streaming from `controller` as service account `agent`.
async fn sidecar(
    ns: &TestNamespace<'_>,
    controller: &ControllerProcess,
    tls: &ControllerTls,
    dir: &Path,
) -> SidecarProcess {
    std::fs::create_dir_all(dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, sa_token(ns, "agent").await).unwrap();
    SidecarProcess::controller_mode(dir, &controller.stream_url, &tls.ca(), &token_file, &[]).await
}

/// Waits until the key's status says `summary` sidecars acknowledged, Propagated is True and
/// the phase is `phase`.
async fn wait_enforced(ns: &TestNamespace<'_>, phase: Phase, summary: &str) -> VaultKey {
    let what = format!("{phase:?} enforced by {summary}");
    wait_status(ns, KEY, &what, |vk| {
        let st = vk.status.as_ref()?;
        (st.phase == Some(phase)
            && st.enforcement.as_ref()?.summary == summary
            && condition(vk, "Propagated")?.0 == "True")
            .then(|| vk.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcement_counts_sidecars_on_every_replica() {
    let ns = fixtures::namespace_with_crds("ha-enf").await;
    put_upstream_secret(&ns, fixtures::UPSTREAM_SECRET, UPSTREAM_VALUE).await;
    let tls = ControllerTls::new();
    let (leader, mut follower) = fixtures::two_ready_replicas(&ns, &tls, ["enf-a", "enf-b"]).await;

    let dirs = tempfile::tempdir().unwrap();
    let on_leader = sidecar(&ns, &leader, &tls, &dirs.path().join("l")).await;
    let on_follower = sidecar(&ns, &follower, &tls, &dirs.path().join("f")).await;
    // The upstream is never called: this test is about status, not calls.
    create_key(
        &ns,
        &fixtures::stripe_vault_key(KEY, "agent", "https://127.0.0.1:9", json!({})),
    )
    .await;
    // One sidecar per replica: only the follower's report makes this 2/2 (the leader alone
    // sees 1 stream).
    wait_enforced(&ns, Phase::Active, "2/2").await;

    // The follower's report: a Lease of its own, labelled, renewed, holding no secret.
    let reports = ns
        .api::<Lease>()
        .list(&ListParams::default().labels("keybrake.dev/enforcement-report=keybrake-controller"))
        .await
        .unwrap();
    let follower_report = reports
        .items
        .iter()
        .find(|l| {
            l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                == Some(follower.identity.as_str())
        })
        .unwrap_or_else(|| panic!("no report Lease of {}: {reports:?}", follower.identity));
    assert_eq!(
        follower_report.name_any(),
        format!("keybrake-controller-{}", follower.identity)
    );
    let text = follower_report
        .annotations()
        .get("keybrake.dev/enforcement")
        .expect("report annotation")
        .clone();
    assert!(text.contains(r#""streams":1"#), "{text}");
    assert!(
        !text.contains(UPSTREAM_VALUE) && !text.contains("vault_key_"),
        "a report must hold no secret: {text}"
    );

    // Revocation: Propagated only once the follower's sidecar acknowledged it too.
    set_state(&ns, KEY, "Revoked").await.unwrap();
    let revoked = wait_enforced(&ns, Phase::Revoked, "2/2").await;
    let (_, reason, message) = condition(&revoked, "Propagated").unwrap();
    assert_eq!(reason, "AllSidecarsAcknowledged");
    assert!(message.contains("2/2"), "{message}");

    // A sidecar leaving the follower leaves the count (the follower's report shrinks).
    drop(on_follower);
    wait_enforced(&ns, Phase::Revoked, "1/1").await;

    // A follower that dies without a word (SIGKILL: its report Lease stays behind) stops
    // counting once its report is not renewed for the lease duration (3 s here).
    let again = sidecar(&ns, &follower, &tls, &dirs.path().join("f2")).await;
    wait_enforced(&ns, Phase::Revoked, "2/2").await;
    follower.kill();
    wait_enforced(&ns, Phase::Revoked, "1/1").await;
    drop(again);
    drop(on_leader);
    drop(leader);
}
