//! A SIGKILL of the gateway that forwards delayed messages, with messages on their way through
//! every level.

use super::*;
use crate::common::GatewayProcess;
use crate::hostile::{stored_payloads, unique, OPEN_AUTH};
use std::collections::HashMap;

/// Messages of the check, delays 1–8 s.
const TOTAL: usize = 300;

/// Wait until the gateway process `p` (started with the admin API) forwards delayed messages.
async fn wait_process_forwarding(p: &GatewayProcess) {
    let admin = p.admin_addr().expect("started with the admin API");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scraped = crate::common::http()
            .get(format!("http://{admin}/metrics"))
            .bearer_auth(crate::common::ADMIN_TOKEN)
            .send()
            .await;
        let text = match scraped {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if crate::common::metric_value(&text, "lmq_delay_forwarder", &[]) == 1.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway process never took up forwarding delayed messages; log:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn messages(parent: &str, range: std::ops::Range<usize>) -> Vec<Outgoing> {
    range
        .map(|i| Outgoing {
            topic: format!("$delayed/{}/{parent}/m", i % 8 + 1),
            payload: i.to_string(),
            user_properties: vec![],
            start_after_ms: None,
        })
        .collect()
}

/// 300 delayed messages (1–8 s, QoS 1, every one acknowledged) are on their way when the
/// forwarding gateway process is killed with SIGKILL 3 s after they were sent. Embedded: a
/// new process on the same data takes over; the subscriber (persistent session, QoS 1) was
/// connected to the killed one and comes back to the new one (clean start 0). Kafka and
/// RocketMQ: the other gateway process of the cluster takes over (lease 2 s); the subscriber
/// is connected to it throughout and half the messages were published there. The core topic
/// holds every message exactly once; the subscriber gets every one, none before due, and none
/// twice on one connection (a message it had before the kill may come again after it, as QoS 1
/// allows, only on the embedded log where its connection was cut).
pub async fn a_sigkill_of_the_forwarding_gateway_loses_and_duplicates_no_delayed_message(core: &Core) {
    let _turn = serial().await;
    let extra = isolated(&format!("{OPEN_AUTH}{DELAY}"));
    let parent = unique("delaycrash");
    let filter = format!("{parent}/#");
    let mut a = core.process_options(&extra).admin().start();
    wait_process_forwarding(&a).await;
    let b = (!core.is_embedded()).then(|| core.process_options(&extra).admin().start());
    let sub_id = unique("crash-sub");
    let before = Collector::start(b.as_ref().map_or(a.addr, |b| b.addr), &sub_id, true, 3600, &[&filter]).await;

    let started = now_ms();
    let (on_a, on_b) = match &b {
        Some(b) => {
            let (ma, mb) = (messages(&parent, 0..TOTAL / 2), messages(&parent, TOTAL / 2..TOTAL));
            let (id_a, id_b) = (unique("crash-pub-a"), unique("crash-pub-b"));
            let (sa, sb) = tokio::join!(publish_all(a.addr, &id_a, &ma, 100), publish_all(b.addr, &id_b, &mb, 100));
            (sa, sb)
        }
        None => (publish_all(a.addr, &unique("crash-pub"), &messages(&parent, 0..TOTAL), 100).await, Vec::new()),
    };
    let sent: Vec<Sent> = on_a.into_iter().chain(on_b).collect();
    let unacked: Vec<usize> = (0..TOTAL).filter(|&i| sent[i].code != 0 || sent[i].acked_ms == 0).collect();
    assert!(unacked.is_empty(), "not acknowledged with success: {unacked:?}");

    // Mid-way: the 1–2 s ones delivered, the rest in the levels.
    tokio::time::sleep(Duration::from_millis((started + 3000 - now_ms()).max(0) as u64)).await;
    let before_kill = before.count();
    a.sigkill();
    let kill_ms = now_ms();

    let (after, survivor) = match b {
        None => {
            let a = core.process_options(&extra).admin().start();
            wait_process_forwarding(&a).await;
            (Some(Collector::start(a.addr, &sub_id, false, 3600, &[]).await), a)
        }
        Some(b) => {
            wait_process_forwarding(&b).await;
            (None, b)
        }
    };
    let took_over_ms = now_ms() - kill_ms;
    let all_seen = || {
        let mut seen: Vec<Got> = before.got();
        seen.extend(after.as_ref().map(|c| c.got()).unwrap_or_default());
        seen
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let distinct: std::collections::HashSet<String> = all_seen().into_iter().map(|g| g.payload).collect();
        if distinct.len() >= TOTAL || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let count = |got: Vec<Got>| {
        let mut by: HashMap<usize, Vec<Got>> = HashMap::new();
        for g in got {
            by.entry(g.payload.parse().expect("payload is an index")).or_default().push(g);
        }
        by
    };
    let first = count(before.got());
    let second = count(after.as_ref().map(|c| c.got()).unwrap_or_default());
    let missing: Vec<usize> = (0..TOTAL).filter(|i| !first.contains_key(i) && !second.contains_key(i)).collect();
    let twice: Vec<usize> = (0..TOTAL)
        .filter(|i| first.get(i).is_some_and(|v| v.len() > 1) || second.get(i).is_some_and(|v| v.len() > 1))
        .collect();
    let again = (0..TOTAL).filter(|i| first.contains_key(i) && second.contains_key(i)).count();
    let sent = &sent;
    let early: Vec<(usize, i64)> = first
        .iter()
        .chain(second.iter())
        .flat_map(|(i, v)| v.iter().map(move |g| (*i, g.at_ms)))
        .filter(|(i, at)| *at < sent[*i].sent_ms + (*i as i64 % 8 + 1) * 1000)
        .collect();
    let late = first
        .iter()
        .chain(second.iter())
        .flat_map(|(i, v)| v.iter().map(move |g| g.at_ms - (sent[*i].acked_ms + (*i as i64 % 8 + 1) * 1000)))
        .max()
        .unwrap_or(0);
    println!(
        "{before_kill} of {TOTAL} delivered before the kill; forwarding taken over {took_over_ms} ms after it; \
         at most {late} ms late; {again} delivered again after the subscriber came back"
    );
    assert!(
        before_kill > 0 && before_kill < TOTAL,
        "the kill was not mid-way: {before_kill} of {TOTAL} delivered before"
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged delayed messages never delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(twice.is_empty(), "delivered twice on one connection: {twice:?}");
    assert!(early.is_empty(), "delivered before due: {early:?}");
    drop(before);
    drop(after);
    drop(survivor);
    drop(a);

    // The core topic, read once the processes are gone: every message once.
    let gw = core.start(&extra).await;
    let mut stored: Vec<usize> =
        stored_payloads(&gw, &parent).await.iter().map(|p| p.parse().expect("payload is an index")).collect();
    stored.sort_unstable();
    let dups: Vec<usize> = stored.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
    assert!(dups.is_empty(), "written to the topic twice: {dups:?}");
    assert_eq!(stored, (0..TOTAL).collect::<Vec<_>>(), "every delayed message written to its topic once");
    drop(gw);
}
