//! Per-publisher order (MQTT 4.6): in the core service's log and at the subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{connect_packet, Raw, TestGateway};
use lmq_gateway::backend::TopicPartition;
use lmq_gateway::protocol::{self as p, Packet, Protocol, PubResponse, QoS};
use std::num::NonZeroU16;

async fn connected(gw: &TestGateway, id: &str) -> Raw {
    let mut raw = Raw::connect(gw.addr, Protocol::V311).await;
    raw.send(&connect_packet(id, Protocol::V311, true)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    raw
}

#[tokio::test]
async fn one_publisher_in_order_in_the_log_and_at_the_subscriber() {
    let gw = TestGateway::start().await;
    let mut sub = connected(&gw, "ord-sub").await;
    sub.send(&Packet::Subscribe(p::Subscribe {
        packet_id: NonZeroU16::new(1).unwrap(),
        filters: vec![("ord/#".into(), p::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() })],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let mut publ = connected(&gw, "ord-pub").await;
    let n: u32 = 5000;
    let window = 64u32;
    let mut acked = 0u32;
    for i in 0..n {
        publ.send(&Packet::Publish(p::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "ord/x".into(),
            packet_id: NonZeroU16::new((i % 65000 + 1) as u16),
            payload: Bytes::from(i.to_be_bytes().to_vec()),
            properties: Default::default(),
        }))
        .await;
        while i + 1 - acked >= window {
            match publ.recv().await {
                Some(Packet::PubAck(_)) => acked += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    while acked < n {
        assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
        acked += 1;
    }
    // The log: all records of this publisher are in one partition, in publish order.
    let backend = gw.gateway().ctx.backend.clone();
    let mut seen = Vec::new();
    for part in 0..backend.partitions("ord").unwrap() {
        let tp = TopicPartition::new("ord", part);
        let mut from = 0;
        loop {
            let f = backend.fetch(&tp, from, 1000).await.unwrap();
            if f.records.is_empty() {
                break;
            }
            for r in &f.records {
                seen.push((part, u32::from_be_bytes(r.record.value[..4].try_into().unwrap())));
            }
            from = f.next_offset;
        }
    }
    let parts: std::collections::HashSet<u32> = seen.iter().map(|(p, _)| *p).collect();
    assert_eq!(parts.len(), 1, "one key, one partition");
    let order: Vec<u32> = seen.iter().map(|(_, v)| *v).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>(), "log order = publish order");
    // The subscriber: same order.
    for i in 0..n {
        match sub.recv().await {
            Some(Packet::Publish(m)) => {
                assert_eq!(u32::from_be_bytes(m.payload[..4].try_into().unwrap()), i);
                sub.send(&Packet::PubAck(PubResponse::new(m.packet_id.unwrap()))).await;
            }
            other => panic!("{other:?}"),
        }
    }
}
