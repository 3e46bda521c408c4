//! Shared harness for integration tests: a real gateway on port 0 over a temp data dir,
//! real MQTT clients (rumqttc v4 and v5), and a raw-socket client for byte-level checks.
#![allow(dead_code, unused_imports)]

use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use lmq_gateway::config::Config;
use lmq_gateway::gateway::Gateway;
use lmq_gateway::protocol::{self, Packet, Protocol, PubResponse, QoS as WireQoS};

pub mod process;
pub use process::{free_addr, GatewayProcess};

pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestGateway {
    pub gw: Option<Gateway>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    listeners: String,
    extra: String,
}

/// Tests that are not about authentication connect anonymously with any ClientId; a test
/// that passes its own `auth:` section gets exactly that.
const OPEN_AUTH: &str = "auth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\n";

/// `listeners`: more listener entries (YAML list items, indented by two spaces) after the
/// first one, `tcp` on 127.0.0.1:0.
fn config(dir: &std::path::Path, listeners: &str, extra: &str) -> Config {
    let auth = if extra.lines().any(|l| l.starts_with("auth:")) { "" } else { OPEN_AUTH };
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{listeners}core:\n  embedded:\n    data_dir: {}\n{auth}{extra}",
        dir.display()
    );
    Config::from_yaml(&yaml).expect("test config")
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with("").await
    }

    /// `extra`: more top-level YAML (not `listeners` / `core`).
    pub async fn start_with(extra: &str) -> TestGateway {
        Self::start_with_listeners("", extra).await
    }

    /// `listeners`: YAML list items for listeners after the default `tcp` one, e.g.
    /// `"  - name: ws\n    bind: 127.0.0.1:0\n    transport: ws\n"`; `extra` as in
    /// [`TestGateway::start_with`]. Find their ports with [`TestGateway::listener`].
    pub async fn start_with_listeners(listeners: &str, extra: &str) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = Gateway::start(config(dir.path(), listeners, extra)).await.expect("gateway starts");
        let addr = gw.addr();
        TestGateway { gw: Some(gw), dir, addr, listeners: listeners.to_string(), extra: extra.to_string() }
    }

    /// Bound address of the listener named `name`.
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.gateway().addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a).expect("listener exists")
    }

    /// Status events (`connect` / `disconnect` / `tcpclean`) written so far, as (type, body).
    pub async fn status_events(&self) -> Vec<(String, serde_json::Value)> {
        use lmq_gateway::backend::TopicPartition;
        let backend = self.gateway().ctx.backend.clone();
        let mut all = Vec::new();
        for partition in 0..4 {
            let tp = TopicPartition::new("GID_LMQ_STATUS", partition);
            let Ok(fetched) = backend.fetch(&tp, 0, 10_000).await else { continue };
            for r in fetched.records {
                let t = r.record.header("eventType").map(|v| String::from_utf8_lossy(v).into_owned());
                let body = serde_json::from_slice(&r.record.value).unwrap_or(serde_json::Value::Null);
                all.push((t.unwrap_or_default(), body));
            }
        }
        all
    }

    /// Graceful stop, then start again on the same data directory (new port).
    pub async fn restart(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown().await;
        }
        let gw = Gateway::start(config(self.dir.path(), &self.listeners, &self.extra)).await.expect("gateway restarts");
        self.addr = gw.addr();
        self.gw = Some(gw);
    }

    pub fn gateway(&self) -> &Gateway {
        self.gw.as_ref().expect("running")
    }

    /// A gateway with the admin API on 127.0.0.1:0 and token [`ADMIN_TOKEN`]; `extra` as in
    /// [`TestGateway::start_with`].
    pub async fn start_admin(extra: &str) -> TestGateway {
        Self::start_with(&format!("{extra}{ADMIN_YAML}")).await
    }

    /// `http://<admin address>` (the gateway was started with the admin API).
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.gateway().admin_addr().expect("admin API enabled"))
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let r = http()
            .get(format!("{}/metrics", self.admin_url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(r.status(), 200);
        r.text().await.expect("metrics body")
    }

    /// Sum of the samples of metric `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics_text().await, name, labels)
    }

    /// Wait (at most [`WAIT`]) until `metric(name, labels)` satisfies `ok`; returns the value.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.metric(name, labels).await;
            if ok(v) {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{name}{labels:?} stayed at {v}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub const ADMIN_TOKEN: &str = "test-admin-token";
const ADMIN_YAML: &str = "admin:\n  enabled: true\n  bind: 127.0.0.1:0\n  token: test-admin-token\n";

/// An HTTP client for the admin API.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(WAIT).build().expect("http client")
}

/// Sum of the samples of `name` in Prometheus text `text` whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(&str, &str)> =
            label_text.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k, v.trim_matches('"'))).collect();
        if labels.iter().all(|l| have.contains(l)) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// rumqttc v4 (MQTT 3.1.1) client whose events are forwarded to a channel.
pub mod v4 {
    use super::*;
    pub use rumqttc::{AsyncClient, Event, Incoming, LastWill, MqttOptions, Packet, Publish, QoS};

    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
        task: tokio::task::JoinHandle<()>,
    }

    pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    pub async fn connect(addr: SocketAddr, id: &str) -> Client {
        connect_with(options(addr, id)).await
    }

    /// Connect; `None` when the server refuses the CONNECT or closes the connection.
    pub async fn try_connect(addr: SocketAddr, id: &str) -> Option<Client> {
        let (client, mut eventloop) = AsyncClient::new(options(addr, id), 1000);
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::ConnAck(a)))) if a.code == rumqttc::ConnectReturnCode::Success => {}
            _ => return None,
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let e = eventloop.poll().await.map_err(|e| e.to_string());
                let end = e.is_err();
                if tx.send(e).is_err() || end {
                    return;
                }
            }
        });
        Some(Client { client, events: rx, task })
    }

    /// Connect and wait for CONNACK. The event loop stops at the first error (no reconnect).
    pub async fn connect_with(opts: MqttOptions) -> Client {
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(e) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut c = Client { client, events: rx, task };
        c.wait_for(|e| matches!(e, Event::Incoming(Incoming::ConnAck(_)))).await;
        c
    }

    impl Client {
        /// Wait for an event matching `f`; panics on timeout or connection error.
        pub async fn wait_for(&mut self, f: impl Fn(&Event) -> bool) -> Event {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(e))) if f(&e) => return e,
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => panic!("connection error while waiting: {e}"),
                    Ok(None) => panic!("event loop ended"),
                    Err(_) => panic!("timed out waiting for event"),
                }
            }
        }

        pub async fn suback(&mut self) -> rumqttc::SubAck {
            match self.wait_for(|e| matches!(e, Event::Incoming(Incoming::SubAck(_)))).await {
                Event::Incoming(Incoming::SubAck(s)) => s,
                _ => unreachable!(),
            }
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> rumqttc::SubAck {
            self.client.subscribe(filter, qos).await.expect("subscribe queued");
            self.suback().await
        }

        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client.publish(topic, qos, retain, payload.to_vec()).await.expect("publish queued");
            match qos {
                QoS::AtMostOnce => {
                    self.wait_for(|e| matches!(e, Event::Outgoing(rumqttc::Outgoing::Publish(_)))).await;
                }
                QoS::AtLeastOnce => {
                    self.wait_for(|e| matches!(e, Event::Incoming(Incoming::PubAck(_)))).await;
                }
                QoS::ExactlyOnce => {
                    self.wait_for(|e| matches!(e, Event::Incoming(Incoming::PubComp(_)))).await;
                }
            }
        }

        pub async fn next_publish(&mut self) -> Publish {
            match self.wait_for(|e| matches!(e, Event::Incoming(Incoming::Publish(_)))).await {
                Event::Incoming(Incoming::Publish(p)) => p,
                _ => unreachable!(),
            }
        }

        /// No PUBLISH arrives within `d`.
        pub async fn no_publish(&mut self, d: Duration) -> bool {
            let deadline = tokio::time::Instant::now() + d;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(Event::Incoming(Incoming::Publish(p))))) => {
                        panic!("unexpected publish on {}: {:?}", p.topic, p.payload)
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_))) | Ok(None) => return true,
                    Err(_) => return true,
                }
            }
        }

        pub async fn disconnect(mut self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(WAIT, async {
                while let Some(e) = self.events.recv().await {
                    if e.is_err() {
                        break;
                    }
                }
            })
            .await;
            self.task.abort();
        }

        /// Wait until the server closes the connection; panics if it stays open.
        pub async fn closed_by_server(&mut self) {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Err(_))) | Ok(None) => return,
                    Ok(Some(Ok(_))) => {}
                    Err(_) => panic!("connection was not closed"),
                }
            }
        }

        /// Drop the TCP connection without DISCONNECT.
        pub fn kill(self) {
            self.task.abort();
        }
    }
}

/// rumqttc v5 client.
pub mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties, SubscribeProperties};
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    pub struct Client {
        pub client: AsyncClient,
        pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
        task: tokio::task::JoinHandle<()>,
    }

    pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    pub async fn connect(addr: SocketAddr, id: &str) -> Client {
        connect_with(options(addr, id)).await.0
    }

    pub async fn connect_with(opts: MqttOptions) -> (Client, rumqttc::v5::mqttbytes::v5::ConnAck) {
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(e) => {
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:?}")));
                        return;
                    }
                }
            }
        });
        let mut c = Client { client, events: rx, task };
        let ack = match c.wait_for(|e| matches!(e, Event::Incoming(Packet::ConnAck(_)))).await {
            Event::Incoming(Packet::ConnAck(a)) => a,
            _ => unreachable!(),
        };
        (c, ack)
    }

    impl Client {
        pub async fn wait_for(&mut self, f: impl Fn(&Event) -> bool) -> Event {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                match tokio::time::timeout_at(deadline, self.events.recv()).await {
                    Ok(Some(Ok(e))) if f(&e) => return e,
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => panic!("connection error while waiting: {e}"),
                    Ok(None) => panic!("event loop ended"),
                    Err(_) => panic!("timed out waiting for event"),
                }
            }
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> rumqttc::v5::mqttbytes::v5::SubAck {
            self.client.subscribe(filter, qos).await.expect("subscribe queued");
            self.suback().await
        }

        pub async fn suback(&mut self) -> rumqttc::v5::mqttbytes::v5::SubAck {
            match self.wait_for(|e| matches!(e, Event::Incoming(Packet::SubAck(_)))).await {
                Event::Incoming(Packet::SubAck(s)) => s,
                _ => unreachable!(),
            }
        }

        pub async fn next_publish(&mut self) -> Publish {
            match self.wait_for(|e| matches!(e, Event::Incoming(Packet::Publish(_)))).await {
                Event::Incoming(Packet::Publish(p)) => p,
                _ => unreachable!(),
            }
        }

        pub async fn disconnect(mut self) {
            let _ = self.client.disconnect().await;
            let _ = tokio::time::timeout(WAIT, async {
                while let Some(e) = self.events.recv().await {
                    if e.is_err() {
                        break;
                    }
                }
            })
            .await;
            self.task.abort();
        }

        pub fn kill(self) {
            self.task.abort();
        }
    }
}

/// A client that speaks raw bytes through the gateway's own codec, for exact checks.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub protocol: Protocol,
}

impl Raw {
    pub async fn connect(addr: SocketAddr, protocol: Protocol) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Raw { stream, buf: BytesMut::new(), protocol }
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut b = BytesMut::new();
        protocol::encode(p, self.protocol, &mut b).expect("encode");
        self.stream.write_all(&b).await.expect("write");
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.stream.write_all(b).await;
    }

    /// Next packet, or None when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(p)) = protocol::decode(&mut self.buf, self.protocol, 1 << 20) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => panic!("timed out waiting for a packet"),
            }
        }
    }

    /// Read until the server closes; returns the packets seen before.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }
}

pub fn connect_packet(id: &str, protocol: Protocol, clean: bool) -> Packet {
    Packet::Connect(Box::new(protocol::Connect {
        protocol,
        clean_start: clean,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }))
}

/// How [`publish_pipelined`] sends: `window` messages in flight at most, and at most `rate`
/// messages per second when set.
#[derive(Clone, Copy)]
pub struct Pace {
    pub window: usize,
    pub rate: Option<f64>,
}

pub const FULL_SPEED: Pace = Pace { window: 200, rate: None };

/// A QoS 1 publisher over a raw socket: sends payloads `next..total` and records every
/// acknowledged one in `acked` (counted in `progress` too); returns the next index to send
/// when the connection ends (or `total`).
#[allow(clippy::too_many_arguments)]
pub async fn publish_pipelined(
    addr: SocketAddr,
    client_id: &str,
    topic: &str,
    mut next: u32,
    total: u32,
    pace: Pace,
    acked: &mut BTreeSet<u32>,
    progress: &AtomicUsize,
) -> u32 {
    const IDLE: Duration = Duration::from_secs(20);
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return next };
    let mut out = BytesMut::new();
    let _ = protocol::encode(&connect_packet(client_id, Protocol::V311, true), Protocol::V311, &mut out);
    if s.write_all(&out).await.is_err() {
        return next;
    }
    let mut buf = BytesMut::new();
    let mut inflight: HashMap<u16, u32> = HashMap::new();
    let mut pkid: u16 = 0;
    let mut connected = false;
    let started = tokio::time::Instant::now();
    let mut sent = 0u32;
    // When the next message may go out (None: now).
    let due = |sent: u32| pace.rate.map(|r| started + Duration::from_secs_f64(f64::from(sent) / r));
    loop {
        while connected && next < total && inflight.len() < pace.window {
            if due(sent).is_some_and(|d| d > tokio::time::Instant::now()) {
                break;
            }
            pkid = pkid % 60_000 + 1;
            let p = Packet::Publish(protocol::Publish {
                dup: false,
                qos: WireQoS::AtLeastOnce,
                retain: false,
                topic: topic.to_owned(),
                packet_id: NonZeroU16::new(pkid),
                payload: Bytes::from(next.to_string()),
                properties: Default::default(),
            });
            out.clear();
            let _ = protocol::encode(&p, Protocol::V311, &mut out);
            if s.write_all(&out).await.is_err() {
                return next.min(inflight.values().copied().min().unwrap_or(next));
            }
            inflight.insert(pkid, next);
            next += 1;
            sent += 1;
        }
        if connected && next >= total && inflight.is_empty() {
            return total;
        }
        loop {
            match protocol::decode(&mut buf, Protocol::V311, 1 << 20) {
                Ok(Some(Packet::ConnAck(_))) => connected = true,
                Ok(Some(Packet::PubAck(PubResponse { packet_id, .. }))) => {
                    if let Some(n) = inflight.remove(&packet_id.get()) {
                        acked.insert(n);
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return next,
            }
        }
        if connected && next >= total && inflight.is_empty() {
            return total;
        }
        let may_send = connected && next < total && inflight.len() < pace.window;
        let until = match due(sent) {
            Some(d) if may_send => d,
            None if may_send => continue,
            _ => tokio::time::Instant::now() + IDLE,
        };
        let paced = may_send && until < tokio::time::Instant::now() + IDLE;
        match tokio::time::timeout_at(until, s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Err(_) if paced => {}
            _ => {
                // Connection gone: resend from the lowest unacknowledged message.
                return inflight.values().copied().min().unwrap_or(next);
            }
        }
    }
}

/// Raw client: CONNECT as `id` (with user name and password if given, and a QoS 1 will on
/// `will_topic`), and the CONNACK code as the client sees it (MQTT 5 reason code, or the
/// 3.1.1 return code).
pub async fn raw_connect(
    addr: SocketAddr,
    id: &str,
    protocol: Protocol,
    login: Option<(String, String)>,
    will_topic: Option<&str>,
) -> (Raw, u8) {
    let mut raw = Raw::connect(addr, protocol).await;
    let (username, password) = login.map_or((None, None), |(u, p)| (Some(u), Some(bytes::Bytes::from(p))));
    raw.send(&Packet::Connect(Box::new(protocol::Connect {
        protocol,
        clean_start: true,
        keep_alive: 30,
        client_id: id.into(),
        will: will_topic.map(|t| protocol::LastWill {
            topic: t.into(),
            payload: bytes::Bytes::from_static(b"bye"),
            qos: protocol::QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        }),
        username,
        password,
        properties: Default::default(),
    })))
    .await;
    let code = match raw.recv().await {
        Some(Packet::ConnAck(a)) if protocol == Protocol::V5 => a.code.0,
        Some(Packet::ConnAck(a)) => a.code.to_v3_connack(),
        other => panic!("expected CONNACK, got {other:?}"),
    };
    (raw, code)
}

pub fn subscribe_packet(pid: u16, filter: &str) -> Packet {
    Packet::Subscribe(protocol::Subscribe {
        packet_id: std::num::NonZeroU16::new(pid).expect("packet id"),
        filters: vec![(
            filter.into(),
            protocol::SubscriptionOptions { qos: protocol::QoS::AtLeastOnce, ..Default::default() },
        )],
        properties: Default::default(),
    })
}

pub fn publish_packet(pid: u16, topic: &str, qos: protocol::QoS, payload: &[u8]) -> Packet {
    Packet::Publish(protocol::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: (qos != protocol::QoS::AtMostOnce).then(|| std::num::NonZeroU16::new(pid).expect("packet id")),
        payload: bytes::Bytes::copy_from_slice(payload),
        properties: Default::default(),
    })
}

impl Raw {
    /// SUBSCRIBE one filter at QoS 1; the SUBACK's code.
    pub async fn suback_code(&mut self, pid: u16, filter: &str) -> u8 {
        self.send(&subscribe_packet(pid, filter)).await;
        match self.recv().await {
            Some(Packet::SubAck(s)) if s.codes.len() == 1 => s.codes[0].0,
            other => panic!("SUBSCRIBE {filter}: expected one SUBACK code, got {other:?}"),
        }
    }
}

/// The reserved namespace as a device sees it (SPEC §8): `topic` cannot be reached over MQTT,
/// with the answers of an ACL refusal. SUBSCRIBE (exact, `topic/#`, `$share/g/topic/+`): SUBACK
/// 0x87 (5.0) / 0x80 (3.1.1). PUBLISH (to `topic` and below): 5.0 QoS 1/2 get PUBACK / PUBREC
/// 0x87 and stay connected, 5.0 QoS 0 gets DISCONNECT 0x87; 3.1.1 is closed without PUBACK. A
/// will on it is refused at CONNECT (0x87 / 5). Payloads start with `device-bytes`.
/// `login(client_id)` gives the user name and password to connect with.
pub async fn assert_topic_unreachable(addr: SocketAddr, topic: &str, login: impl Fn(&str) -> Option<(String, String)>) {
    use protocol::{QoS, ReasonCode};
    let connect = |id: String, protocol: Protocol| {
        let login = login(&id);
        async move {
            let (raw, code) = raw_connect(addr, &id, protocol, login, None).await;
            assert_eq!(code, 0, "{id} connects");
            raw
        }
    };
    // ClientIds of their own: checks running at once on one broker must not take each
    // other's connections over.
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let probe = PROBES.fetch_add(1, Ordering::Relaxed);
    let filters = [topic.to_string(), format!("{topic}/#"), format!("$share/g/{topic}/+")];
    let mut c5 = connect(format!("probe5-{topic}-{probe}"), Protocol::V5).await;
    for (n, f) in filters.iter().enumerate() {
        assert_eq!(c5.suback_code(1 + n as u16, f).await, 0x87, "5.0 SUBSCRIBE {f}");
    }
    for (pid, qos) in [(10, QoS::AtLeastOnce), (11, QoS::ExactlyOnce)] {
        for t in [topic.to_string(), format!("{topic}/x")] {
            c5.send(&publish_packet(pid, &t, qos, b"device-bytes-5")).await;
            match c5.recv().await {
                Some(Packet::PubAck(a)) if qos == QoS::AtLeastOnce => {
                    assert_eq!(a.code, ReasonCode::NOT_AUTHORIZED, "PUBACK {t}")
                }
                Some(Packet::PubRec(a)) if qos == QoS::ExactlyOnce => {
                    assert_eq!(a.code, ReasonCode::NOT_AUTHORIZED, "PUBREC {t}")
                }
                other => panic!("5.0 PUBLISH {t} {qos:?}: {other:?}"),
            }
        }
    }
    c5.send(&publish_packet(0, topic, QoS::AtMostOnce, b"device-bytes-5-qos0")).await;
    let seen = c5.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.code == ReasonCode::NOT_AUTHORIZED),
        "5.0 QoS 0 PUBLISH {topic}: {seen:?}"
    );

    let mut c3 = connect(format!("probe3-{topic}-{probe}"), Protocol::V311).await;
    for (n, f) in filters.iter().enumerate() {
        assert_eq!(c3.suback_code(1 + n as u16, f).await, 0x80, "3.1.1 SUBSCRIBE {f}");
    }
    c3.send(&publish_packet(7, &format!("{topic}/x"), QoS::AtLeastOnce, b"device-bytes-3")).await;
    let seen = c3.until_closed().await;
    assert!(seen.is_empty(), "3.1.1 PUBLISH {topic}: no PUBACK, connection closed; got {seen:?}");

    for (protocol, code) in [(Protocol::V5, 0x87), (Protocol::V311, 5)] {
        let id = format!("will-{topic}-{probe}");
        let (_, got) = raw_connect(addr, &id, protocol, login(&id), Some(&format!("{topic}/w"))).await;
        assert_eq!(got, code, "{protocol:?} will on {topic}");
    }
}
