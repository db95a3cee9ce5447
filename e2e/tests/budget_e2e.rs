//! Several sidecars sharing one key's `dailyUsdCap` (docs/verdicts.md, "Several sidecars"):
//! two real controller replicas on the shared kube-apiserver, three real `keybrake-sidecar`
//! processes in controller mode (two streaming from one replica, one from the other), agents
//! charging through all of them at once against a fake Stripe. The sidecars book only against
//! budget-slice leases, which the replicas grant from the key's `status.budget` under a
//! resourceVersion precondition; so the money that moved never exceeds the cap (the documented
//! bound for calls whose cost is known up front), and `status.spentTodayUsd` reaches it.
//!
//! With the former per-sidecar ledgers the same run would let each sidecar spend the whole cap
//! (3 × cap).
use std::time::{Duration, Instant};

use keybrake_api::{Usd, VaultKey, budget::MAX_LEASES};
use keybrake_e2e::{
    fixtures::{self, SidecarProcess},
    processes::{ControllerTls, free_port, poll},
};
use keybrake_testkit::{FakeKind, FakeVendor};
use kube::api::{Patch, PatchParams};
use serde_json::json;

const STRIPE_SECRET: &str = "sk_test_upstream_budget_e2e";
const KEY: &str = "shared-budget";
const SA: &str = "agent";
/// $10.00 a day, charges of $0.50: 20 fit.
const CAP: &str = "10.00";
const CHARGE_CENTS: i64 = 50;
const AGENTS_PER_SIDECAR: usize = 4;
const CALLS_PER_AGENT: usize = 25;
const DEADLINE: Duration = Duration::from_secs(90);

/// One Stripe charge through `sidecar`; returns (status, verdict).
async fn charge(sidecar: std::net::SocketAddr, vault_key: &str) -> (u16, String) {
    let form = format!("amount={CHARGE_CENTS}&currency=usd");
    fixtures::agent_form_call(sidecar, "/stripe/v1/charges", vault_key, &form).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_sharing_a_key_stay_within_its_daily_cap() {
    let ns = fixtures::namespace_with_crds("budget").await;
    let tls = ControllerTls::new();
    // Short leases, so idle sidecars give their unspent slices back within seconds.
    let replica = |name: &str| {
        let sink = format!(
            "sqlite://{}",
            tls.dir.path().join(format!("{name}.db")).display()
        );
        vec![
            "--audit-sink".to_owned(),
            sink,
            "--budget-lease-secs".to_owned(),
            "6".to_owned(),
        ]
    };
    let (args_a, args_b) = (replica("a"), replica("b"));
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let controller_a =
        fixtures::ready_controller(&ns, &tls, "budget-a", free_port(), &args_a).await;
    let controller_b =
        fixtures::ready_controller(&ns, &tls, "budget-b", free_port(), &args_b).await;

    let stripe = FakeVendor::start(FakeKind::Stripe, STRIPE_SECRET)
        .await
        .unwrap();
    fixtures::put_upstream_secret(&ns, fixtures::UPSTREAM_SECRET, STRIPE_SECRET).await;
    let key = fixtures::stripe_vault_key(
        KEY,
        SA,
        &stripe.url(),
        json!({
            "allow": [{"operation": "charges.create"}],
            "limits": {"dailyUsdCap": CAP},
        }),
    );
    fixtures::create_key(&ns, &key).await;
    let vault_key = fixtures::minted_token(&ns, KEY).await;
    let token_file = tls.dir.path().join("sa-token");
    std::fs::write(&token_file, fixtures::sa_token(&ns, SA).await).unwrap();

    let mut sidecars = Vec::new();
    for (i, controller) in [&controller_a, &controller_a, &controller_b]
        .into_iter()
        .enumerate()
    {
        let dir = tls.dir.path().join(format!("sidecar-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let sidecar = SidecarProcess::controller_mode(
            &dir,
            &controller.stream_url,
            &tls.ca(),
            &token_file,
            &["--budget-max-wait", "5s"],
        )
        .await;
        sidecar.wait_ready().await;
        sidecars.push(sidecar);
    }

    // Every agent charges until its calls run out; all twelve at once.
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for (i, sidecar) in sidecars.iter().enumerate() {
        for _ in 0..AGENTS_PER_SIDECAR {
            let (proxy, vault_key) = (sidecar.proxy, vault_key.clone());
            agents.spawn(async move {
                let mut allowed = 0usize;
                let mut denied = 0usize;
                for _ in 0..CALLS_PER_AGENT {
                    match charge(proxy, &vault_key).await {
                        (200, v) if v == "allow" => allowed += 1,
                        (402, v) if v == "daily_cap" => denied += 1,
                        other => panic!("sidecar {i}: unexpected answer {other:?}"),
                    }
                }
                (i, allowed, denied)
            });
        }
    }
    let mut allowed_by_sidecar = [0usize; 3];
    let mut denied = 0;
    while let Some(done) = agents.join_next().await {
        let (i, allowed, d) = done.expect("agent task");
        allowed_by_sidecar[i] += allowed;
        denied += d;
    }
    let allowed: usize = allowed_by_sidecar.iter().sum();
    let cap: Usd = CAP.parse().unwrap();
    let booked = Usd::from_cents(CHARGE_CENTS * allowed as i64);
    eprintln!(
        "budget_e2e: {allowed} charges allowed ({allowed_by_sidecar:?} per sidecar), {denied} \
         denied daily_cap, booked ${booked} of a ${cap} cap, in {} ms",
        started.elapsed().as_millis()
    );
    // The vendor saw exactly the allowed charges: nothing else moved money.
    assert_eq!(stripe.request_count(), allowed);
    // The bound: amounts known before the call, no sidecar vanished: never past the cap.
    assert!(booked <= cap, "booked ${booked} > cap ${cap}");
    // And the cap was usable across sidecars (slices are 10 % of it; a little may sit unspent
    // in the other sidecars' leases when the last calls are refused).
    assert!(
        booked >= Usd::from_cents(700),
        "only ${booked} of ${cap} usable"
    );
    assert!(
        allowed_by_sidecar.iter().filter(|n| **n > 0).count() >= 2,
        "the budget was shared: {allowed_by_sidecar:?}"
    );

    // The book: never more committed than the cap, and the idle sidecars give their slices
    // back, so it converges on what was spent; spentTodayUsd shows the total.
    let keys = ns.api::<VaultKey>();
    let (book, shown) = poll("status shows the day's total", DEADLINE, || {
        let keys = keys.clone();
        async move {
            let status = keys.get(KEY).await.ok()?.status?;
            let book = status.budget?;
            let committed = book.leases.iter().fold(book.settled_usd, |s, l| {
                s.saturating_add(l.granted_usd.max(l.used_usd))
            });
            assert!(committed <= cap, "committed ${committed} > cap: {book:?}");
            assert!(book.leases.len() <= MAX_LEASES);
            let shown = status.spent_today_usd?;
            (book.leases.is_empty() && book.settled_usd == booked && shown == booked)
                .then_some((book, shown))
        }
    })
    .await;
    eprintln!(
        "budget_e2e: status.budget settled ${}, spentTodayUsd ${shown}",
        book.settled_usd
    );

    // A new sidecar can still get what the others gave back, and no more.
    let left = cap.saturating_sub(booked);
    let dir = tls.dir.path().join("sidecar-late");
    std::fs::create_dir_all(&dir).unwrap();
    let late = SidecarProcess::controller_mode(
        &dir,
        &controller_b.stream_url,
        &tls.ca(),
        &token_file,
        &["--budget-max-wait", "5s"],
    )
    .await;
    late.wait_ready().await;
    let mut late_allowed = 0;
    for _ in 0..(left.micros() / Usd::from_cents(CHARGE_CENTS).micros() + 2) {
        if charge(late.proxy, &vault_key).await.0 == 200 {
            late_allowed += 1;
        }
    }
    let mut total = Usd::from_cents(CHARGE_CENTS * (allowed + late_allowed) as i64);
    assert!(total <= cap, "with the late sidecar: ${total} > ${cap}");
    assert_eq!(
        total, cap,
        "the unspent rest returned by idle sidecars was usable"
    );

    // The cap is raised to $20; a sidecar takes a slice, spends part of it and vanishes
    // (SIGKILL: no release). Its unspent rest stays committed (fail closed), so everything the
    // others can still book is the new cap minus that stranded rest, and never more.
    let cap: Usd = "20.00".parse().unwrap();
    keys.patch(
        KEY,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"limits": {"dailyUsdCap": cap}}})),
    )
    .await
    .expect("raise the cap");
    let mut late = late;
    // (Its last calls were refused: a refusal stands for a second before it asks again.)
    let proxy = late.proxy;
    poll("a charge allowed under the raised cap", DEADLINE, || {
        let vault_key = vault_key.clone();
        async move { (charge(proxy, &vault_key).await.0 == 200).then_some(()) }
    })
    .await;
    total = total.saturating_add(Usd::from_cents(CHARGE_CENTS));
    late.child.kill().expect("SIGKILL the late sidecar");
    let _ = late.child.wait();
    let survivor = &sidecars[0];
    let mut survivor_allowed = 0;
    for _ in 0..60 {
        match charge(survivor.proxy, &vault_key).await {
            (200, _) => survivor_allowed += 1,
            (402, v) if v == "daily_cap" => break,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    total = total.saturating_add(Usd::from_cents(CHARGE_CENTS * survivor_allowed));
    // The survivor's idle lease is released within a lease time; the vanished one never is.
    let book = poll("the survivor's lease released", DEADLINE, || {
        let keys = keys.clone();
        async move {
            let book = keys.get(KEY).await.ok()?.status?.budget?;
            (book.leases.len() == 1).then_some(book)
        }
    })
    .await;
    let [stranded] = &book.leases[..] else {
        panic!("only the vanished sidecar's lease is open: {book:?}");
    };
    let committed = book
        .settled_usd
        .saturating_add(stranded.granted_usd.max(stranded.used_usd));
    eprintln!(
        "budget_e2e: a sidecar vanished holding a lease of ${} (reported used ${}): ${total} \
         booked of a ${cap} cap, ${committed} committed",
        stranded.granted_usd, stranded.used_usd
    );
    assert!(total <= cap, "after a vanished sidecar: ${total} > ${cap}");
    assert_eq!(committed, cap, "the survivor got everything not stranded");
    assert!(
        total >= cap.saturating_sub(stranded.granted_usd.saturating_sub(stranded.used_usd)),
        "only the vanished lease's unreported rest is missing"
    );
    assert_eq!(
        stripe.request_count(),
        (total.micros() / Usd::from_cents(CHARGE_CENTS).micros()) as usize
    );

    for (i, sidecar) in sidecars.iter().enumerate() {
        let log = sidecar.log_text();
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("budget request failed"))
            .collect();
        eprintln!(
            "budget_e2e: sidecar {i}: {} failed budget requests {:?}",
            failed.len(),
            failed.first()
        );
        assert!(!log.contains(&vault_key), "the vault key reached a log");
        assert!(
            !log.contains(STRIPE_SECRET),
            "the upstream secret reached a log"
        );
    }
}
