//! Transports end to end: TLS (rumqttc and raw rustls clients, mTLS, reload), MQTT over
//! WebSocket and WSS (tokio-tungstenite client with the gateway's codec), the console page,
//! PROXY protocol v1/v2, the gateway-wide connection limit, and idle handshakes that must
//! not hold up anyone else. Certificates are made at test time with rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use common::*;
use lmq_gateway::config::ListenerConfig;
use lmq_gateway::protocol::{self, Packet, Protocol, ReasonCode};
use lmq_gateway::transport::Acceptor;

// ---------- certificates ----------

struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A certificate for 127.0.0.1 / localhost usable by servers and clients.
    fn issue(&self, cn: &str, expired: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    other_ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap(), ca: Ca::new("lmq test CA"), other_ca: Ca::new("other CA") };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki.install_server(&pki.ca.issue("gateway-1", false));
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn install_server(&self, leaf: &Leaf) {
        // Write-then-rename, as a deploy tool would, so a reload never sees half a file.
        for (name, body) in [("server.pem", &leaf.cert_pem), ("server.key", &leaf.key_pem)] {
            let tmp = self.path(&format!("{name}.tmp"));
            std::fs::write(&tmp, body).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }
    }

    /// YAML `tls:` block for a listener.
    fn tls_yaml(&self, client_ca: bool, require: bool) -> String {
        let mut y = format!(
            "    tls:\n      cert: {}\n      key: {}\n      reload_interval_secs: 1\n",
            self.path("server.pem").display(),
            self.path("server.key").display()
        );
        if client_ca {
            y.push_str(&format!("      client_ca: {}\n", self.path("ca.pem").display()));
        }
        if require {
            y.push_str("      require_client_cert: true\n");
        }
        y
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(trust: &Ca, client: Option<&Leaf>, alpn: &[u8]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(trust.der()).unwrap();
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut c = match client {
        Some(l) => b
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key_der.clone())),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![alpn.to_vec()];
    c
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(WAIT, TlsConnector::from(Arc::new(cfg)).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Send CONNECT on any stream; true if a successful CONNACK comes back, false if the
/// connection is closed or fails first.
async fn mqtt_connects<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, id: &str) -> bool {
    let mut b = BytesMut::new();
    protocol::encode(&connect_packet(id, Protocol::V311, true), Protocol::V311, &mut b).unwrap();
    if s.write_all(&b).await.is_err() || s.flush().await.is_err() {
        return false;
    }
    let mut inbuf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some(p)) = protocol::decode(&mut inbuf, Protocol::V311, 1 << 20) {
            return matches!(p, Packet::ConnAck(a) if a.code == ReasonCode::SUCCESS);
        }
        match tokio::time::timeout_at(deadline, s.read_buf(&mut inbuf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            Ok(Ok(_)) => {}
            Err(_) => panic!("neither CONNACK nor close within {WAIT:?}"),
        }
    }
}

fn rumqttc_tls(addr: SocketAddr, id: &str, cfg: ClientConfig) -> v4::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg))));
    o
}

fn listener(name: &str, transport: &str, rest: &str) -> String {
    format!("  - name: {name}\n    bind: 127.0.0.1:0\n    transport: {transport}\n{rest}")
}

// ---------- TLS ----------

#[tokio::test]
async fn tls_clients_exchange_messages_with_tcp_clients() {
    let pki = Pki::new();
    let gw = TestGateway::start_with_listeners(&listener("tls", "tls", &pki.tls_yaml(false, false)), "").await;
    let tls = gw.listener("tls");

    let mut tls_sub = v4::connect_with(rumqttc_tls(tls, "tls-sub", client_config(&pki.ca, None, b"mqtt"))).await;
    tls_sub.subscribe("tls/#", v4::QoS::AtLeastOnce).await;
    let mut tcp = v4::connect(gw.addr, "tcp-pub").await;
    tcp.publish("tls/down", v4::QoS::AtLeastOnce, false, b"to the TLS client").await;
    let p = tls_sub.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("tls/down", &b"to the TLS client"[..]));

    let mut tcp_sub = v4::connect(gw.addr, "tcp-sub").await;
    tcp_sub.subscribe("up/#", v4::QoS::AtLeastOnce).await;
    let mut tls_pub = v4::connect_with(rumqttc_tls(tls, "tls-pub", client_config(&pki.ca, None, b"mqtt"))).await;
    tls_pub.publish("up/x", v4::QoS::AtLeastOnce, false, b"from TLS").await;
    assert_eq!(&tcp_sub.next_publish().await.payload[..], b"from TLS");

    // TLS 1.2 is offered too, and the negotiated ALPN is mqtt.
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.der()).unwrap();
    let mut v12 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    v12.alpn_protocols = vec![b"mqtt".to_vec()];
    let s = tls_connect(tls, v12).await.expect("TLS 1.2 handshake");
    assert_eq!(s.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"mqtt"[..]));
    assert!(mqtt_connects(s, "tls12").await);
}

#[tokio::test]
async fn tls_refuses_wrong_ca_and_plain_tcp_and_keeps_serving() {
    let pki = Pki::new();
    let gw = TestGateway::start_with_listeners(&listener("tls", "tls", &pki.tls_yaml(false, false)), "").await;
    let tls = gw.listener("tls");

    // A client that trusts another CA refuses the gateway's certificate.
    let err = tls_connect(tls, client_config(&pki.other_ca, None, b"mqtt")).await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer") || err.to_string().contains("invalid peer certificate"), "{err}");

    // Plain MQTT on the TLS port: no CONNACK, the connection is closed.
    let mut raw = Raw::connect(tls, Protocol::V311).await;
    raw.send(&connect_packet("plain-on-tls", Protocol::V311, true)).await;
    let seen = tokio::time::timeout(WAIT, raw.until_closed()).await.expect("closed promptly");
    assert!(seen.is_empty(), "{seen:?}");

    // The gateway keeps serving TLS and TCP clients.
    let s = tls_connect(tls, client_config(&pki.ca, None, b"mqtt")).await.expect("handshake");
    assert!(mqtt_connects(s, "after-bad-ones").await);
    let c = v4::connect(gw.addr, "tcp-still").await;
    c.disconnect().await;
}

#[tokio::test]
async fn mtls_accepts_valid_client_certificates_and_refuses_others() {
    let pki = Pki::new();
    let gw = TestGateway::start_with_listeners(&listener("mtls", "tls", &pki.tls_yaml(true, true)), "").await;
    let addr = gw.listener("mtls");

    let good = pki.ca.issue("GID_dev@@@device-1", false);
    let s = tls_connect(addr, client_config(&pki.ca, Some(&good), b"mqtt")).await.expect("handshake");
    assert!(mqtt_connects(s, "GID_dev@@@device-1").await, "valid client certificate accepted");
    let mut c =
        v4::connect_with(rumqttc_tls(addr, "GID_dev@@@device-1b", client_config(&pki.ca, Some(&good), b"mqtt"))).await;
    c.subscribe("m/#", v4::QoS::AtMostOnce).await;

    let refused = [
        ("no certificate", None),
        ("other CA", Some(pki.other_ca.issue("GID_dev@@@intruder", false))),
        ("expired", Some(pki.ca.issue("GID_dev@@@old", true))),
    ];
    for (why, leaf) in &refused {
        // With TLS 1.3 the client may finish its side before the server refuses; either
        // way no CONNACK ever arrives.
        let ok = match tls_connect(addr, client_config(&pki.ca, leaf.as_ref(), b"mqtt")).await {
            Ok(s) => mqtt_connects(s, "GID_dev@@@refused").await,
            Err(_) => false,
        };
        assert!(!ok, "{why}: must be refused");
    }
    // Still serving the good client.
    let s = tls_connect(addr, client_config(&pki.ca, Some(&good), b"mqtt")).await.expect("handshake");
    assert!(mqtt_connects(s, "GID_dev@@@device-1c").await);
}

#[tokio::test]
async fn client_certificate_cn_is_the_connection_identity() {
    let pki = Pki::new();
    let yaml =
        format!("name: m\nbind: 127.0.0.1:0\ntransport: tls\n{}", pki.tls_yaml(true, false).replace("\n    ", "\n"));
    let yaml = yaml.replacen("    tls:", "tls:", 1);
    let cfg: ListenerConfig = serde_yaml_ng::from_str(&yaml).unwrap();
    let acceptor = Arc::new(Acceptor::new(&cfg, 1 << 20).unwrap());
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let serve = {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut cns = Vec::new();
            for _ in 0..2 {
                let (tcp, peer) = sock.accept().await.unwrap();
                let (_stream, info) = acceptor.accept(tcp, peer).await.unwrap();
                assert_eq!(info.peer, peer);
                cns.push(info.tls_cn);
            }
            cns
        })
    };
    let leaf = pki.ca.issue("GID_dev@@@cn-42", false);
    let _a = tls_connect(addr, client_config(&pki.ca, Some(&leaf), b"mqtt")).await.unwrap();
    let _b = tls_connect(addr, client_config(&pki.ca, None, b"mqtt")).await.unwrap();
    let cns = tokio::time::timeout(WAIT, serve).await.unwrap().unwrap();
    assert_eq!(cns, vec![Some("GID_dev@@@cn-42".to_string()), None]);
}

#[tokio::test]
async fn replaced_certificate_files_are_used_for_new_connections() {
    let pki = Pki::new();
    let gw = TestGateway::start_with_listeners(&listener("tls", "tls", &pki.tls_yaml(false, false)), "").await;
    let addr = gw.listener("tls");
    let served_cert = |s: &tokio_rustls::client::TlsStream<TcpStream>| {
        s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap()
    };
    let first = tls_connect(addr, client_config(&pki.ca, None, b"mqtt")).await.unwrap();
    let old = served_cert(&first);

    let renewed = pki.ca.issue("gateway-2", false);
    pki.install_server(&renewed);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = tls_connect(addr, client_config(&pki.ca, None, b"mqtt")).await.unwrap();
        let now = served_cert(&s);
        if now == renewed.der.to_vec() {
            assert!(mqtt_connects(s, "after-reload").await);
            break;
        }
        assert_eq!(now, old, "only the old or the new certificate may be served");
        assert!(Instant::now() < deadline, "new certificate not picked up within 5 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection made before the reload still works.
    assert!(mqtt_connects(first, "before-reload").await);

    // A broken file keeps the current certificate.
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = tls_connect(addr, client_config(&pki.ca, None, b"mqtt")).await.expect("still serving");
    assert_eq!(served_cert(&s), renewed.der.to_vec());
}

// ---------- self-signed TLS ----------

/// Accepts whatever certificate the server presents and keeps it: the first contact of a
/// client that will trust that one certificate from then on.
#[derive(Debug)]
struct TakeAnyCertificate {
    seen: parking_lot::Mutex<Option<CertificateDer<'static>>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for TakeAnyCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock() = Some(end_entity.clone().into_owned());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The certificate a TLS server at `addr` presents.
async fn presented_certificate(addr: SocketAddr) -> CertificateDer<'static> {
    let verifier = Arc::new(TakeAnyCertificate {
        seen: parking_lot::Mutex::new(None),
        algorithms: provider().signature_verification_algorithms,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"mqtt".to_vec()];
    drop(tls_connect(addr, cfg).await.expect("handshake"));
    let cert = verifier.seen.lock().take();
    cert.expect("the server presented a certificate")
}

/// A client that trusts exactly `cert`, nothing else.
fn trusting_only(cert: &CertificateDer<'static>) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"mqtt".to_vec()];
    c
}

/// `openssl x509 -fingerprint -sha256` style: upper-case hex pairs joined by colons.
fn sha256_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

#[tokio::test]
async fn self_signed_listener_serves_a_certificate_clients_can_pin() {
    let tls = "    tls:\n      self_signed: true\n      self_signed_names: [mqtt.example.test]\n";
    let gw = TestGateway::start_with_listeners(&listener("tls", "tls", tls), "").await;
    let addr = gw.listener("tls");

    // The certificate on the wire is the one whose fingerprint the gateway reports.
    let cert = presented_certificate(addr).await;
    let reported = gw.gateway().tls_fingerprint("tls").expect("a TLS listener has a fingerprint");
    assert_eq!(reported, sha256_fingerprint(&cert));
    assert_eq!(reported.len(), 32 * 3 - 1, "{reported}");
    assert_eq!(gw.gateway().tls_fingerprint("tcp"), None);
    assert_eq!(presented_certificate(addr).await, cert, "the same certificate for every client");

    // rumqttc trusting only that certificate exchanges messages (server name 127.0.0.1).
    let mut sub = v4::connect_with(rumqttc_tls(addr, "pinned-sub", trusting_only(&cert))).await;
    sub.subscribe("pinned/#", v4::QoS::AtLeastOnce).await;
    let mut tcp = v4::connect(gw.addr, "tcp-pub").await;
    tcp.publish("pinned/a", v4::QoS::AtLeastOnce, false, b"over self-signed TLS").await;
    assert_eq!(&sub.next_publish().await.payload[..], b"over self-signed TLS");

    // The certificate is valid for localhost and the extra name too, not for other names.
    for name in ["localhost", "mqtt.example.test"] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let server = ServerName::try_from(name.to_string()).unwrap();
        let s = TlsConnector::from(Arc::new(trusting_only(&cert))).connect(server, tcp).await;
        let id = format!("by-{}", name.replace('.', "-"));
        assert!(mqtt_connects(s.unwrap_or_else(|e| panic!("{name}: {e}")), &id).await, "{name}");
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let other = ServerName::try_from("elsewhere.example.test".to_string()).unwrap();
    let err = TlsConnector::from(Arc::new(trusting_only(&cert))).connect(other, tcp).await.unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // Another gateway makes another certificate: a client pinned to this one refuses it.
    let gw2 = TestGateway::start_with_listeners(&listener("tls", "tls", tls), "").await;
    assert_ne!(gw2.gateway().tls_fingerprint("tls"), Some(reported));
    assert!(tls_connect(gw2.listener("tls"), trusting_only(&cert)).await.is_err());
}

// ---------- WebSocket ----------

struct WsClient<S> {
    ws: tokio_tungstenite::WebSocketStream<S>,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    async fn send_frames(&mut self, frames: Vec<Vec<u8>>) {
        for f in frames {
            self.ws.send(Message::Binary(f.into())).await.unwrap();
        }
    }
    async fn recv(&mut self) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(p)) = protocol::decode(&mut self.buf, Protocol::V311, 1 << 20) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await.expect("packet within timeout") {
                Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }
}

fn encode(p: &Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    protocol::encode(p, Protocol::V311, &mut b).unwrap();
    b.to_vec()
}

fn ws_request(
    addr: SocketAddr,
    scheme: &str,
    path: &str,
    proto: Option<&str>,
    origin: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("{scheme}://{addr}{path}").into_client_request().unwrap();
    if let Some(p) = proto {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", HeaderValue::from_str(o).unwrap());
    }
    req
}

async fn ws_open(
    addr: SocketAddr,
    path: &str,
    proto: Option<&str>,
    origin: Option<&str>,
) -> Result<(WsClient<TcpStream>, Option<String>), String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(ws_request(addr, "ws", path, proto, origin), tcp).await.map_err(
        |e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => format!("HTTP {}", r.status().as_u16()),
            e => e.to_string(),
        },
    )?;
    let chosen = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(String::from);
    Ok((WsClient { ws, buf: BytesMut::new() }, chosen))
}

fn publish(topic: &str, qos: protocol::QoS, id: u16, payload: &[u8]) -> Packet {
    Packet::Publish(protocol::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: std::num::NonZeroU16::new(id),
        payload: bytes::Bytes::copy_from_slice(payload),
        properties: Default::default(),
    })
}

fn subscribe(filter: &str, id: u16) -> Packet {
    Packet::Subscribe(protocol::Subscribe {
        packet_id: std::num::NonZeroU16::new(id).unwrap(),
        filters: vec![(
            filter.into(),
            protocol::SubscriptionOptions { qos: protocol::QoS::AtLeastOnce, ..Default::default() },
        )],
        properties: Default::default(),
    })
}

#[tokio::test]
async fn websocket_carries_mqtt_split_across_and_packed_into_frames() {
    let gw = TestGateway::start_with_listeners(&listener("ws", "ws", ""), "").await;
    let addr = gw.listener("ws");
    let (mut c, chosen) = ws_open(addr, "/mqtt", Some("mqtt"), None).await.expect("upgrade");
    assert_eq!(chosen.as_deref(), Some("mqtt"));

    // CONNECT split across two WebSocket messages.
    let connect = encode(&connect_packet("ws-client", Protocol::V311, true));
    let (a, b) = connect.split_at(5);
    c.send_frames(vec![a.to_vec(), b.to_vec()]).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));

    // SUBSCRIBE and a QoS 1 PUBLISH to the same topic packed into one message.
    let mut packed = encode(&subscribe("ws/#", 1));
    packed.extend(encode(&publish("ws/echo", protocol::QoS::AtLeastOnce, 2, b"packed")));
    c.send_frames(vec![packed]).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(c.recv().await.expect("packet"));
    }
    assert!(got.iter().any(|p| matches!(p, Packet::SubAck(_))), "{got:?}");
    assert!(got.iter().any(|p| matches!(p, Packet::PubAck(_))), "{got:?}");
    assert!(got.iter().any(|p| matches!(p, Packet::Publish(p) if p.topic == "ws/echo" && &p.payload[..] == b"packed")));

    // A TCP client's message reaches the WebSocket client.
    let mut tcp = v4::connect(gw.addr, "tcp-pub").await;
    tcp.publish("ws/from-tcp", v4::QoS::AtLeastOnce, false, b"hi ws").await;
    loop {
        match c.recv().await.expect("delivery") {
            Packet::Publish(p) if p.topic == "ws/from-tcp" => {
                assert_eq!(&p.payload[..], b"hi ws");
                break;
            }
            _ => {}
        }
    }

    // The older subprotocol name is answered with itself.
    let (_, chosen) = ws_open(addr, "/mqtt", Some("mqttv3.1"), None).await.expect("upgrade");
    assert_eq!(chosen.as_deref(), Some("mqttv3.1"));
}

#[tokio::test]
async fn websocket_refuses_wrong_path_subprotocol_origin_and_text_frames() {
    let gw = TestGateway::start_with_listeners(
        &listener("ws", "ws", "    ws_path: /mqtt\n    allowed_origins: [\"https://app.example.com\"]\n"),
        "",
    )
    .await;
    let addr = gw.listener("ws");
    assert_eq!(ws_open(addr, "/other", Some("mqtt"), None).await.err().as_deref(), Some("HTTP 404"));
    let app = Some("https://app.example.com");
    assert_eq!(ws_open(addr, "/mqtt", Some("xmpp"), app).await.err().as_deref(), Some("HTTP 400"));
    assert_eq!(ws_open(addr, "/mqtt", None, app).await.err().as_deref(), Some("HTTP 400"));
    assert_eq!(
        ws_open(addr, "/mqtt", Some("mqtt"), Some("https://evil.example.net")).await.err().as_deref(),
        Some("HTTP 403")
    );
    // No Origin at all is refused too while an allow-list is set.
    assert_eq!(ws_open(addr, "/mqtt", Some("mqtt"), None).await.err().as_deref(), Some("HTTP 403"));
    let (mut ok, _) =
        ws_open(addr, "/mqtt", Some("mqtt"), Some("https://app.example.com")).await.expect("allowed origin");
    ok.send_frames(vec![encode(&connect_packet("ws-origin", Protocol::V311, true))]).await;
    assert!(matches!(ok.recv().await, Some(Packet::ConnAck(_))));

    // Text frames are a protocol error [MQTT-6.0.0-1]: the connection is closed.
    ok.ws.send(Message::Text("hello".into())).await.unwrap();
    assert!(ok.recv().await.is_none(), "connection must close after a text frame");
}

#[tokio::test]
async fn wss_uses_the_tls_config_and_console_is_served() {
    let pki = Pki::new();
    let gw = TestGateway::start_with_listeners(
        &format!("{}{}", listener("wss", "wss", &pki.tls_yaml(false, false)), listener("ws", "ws", "")),
        "",
    )
    .await;
    let wss = gw.listener("wss");
    let tls = tls_connect(wss, client_config(&pki.ca, None, b"http/1.1")).await.expect("TLS");
    let (ws, resp) = tokio_tungstenite::client_async(ws_request(wss, "wss", "/mqtt", Some("mqtt"), None), tls)
        .await
        .expect("upgrade over TLS");
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "mqtt");
    let mut c = WsClient { ws, buf: BytesMut::new() };
    c.send_frames(vec![encode(&connect_packet("wss-client", Protocol::V311, true))]).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));

    // The console and its script, on plain HTTP and over TLS.
    let http = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut s = TcpStream::connect(gw.listener("ws")).await.unwrap();
    s.write_all(http("/console").as_bytes()).await.unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("text/html") && page.contains("/console/mqtt.min.js"), "{page}");

    let mut s = tls_connect(wss, client_config(&pki.ca, None, b"http/1.1")).await.unwrap();
    s.write_all(http("/console/mqtt.min.js").as_bytes()).await.unwrap();
    let mut js = Vec::new();
    let _ = s.read_to_end(&mut js).await;
    let shipped = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("web/mqtt.min.js")).unwrap();
    assert!(js.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(js.ends_with(&shipped), "the whole MQTT.js bundle is served");

    let mut s = TcpStream::connect(gw.listener("ws")).await.unwrap();
    s.write_all(http("/etc/passwd").as_bytes()).await.unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
}

// ---------- PROXY protocol ----------

async fn connect_with_prefix(addr: SocketAddr, prefix: &[u8], id: &str) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    let ok = mqtt_connects(&mut s, id).await;
    if ok {
        let _ = s.write_all(&encode(&Packet::Disconnect(Default::default()))).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
    }
    ok
}

#[tokio::test]
async fn proxy_protocol_headers_give_the_real_client_ip() {
    let gw = TestGateway::start_with_listeners(&listener("lb", "tcp", "    proxy_protocol: true\n"), "").await;
    let addr = gw.listener("lb");
    assert!(connect_with_prefix(addr, b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 1883\r\n", "GID_pp@@@v1").await);
    let v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        ("198.51.100.9:4242".parse::<SocketAddr>().unwrap(), "10.0.0.1:1883".parse::<SocketAddr>().unwrap()),
    )
    .build()
    .unwrap();
    assert!(connect_with_prefix(addr, &v2, "GID_pp@@@v2").await);
    assert!(connect_with_prefix(addr, b"PROXY TCP6 2001:db8::5 2001:db8::1 4000 1883\r\n", "GID_pp@@@v6").await);

    // Malformed or missing headers close the connection without CONNACK.
    assert!(!connect_with_prefix(addr, b"PROXY TCP4 300.1.1.1 10.0.0.1 1 2\r\n", "GID_pp@@@bad").await);
    assert!(!connect_with_prefix(addr, b"", "GID_pp@@@none").await);

    let deadline = Instant::now() + WAIT;
    let ip_of = |events: &[(String, serde_json::Value)], id: &str| {
        events.iter().find(|(t, b)| t == "connect" && b["clientId"] == id).map(|(_, b)| b["clientIp"].clone())
    };
    loop {
        let events = gw.status_events().await;
        if let (Some(a), Some(b), Some(c)) =
            (ip_of(&events, "GID_pp@@@v1"), ip_of(&events, "GID_pp@@@v2"), ip_of(&events, "GID_pp@@@v6"))
        {
            assert_eq!(a, "203.0.113.7");
            assert_eq!(b, "198.51.100.9");
            assert_eq!(c, "2001:db8::5");
            assert!(ip_of(&events, "GID_pp@@@bad").is_none() && ip_of(&events, "GID_pp@@@none").is_none());
            break;
        }
        assert!(Instant::now() < deadline, "connect events missing: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn proxy_protocol_headers_are_believed_only_from_trusted_networks() {
    // The only trusted network is not where the test connects from: a client cannot pass
    // itself off as another address by sending a PROXY header of its own.
    let lb = listener("lb", "tcp", "    proxy_protocol: true\n    proxy_trusted_networks: [10.0.0.0/8]\n");
    let gw = TestGateway::start_with_listeners(&lb, "").await;
    let addr = gw.listener("lb");
    assert!(!connect_with_prefix(addr, b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 1883\r\n", "GID_pp@@@spoof").await);
    // The same header is believed from a trusted address (loopback by default).
    let gw = TestGateway::start_with_listeners(&listener("lb", "tcp", "    proxy_protocol: true\n"), "").await;
    assert!(
        connect_with_prefix(gw.listener("lb"), b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 1883\r\n", "GID_pp@@@ok").await
    );
}

// ---------- limits and slow handshakes ----------

#[tokio::test]
async fn idle_handshakes_do_not_delay_other_clients() {
    let pki = Pki::new();
    let gw = TestGateway::start_with_listeners(
        &format!("{}{}", listener("tls", "tls", &pki.tls_yaml(false, false)), listener("ws", "ws", "")),
        "",
    )
    .await;
    let (tls, ws) = (gw.listener("tls"), gw.listener("ws"));
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(tls).await.unwrap());
        idle.push(TcpStream::connect(ws).await.unwrap());
    }
    let mut sub = v4::connect(gw.addr, "watcher").await;
    sub.subscribe("slow/#", v4::QoS::AtLeastOnce).await;

    let started = Instant::now();
    let mut c = v4::connect_with(rumqttc_tls(tls, "busy-tls", client_config(&pki.ca, None, b"mqtt"))).await;
    c.publish("slow/tls", v4::QoS::AtLeastOnce, false, b"through").await;
    let (mut w, _) = ws_open(ws, "/mqtt", Some("mqtt"), None).await.expect("upgrade");
    w.send_frames(vec![
        encode(&connect_packet("busy-ws", Protocol::V311, true)),
        encode(&publish("slow/ws", protocol::QoS::AtLeastOnce, 1, b"through")),
    ])
    .await;
    assert!(matches!(w.recv().await, Some(Packet::ConnAck(_))));
    assert!(matches!(w.recv().await, Some(Packet::PubAck(_))));
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?} with 1000 idle handshakes");
    let got = [sub.next_publish().await.topic, sub.next_publish().await.topic];
    assert!(got.contains(&"slow/tls".to_string()) && got.contains(&"slow/ws".to_string()), "{got:?}");
    drop(idle);
}

#[tokio::test]
async fn handshake_timeout_closes_silent_connections() {
    let gw = TestGateway::start_with_listeners(&listener("ws", "ws", "    handshake_timeout_secs: 1\n"), "").await;
    let mut s = TcpStream::connect(gw.listener("ws")).await.unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut sink)).await.expect("closed").unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", started.elapsed());
}

#[tokio::test]
async fn gateway_wide_connection_limit_holds_extra_clients_back() {
    let gw = TestGateway::start_with_listeners(&listener("ws", "ws", ""), "max_connections_total: 2\n").await;
    let a = v4::connect(gw.addr, "limit-a").await;
    let (mut b, _) = ws_open(gw.listener("ws"), "/mqtt", Some("mqtt"), None).await.expect("upgrade");
    b.send_frames(vec![encode(&connect_packet("limit-b", Protocol::V311, true))]).await;
    assert!(matches!(b.recv().await, Some(Packet::ConnAck(_))));

    // The third waits in the backlog ...
    let third = tokio::spawn(async move {
        let mut raw = Raw::connect(gw.addr, Protocol::V311).await;
        raw.send(&connect_packet("limit-c", Protocol::V311, true)).await;
        let ack = raw.recv().await;
        (ack, gw)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.is_finished(), "a third connection was served above max_connections_total");
    // ... until one of the two leaves.
    a.disconnect().await;
    let (ack, _gw) = tokio::time::timeout(WAIT, third).await.expect("served after a slot freed").unwrap();
    assert!(matches!(ack, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
}

#[tokio::test]
async fn client_certificate_cn_authenticates_when_enabled() {
    let pki = Pki::new();
    let auth = "auth:\n  tls_client_cn_identity: true\n  allow_plain_client_ids: true\n  certificate_acl:\n    publish: [\"dev/#\"]\n    subscribe: [\"dev/#\"]\n";
    let gw = TestGateway::start_with_listeners(&listener("tls", "tls", &pki.tls_yaml(true, false)), auth).await;
    let addr = gw.listener("tls");
    let leaf = pki.ca.issue("GID_dev@@@cert-1", false);
    // ClientId = CN, no user name: accepted.
    let s = tls_connect(addr, client_config(&pki.ca, Some(&leaf), b"mqtt")).await.unwrap();
    assert!(mqtt_connects(s, "GID_dev@@@cert-1").await);
    // Another ClientId with the same certificate: refused.
    let s = tls_connect(addr, client_config(&pki.ca, Some(&leaf), b"mqtt")).await.unwrap();
    assert!(!mqtt_connects(s, "GID_dev@@@cert-2").await);
    // No certificate and no user name: refused (anonymous access is off).
    let s = tls_connect(addr, client_config(&pki.ca, None, b"mqtt")).await.unwrap();
    assert!(!mqtt_connects(s, "GID_dev@@@cert-1").await);
}
