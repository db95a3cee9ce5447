//! The leader's reconcile loop (kube-runtime `Controller` over VaultKeys, owning token
//! Secrets): mint the token once, write status with server-side apply, publish Events,
//! requeue at the expiry instant and delete keys that stayed expired past the grace.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use keybrake_api::{KeyId, VaultKey};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    enforcement::EnforcementTracker,
    event_publisher::{EventPublisher, Notice},
    index::{PolicyIndex, Scope},
    lifecycle::{self, EnforcementView, Next, Observed},
    metrics::Metrics,
    peer_enforcement::{PeerReports, ScopeKeys, combine},
    token::{TOKEN_SECRET_KEY, mint_token, token_secret_name},
};

/// Field manager for every write this controller makes.
pub const FIELD_MANAGER: &str = "keybrake-controller";
/// Label on minted token Secrets.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "keybrake-controller");
pub const VAULT_KEY_LABEL: &str = "keybrake.dev/vault-key";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("minting: {0}")]
    Mint(#[from] crate::token::MintError),
    #[error("VaultKey has no namespace")]
    NoNamespace,
}

impl ReconcileError {
    /// Every value [`ReconcileError::kind`] returns (the metric's `kind` label).
    pub const KINDS: [&'static str; 3] = ["kube", "mint", "invalid"];

    pub fn kind(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kube",
            ReconcileError::Mint(_) => "mint",
            ReconcileError::NoNamespace => "invalid",
        }
    }
}

pub struct Context {
    pub client: Client,
    pub index: Arc<PolicyIndex>,
    pub tracker: Arc<EnforcementTracker>,
    pub events: EventPublisher,
    pub metrics: Metrics,
    pub leader: watch::Receiver<bool>,
    /// True once the index holds the initial lists of VaultKeys and Secrets.
    pub synced: watch::Receiver<bool>,
    /// Expired keys are deleted this long after expiry; `None` keeps them.
    pub gc_grace: Option<Duration>,
    /// The other replicas' enforcement reports (their streams count in status too).
    pub peers: Arc<PeerReports>,
    /// Keys and generations per scope, as this replica sees them (for the peers' fingerprints).
    pub scope_keys: Arc<ScopeKeys>,
}

/// This replica's own streams' enforcement of `id` (bound to `scope`): acknowledgements are
/// counted against the key's latest revision in this replica's index.
pub fn local_view(
    index: &PolicyIndex,
    tracker: &EnforcementTracker,
    id: &KeyId,
    scope: &Scope,
) -> EnforcementView {
    let revision = match index.published(id) {
        Some((published_scope, revision)) if published_scope == *scope => revision,
        _ => index.scope_revision(scope),
    };
    tracker.view(id, scope, revision)
}

async fn reconcile(vk: Arc<VaultKey>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if !*ctx.leader.borrow() || !*ctx.synced.borrow() {
        // Followers keep their hands off, and so does a leader whose index is not synced yet;
        // becoming leader and synced re-runs every key.
        return Ok(Action::await_change());
    }
    if vk.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let timer = ctx.metrics.reconcile_duration.start_timer();
    let ns = vk.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = vk.name_any();
    let id = KeyId::new(&ns, &name);
    let keys: Api<VaultKey> = Api::namespaced(ctx.client.clone(), &ns);
    let reference = vk.object_ref(&());
    let now = Timestamp::now();

    let current_phase = lifecycle::phase_at(
        vk.spec.state,
        lifecycle::effective_expiry(
            &vk.spec,
            vk.metadata.creation_timestamp.as_ref().map(|t| t.0),
        )
        .ok()
        .flatten(),
        now,
    );
    let wants_token = matches!(
        current_phase,
        keybrake_api::Phase::Active | keybrake_api::Phase::Suspended
    );
    let token_minted = if ctx.index.has_token_secret(&id) {
        true
    } else if wants_token {
        ensure_token(&ctx, &vk, &ns, &name).await?
    } else {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        secrets.get_opt(&token_secret_name(&name)).await?.is_some()
    };

    let scope = Scope::new(&ns, &vk.spec.workload.service_account_name);
    let enforcement = combine(
        local_view(&ctx.index, &ctx.tracker, &id, &scope),
        ctx.peers
            .counts(&id, &scope, ctx.scope_keys.fingerprint(&scope)),
    );
    let observed = Observed {
        name: &name,
        spec: &vk.spec,
        created: vk.metadata.creation_timestamp.as_ref().map(|t| t.0),
        generation: vk.metadata.generation,
        current: vk.status.as_ref(),
        token_minted,
        grant_problem: ctx.index.problem(&id),
        enforcement,
    };
    let desired = lifecycle::desired_status(&observed, now);
    for notice in lifecycle::notices(vk.status.as_ref(), &desired) {
        publish(&ctx, &reference, notice.warning, notice.reason, notice.note).await;
    }
    if lifecycle::status_changed(vk.status.as_ref(), &desired) {
        let patch = serde_json::json!({
            "apiVersion": "keybrake.dev/v1alpha1",
            "kind": "VaultKey",
            "status": desired,
        });
        keys.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    let phase = desired.phase.unwrap_or(keybrake_api::Phase::Active);
    let expiry = desired.expires_at.as_ref().map(|t| t.0);
    let action = match lifecycle::next_step(phase, expiry, now, ctx.gc_grace) {
        Next::RequeueAfter(after) => Action::requeue(after),
        Next::AwaitChange => Action::await_change(),
        Next::Delete => {
            keys.delete(&name, &Default::default()).await?;
            publish(
                &ctx,
                &reference,
                false,
                "Collected",
                "expired vault key deleted after the garbage-collection grace".into(),
            )
            .await;
            Action::await_change()
        }
    };
    timer.observe_duration();
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    Ok(action)
}

/// Creates the token Secret unless it exists. Never overwrites: a vault key is minted once.
async fn ensure_token(
    ctx: &Context,
    vk: &VaultKey,
    ns: &str,
    name: &str,
) -> Result<bool, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret_name = token_secret_name(name);
    if secrets.get_opt(&secret_name).await?.is_some() {
        return Ok(true);
    }
    let token = mint_token()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name),
            namespace: Some(ns.to_owned()),
            owner_references: vk.controller_owner_ref(&()).map(|o| vec![o]),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                (VAULT_KEY_LABEL.to_owned(), name.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            TOKEN_SECRET_KEY.to_owned(),
            ByteString(token.expose().as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            publish(
                ctx,
                &vk.object_ref(&()),
                false,
                "Issued",
                format!(
                    "vault key minted into Secret {}, key {TOKEN_SECRET_KEY}",
                    token_secret_name(name)
                ),
            )
            .await;
            Ok(true)
        }
        // Another writer (a previous leader) got there first: theirs stands.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(true),
        Err(e) => Err(e.into()),
    }
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    warning: bool,
    reason: &str,
    note: String,
) {
    let notice = Notice {
        warning,
        reason,
        note,
    };
    if let Err(e) = ctx.events.publish(&notice, reference).await {
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}

fn error_policy(vk: Arc<VaultKey>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    tracing::warn!(key = %vk.name_any(), error = %error, "reconcile failed");
    ctx.metrics.reconciles.with_label_values(&["error"]).inc();
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.kind()])
        .inc();
    Action::requeue(Duration::from_secs(5))
}

fn object_ref(id: &KeyId) -> ObjectRef<VaultKey> {
    ObjectRef::new(id.name()).within(id.namespace())
}

/// Runs the controller until shutdown. Reconciles are also triggered when leadership is
/// gained, when a key's grant changes in the index, and when its acknowledgements change
/// (the scheduler coalesces repeated triggers for one key while a reconcile is pending).
/// Drops what the reconciler never reads from a cached VaultKey.
fn slim(vk: &mut VaultKey) {
    vk.managed_fields_mut().clear();
    vk.annotations_mut().remove(LAST_APPLIED);
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

pub async fn run_controller(ctx: Arc<Context>, keys: Api<VaultKey>, shutdown: CancellationToken) {
    // Every key is looked at again whenever this replica becomes able to act: leader and
    // synced (before the initial lists, a missing Secret may only be not-yet-seen).
    let gained = futures::stream::unfold(
        (ctx.leader.clone(), ctx.synced.clone(), false),
        |(mut leader, mut synced, mut was_able)| async move {
            loop {
                tokio::select! {
                    changed = leader.changed() => changed.ok()?,
                    changed = synced.changed() => changed.ok()?,
                }
                let able = *leader.borrow_and_update() && *synced.borrow_and_update();
                let became_able = able && !was_able;
                was_able = able;
                if became_able {
                    return Some(((), (leader, synced, was_able)));
                }
            }
        },
    );
    let index = ctx.index.clone();
    let from_index = futures::stream::unfold(index, |index| async move {
        let batch = index.changed_keys().await;
        Some((
            futures::stream::iter(batch.iter().map(object_ref).collect::<Vec<_>>()),
            index,
        ))
    })
    .flatten();
    let tracker = ctx.tracker.clone();
    let from_acks = futures::stream::unfold(tracker, |tracker| async move {
        let batch = tracker.changed_keys().await;
        Some((
            futures::stream::iter(batch.iter().map(object_ref).collect::<Vec<_>>()),
            tracker,
        ))
    })
    .flatten();
    let from_peers = futures::stream::unfold(ctx.clone(), |ctx| async move {
        let scopes = ctx.peers.changed_scopes().await;
        let refs: Vec<ObjectRef<VaultKey>> = scopes
            .iter()
            .flat_map(|scope| ctx.scope_keys.keys_of(scope))
            .map(|id| object_ref(&id))
            .collect();
        Some((futures::stream::iter(refs), ctx))
    })
    .flatten();
    let stop = shutdown.clone();
    // The store keeps every VaultKey for the reconciler; without managedFields (written by every
    // apply, several KB per key) and kubectl's last-applied copy of the spec it is a fraction
    // of the size. Token Secrets are not watched here: the index already reports a token Secret
    // appearing, changing or vanishing as a change of the key (`from_index`).
    let (store, writer) = reflector::store();
    let objects = watcher(keys, watcher::Config::default())
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .touched_objects();
    Controller::for_stream(objects, store)
        .reconcile_all_on(gained)
        .reconcile_on(futures::stream::select(
            futures::stream::select(from_index, from_acks),
            from_peers,
        ))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
