//! Backlog and delay metrics (SPEC §10): a persistent session that goes offline while its
//! parent topic gets messages shows in `GET /metrics` (per parent topic and among the top-K
//! sessions) with the age of its oldest message, and drains to zero once it comes back and
//! acknowledges everything; the top-K series stay at most K.

use super::ADMIN;
use crate::hostile::{disconnect, publish, received, signed, subscribe, unique, Core, AUTH};
use lmq_gateway::gateway::Gateway;
use lmq_gateway::protocol::ReasonCode;
use std::time::{Duration, Instant};

/// A round every second; more top sessions than other checks on a shared broker leave behind.
const BACKLOG: &str = "backlog:\n  interval_secs: 1\n  top_sessions: 200\n";

/// The `/metrics` text of `gw` (open: no token).
async fn metrics(gw: &Gateway) -> String {
    let addr = gw.admin_addr().expect("admin API enabled");
    let r = crate::common::http().get(format!("http://{addr}/metrics")).send().await.expect("GET /metrics");
    assert_eq!(r.status(), 200);
    r.text().await.expect("metrics body")
}

/// The value of the series `name{labels}` (labels in the order the encoder writes them:
/// sorted by name), `None` when there is no such series.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_owned()
    } else {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{name}{{{}}}", l.join(","))
    };
    text.lines().find_map(|line| line.strip_prefix(&series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Series of the metric `name` (any labels).
fn series_count(text: &str, name: &str) -> usize {
    text.lines().filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{'))).count()
}

/// Wait (at most 60 s) until `ok` holds for the metrics text; returns it.
async fn wait_metrics(gw: &Gateway, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = metrics(gw).await;
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s\n{}", backlog_lines(&text));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn backlog_lines(text: &str) -> String {
    text.lines().filter(|l| l.contains("backlog") && !l.starts_with('#')).collect::<Vec<_>>().join("\n")
}

fn parent_backlog(text: &str, parent: &str, sessions: &str) -> Option<f64> {
    sample(text, "lmq_backlog_messages", &[("parent_topic", parent), ("sessions", sessions)])
}

fn parent_delay(text: &str, parent: &str, sessions: &str) -> Option<f64> {
    sample(text, "lmq_backlog_delay_seconds", &[("parent_topic", parent), ("sessions", sessions)])
}

fn session_backlog(text: &str, client_id: &str) -> Option<f64> {
    sample(text, "lmq_session_backlog_messages", &[("client_id", client_id)])
}

fn session_delay(text: &str, client_id: &str) -> Option<f64> {
    sample(text, "lmq_session_backlog_delay_seconds", &[("client_id", client_id)])
}

/// A persistent subscriber goes offline; N messages are published to its parent topic. The
/// metrics show a backlog of N for that parent topic (offline sessions) and for the session
/// among the top K, with a delay at least the time since the messages were stored; once it
/// reconnects and acknowledges them all, the backlog is 0, connected and offline again.
pub async fn backlog_of_an_offline_session_is_reported_until_it_returns(core: &Core) {
    const N: usize = 20;
    let gw = core.start(&format!("{AUTH}{ADMIN}{BACKLOG}")).await;
    let addr = gw.addr();
    let parent = unique("bl");
    let sub_id = unique("blsub");
    let (code, _, mut sub) = signed(addr, &sub_id, true).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    subscribe(&mut sub, &[&format!("{parent}/#")]).await;
    disconnect(sub).await;

    let (code, _, mut publisher) = signed(addr, &unique("blpub"), true).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    for i in 0..N {
        publish(&mut publisher, &format!("{parent}/room{}", i % 3), &format!("m{i}"), (i + 1) as u16).await;
    }
    let stored_at = Instant::now();
    disconnect(publisher).await;

    let text = wait_metrics(&gw, "backlog N for the parent topic and the session", |t| {
        parent_backlog(t, &parent, "offline") == Some(N as f64) && session_backlog(t, &sub_id) == Some(N as f64)
    })
    .await;
    assert_eq!(parent_backlog(&text, &parent, "connected"), Some(0.0), "nobody connected reads {parent}");

    // Delay: at least the time that has passed since the last message was stored, measured
    // before a round that computes it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let elapsed = stored_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let text = metrics(&gw).await;
    let delay = session_delay(&text, &sub_id).expect("the session is among the top K");
    assert!(delay >= elapsed, "session delay {delay} s < {elapsed} s since the messages were stored");
    let topic_delay = parent_delay(&text, &parent, "offline").expect("delay series of the parent topic");
    assert!(topic_delay >= elapsed, "parent-topic delay {topic_delay} s < {elapsed} s");
    assert!(delay <= stored_at.elapsed().as_secs_f64() + 30.0, "delay {delay} s is not the age of these messages");
    assert_eq!(session_backlog(&text, &sub_id), Some(N as f64));

    // Back, and every message acknowledged (`received` sends PUBACK for each).
    let (code, present, mut sub) = signed(addr, &sub_id, false).await;
    assert_eq!((code, present), (ReasonCode::SUCCESS, true));
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < N && Instant::now() < deadline {
        got.extend(received(&mut sub, Duration::from_secs(1)).await);
    }
    assert_eq!(got.len(), N, "the offline messages arrive: {got:?}");
    let text = wait_metrics(&gw, "backlog 0 while connected", |t| {
        parent_backlog(t, &parent, "connected") == Some(0.0)
            && parent_backlog(t, &parent, "offline") == Some(0.0)
            && session_backlog(t, &sub_id).is_none()
    })
    .await;
    assert_eq!(parent_delay(&text, &parent, "offline"), Some(0.0));
    assert!(sample(&text, "lmq_backlog_sessions", &[("sessions", "connected")]).unwrap_or(0.0) >= 1.0);

    disconnect(sub).await;
    wait_metrics(&gw, "backlog 0 offline after acknowledging everything", |t| {
        parent_backlog(t, &parent, "offline") == Some(0.0) && session_backlog(t, &sub_id).is_none()
    })
    .await;
}

/// More sessions with a backlog than K: exactly the K largest are reported by ClientId, and
/// a session that drains leaves the set (its series are removed) while the next one enters.
pub async fn top_k_session_series_stay_within_k(core: &Core) {
    const K: usize = 3;
    let gw = core.start(&format!("{AUTH}{ADMIN}backlog:\n  interval_secs: 1\n  top_sessions: {K}\n")).await;
    let addr = gw.addr();
    let parent = unique("topk");
    let (_, _, mut publisher) = signed(addr, &unique("topkpub"), true).await;
    // Session i subscribes before message i: 6 sessions with backlogs 6, 5, ..., 1.
    let ids: Vec<String> = (0..6).map(|i| unique(&format!("topk{i}s"))).collect();
    for (i, id) in ids.iter().enumerate() {
        let (code, _, mut sub) = signed(addr, id, true).await;
        assert_eq!(code, ReasonCode::SUCCESS);
        subscribe(&mut sub, &[&format!("{parent}/#")]).await;
        disconnect(sub).await;
        publish(&mut publisher, &format!("{parent}/x"), &format!("m{i}"), (i + 1) as u16).await;
    }
    let text = wait_metrics(&gw, "the K largest backlogs", |t| {
        (0..K).all(|i| session_backlog(t, &ids[i]) == Some((6 - i) as f64))
    })
    .await;
    assert_eq!(series_count(&text, "lmq_session_backlog_messages"), K, "{}", backlog_lines(&text));
    assert_eq!(series_count(&text, "lmq_session_backlog_delay_seconds"), K);
    assert_eq!(parent_backlog(&text, &parent, "offline"), Some((6 + 5 + 4 + 3 + 2 + 1) as f64));

    // The largest drains: it leaves the set, the fourth enters.
    let (_, _, mut first) = signed(addr, &ids[0], false).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 6 && Instant::now() < deadline {
        got.extend(received(&mut first, Duration::from_secs(1)).await);
    }
    assert_eq!(got.len(), 6, "{got:?}");
    disconnect(first).await;
    let text = wait_metrics(&gw, "the next session in the top K", |t| {
        session_backlog(t, &ids[0]).is_none() && session_backlog(t, &ids[3]) == Some(3.0)
    })
    .await;
    assert_eq!(series_count(&text, "lmq_session_backlog_messages"), K, "{}", backlog_lines(&text));
    assert!(session_delay(&text, &ids[0]).is_none(), "the drained session's delay series is removed");
}
