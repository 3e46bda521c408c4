//! Errors of the MQTT codec.
//!
//! [`DecodeError`] describes why bytes received from a peer are not a valid packet; every
//! message cites the normative statement it enforces where the specification has one, and
//! [`DecodeError::reason_code`] gives the MQTT 5 reason code to put in the CONNACK or
//! DISCONNECT that closes the connection. [`EncodeError`] describes a packet that cannot be
//! represented on the wire.

use super::types::ReasonCode;
use thiserror::Error;

/// Why received bytes are not a valid MQTT packet. After any decode error the connection
/// must be closed; the receive buffer's content is then unspecified.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("remaining length is longer than 4 bytes [MQTT-2.2.3]")]
    MalformedRemainingLength,
    #[error("variable byte integer is longer than 4 bytes [MQTT-1.5.5]")]
    MalformedVarInt,
    #[error("reserved or unknown packet type {0} [MQTT-2.2.1]")]
    InvalidPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for packet type {packet_type} [MQTT-2.2.2-1] [MQTT-2.2.2-2]")]
    InvalidFlags { packet_type: u8, flags: u8 },
    #[error("PUBLISH with both QoS bits set [MQTT-3.3.1-4]")]
    InvalidPublishQoS,
    #[error("PUBLISH with QoS 0 and DUP set [MQTT-3.3.1-2]")]
    DupWithQoS0,
    #[error("will QoS 3 [MQTT-3.1.2-12]")]
    InvalidWillQoS,
    #[error("subscription option QoS 3 [MQTT-3-8.3-4]")]
    InvalidQoS(u8),
    #[error("packet identifier 0 [MQTT-2.3.1-1]")]
    ZeroPacketId,
    #[error("string is not well-formed UTF-8 [MQTT-1.5.3-1]")]
    InvalidUtf8,
    #[error("string contains U+0000 [MQTT-1.5.3-2]")]
    NullCharInString,
    #[error("packet ends in the middle of {0}: remaining length too short")]
    UnexpectedEof(&'static str),
    #[error("{0} unused bytes at the end of the packet: remaining length does not match its contents")]
    TrailingBytes(usize),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("unsupported protocol name or level {0} [MQTT-3.1.2-1] [MQTT-3.1.2-2]")]
    UnsupportedProtocolVersion(u8),
    #[error("reserved CONNECT flag is not 0 [MQTT-3.1.2-3]")]
    ReservedConnectFlag,
    #[error("will QoS or will retain set without the will flag [MQTT-3.1.2-11] [MQTT-3.1.2-13] [MQTT-3.1.2-15]")]
    WillFlagsWithoutWill,
    #[error("password without user name [MQTT-3.1.2-22]")]
    PasswordWithoutUsername,
    #[error("reserved CONNACK acknowledge flags are not 0 [MQTT-3.2.2-1]")]
    InvalidConnAckFlags,
    #[error("invalid return code {0:#04x} for MQTT 3.1.1 [MQTT-3.2.2-3] [MQTT-3.9.3-2]")]
    InvalidReturnCode(u8),
    #[error("property {0:#04x} is unknown or not allowed in this packet [MQTT-2.2.2.2]")]
    InvalidProperty(u8),
    #[error("property {0:#04x} included more than once [MQTT-2.2.2.2]")]
    DuplicateProperty(u8),
    #[error("property {id:#04x} has the invalid value {value}")]
    InvalidPropertyValue { id: u8, value: u32 },
    #[error("topic name contains a wildcard character [MQTT-3.3.2-2]")]
    WildcardInTopicName,
    #[error("topic name is empty [MQTT-4.7.3-1]")]
    EmptyTopicName,
    #[error("SUBSCRIBE without topic filter [MQTT-3.8.3-3]")]
    EmptySubscribe,
    #[error("UNSUBSCRIBE without topic filter [MQTT-3.10.3-2]")]
    EmptyUnsubscribe,
    #[error("SUBACK or UNSUBACK without reason codes [MQTT-3.9.3-1] [MQTT-3.11.3-1]")]
    EmptyAck,
    #[error("reserved bits of subscription options {0:#04x} are not 0 [MQTT-3.8.3-4] [MQTT-3.8.3-5]")]
    InvalidSubscriptionOptions(u8),
    #[error("retain handling 3 [MQTT-3.8.3.1]")]
    InvalidRetainHandling,
}

impl DecodeError {
    /// The MQTT 5 reason code to report this error with (CONNACK before the session
    /// exists, DISCONNECT afterwards).
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            UnsupportedProtocolVersion(_) => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            WildcardInTopicName | EmptyTopicName => ReasonCode::TOPIC_NAME_INVALID,
            DuplicateProperty(_)
            | InvalidPropertyValue { .. }
            | InvalidQoS(_)
            | InvalidRetainHandling
            | EmptySubscribe
            | EmptyUnsubscribe => ReasonCode::PROTOCOL_ERROR,
            MalformedRemainingLength
            | MalformedVarInt
            | InvalidPacketType(_)
            | InvalidFlags { .. }
            | InvalidPublishQoS
            | DupWithQoS0
            | InvalidWillQoS
            | ZeroPacketId
            | InvalidUtf8
            | NullCharInString
            | UnexpectedEof(_)
            | TrailingBytes(_)
            | Malformed(_)
            | ReservedConnectFlag
            | WillFlagsWithoutWill
            | PasswordWithoutUsername
            | InvalidConnAckFlags
            | InvalidReturnCode(_)
            | InvalidProperty(_)
            | EmptyAck
            | InvalidSubscriptionOptions(_) => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("remaining length {0} exceeds 268,435,455 bytes")]
    PacketTooLarge(usize),
    #[error("string of {0} bytes exceeds 65,535 bytes")]
    StringTooLong(usize),
    #[error("binary data of {0} bytes exceeds 65,535 bytes")]
    BinaryTooLong(usize),
    #[error("value {0} does not fit a variable byte integer")]
    VarIntTooLarge(usize),
    #[error("subscription identifier 0 [MQTT-3.8.2.1.2]")]
    ZeroSubscriptionIdentifier,
    #[error("PUBLISH with QoS > 0 needs a packet identifier [MQTT-2.2.1-2]")]
    MissingPacketId,
    #[error("{0} does not exist in this protocol version")]
    UnsupportedPacket(&'static str),
}
