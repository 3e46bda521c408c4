//! Two gateways on one cluster (Kafka, RocketMQ): one forwards, both take delayed messages.

use super::*;
use crate::hostile::{unique, OPEN_AUTH};
use std::collections::HashMap;

/// Messages published on each gateway.
const EACH: usize = 100;

fn holders(a: &Gateway, b: &Gateway) -> i64 {
    a.ctx.metrics.delay.holder.get() + b.ctx.metrics.delay.holder.get()
}

/// Two gateways on one cluster: exactly one holds the forwarding lease (the sum of
/// `lmq_delay_forwarder` is 1 and stays 1, never 2), and only that one writes delayed
/// messages to their topics. 100 delayed messages (1–3 s) published on each reach a
/// subscriber on each gateway exactly once, none early, 99 % at most 1 s late (from the PUBACK
/// time plus the delay).
pub async fn two_gateways_one_forwarder_and_delayed_messages_from_either_arrive_once(core: &Core) {
    let _turn = serial().await;
    let extra = isolated(&format!("{OPEN_AUTH}{DELAY}"));
    let (a, b) = (core.start(&extra).await, core.start(&extra).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    while holders(&a, &b) != 1 {
        assert!(holders(&a, &b) <= 1, "both gateways forward delayed messages");
        assert!(Instant::now() < deadline, "neither gateway took up forwarding delayed messages");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It stays one (beats go on, the other does not claim).
    for _ in 0..100 {
        assert_eq!(holders(&a, &b), 1, "the forwarding gateways: one, then {}", holders(&a, &b));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let a_holds = a.ctx.metrics.delay.holder.get() == 1;
    let (holder, other) = if a_holds { (&a, &b) } else { (&b, &a) };
    let forwarded = |g: &Gateway| g.ctx.metrics.delay.forwarded.with_label_values(&["topic"]).get();
    let (by_holder, by_other) = (forwarded(holder), forwarded(other));

    let parent = unique("delaycluster");
    let filter = format!("{parent}/#");
    let sub_a = Collector::start(a.addr(), &unique("cluster-sub-a"), true, 0, &[&filter]).await;
    let sub_b = Collector::start(b.addr(), &unique("cluster-sub-b"), true, 0, &[&filter]).await;
    let msgs: Vec<Outgoing> = (0..2 * EACH)
        .map(|i| Outgoing {
            topic: format!("$delayed/{}/{parent}/{}", i % 3 + 1, if i < EACH { "a" } else { "b" }),
            payload: i.to_string(),
            user_properties: vec![],
            start_after_ms: None,
        })
        .collect();
    let (id_a, id_b) = (unique("cluster-pub-a"), unique("cluster-pub-b"));
    let (sa, sb) =
        tokio::join!(publish_all(a.addr(), &id_a, &msgs[..EACH], 50), publish_all(b.addr(), &id_b, &msgs[EACH..], 50));
    let sent: Vec<Sent> = sa.into_iter().chain(sb).collect();
    assert!(sent.iter().all(|s| s.code == 0 && s.acked_ms > 0), "every delayed PUBLISH acknowledged with success");

    for sub in [&sub_a, &sub_b] {
        sub.wait_for(2 * EACH, Duration::from_secs(15)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, sub) in [("a", &sub_a), ("b", &sub_b)] {
        let mut by: HashMap<usize, Vec<i64>> = HashMap::new();
        for g in sub.got() {
            by.entry(g.payload.parse().expect("payload is an index")).or_default().push(g.at_ms);
        }
        let missing: Vec<usize> = (0..2 * EACH).filter(|i| !by.contains_key(i)).collect();
        let twice: Vec<usize> = by.iter().filter(|(_, v)| v.len() > 1).map(|(i, _)| *i).collect();
        assert!(missing.is_empty(), "subscriber on {name}: never delivered {missing:?}");
        assert!(twice.is_empty(), "subscriber on {name}: delivered twice {twice:?}");
        let mut late = Vec::new();
        for (i, at) in by.iter().map(|(i, v)| (*i, v[0])) {
            let delay = (i as i64 % 3 + 1) * 1000;
            assert!(
                at >= sent[i].sent_ms + delay,
                "subscriber on {name}: #{i} {} ms early",
                sent[i].sent_ms + delay - at
            );
            late.push(at - (sent[i].acked_ms + delay));
        }
        let p99 = quantile(&mut late, 0.99);
        println!("subscriber on {name}: lateness p99 {p99} ms, max {} ms", quantile(&mut late, 1.0));
        assert!(p99 <= 1000, "subscriber on {name}: p99 lateness {p99} ms");
    }
    assert_eq!(holders(&a, &b), 1, "forwarding gateways at the end");
    assert!(forwarded(holder) - by_holder >= 2 * EACH as u64, "the holder wrote the delayed messages to their topics");
    assert_eq!(forwarded(other), by_other, "the other gateway wrote delayed messages to their topics");
    drop((a, b));
}
