//! `gateway.yaml`: every option, its default, and validation.
//!
//! Structs here are plain serde data with `deny_unknown_fields`, so a misspelt key is refused
//! with a message naming it. Defaults are functions so that the shipped `gateway.yaml`, the
//! docs and the code cannot drift apart silently: `check-config` prints the effective values.
//! This module must not start anything.

pub mod auth;
pub mod reserved;

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

use self::reserved::ReservedTopics;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this gateway instance in events and logs; default: host name + port.
    #[serde(default)]
    pub gateway_id: Option<String>,
    /// Which ClientIds and topic names clients may use: `lmq` or `mqtt` (see [`Naming`]).
    #[serde(default)]
    pub naming: Naming,
    /// Network listeners.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    /// Connections all listeners together serve at once (handshakes included); beyond it new
    /// clients wait in the kernel backlog, like a full listener's.
    #[serde(default = "default_max_connections_total")]
    pub max_connections_total: usize,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub topics: TopicsConfig,
    #[serde(default)]
    pub core: CoreConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Authentication and authorisation: access keys, tokens, anonymous access (see `config::auth`).
    #[serde(default)]
    pub auth: auth::AuthConfig,
    /// Admin HTTP API: metrics, health, clients, tokens, credentials, messages.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Message trace (`crate::trace`): off by default.
    #[serde(default)]
    pub trace: TraceConfig,
    /// Backlog and delay metrics (`lmq_backlog_*`), computed while the admin API is enabled.
    #[serde(default)]
    pub backlog: BacklogConfig,
    /// Delayed messages (`crate::delay`): `$delayed/<seconds>/<topic>`, `__STARTDELIVERTIME`.
    #[serde(default)]
    pub delay: DelayConfig,
}

/// Delayed messages: the delay-level topics and the forwarders that move them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DelayConfig {
    /// Take part in moving delayed messages (one gateway at a time does, see `delay::lease`).
    /// Off: this gateway still accepts delayed messages; others deliver them.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A gateway that has not seen the forwarding gateway's lease renewed for this long takes
    /// over, milliseconds (renewed every fifth of it).
    #[serde(default = "default_delay_lease_ms")]
    pub lease_ms: u64,
    /// Retention of the delay topics when the gateway creates them on a core service with
    /// retention per topic (Kafka: `retention.ms`), hours. The longest hold of a level is half
    /// of it (the other half is the outage the pending messages survive).
    #[serde(default = "default_delay_retention_hours")]
    pub retention_hours: u64,
    /// Partitions of each delay level (forwarded in parallel; records are spread by key).
    #[serde(default = "default_delay_partitions")]
    pub partitions: u32,
    /// Ready records a level's forwarder moves at once (and the most it holds in memory).
    #[serde(default = "default_delay_batch")]
    pub batch: usize,
    /// Longest wait for one core-service operation of a forwarder, seconds.
    #[serde(default = "default_delay_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_delay_lease_ms() -> u64 {
    10_000
}
fn default_delay_retention_hours() -> u64 {
    // 40 days of the longest delay's top-level holds plus 5 days.
    1080
}
fn default_delay_partitions() -> u32 {
    4
}
fn default_delay_batch() -> usize {
    256
}
fn default_delay_timeout_secs() -> u64 {
    10
}

impl Default for DelayConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

/// Message trace: events of sampled messages in an internal core topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TraceConfig {
    /// Write trace events for the messages this gateway handles.
    #[serde(default)]
    pub enabled: bool,
    /// Share of messages traced, 0.0 to 1.0 (chosen from the message ID, the same on every
    /// gateway).
    #[serde(default = "default_trace_sample_rate")]
    pub sample_rate: f64,
    /// Parent topics whose messages are traced; empty: all.
    #[serde(default)]
    pub parents: Vec<String>,
    /// The internal core topic of the events (reserved like the events topic).
    #[serde(default = "default_trace_topic")]
    pub topic: String,
    /// Partitions of the trace topic when the gateway creates it.
    #[serde(default = "default_trace_partitions")]
    pub partitions: u32,
    /// How long the trace topic keeps events, where the core service sets retention per topic
    /// and the gateway creates the topic (Kafka: `retention.ms`); elsewhere the service's own.
    #[serde(default = "default_trace_retention_hours")]
    pub retention_hours: u64,
}

impl TraceConfig {
    /// `retention_hours` in milliseconds.
    pub fn retention_ms(&self) -> u64 {
        self.retention_hours.saturating_mul(3_600_000)
    }
}

fn default_trace_retention_hours() -> u64 {
    72
}

fn default_trace_sample_rate() -> f64 {
    1.0
}
fn default_trace_topic() -> String {
    "lmq-trace".into()
}
fn default_trace_partitions() -> u32 {
    4
}

impl Default for TraceConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

impl Default for Config {
    fn default() -> Self {
        // An empty document yields every default.
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Plain MQTT over TCP.
    Tcp,
    /// MQTT over TLS (needs `tls`); ALPN `mqtt`.
    Tls,
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt` / `mqttv3.1`); also serves
    /// the browser console at `GET /console`.
    Ws,
    /// MQTT over WebSocket over TLS (needs `tls`); ALPN `http/1.1`.
    Wss,
}

impl Transport {
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Label used in logs and metrics.
    pub name: String,
    /// Address and port, e.g. `0.0.0.0:1883`; port 0 picks a free port.
    pub bind: SocketAddr,
    #[serde(default = "default_transport")]
    pub transport: Transport,
    /// Connections this listener accepts at once; further ones wait in the kernel backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Expect a PROXY protocol v1 or v2 header (from a load balancer) before anything else;
    /// its source address becomes the client's address. A connection without a valid header
    /// is closed. Only enable behind a proxy that always sends one.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: the source networks (CIDR) whose PROXY headers are believed,
    /// i.e. the load balancers. A connection from anywhere else is closed before its header
    /// is read, so a client cannot pass itself off as another address.
    #[serde(default = "default_proxy_trusted")]
    pub proxy_trusted_networks: Vec<ipnet::IpNet>,
    /// Seconds the PROXY header, TLS handshake and WebSocket upgrade may take together.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Certificate and key for `tls` / `wss` listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// HTTP path of the MQTT WebSocket endpoint (`ws` / `wss`).
    #[serde(default = "default_ws_path")]
    pub ws_path: String,
    /// Browser origins (`Origin` header, e.g. `https://app.example.com`) allowed to open a
    /// WebSocket; empty allows all. Requests without an `Origin` header (non-browser
    /// clients) are always allowed.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// TLS settings of a `tls` / `wss` listener. The files are re-read when they change (checked
/// every `reload_interval_secs`) and on SIGHUP; new connections get the new certificate,
/// established ones keep theirs. A file that fails to load keeps the previous one in use.
/// With `self_signed: true` the gateway makes its own certificate at start instead (kept in
/// memory, new at every start, never reloaded) and logs its SHA-256 fingerprint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (server certificate first). Overridden by `LMQ_TLS_CERT`.
    /// Required unless `self_signed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Overridden by `LMQ_TLS_KEY`. Required unless
    /// `self_signed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Make a self-signed certificate at start (for `localhost`, `127.0.0.1`, `::1`, the host
    /// name and `self_signed_names`) instead of reading `cert` / `key`; clients trust it by
    /// its fingerprint, logged at start. For trying things out: use real certificates once
    /// clients you do not control connect.
    #[serde(default)]
    pub self_signed: bool,
    /// With `self_signed`: further DNS names or IP addresses the certificate is made for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub self_signed_names: Vec<String>,
    /// PEM CA certificates that sign client certificates; enables client-certificate
    /// authentication (mTLS). The certificate's subject CN becomes the connection's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients without a valid certificate (otherwise a certificate
    /// is optional, but one that is presented must be valid).
    #[serde(default)]
    pub require_client_cert: bool,
    /// How often the certificate files are checked for changes (not with `self_signed`).
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval_secs: u64,
}

impl TlsConfig {
    /// Certificate path after the `LMQ_TLS_CERT` override (`None` only for a self-signed
    /// listener without one, which reads no file).
    pub fn cert_path(&self) -> Option<PathBuf> {
        std::env::var_os("LMQ_TLS_CERT").map(PathBuf::from).or_else(|| self.cert.clone())
    }
    /// Key path after the `LMQ_TLS_KEY` override.
    pub fn key_path(&self) -> Option<PathBuf> {
        std::env::var_os("LMQ_TLS_KEY").map(PathBuf::from).or_else(|| self.key.clone())
    }
}

fn default_transport() -> Transport {
    Transport::Tcp
}
fn default_max_connections() -> usize {
    100_000
}
fn default_max_connections_total() -> usize {
    100_000
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_ws_path() -> String {
    "/mqtt".into()
}
/// Path of the console page (served by `transport::console` on the `ws` / `wss` listeners): a
/// listener's `ws_path` must not be it or under it.
pub const CONSOLE_PAGE_PATH: &str = "/console";
fn default_tls_reload_interval() -> u64 {
    5
}
fn default_proxy_trusted() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"].iter().filter_map(|n| n.parse().ok()).collect()
}
fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        name: "tcp".into(),
        bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
        transport: Transport::Tcp,
        max_connections: default_max_connections(),
        proxy_protocol: false,
        proxy_trusted_networks: default_proxy_trusted(),
        handshake_timeout_secs: default_handshake_timeout(),
        tls: None,
        ws_path: default_ws_path(),
        allowed_origins: Vec::new(),
    }]
}

/// MQTT protocol behaviour.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Seconds a new connection has to send its CONNECT.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Largest keepalive granted; a larger (or zero) request is lowered to this (MQTT 5 Server Keep Alive).
    #[serde(default = "default_keepalive_max")]
    pub keepalive_max_secs: u16,
    /// Largest session expiry granted to MQTT 5 clients; cleanSession=false 3.1.1 sessions get this.
    #[serde(default = "default_session_expiry_max")]
    pub session_expiry_max_secs: u32,
    /// QoS 1/2 PUBLISHes a client may have unacknowledged towards us (our Receive Maximum).
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    /// QoS 1/2 messages we send a client before waiting for its acknowledgements
    /// (lowered to the client's Receive Maximum).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages waiting per connection for delivery; beyond it QoS 0 is dropped and QoS 1/2
    /// is read back from the core service once the client catches up.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Topic aliases accepted from MQTT 5 clients (Topic Alias Maximum); 0 disables.
    #[serde(default = "default_topic_alias_max")]
    pub topic_alias_max: u16,
    /// Seconds to wait for the core service to acknowledge a message before giving up on it
    /// and disconnecting the client (nothing is acknowledged to the client in that case).
    #[serde(default = "default_backend_timeout")]
    pub backend_timeout_secs: u64,
    /// Milliseconds between saves of a persistent session whose positions changed (its
    /// checkpoint). After a gateway crash a client gets again, at most, the QoS 1 messages it
    /// acknowledged within this interval; QoS 2 state is saved before PUBREC whatever this is.
    /// One state record per busy session per interval: 100,000 busy sessions write 100,000
    /// records per second at the default. 10 to 60,000.
    #[serde(default = "default_session_checkpoint_ms")]
    pub session_checkpoint_ms: u64,
    /// Whether retained messages are supported.
    #[serde(default = "default_true")]
    pub retain_available: bool,
    /// Bytes that may wait to be written to one client. Beyond it the gateway stops reading
    /// from that client (its PINGREQs, PUBLISHes … are not decoded and answered until it
    /// reads); deliveries already pause at 256 KiB or this, whichever is lower.
    #[serde(default = "default_max_output_buffer")]
    pub max_output_buffer_bytes: usize,
    /// Seconds a client may leave its output backed up (see `max_output_buffer_bytes`)
    /// without draining it; then it is disconnected (MQTT 5: DISCONNECT 0x97, counted as
    /// `slow_reader`). Its QoS 1/2 messages stay in the core service.
    #[serde(default = "default_write_stall_timeout")]
    pub write_stall_timeout_secs: u64,
    /// Retained messages sent for one SUBSCRIBE (all its filters together), and waiting to be
    /// sent per connection at any time; the first ones in topic order are sent.
    #[serde(default = "default_max_retained_per_subscribe")]
    pub max_retained_per_subscribe: usize,
    /// Seconds of silence after which a client that asked for keepalive 0 (MQTT 3.1/3.1.1;
    /// MQTT 5 clients get Server Keep Alive instead) is disconnected; 0 = never.
    #[serde(default = "default_idle_timeout_keepalive_0")]
    pub idle_timeout_secs_when_keepalive_0: u64,
    /// Acknowledgements a client may give above its oldest unacknowledged message (each one
    /// is remembered until that message is acknowledged); beyond it the client is
    /// disconnected (MQTT 5: 0x97) and gets the unacknowledged messages again when it returns.
    #[serde(default = "default_max_acked_above")]
    pub max_acked_above: usize,
    /// Milliseconds after CONNECT during which a client with a stored session may switch to
    /// LMQ's offline pull by publishing `$SYS/getOfflineMsg`: its backlog is held that long
    /// (or until it publishes anything else) before it is pushed; 0 = no offline pull (the
    /// built-in default; the shipped `gateway.yaml` sets 500). Only sessions with a backlog wait.
    #[serde(default = "default_offline_pull_window_ms")]
    pub offline_pull_window_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

fn default_connect_timeout() -> u64 {
    10
}
fn default_keepalive_max() -> u16 {
    480
}
fn default_session_expiry_max() -> u32 {
    3 * 24 * 3600
}
fn default_receive_maximum() -> u16 {
    128
}
fn default_max_inflight() -> u16 {
    64
}
fn default_queue_capacity() -> usize {
    1024
}
fn default_topic_alias_max() -> u16 {
    32
}
fn default_session_checkpoint_ms() -> u64 {
    1000
}
fn default_backend_timeout() -> u64 {
    30
}
fn default_true() -> bool {
    true
}
fn default_max_output_buffer() -> usize {
    1 << 20
}
fn default_write_stall_timeout() -> u64 {
    30
}
fn default_max_retained_per_subscribe() -> usize {
    1000
}
fn default_idle_timeout_keepalive_0() -> u64 {
    600
}
fn default_max_acked_above() -> usize {
    10_000
}
fn default_offline_pull_window_ms() -> u64 {
    0
}

/// LMQ limits (SPEC §5).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest MQTT topic name, in characters.
    #[serde(default = "default_64")]
    pub max_topic_len: usize,
    /// Longest ClientId, in characters.
    #[serde(default = "default_64")]
    pub max_client_id_len: usize,
    /// Largest PUBLISH payload, in bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Subscriptions a client may hold at once.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Retained messages this gateway holds (every gateway holds all of them): a retained
    /// PUBLISH to a topic that has none yet is refused beyond this count.
    #[serde(default = "default_max_retained_messages")]
    pub max_retained_messages: usize,
    /// Bytes of retained messages (topics + payloads) this gateway holds; a retained PUBLISH
    /// that would go beyond is refused.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: usize,
    /// Core topics this gateway creates or reads for parents accepted by `*` (declared
    /// parents do not count): a publish or subscribe needing one more is refused (0x97).
    #[serde(default = "default_max_core_topics")]
    pub max_core_topics: usize,
    /// Distinct share groups (`$share/<group>/...`) one client may subscribe with at once.
    #[serde(default = "default_max_share_groups_per_client")]
    pub max_share_groups_per_client: usize,
    /// Delayed wills (MQTT 5 Will Delay Interval) waiting at once per identity (access key,
    /// device credential or token subject); beyond it a will is published without delay.
    #[serde(default = "default_max_delayed_wills_per_identity")]
    pub max_delayed_wills_per_identity: usize,
    /// Persistent sessions one identity may hold in the sessions store; a CONNECT that would
    /// create one more is refused (0x97 / 3.1.1: server unavailable). 0 = no limit.
    #[serde(default = "default_max_sessions_per_identity")]
    pub max_sessions_per_identity: usize,
    /// Bytes of recent messages the router keeps (all partitions together) to hand to a
    /// subscriber that fell behind without reading them again from the core service.
    #[serde(default = "default_max_replay_bytes")]
    pub max_replay_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

fn default_64() -> usize {
    64
}
fn default_max_payload() -> usize {
    65_536
}
fn default_max_subscriptions() -> usize {
    30
}
fn default_max_retained_messages() -> usize {
    100_000
}
fn default_max_retained_bytes() -> usize {
    256 * 1024 * 1024
}
fn default_max_core_topics() -> usize {
    1000
}
fn default_max_share_groups_per_client() -> usize {
    10
}
fn default_max_delayed_wills_per_identity() -> usize {
    1000
}
fn default_max_sessions_per_identity() -> usize {
    100_000
}
fn default_max_replay_bytes() -> usize {
    64 * 1024 * 1024
}

/// Naming profile: which ClientIds and topic names clients may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    /// Alibaba LMQ's rules: `<GroupId>@@@<DeviceId>` ClientIds (any ClientId of letters,
    /// digits, `-`, `_`, `@` with `auth.allow_plain_client_ids`), no `$` topics, and parent
    /// topics (first levels) that are core-topic names.
    #[default]
    Lmq,
    /// Any ClientId and topic MQTT allows: any UTF-8 ClientId (an empty one with a clean
    /// start is assigned), any topic name and filter including empty levels and `$` topics
    /// other than `$SYS` (stored and retained like any other, not matched by a first-level
    /// wildcard). With `*`, a first level that cannot be a core-topic name (empty, `$…`,
    /// other characters) is stored in `topics.other_core_topic`.
    Mqtt,
}

/// Record key of a message written to the core service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKey {
    /// The publishing ClientId: per-client order (LMQ's upstream order).
    ClientId,
    /// The full MQTT topic: per-topic order.
    Topic,
    /// No key: spread over partitions.
    None,
}

/// Parent topics (SPEC §2).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Declared parent topics; `name: "*"` accepts any parent topic (development).
    #[serde(default = "default_parents")]
    pub parents: Vec<ParentTopic>,
    /// `naming: mqtt` with `*`: the core topic of every parent that cannot be a core-topic
    /// name itself (empty first level, `$…`, characters outside `[A-Za-z0-9._-]`).
    #[serde(default = "default_other_core_topic")]
    pub other_core_topic: String,
    /// The top-level `naming` (copied here when the configuration is loaded).
    #[serde(skip)]
    pub naming: Naming,
    #[serde(default = "default_record_key")]
    pub record_key: RecordKey,
    /// Core-service topic that receives client status events. Reserved: no MQTT client can
    /// publish or subscribe to it.
    #[serde(default = "default_events_topic")]
    pub events_topic: String,
    /// Core-service topics whose name starts with this (ASCII case ignored) are the
    /// gateway's own (state, and later delay and trace topics): no MQTT client can publish or
    /// subscribe to them, `*` does not map onto them, and a declared parent may not be
    /// mapped onto one. The events topic and the configured state topics are reserved by
    /// name as well (see [`Config::reserved_topics`]).
    #[serde(default = "default_reserved_prefix")]
    pub reserved_prefix: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParentTopic {
    /// First topic level, or `*`.
    pub name: String,
    /// Core-service topic; default: the parent topic's own name.
    #[serde(default)]
    pub core_topic: Option<String>,
    /// Partitions when the gateway creates the core-service topic.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
}

fn default_parents() -> Vec<ParentTopic> {
    vec![ParentTopic { name: "*".into(), core_topic: None, partitions: default_partitions() }]
}
fn default_other_core_topic() -> String {
    "mqtt-other".into()
}
fn default_record_key() -> RecordKey {
    RecordKey::ClientId
}
fn default_events_topic() -> String {
    "GID_LMQ_STATUS".into()
}
fn default_reserved_prefix() -> String {
    "lmq-".into()
}
fn default_partitions() -> u32 {
    4
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CoreKind {
    Embedded,
    Kafka,
    /// A RocketMQ cluster (classic remoting protocol), see [`RocketmqConfig`].
    Rocketmq,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoreConfig {
    /// Which core service stores messages and state.
    #[serde(default = "default_core_kind")]
    pub kind: CoreKind,
    #[serde(default)]
    pub embedded: EmbeddedConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub rocketmq: RocketmqConfig,
}

impl Default for CoreConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

fn default_core_kind() -> CoreKind {
    CoreKind::Embedded
}

/// The RocketMQ core service (`core.kind: rocketmq`): where the cluster is and how the
/// gateway's client behaves. See ARCHITECTURE.md, "RocketMQ core service".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RocketmqConfig {
    /// Name server address(es), `host:port[;host:port...]`. Overridden by `LMQ_ROCKETMQ_NAMESRV`.
    #[serde(default = "default_rmq_namesrv")]
    pub namesrv_addr: String,
    /// Producer group of the gateway's producer.
    #[serde(default = "default_rmq_producer_group")]
    pub producer_group: String,
    /// Consumer group named in the gateway's pull requests (no offsets are committed in it).
    #[serde(default = "default_rmq_consumer_group")]
    pub consumer_group: String,
    /// Time one send may take before it is retried (or fails), milliseconds.
    #[serde(default = "default_rmq_send_timeout")]
    pub send_timeout_ms: u64,
    /// Further attempts after a failed send (to the same queue, so order is kept).
    #[serde(default = "default_rmq_send_retries")]
    pub send_retries: u32,
    /// Tag of a message whose MQTT topic has no second level (otherwise the tag is the second level).
    #[serde(default = "default_rmq_default_tag")]
    pub default_tag: String,
    /// Existing topic whose brokers the gateway creates new topics on (RocketMQ's `createTopicKey`;
    /// `TBW102` needs `autoCreateTopicEnable` on the brokers, else use the cluster name).
    #[serde(default = "default_rmq_create_topic_key")]
    pub create_topic_key: String,
    /// Topic holding sessions, retained messages, credentials and revoked tokens (one queue).
    #[serde(default = "default_rmq_state_topic")]
    pub state_topic: String,
    /// State entries are rewritten once their record is this old, so the broker's file retention
    /// (`fileReservedTime`, default 72 h) never removes live state. Must stay below that retention.
    #[serde(default = "default_rmq_state_refresh_hours")]
    pub state_refresh_hours: u64,
    /// How long the broker holds a tail's pull request while a queue has nothing new (long polling).
    #[serde(default = "default_rmq_poll_suspend_ms")]
    pub poll_suspend_ms: u64,
    /// Records queued per message queue before `enqueue` waits (back-pressure).
    #[serde(default = "default_rmq_queue_capacity")]
    pub queue_capacity: usize,
    /// Worker threads of the client's own runtime.
    #[serde(default = "default_rmq_worker_threads")]
    pub client_worker_threads: usize,
    /// Blocking threads the client's runtime may use.
    #[serde(default = "default_rmq_blocking_threads")]
    pub client_blocking_threads: usize,
    /// Directory of this gateway's local copy of the state topic (a disposable cache: deleting
    /// it loses nothing; with it, a restart reads only what was written since). One directory
    /// per gateway process. Unset: a new temporary directory, removed at exit, so every start
    /// reads the state topic from its oldest record.
    #[serde(default)]
    pub state_cache_dir: Option<std::path::PathBuf>,
}

impl Default for RocketmqConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

impl RocketmqConfig {
    /// Name server address after the `LMQ_ROCKETMQ_NAMESRV` override.
    pub fn namesrv(&self) -> String {
        std::env::var("LMQ_ROCKETMQ_NAMESRV")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.namesrv_addr.clone())
    }
}

fn default_rmq_namesrv() -> String {
    "127.0.0.1:9876".into()
}
fn default_rmq_producer_group() -> String {
    "GID_LMQ_GATEWAY".into()
}
fn default_rmq_consumer_group() -> String {
    "GID_LMQ_GATEWAY_READER".into()
}
fn default_rmq_send_timeout() -> u64 {
    3000
}
fn default_rmq_send_retries() -> u32 {
    2
}
fn default_rmq_default_tag() -> String {
    "mqtt".into()
}
fn default_rmq_create_topic_key() -> String {
    "TBW102".into()
}
fn default_rmq_state_topic() -> String {
    "LMQ_GATEWAY_STATE".into()
}
fn default_rmq_state_refresh_hours() -> u64 {
    24
}
fn default_rmq_poll_suspend_ms() -> u64 {
    1000
}
fn default_rmq_queue_capacity() -> usize {
    1024
}
fn default_rmq_worker_threads() -> usize {
    2
}
fn default_rmq_blocking_threads() -> usize {
    8
}

/// When the embedded log calls fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Before acknowledging each batch of appends (group commit): survives power loss.
    Always,
    /// Every `fsync_interval_ms`; acknowledged after the write reached the OS, so a process
    /// crash loses nothing but a power loss may lose the last interval.
    Interval,
    /// Leave flushing to the OS.
    Never,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Directory holding the log segments and state files.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_fsync")]
    pub fsync: FsyncPolicy,
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval_ms: u64,
    /// Records older than this are deleted (whole segments at a time).
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// A segment file is closed and a new one started at this size.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Recent records kept in memory per partition for fast reads by lagging readers.
    #[serde(default = "default_cache_records")]
    pub cache_records: usize,
    /// Bytes of recent records kept in memory per partition (whichever of this and
    /// `cache_records` is reached first).
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_fsync() -> FsyncPolicy {
    FsyncPolicy::Always
}
fn default_fsync_interval() -> u64 {
    100
}
fn default_retention_hours() -> u64 {
    72
}
fn default_segment_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_cache_records() -> usize {
    16_384
}
fn default_cache_bytes() -> usize {
    8 * 1024 * 1024
}

/// The Kafka core service (`core.kind: kafka`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated host:port list.
    #[serde(default = "default_kafka_bootstrap")]
    pub bootstrap_servers: String,
    /// `client.id` of the gateway's producer and consumers.
    #[serde(default = "default_kafka_client_id")]
    pub client_id: String,
    /// Create missing topics (events, state, parent topics) at start; false = refuse to start
    /// (or to use a parent topic) when one is missing.
    #[serde(default = "default_true")]
    pub create_topics: bool,
    /// Replication factor of the topics the gateway creates.
    #[serde(default = "default_kafka_replication")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of the topics the gateway creates: with `acks=all`, a message is
    /// acknowledged only once this many replicas have it (unset: the brokers' default).
    #[serde(default)]
    pub min_insync_replicas: Option<i32>,
    /// Partitions of the events and state topics the gateway creates (parent topics:
    /// `topics.parents[].partitions`).
    #[serde(default = "default_kafka_partitions")]
    pub partitions: u32,
    /// Names of the compacted state topics.
    #[serde(default)]
    pub state_topics: KafkaStateTopics,
    /// Producer `linger.ms`: how long a batch waits for more records.
    #[serde(default = "default_kafka_linger")]
    pub linger_ms: u64,
    /// Producer `batch.size` in bytes.
    #[serde(default = "default_kafka_batch_size")]
    pub batch_size: u64,
    /// Producer `compression.type`: none, gzip, snappy, lz4, zstd.
    #[serde(default = "default_kafka_compression")]
    pub compression: String,
    /// Producer `message.timeout.ms`: a record not stored within this time (retries
    /// included) is reported as failed to its publisher, never acknowledged.
    #[serde(default = "default_kafka_delivery_timeout")]
    pub delivery_timeout_ms: u64,
    /// Consumer `fetch.wait.max.ms`: longest a fetch waits for new records.
    #[serde(default = "default_kafka_fetch_wait")]
    pub fetch_wait_max_ms: u64,
    /// Directory of this gateway's local copy of the sessions, retained and credentials stores (a
    /// disposable cache: deleting it loses nothing; with it, a restart reads only what changed
    /// since). One directory per gateway process. Unset: a new temporary directory, removed at
    /// exit, so every start reads those topics from the beginning.
    #[serde(default)]
    pub state_cache_dir: Option<std::path::PathBuf>,
    /// Any other librdkafka property (security, SASL, tuning), given to the producer and
    /// every consumer. A property the options above already set is refused.
    #[serde(default)]
    pub librdkafka: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

impl KafkaConfig {
    /// librdkafka properties set by the first-class options above (or fixed by the gateway).
    pub const MANAGED_PROPERTIES: [&'static str; 13] = [
        "bootstrap.servers",
        "metadata.broker.list",
        "client.id",
        "acks",
        "request.required.acks",
        "enable.idempotence",
        "linger.ms",
        "queue.buffering.max.ms",
        "batch.size",
        "compression.type",
        "message.timeout.ms",
        "fetch.wait.max.ms",
        "allow.auto.create.topics",
    ];
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaStateTopics {
    #[serde(default = "default_kafka_sessions_topic")]
    pub sessions: String,
    #[serde(default = "default_kafka_retained_topic")]
    pub retained: String,
    #[serde(default = "default_kafka_credentials_topic")]
    pub credentials: String,
    #[serde(default = "default_kafka_revoked_topic")]
    pub revoked_tokens: String,
    /// Checkpoints of the delayed-message forwarders.
    #[serde(default = "default_kafka_delay_state_topic")]
    pub delay: String,
}

fn default_kafka_delay_state_topic() -> String {
    "lmq-delay-state".into()
}

impl Default for KafkaStateTopics {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

fn default_kafka_bootstrap() -> String {
    "localhost:9092".into()
}
fn default_kafka_client_id() -> String {
    "lmq-gateway".into()
}
fn default_kafka_replication() -> i32 {
    1
}
fn default_kafka_partitions() -> u32 {
    4
}
fn default_kafka_linger() -> u64 {
    5
}
fn default_kafka_batch_size() -> u64 {
    1_000_000
}
fn default_kafka_compression() -> String {
    "lz4".into()
}
fn default_kafka_delivery_timeout() -> u64 {
    30_000
}
fn default_kafka_fetch_wait() -> u64 {
    100
}
fn default_kafka_sessions_topic() -> String {
    "lmq-sessions".into()
}
fn default_kafka_retained_topic() -> String {
    "lmq-retained".into()
}
fn default_kafka_credentials_topic() -> String {
    "lmq-credentials".into()
}
fn default_kafka_revoked_topic() -> String {
    "lmq-revoked-tokens".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// `tracing` filter, e.g. `info` or `lmq_gateway=debug`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: default_log_format(), level: default_log_level() }
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Human
}
fn default_log_level() -> String {
    "info".into()
}

/// The admin HTTP API (`admin`): `/metrics`, `/healthz`, `/readyz` and `/api/v1/...`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API.
    #[serde(default)]
    pub enabled: bool,
    /// Address and port; loopback by default so that only this host reaches it. Overridden by
    /// `LMQ_ADMIN_BIND`.
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
    /// Bearer token required by the management routes `/api/v1/...` (`Authorization: Bearer
    /// <token>`). Prefer the variable named by `token_env`, which overrides this. Without a
    /// token (an empty one counts as none) those routes answer 401; `/metrics`, `/healthz` and
    /// `/readyz` never need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<auth::Secret>,
    /// Environment variable holding the token.
    #[serde(default = "default_admin_token_env")]
    pub token_env: String,
    /// Connections the admin port holds at once; more are closed when accepted.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers (and to start the next request
    /// on a kept-alive connection) before its connection is closed.
    #[serde(default = "default_admin_header_timeout")]
    pub header_read_timeout_secs: u64,
    /// Most records one message query (`/api/v1/messages`) reads from the core service; a
    /// search that stops there returns a cursor to go on from.
    #[serde(default = "default_query_max_scan")]
    pub query_max_scan: usize,
    /// Payload bytes a query answer shows per message; longer payloads are cut (`truncated`).
    #[serde(default = "default_query_max_payload")]
    pub query_max_payload_bytes: usize,
}

fn default_query_max_scan() -> usize {
    100_000
}
fn default_query_max_payload() -> usize {
    4096
}

fn default_admin_max_connections() -> usize {
    256
}
fn default_admin_header_timeout() -> u64 {
    10
}

/// `backlog:` — how the backlog and delay metrics are computed (`session::backlog`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BacklogConfig {
    /// Seconds between two rounds of the computation.
    #[serde(default = "default_backlog_interval")]
    pub interval_secs: u64,
    /// K: the sessions with the largest backlog reported by ClientId (0: none).
    #[serde(default = "default_backlog_top_sessions")]
    pub top_sessions: usize,
    /// Sessions examined per round at most; more are spread over several rounds (the gauges
    /// change once all were examined).
    #[serde(default = "default_backlog_sessions_per_round")]
    pub max_sessions_per_round: usize,
}

fn default_backlog_interval() -> u64 {
    15
}
fn default_backlog_top_sessions() -> usize {
    10
}
fn default_backlog_sessions_per_round() -> usize {
    10_000
}

impl Default for BacklogConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").unwrap_or_else(|_| unreachable!("defaults deserialize"))
    }
}

impl AdminConfig {
    /// Bind address after the `LMQ_ADMIN_BIND` override.
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        match std::env::var("LMQ_ADMIN_BIND") {
            Ok(v) => {
                v.parse().map_err(|_| ConfigError::Invalid(format!("LMQ_ADMIN_BIND `{v}` is not an address:port")))
            }
            Err(_) => Ok(self.bind),
        }
    }

    /// The token: the `token_env` variable if set and not empty, else `token`.
    pub fn resolved_token(&self) -> Option<auth::Secret> {
        std::env::var(&self.token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .map(auth::Secret::new)
            .or_else(|| self.token.clone().filter(|t| !t.is_empty()))
    }
}

fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_token_env() -> String {
    "LMQ_ADMIN_TOKEN".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml_ng::Error },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Load and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parse from a string (tests, embedding).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Self::parse(text, Path::new("<string>"))
    }

    fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config =
            serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.set_naming(config.naming);
        config.validate()?;
        Ok(config)
    }

    /// Apply a naming profile to the sections that follow it.
    pub fn set_naming(&mut self, naming: Naming) {
        self.naming = naming;
        self.topics.naming = naming;
        self.auth.naming = naming;
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.listeners.is_empty() {
            return invalid("listeners: at least one listener is required".into());
        }
        let t = &self.trace;
        if !(0.0..=1.0).contains(&t.sample_rate) || t.partitions == 0 || t.topic.is_empty() || t.retention_hours == 0 {
            return invalid(
                "trace: sample_rate must be 0.0 to 1.0, partitions and retention_hours at least 1, topic non-empty"
                    .into(),
            );
        }
        let d = &self.delay;
        if d.lease_ms < 500
            || d.retention_hours < 2
            || d.batch == 0
            || d.batch > 10_000
            || d.timeout_secs == 0
            || !(1..=64).contains(&d.partitions)
        {
            return invalid(
                "delay: lease_ms at least 500, retention_hours at least 2, batch 1 to 10000, timeout_secs at least 1, \
                 partitions 1 to 64"
                    .into(),
            );
        }
        if !(10..=60_000).contains(&self.mqtt.session_checkpoint_ms) {
            return invalid("mqtt.session_checkpoint_ms must be 10 to 60000".into());
        }
        let max_permits = tokio::sync::Semaphore::MAX_PERMITS;
        if self.max_connections_total == 0 || self.max_connections_total > max_permits {
            return invalid(format!("max_connections_total must be between 1 and {max_permits}"));
        }
        for l in &self.listeners {
            let name = &l.name;
            if l.max_connections == 0 || l.max_connections > max_permits {
                return invalid(format!("listeners[{name}].max_connections must be between 1 and {max_permits}"));
            }
            if l.handshake_timeout_secs == 0 {
                return invalid(format!("listeners[{name}].handshake_timeout_secs must be at least 1"));
            }
            match (l.transport.is_tls(), &l.tls) {
                (true, None) => {
                    return invalid(format!(
                        "listeners[{name}]: transport {} needs a `tls` section (cert and key, or self_signed: true)",
                        l.transport.as_str()
                    ))
                }
                (false, Some(_)) => {
                    return invalid(format!(
                        "listeners[{name}]: `tls` is only for transport tls or wss, not {}",
                        l.transport.as_str()
                    ))
                }
                _ => {}
            }
            if let Some(t) = &l.tls {
                if t.self_signed {
                    if t.cert.is_some() || t.key.is_some() {
                        return invalid(format!(
                            "listeners[{name}].tls: self_signed makes its own certificate; remove cert and key \
                             (or set self_signed: false to use them)"
                        ));
                    }
                    if let Some(bad) = t.self_signed_names.iter().find(|n| !valid_certificate_name(n)) {
                        return invalid(format!(
                            "listeners[{name}].tls.self_signed_names: `{bad}` is neither a DNS name nor an IP address"
                        ));
                    }
                } else {
                    if t.cert.is_none() || t.key.is_none() {
                        return invalid(format!(
                            "listeners[{name}].tls needs cert and key (PEM files), or self_signed: true"
                        ));
                    }
                    if !t.self_signed_names.is_empty() {
                        return invalid(format!("listeners[{name}].tls.self_signed_names needs self_signed: true"));
                    }
                }
                if t.require_client_cert && t.client_ca.is_none() {
                    return invalid(format!("listeners[{name}].tls.require_client_cert needs tls.client_ca"));
                }
                if t.reload_interval_secs == 0 {
                    return invalid(format!("listeners[{name}].tls.reload_interval_secs must be at least 1"));
                }
            }
            if !l.ws_path.starts_with('/') || l.ws_path.contains(char::is_whitespace) {
                return invalid(format!("listeners[{name}].ws_path must be an absolute path like /mqtt"));
            }
            if l.ws_path == CONSOLE_PAGE_PATH || l.ws_path.starts_with(&format!("{CONSOLE_PAGE_PATH}/")) {
                return invalid(format!("listeners[{name}].ws_path must not be the console's path"));
            }
        }
        let b = &self.backlog;
        if b.interval_secs == 0 || b.max_sessions_per_round == 0 || b.top_sessions > 1000 {
            return invalid(
                "backlog: interval_secs and max_sessions_per_round must be at least 1, top_sessions at most 1000"
                    .into(),
            );
        }
        let prefix = &self.topics.reserved_prefix;
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return invalid(format!(
                "topics.reserved_prefix `{prefix}` must be non-empty letters, digits, `-`, `_` or `.`"
            ));
        }
        let reserved = self.reserved_topics();
        for p in &self.topics.parents {
            if p.name.is_empty() || p.name.contains(['/', '+', '#']) {
                return invalid(format!("topics.parents: `{}` is not a single topic level", p.name));
            }
            if p.partitions == 0 {
                return invalid(format!("topics.parents[{}].partitions must be at least 1", p.name));
            }
            if p.name == "*" {
                continue;
            }
            let core = p.core_topic.as_deref().unwrap_or(&p.name);
            for (what, name) in [("name", p.name.as_str()), ("core_topic", core)] {
                if reserved.contains(name) {
                    return invalid(format!(
                        "topics.parents[{}]: {what} `{name}` is reserved for the gateway's own records \
                         (events topic `{}`, state topics, core-service system topics, names starting with `{prefix}`); \
                         MQTT clients can never publish or subscribe there. Use another name",
                        p.name, self.topics.events_topic
                    ));
                }
            }
        }
        let other = &self.topics.other_core_topic;
        if self.naming == Naming::Mqtt {
            let safe = !other.is_empty()
                && other.len() <= 200
                && other.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && other != "."
                && other != "..";
            if !safe || reserved.contains(other) {
                return invalid(format!(
                    "topics.other_core_topic `{other}` must be a core-topic name (letters, digits, `-`, `_`, `.`) outside the reserved namespace"
                ));
            }
        }
        if self.mqtt.receive_maximum == 0 || self.mqtt.max_inflight == 0 {
            return invalid("mqtt.receive_maximum and mqtt.max_inflight must be at least 1".into());
        }
        if self.mqtt.queue_capacity == 0 {
            return invalid("mqtt.queue_capacity must be at least 1".into());
        }
        if self.mqtt.max_output_buffer_bytes < 1024 || self.mqtt.write_stall_timeout_secs == 0 {
            return invalid(
                "mqtt.max_output_buffer_bytes must be at least 1024 and mqtt.write_stall_timeout_secs at least 1"
                    .into(),
            );
        }
        self.core.kafka.validate()?;
        Ok(())
    }
}

/// A name a self-signed certificate can carry: an IP address, or a DNS name of ASCII
/// letters, digits, `-`, `.` and `*` (a wildcard label).
fn valid_certificate_name(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
        || (!name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
            }))
}

impl Config {
    /// The reserved namespace (SPEC §8) of this configuration: the events topic, the state
    /// topics of the configured core service, its system topics, and every name under
    /// `topics.reserved_prefix`. The embedded engine keeps its state in files outside the
    /// topic namespace (`data_dir/state/`), so it adds no names.
    /// Longest hold of a delay level: half of what the delay topics are kept (Kafka: the
    /// retention the gateway creates them with; embedded: `core.embedded.retention_hours`, 0 =
    /// forever; RocketMQ: the broker's file retention, of which `state_refresh_hours` is the
    /// safe part).
    pub fn delay_max_hold_ms(&self) -> u64 {
        let hours = |h: u64| h.saturating_mul(3_600_000);
        match self.core.kind {
            CoreKind::Kafka => hours(self.delay.retention_hours) / 2,
            CoreKind::Embedded if self.core.embedded.retention_hours == 0 => u64::MAX,
            CoreKind::Embedded => hours(self.core.embedded.retention_hours) / 2,
            CoreKind::Rocketmq => hours(self.core.rocketmq.state_refresh_hours),
        }
    }

    pub fn reserved_topics(&self) -> ReservedTopics {
        use self::reserved::{KAFKA_SYSTEM_PREFIXES, ROCKETMQ_SYSTEM_PREFIXES, ROCKETMQ_SYSTEM_TOPICS};
        let mut names = vec![self.topics.events_topic.as_str(), self.trace.topic.as_str()];
        let mut prefixes = vec![self.topics.reserved_prefix.as_str()];
        match self.core.kind {
            CoreKind::Embedded => {}
            CoreKind::Kafka => {
                let t = &self.core.kafka.state_topics;
                names.extend([t.sessions.as_str(), &t.retained, &t.credentials, &t.revoked_tokens, &t.delay]);
                prefixes.extend(KAFKA_SYSTEM_PREFIXES);
            }
            CoreKind::Rocketmq => {
                let r = &self.core.rocketmq;
                names.extend([r.state_topic.as_str(), &r.create_topic_key]);
                names.extend(ROCKETMQ_SYSTEM_TOPICS);
                prefixes.extend(ROCKETMQ_SYSTEM_PREFIXES);
            }
        }
        ReservedTopics::new(names, prefixes)
    }
}

impl KafkaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for key in self.librdkafka.keys() {
            if Self::MANAGED_PROPERTIES.contains(&key.as_str()) {
                return invalid(format!(
                    "core.kafka.librdkafka.{key} is set by a core.kafka option (or fixed by the gateway); set it there"
                ));
            }
        }
        if self.bootstrap_servers.trim().is_empty() {
            return invalid("core.kafka.bootstrap_servers must name at least one broker".into());
        }
        if self.partitions == 0 || self.replication_factor == 0 || self.replication_factor < -1 {
            return invalid("core.kafka.partitions and replication_factor must be at least 1".into());
        }
        if let Some(min_isr) = self.min_insync_replicas {
            if min_isr < 1 || (self.replication_factor > 0 && min_isr > self.replication_factor) {
                return invalid(format!(
                    "core.kafka.min_insync_replicas {min_isr} must be between 1 and replication_factor ({}): \
                     with more, no write could ever be acknowledged",
                    self.replication_factor
                ));
            }
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.compression.as_str()) {
            return invalid(format!(
                "core.kafka.compression `{}`: use none, gzip, snappy, lz4 or zstd",
                self.compression
            ));
        }
        let t = &self.state_topics;
        let names = [&t.sessions, &t.retained, &t.credentials, &t.revoked_tokens, &t.delay];
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() || names[..i].contains(n) {
                return invalid("core.kafka.state_topics must be five distinct, non-empty names".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings the shipped file sets to a non-default value on purpose (the README quick
    /// start: a demo access key, an instance id and any ClientId; the WebSocket listener with
    /// the console and the admin port a newcomer expects — off by default for embedders and
    /// tests, which choose their own ports; LMQ's offline pull window, off by default so that
    /// embedders' returning sessions never wait for it). Everything else it shows must be the
    /// default.
    const SHIPPED_DEMO_SETTINGS: &[&[&str]] = &[
        &["auth", "access_keys"],
        &["auth", "instance_id"],
        &["auth", "allow_plain_client_ids"],
        &["listeners"],
        &["admin", "enabled"],
        &["mqtt", "offline_pull_window_ms"],
    ];

    fn at<'a>(v: &'a mut serde_yaml_ng::Value, path: &[&str]) -> &'a mut serde_yaml_ng::Value {
        path.iter().fold(v, |v, k| v.get_mut(*k).unwrap_or_else(|| panic!("no `{}`", path.join("."))))
    }

    #[test]
    fn shipped_gateway_yaml_is_valid_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.yaml");
        // Every key in the file is known (deny_unknown_fields) and every value valid.
        let shipped = Config::load(&path).expect("gateway.yaml loads");
        shipped.auth.validate().expect("auth section valid");
        let mut a = serde_yaml_ng::to_value(&shipped).unwrap();
        let mut b = serde_yaml_ng::to_value(Config::default()).unwrap();
        for path in SHIPPED_DEMO_SETTINGS {
            let default = at(&mut b, path).clone();
            let demo = at(&mut a, path);
            assert_ne!(*demo, default, "`{}` equals the default: drop it from SHIPPED_DEMO_SETTINGS", path.join("."));
            *demo = default;
        }
        // All the rest: the shipped file documents the defaults.
        assert_eq!(serde_yaml_ng::to_string(&a).unwrap(), serde_yaml_ng::to_string(&b).unwrap());
        // The demo key is the one the README uses.
        let key = shipped.auth.resolve_with(|_| None).unwrap().access_keys.remove(0);
        assert_eq!((key.id.as_str(), key.secret.expose()), ("demo-key", "demo-secret-change-me"));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = Config::from_yaml("mqtt:\n  keepalive_maxx_secs: 5\n").unwrap_err().to_string();
        assert!(err.contains("keepalive_maxx_secs"), "{err}");
        let err = Config::from_yaml("nonsense: 1\n").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let err = Config::from_yaml("topics:\n  parents:\n    - name: a/b\n").unwrap_err().to_string();
        assert!(err.contains("a/b"), "{err}");
        let err = Config::from_yaml("listeners: []\n").unwrap_err().to_string();
        assert!(err.contains("at least one listener"), "{err}");
        let err = Config::from_yaml("listeners:\n  - name: s\n    bind: 127.0.0.1:0\n    transport: tls\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a `tls` section"), "{err}");
        let err = Config::from_yaml(
            "listeners:\n  - name: s\n    bind: 127.0.0.1:0\n    transport: tls\n    tls:\n      cert: c.pem\n      key: k.pem\n      require_client_cert: true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("client_ca"), "{err}");
        let err =
            Config::from_yaml("listeners:\n  - name: w\n    bind: 127.0.0.1:0\n    transport: ws\n    ws_path: mqtt\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("ws_path"), "{err}");
    }

    #[test]
    fn an_empty_admin_token_is_no_token() {
        let admin = |yaml: &str| Config::from_yaml(yaml).unwrap().admin;
        // A variable only this test sets, so parallel tests do not see it.
        std::env::set_var("LMQ_TEST_EMPTY_ADMIN_TOKEN", "");
        let env = "admin:\n  token_env: LMQ_TEST_EMPTY_ADMIN_TOKEN\n";
        assert!(admin(env).resolved_token().is_none(), "empty variable: management API off");
        let with_file_token = admin(&format!("{env}  token: from-file\n"));
        assert_eq!(with_file_token.resolved_token().map(|t| t.expose().to_string()).as_deref(), Some("from-file"));
        assert!(admin("admin:\n  token: \"\"\n  token_env: LMQ_TEST_UNSET_TOKEN_VAR\n").resolved_token().is_none());
    }

    #[test]
    fn self_signed_tls_needs_no_files_and_takes_no_files() {
        let tls = |body: &str| {
            Config::from_yaml(&format!(
                "listeners:\n  - name: s\n    bind: 127.0.0.1:0\n    transport: tls\n    tls:\n{body}"
            ))
        };
        let ok =
            tls("      self_signed: true\n      self_signed_names: [gw.example.com, 10.0.0.7, \"*.example.org\"]\n")
                .unwrap();
        let t = ok.listeners[0].tls.as_ref().unwrap();
        assert!(t.self_signed && t.cert.is_none() && t.key.is_none());
        assert_eq!(t.self_signed_names.len(), 3);
        // Client certificates work the same with a self-signed server certificate.
        tls("      self_signed: true\n      client_ca: ca.pem\n      require_client_cert: true\n").unwrap();
        for (body, expected) in [
            ("      self_signed: true\n      cert: c.pem\n", "remove cert and key"),
            ("      self_signed: true\n      self_signed_names: [\"a b\"]\n", "`a b`"),
            ("      self_signed: true\n      self_signed_names: [\"\"]\n", "neither a DNS name"),
            ("      self_signed: false\n", "needs cert and key"),
            ("      cert: c.pem\n", "needs cert and key"),
            ("      cert: c.pem\n      key: k.pem\n      self_signed_names: [x]\n", "needs self_signed: true"),
        ] {
            let err = tls(body).unwrap_err().to_string();
            assert!(err.contains(expected), "{body}: {err}");
        }
    }

    #[test]
    fn parents_mapped_onto_reserved_topics_are_refused() {
        let parent = |kind: &str, name: &str, core: &str| {
            Config::from_yaml(&format!(
                "core:\n  kind: {kind}\ntopics:\n  parents:\n    - name: {name}\n      core_topic: {core}\n"
            ))
        };
        for (kind, name, core) in [
            ("embedded", "foo", "lmq-sessions"),
            ("embedded", "foo", "GID_LMQ_STATUS"),
            ("embedded", "foo", "gid_lmq_status"),
            ("embedded", "GID_LMQ_STATUS", "elsewhere"),
            ("embedded", "foo", "lmq-delay"),
            ("kafka", "foo", "__consumer_offsets"),
            ("rocketmq", "foo", "LMQ_GATEWAY_STATE"),
            ("rocketmq", "foo", "RMQ_SYS_TRACE_TOPIC"),
        ] {
            let err = parent(kind, name, core).unwrap_err().to_string();
            assert!(err.contains("is reserved") && err.contains(&format!("parents[{name}]")), "{kind} {core}: {err}");
        }
        // State topics renamed in the config are reserved under their new names.
        let err = Config::from_yaml(
            "core:\n  kind: kafka\n  kafka:\n    state_topics:\n      credentials: creds\n\
             topics:\n  parents:\n    - name: creds\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`creds` is reserved"), "{err}");
        // Only the core service in use reserves its state topics.
        assert!(parent("embedded", "foo", "LMQ_GATEWAY_STATE").is_ok());
        assert!(parent("embedded", "foo", "iot.foo").is_ok());
        let err = Config::from_yaml("topics:\n  reserved_prefix: \"\"\n").unwrap_err().to_string();
        assert!(err.contains("reserved_prefix"), "{err}");
        let r = Config::from_yaml("core:\n  kind: kafka\n").unwrap().reserved_topics();
        for name in ["GID_LMQ_STATUS", "lmq-sessions", "lmq-retained", "lmq-credentials", "lmq-revoked-tokens", "lmq-x"]
        {
            assert!(r.contains(name), "{name}");
        }
    }

    #[test]
    fn kafka_options_set_twice_or_invalid_are_refused() {
        let base = "listeners:\n  - name: t\n    bind: 127.0.0.1:0\ncore:\n  kind: kafka\n  kafka:\n";
        let ok = Config::from_yaml(&format!("{base}    librdkafka:\n      security.protocol: SASL_SSL\n")).unwrap();
        assert_eq!(ok.core.kind, CoreKind::Kafka);
        assert_eq!(ok.core.kafka.librdkafka["security.protocol"], "SASL_SSL");
        for dup in ["linger.ms", "bootstrap.servers", "enable.idempotence", "acks"] {
            let err =
                Config::from_yaml(&format!("{base}    librdkafka:\n      {dup}: \"1\"\n")).unwrap_err().to_string();
            assert!(err.contains(dup) && err.contains("set it there"), "{err}");
        }
        let err = Config::from_yaml(&format!("{base}    compression: brotli\n")).unwrap_err().to_string();
        assert!(err.contains("compression"), "{err}");
        let err = Config::from_yaml(&format!("{base}    state_topics:\n      sessions: x\n      retained: x\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("distinct"), "{err}");
        let ok = Config::from_yaml(&format!("{base}    replication_factor: 3\n    min_insync_replicas: 2\n")).unwrap();
        assert_eq!(ok.core.kafka.min_insync_replicas, Some(2));
        for bad in ["replication_factor: 3\n    min_insync_replicas: 4", "min_insync_replicas: 0"] {
            let err = Config::from_yaml(&format!("{base}    {bad}\n")).unwrap_err().to_string();
            assert!(err.contains("min_insync_replicas"), "{err}");
        }
    }
}
