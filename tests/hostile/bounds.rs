//! A subscriber that stops reading (SPEC §8): its output is bounded, it is disconnected once
//! its output stayed backed up for `mqtt.write_stall_timeout_secs`, nobody else waits for it,
//! and since its QoS 1 messages stay in the core service its persistent session gets every
//! one of them when it comes back.

use super::*;
use bytes::BytesMut;
use lmq_gateway::limits::Refusal;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::AsyncReadExt;

const STALL: Duration = Duration::from_secs(2);
/// Deliveries pause at 64 KiB of output; up to 1000 QoS 1 messages may be in flight, so what
/// the subscriber leaves unread backs up in the gateway and not only in the socket buffers.
const CONFIG: &str = "mqtt:\n  max_output_buffer_bytes: 65536\n  write_stall_timeout_secs: 2\n  max_inflight: 1000\n";
/// 600 messages of 16 KiB: more than the socket buffers of both sides (the kernel lets the
/// gateway's grow to 4 MiB) and the 64 KiB output buffer together.
const FILL: u32 = 600;
const FILL_PAYLOAD: usize = 16 * 1024;
const BATCH: u32 = 20;

/// Message `i`: its index in the first 8 bytes, padded to `size`.
fn payload(i: u32, size: usize) -> Vec<u8> {
    let mut p = format!("{i:08}").into_bytes();
    p.resize(size.max(8), b'.');
    p
}

fn index(payload: &[u8]) -> Option<u32> {
    std::str::from_utf8(payload.get(..8)?).ok()?.parse().ok()
}

fn connect_v5(id: &str, clean: bool) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol: Protocol::V5,
        clean_start: clean,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: p::ConnectProperties { session_expiry_interval: Some(3600), ..Default::default() },
    }))
}

/// The CONNACK's session-present flag; it must come within [`crate::common::WAIT`].
async fn connack(raw: &mut Raw) -> bool {
    let packet = tokio::time::timeout(crate::common::WAIT, async {
        loop {
            if let Ok(Some(packet)) = p::decode(&mut raw.buf, Protocol::V5, 1 << 20) {
                return Some(packet);
            }
            match raw.stream.read_buf(&mut raw.buf).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no CONNACK within {:?}", crate::common::WAIT));
    match packet {
        Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS => a.session_present,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A subscriber that reads and acknowledges everything, recording when each message came.
fn reading_subscriber(mut raw: Raw) -> (Arc<Mutex<HashMap<u32, Instant>>>, tokio::task::JoinHandle<()>) {
    let arrived = Arc::new(Mutex::new(HashMap::new()));
    let seen = arrived.clone();
    let task = tokio::spawn(async move {
        loop {
            while let Ok(Some(packet)) = p::decode(&mut raw.buf, Protocol::V5, 1 << 20) {
                if let Packet::Publish(m) = packet {
                    if let Some(i) = index(&m.payload) {
                        seen.lock().expect("lock").entry(i).or_insert_with(Instant::now);
                    }
                    if let Some(id) = m.packet_id {
                        raw.send(&Packet::PubAck(p::PubResponse::new(id))).await;
                    }
                }
            }
            match raw.stream.read_buf(&mut raw.buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    });
    (arrived, task)
}

/// What the client that stopped reading finds in its socket once it reads again: the
/// messages that were waiting, then how the connection ended.
struct Drained {
    publishes: usize,
    last: Option<Packet>,
    closed: bool,
}

async fn drain(mut raw: Raw) -> Drained {
    let mut drained = Drained { publishes: 0, last: None, closed: false };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Ok(Some(packet)) = p::decode(&mut raw.buf, Protocol::V5, 1 << 20) {
            if matches!(packet, Packet::Publish(_)) {
                drained.publishes += 1;
            }
            drained.last = Some(packet);
        }
        match tokio::time::timeout_at(deadline, raw.stream.read_buf(&mut raw.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => {
                drained.closed = true;
                return drained;
            }
            Err(_) => return drained,
        }
    }
}

/// Publish messages `from..from + n` (QoS 1, `size` bytes) in one write; returns how long
/// the acknowledgements took and when each came.
async fn publish_batch(
    publisher: &mut Raw,
    topic: &str,
    from: u32,
    n: u32,
    size: usize,
) -> (Duration, Vec<(u32, Instant)>) {
    // Packet id = index + 1: the test publishes far fewer than 65,535 messages.
    let mut bytes = BytesMut::new();
    for i in from..from + n {
        let id = u16::try_from(i + 1).expect("packet id");
        p::encode(
            &crate::common::publish_packet(id, topic, QoS::AtLeastOnce, &payload(i, size)),
            Protocol::V5,
            &mut bytes,
        )
        .expect("encode");
    }
    let sent = Instant::now();
    publisher.send_bytes(&bytes).await;
    let mut acked = Vec::new();
    for _ in 0..n {
        match publisher.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(a.code, ReasonCode::SUCCESS, "PUBACK");
                acked.push((u32::from(a.packet_id.get()) - 1, Instant::now()));
            }
            other => panic!("the publisher expected PUBACK, got {other:?}"),
        }
    }
    (sent.elapsed(), acked)
}

/// A real subscriber (MQTT 5, persistent session, QoS 1) stops reading while a publisher
/// sends more than every buffer holds. It is disconnected (DISCONNECT 0x97) once its output
/// stayed backed up for the stall timeout; the publisher's acknowledgements and another
/// subscriber's deliveries keep coming meanwhile; and when it reconnects to its session it
/// receives every message it had not acknowledged, which is all of them.
pub async fn a_subscriber_that_stops_reading_is_disconnected_and_gets_every_message_back(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{CONFIG}")).await;
    let addr = gw.addr();
    let topic = format!("{}/data", unique("slow"));
    let slow_id = unique("slow-reader");

    // The slow client, with a small receive buffer so that what it leaves unread waits in
    // the gateway.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(8 * 1024).expect("SO_RCVBUF");
    let stream = sock.connect(addr).await.expect("connect");
    let mut slow = Raw { stream, buf: BytesMut::new(), protocol: Protocol::V5 };
    slow.send(&connect_v5(&slow_id, true)).await;
    connack(&mut slow).await;
    assert_eq!(slow.suback_code(1, &topic).await, 0x01);

    let mut normal = Raw::connect(addr, Protocol::V5).await;
    normal.send(&connect_v5(&unique("normal"), true)).await;
    connack(&mut normal).await;
    assert_eq!(normal.suback_code(1, &topic).await, 0x01);
    let (arrived, normal_task) = reading_subscriber(normal);

    // Watches for the disconnect (counted the moment the gateway gives up on the client),
    // then reads what the slow client was sent.
    let disconnected = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (ctx, disconnected) = (gw.ctx.clone(), disconnected.clone());
        tokio::spawn(async move {
            while ctx.limits.refused(Refusal::SlowReader) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let at = Instant::now();
            disconnected.store(true, Ordering::Relaxed);
            (at, drain(slow).await)
        })
    };

    // The publisher: the fill at full speed (pipelined in batches), then one small message
    // every 50 ms until the slow client is gone, then a few more.
    let mut publisher = Raw::connect(addr, Protocol::V5).await;
    publisher.send(&connect_v5(&unique("publisher"), true)).await;
    connack(&mut publisher).await;
    let mut acked_at: HashMap<u32, Instant> = HashMap::new();
    let mut worst_ack = Duration::ZERO;
    let mut next = 0u32;
    let first = Instant::now();
    while next < FILL {
        let (took, acked) = publish_batch(&mut publisher, &topic, next, BATCH, FILL_PAYLOAD).await;
        next += BATCH;
        worst_ack = worst_ack.max(took);
        acked_at.extend(acked);
    }
    let filled = Instant::now();
    let mut after = 0;
    while after < 5 {
        assert!(filled.elapsed() < STALL + Duration::from_secs(5), "the slow client was never disconnected");
        if disconnected.load(Ordering::Relaxed) {
            after += 1;
        }
        let (took, acked) = publish_batch(&mut publisher, &topic, next, 1, 1024).await;
        next += 1;
        worst_ack = worst_ack.max(took);
        acked_at.extend(acked);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = next;
    let (at, drained) = watcher.await.expect("watcher");

    // Disconnected after the stall timeout, not before (its output cannot have backed up
    // before the first message), and soon after the fill.
    assert!(at - first >= STALL, "disconnected {:?} after the first message", at - first);
    assert!(at <= filled + STALL + Duration::from_millis(1500), "disconnected {:?} after the fill", at - filled);
    assert!(drained.closed, "the connection stayed open");
    assert!(
        matches!(&drained.last, Some(Packet::Disconnect(d)) if d.code == ReasonCode::QUOTA_EXCEEDED),
        "the last packet (after {} PUBLISHes) is not DISCONNECT 0x97: {:?}",
        drained.publishes,
        drained.last
    );

    // Nobody else waited: each acknowledgement and each delivery to the other subscriber came
    // promptly, the whole time.
    assert!(worst_ack < Duration::from_secs(1), "the publisher waited {worst_ack:?} for a batch");
    let deadline = Instant::now() + crate::common::WAIT;
    while arrived.lock().expect("lock").len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let worst_delivery = {
        let arrived = arrived.lock().expect("lock");
        let missing: Vec<u32> = (0..total).filter(|i| !arrived.contains_key(i)).take(10).collect();
        assert!(missing.is_empty(), "the reading subscriber is missing e.g. {missing:?} of {total}");
        acked_at.iter().map(|(i, t)| arrived[i].saturating_duration_since(*t)).max().unwrap_or_default()
    };
    assert!(worst_delivery < Duration::from_secs(1), "a delivery to the reading subscriber took {worst_delivery:?}");
    normal_task.abort();

    // Back to its session: every message, none of which it had acknowledged.
    let mut slow = Raw::connect(addr, Protocol::V5).await;
    slow.send(&connect_v5(&slow_id, false)).await;
    assert!(connack(&mut slow).await, "the slow client's session is still there");
    let (got, task) = reading_subscriber(slow);
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.lock().expect("lock").len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let got: BTreeSet<u32> = got.lock().expect("lock").keys().copied().collect();
    let missing: Vec<u32> = (0..total).filter(|i| !got.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{} of {total} messages never reached the returning session, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    drop(gw);
}
