//! Fair queuing among tenants: a flood from one key does not lock another
//! out, weights set the shares, a key's own cap holds, and without keys the
//! tenant is the client (or a trusted `x-tenant`).

use crate::support;

use anteroom::config::KeyEntry;
use anteroom::sim::Mode;
use support::*;

/// A key named `name` whose secret is `sk-{name}`.
fn key(name: &str, weight: u32) -> KeyEntry {
    KeyEntry {
        name: name.into(),
        sha256: Some(hex(anteroom::types::digest(
            format!("sk-{name}").as_bytes(),
        ))),
        weight,
        ..Default::default()
    }
}

fn bearer(name: &str) -> String {
    format!("Bearer sk-{name}")
}

/// Send `n` requests of `tenant` at once (ids `{tenant}-{i}`), each read to
/// its end; the handles of their tasks.
fn flood(
    url: &str,
    tenant: &'static str,
    n: usize,
    header: &'static str,
) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|i| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let value = if header == "authorization" {
                    bearer(tenant)
                } else {
                    tenant.to_owned()
                };
                let resp = chat_with(
                    &client(),
                    &url,
                    &[(header, &value)],
                    &format!("{tenant}-{i}"),
                    false,
                    1,
                )
                .await;
                let status = resp.status().as_u16();
                body_bytes(resp).await;
                status
            })
        })
        .collect()
}

/// Two long streams of `holder` that hold both of the proxy's slots until
/// dropped, so what is sent meanwhile queues before anything is served.
async fn hold_both_slots(
    client: &HttpClient,
    proxy: &anteroom::cli::serve::Running,
    holder: &str,
) -> Vec<http::Response<hyper::body::Incoming>> {
    let auth = bearer(holder);
    let h = [("authorization", auth.as_str())];
    let mut held = Vec::new();
    for i in 0..2 {
        let id = format!("{holder}-{i}");
        held.push(chat_with(client, &proxy.url(), &h, &id, true, 10_000).await);
    }
    wait_until("both slots held", || {
        proxy.scheduler.snapshot().running == 2
    })
    .await;
    held
}

async fn all_ok(tasks: Vec<tokio::task::JoinHandle<u16>>) {
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

/// Positions in the backend's arrival order of the ids starting with `prefix`.
fn positions(order: &[String], prefix: &str) -> Vec<usize> {
    order
        .iter()
        .enumerate()
        .filter(|(_, id)| id.starts_with(prefix))
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_tenant_is_served_interleaved_with_a_flood() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = 2.into();
        c.key = vec![key("alpha", 1), key("bravo", 1), key("charlie", 1)];
    })
    .await;
    // Both slots are held while alpha's flood and then bravo's 20 arrive,
    // so the order they go out in is the queue's alone, however slowly the
    // clients' connections come up on a loaded machine.
    let held = hold_both_slots(&client, &proxy, "charlie").await;
    let a = flood(&proxy.url(), "alpha", 500, "authorization");
    wait_until("alpha's 500 wait", || {
        proxy.scheduler.snapshot().waiting == 500
    })
    .await;
    let b = flood(&proxy.url(), "bravo", 20, "authorization");
    wait_until("bravo's 20 wait too", || {
        proxy.scheduler.snapshot().waiting == 520
    })
    .await;
    drop(held);
    all_ok(b).await;
    all_ok(a).await;

    let order = sim.stats().order;
    assert_eq!(order.len(), 522);
    let bravo = positions(&order, "bravo-");
    let alpha = positions(&order, "alpha-");
    // Arrival order would put all 20 after alpha's whole flood. Taking
    // turns (equal weights), bravo's go out one for one with alpha's.
    assert!(
        bravo[19] < alpha[30],
        "bravo's last went out at {}, alpha's 31st at {}: {bravo:?}",
        bravo[19],
        alpha[30]
    );
    assert!(alpha.len() == 500 && alpha[499] > bravo[19]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_3_to_1_share_the_slots_3_to_1() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = 2.into();
        c.key = vec![key("heavy", 3), key("light", 1), key("holder", 1)];
    })
    .await;
    // Both slots held, so both floods queue before anything is served.
    let held = hold_both_slots(&client, &proxy, "holder").await;
    let heavy = flood(&proxy.url(), "heavy", 200, "authorization");
    let light = flood(&proxy.url(), "light", 200, "authorization");
    wait_until("400 queued", || proxy.scheduler.snapshot().waiting == 400).await;
    let tenants = proxy.scheduler.snapshot().tenants;
    let named = |n: &str| tenants.iter().find(|t| t.name == n).cloned().unwrap();
    assert_eq!((named("heavy").waiting, named("heavy").weight), (200, 3));
    assert_eq!((named("light").waiting, named("holder").running), (200, 2));
    drop(held);
    all_ok(heavy).await;
    all_ok(light).await;

    let order: Vec<String> = sim
        .stats()
        .order
        .into_iter()
        .filter(|id| !id.starts_with("hold"))
        .collect();
    // While both have work queued (the first 260 dispatches: 195 + 65), every
    // window of 20 holds 15 of heavy's, give or take one at the edges.
    for (w, window) in order[..260].chunks(20).enumerate() {
        let h = window.iter().filter(|id| id.starts_with("heavy")).count();
        assert!((14..=16).contains(&h), "window {w}: {h} of 20 heavy");
    }
    let h = order[..260]
        .iter()
        .filter(|id| id.starts_with("heavy"))
        .count();
    assert!(
        (193..=197).contains(&h),
        "{h} of the first 260 were heavy's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_cap_of_requests_in_flight_holds_while_others_use_the_rest() {
    trace_init();
    let (sim, proxy, client) = setup(sim_config(Mode::Batch), |c| {
        c.max_concurrency = 4.into();
        c.key = vec![
            KeyEntry {
                max_in_flight: Some(1),
                ..key("capped", 1)
            },
            key("free", 1),
        ];
    })
    .await;
    let auth = |n: &str| [("authorization", bearer(n))];
    let mut capped = vec![];
    for i in 0..3 {
        let (client, url) = (client.clone(), proxy.url());
        let id = format!("capped-{i}");
        capped.push(tokio::spawn(async move {
            let h = [("authorization", bearer("capped"))];
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            chat_with(&client, &url, &h, &id, true, 10_000).await
        }));
        // One at a time, so they run in the order they were sent.
        wait_until("arrived", || {
            let s = proxy.scheduler.snapshot();
            s.running + s.waiting == i + 1
        })
        .await;
    }
    wait_until("one capped running, two waiting", || {
        let s = proxy.scheduler.snapshot();
        s.running == 1 && s.waiting == 2
    })
    .await;
    // The other key still gets the free slots at once.
    let free = auth("free");
    let free: Vec<(&str, &str)> = free.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for i in 0..3 {
        let resp = chat_with(&client, &proxy.url(), &free, &format!("free-{i}"), false, 1).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    let s = proxy.scheduler.snapshot();
    assert_eq!((s.running, s.waiting), (1, 2), "capped stays at one");
    let t = s.tenants.iter().find(|t| t.name == "capped").unwrap();
    assert_eq!((t.running, t.waiting, t.max_in_flight), (1, 2, Some(1)));

    // Each capped stream that ends lets the next one start, one at a time.
    let mut started = 1;
    for task in capped {
        let resp = task.await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        if started < 3 {
            started += 1;
            wait_until("the next capped stream starts", || {
                positions(&sim.stats().order, "capped-").len() == started
            })
            .await;
            assert_eq!(proxy.scheduler.snapshot().running, 1);
        }
    }
    wait_until("all done", || proxy.scheduler.snapshot().running == 0).await;
    assert_eq!(proxy.scheduler.snapshot().tenants, vec![]);
}

/// Without keys: the client's address is the tenant, or `x-tenant` when the
/// config trusts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_a_trusted_x_tenant_names_the_tenant() {
    trace_init();
    for trust in [true, false] {
        let (sim, proxy, client, busy) = one_slot_busy(|c| c.trust_tenant_header = trust).await;
        let mut tasks = flood(&proxy.url(), "a", 1, "x-tenant");
        wait_until("a-0 queued", || proxy.scheduler.snapshot().waiting == 1).await;
        // Sequential arrivals: a-0, then three of a (ids a2-…), then b-0.
        for i in 0..3 {
            let url = proxy.url();
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let r = chat_with(
                    &client,
                    &url,
                    &[("x-tenant", "a")],
                    &format!("a2-{i}"),
                    false,
                    1,
                )
                .await;
                let s = r.status().as_u16();
                body_bytes(r).await;
                s
            }));
            wait_until("queued", || proxy.scheduler.snapshot().waiting == 2 + i).await;
        }
        tasks.extend(flood(&proxy.url(), "b", 1, "x-tenant"));
        wait_until("five queued", || proxy.scheduler.snapshot().waiting == 5).await;
        let names: Vec<String> = proxy
            .scheduler
            .snapshot()
            .tenants
            .iter()
            .map(|t| t.name.clone())
            .collect();
        drop(busy);
        all_ok(tasks).await;
        let order = sim.stats().order;
        let b = positions(&order, "b-")[0];
        if trust {
            // The busy request named no tenant: it is its address's.
            assert_eq!(names, ["a", "b", "127.0.0.1"]);
            assert_eq!(b, 2, "b takes its turn after a's first: {order:?}");
        } else {
            assert_eq!(names, ["127.0.0.1"]);
            assert_eq!(b, 5, "one tenant: arrival order: {order:?}");
        }
    }
}
