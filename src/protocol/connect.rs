//! CONNECT [MQTT-3.1] and CONNACK [MQTT-3.2], for MQTT 3.1, 3.1.1 and 5.0.
//!
//! A CONNECT is decoded according to its own protocol name and level; CONNACK according to
//! the protocol negotiated on the connection.

use super::error::{DecodeError, EncodeError};
use super::primitives::{check_topic_name, Reader, Sink};
use super::properties;
use super::types::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, LastWill, Protocol, QoS, ReasonCode, WillProperties,
};

const RESERVED: u8 = 0x01;
const CLEAN_START: u8 = 0x02;
const WILL: u8 = 0x04;
const WILL_QOS_SHIFT: u8 = 3;
const WILL_RETAIN: u8 = 0x20;
const PASSWORD: u8 = 0x40;
const USERNAME: u8 = 0x80;

/// MQTT 3.1.1 CONNACK return codes 0..=5 as MQTT 5 reason codes; the inverse of
/// [`ReasonCode::to_v3_connack`] on these values.
const V3_RETURN_CODES: [ReasonCode; 6] = [
    ReasonCode::SUCCESS,
    ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
    ReasonCode::SERVER_UNAVAILABLE,
    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
    ReasonCode::NOT_AUTHORIZED,
];

pub(crate) fn decode_connect(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = r.prefixed("protocol name")?;
    let level = r.u8("protocol level")?;
    let protocol = match (name, level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQIsdp", 3) => Protocol::V31,
        _ => return Err(DecodeError::UnsupportedProtocolVersion(level)),
    };
    let flags = r.u8("connect flags")?;
    if flags & RESERVED != 0 {
        return Err(DecodeError::ReservedConnectFlag);
    }
    let will_flag = flags & WILL != 0;
    let will_qos = (flags >> WILL_QOS_SHIFT) & 0x03;
    let will_retain = flags & WILL_RETAIN != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidWillQoS)?;
    let has_username = flags & USERNAME != 0;
    let has_password = flags & PASSWORD != 0;
    if has_password && !has_username && !protocol.is_v5() {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if protocol.is_v5() { properties::decode_connect(r)? } else { ConnectProperties::default() };

    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = if protocol.is_v5() { properties::decode_will(r)? } else { WillProperties::default() };
        let topic = r.string("will topic")?;
        if topic.is_empty() {
            return Err(DecodeError::EmptyTopicName);
        }
        check_topic_name(&topic)?;
        let payload = r.binary("will payload")?;
        Some(LastWill { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if has_username { Some(r.string("user name")?) } else { None };
    let password = if has_password { Some(r.binary("password")?) } else { None };
    Ok(Connect {
        protocol,
        clean_start: flags & CLEAN_START != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// Encodes for `c.protocol`.
pub(crate) fn write_connect<S: Sink>(c: &Connect, s: &mut S) -> Result<(), EncodeError> {
    let (name, level) = match c.protocol {
        Protocol::V31 => ("MQIsdp", 3),
        Protocol::V311 => ("MQTT", 4),
        Protocol::V5 => ("MQTT", 5),
    };
    let v5 = c.protocol.is_v5();
    s.put_str(name)?;
    s.put_u8(level);
    let mut flags = 0;
    if c.clean_start {
        flags |= CLEAN_START;
    }
    if let Some(w) = &c.will {
        flags |= WILL | (w.qos as u8) << WILL_QOS_SHIFT;
        if w.retain {
            flags |= WILL_RETAIN;
        }
    }
    if c.username.is_some() {
        flags |= USERNAME;
    }
    if c.password.is_some() {
        flags |= PASSWORD;
    }
    s.put_u8(flags);
    s.put_u16(c.keep_alive);
    if v5 {
        properties::encode(&c.properties, s)?;
    }
    s.put_str(&c.client_id)?;
    if let Some(w) = &c.will {
        if v5 {
            properties::encode(&w.properties, s)?;
        }
        s.put_str(&w.topic)?;
        s.put_binary(&w.payload)?;
    }
    if let Some(u) = &c.username {
        s.put_str(u)?;
    }
    if let Some(p) = &c.password {
        s.put_binary(p)?;
    }
    Ok(())
}

pub(crate) fn decode_connack(r: &mut Reader<'_>, protocol: Protocol) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("connect acknowledge flags")?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::InvalidConnAckFlags);
    }
    let code = r.u8("connect reason code")?;
    let (code, properties) = if protocol.is_v5() {
        (ReasonCode(code), properties::decode_connack(r)?)
    } else {
        let code = V3_RETURN_CODES.get(usize::from(code)).copied().ok_or(DecodeError::InvalidReturnCode(code))?;
        (code, ConnAckProperties::default())
    };
    Ok(ConnAck { session_present: flags & 0x01 != 0, code, properties })
}

pub(crate) fn write_connack<S: Sink>(c: &ConnAck, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    // MQTT 3.1 has no Session Present flag: the byte is reserved.
    let session_present = c.session_present && protocol != Protocol::V31;
    s.put_u8(u8::from(session_present));
    if protocol.is_v5() {
        s.put_u8(c.code.0);
        properties::encode(&c.properties, s)
    } else {
        s.put_u8(c.code.to_v3_connack());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::types::Packet;
    use super::*;
    use bytes::Bytes;

    #[rustfmt::skip]
    const V311_CONNECT_FULL: &[u8] = &[
        0x10, 34,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
        0xEE, // user name, password, will retain, will QoS 1, will, clean session
        0x00, 0x3C, // keep alive 60
        0x00, 0x03, b'c', b'i', b'd',
        0x00, 0x03, b'w', b'/', b't',
        0x00, 0x02, b'b', b'y',
        0x00, 0x04, b'u', b's', b'e', b'r',
        0x00, 0x02, b'p', b'w',
    ];

    #[test]
    fn v311_connect_with_will_username_password() {
        let expected = Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive: 60,
            client_id: "cid".into(),
            will: Some(LastWill {
                topic: "w/t".into(),
                payload: Bytes::from_static(b"by"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: WillProperties::default(),
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"pw")),
            properties: ConnectProperties::default(),
        }));
        // Decoded by its own protocol level whatever the connection says.
        check_vector(V311_CONNECT_FULL, Protocol::V5, &expected);
        check_vector(V311_CONNECT_FULL, Protocol::V311, &expected);
    }

    #[rustfmt::skip]
    const V5_CONNECT: &[u8] = &[
        0x10, 38,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05,
        0xC6, // user name, password, will, clean start
        0x00, 0x0A,
        0x08, 0x11, 0x00, 0x00, 0x00, 0x78, 0x21, 0x00, 0x0A, // session expiry 120, receive max 10
        0x00, 0x00, // empty client identifier
        0x05, 0x18, 0x00, 0x00, 0x00, 0x05, // will delay 5
        0x00, 0x01, b'w',
        0x00, 0x00,
        0x00, 0x01, b'u',
        0x00, 0x01, b'p',
    ];

    #[test]
    fn v5_connect_with_properties() {
        let expected = Packet::Connect(Box::new(Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 10,
            client_id: String::new(),
            will: Some(LastWill {
                topic: "w".into(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: WillProperties { will_delay_interval: Some(5), ..Default::default() },
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"p")),
            properties: ConnectProperties {
                session_expiry_interval: Some(120),
                receive_maximum: Some(10),
                ..Default::default()
            },
        }));
        check_vector(V5_CONNECT, Protocol::V311, &expected);
    }

    fn connect(name: &[u8], level: u8, flags: u8, tail: &[u8]) -> Vec<u8> {
        let mut body = vec![0x00, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, flags, 0x00, 0x00]);
        if level == 5 {
            body.push(0x00); // no properties
        }
        body.extend_from_slice(tail);
        let mut v = vec![0x10, body.len() as u8];
        v.extend_from_slice(&body);
        v
    }

    const CID: &[u8] = &[0x00, 0x01, b'c'];

    #[test]
    fn mqtt31_and_minimal_connects() {
        let p = decode_all(&connect(b"MQIsdp", 3, 0x02, CID), Protocol::V311).unwrap();
        let Packet::Connect(c) = &p else { panic!("{p:?}") };
        assert_eq!(c.protocol, Protocol::V31);
        assert_eq!(encode_vec(&p, Protocol::V311), connect(b"MQIsdp", 3, 0x02, CID));
        // Password without user name is fine in MQTT 5.
        let mut tail = CID.to_vec();
        tail.extend_from_slice(&[0x00, 0x01, b'p']);
        let p = decode_all(&connect(b"MQTT", 5, 0x40, &tail), Protocol::V311).unwrap();
        let Packet::Connect(c) = &p else { panic!("{p:?}") };
        assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
        assert_eq!(c.username, None);
    }

    #[test]
    fn connect_negative_vectors() {
        let mut password_tail = CID.to_vec();
        password_tail.extend_from_slice(&[0x00, 0x01, b'p']);
        let mut wild_will = CID.to_vec();
        wild_will.extend_from_slice(&[0x00, 0x01, b'#', 0x00, 0x00]);
        let mut empty_will = CID.to_vec();
        empty_will.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]);
        let cases: Vec<(Vec<u8>, DecodeError, u8)> = vec![
            (connect(b"MQTX", 4, 0, CID), DecodeError::UnsupportedProtocolVersion(4), 0x84),
            (connect(b"MQTT", 3, 0, CID), DecodeError::UnsupportedProtocolVersion(3), 0x84),
            (connect(b"MQTT", 6, 0, CID), DecodeError::UnsupportedProtocolVersion(6), 0x84),
            (connect(b"MQIsdp", 4, 0, CID), DecodeError::UnsupportedProtocolVersion(4), 0x84),
            (connect(b"MQTT", 4, 0x03, CID), DecodeError::ReservedConnectFlag, 0x81),
            (connect(b"MQTT", 5, 0x1C, CID), DecodeError::InvalidWillQoS, 0x81),
            (connect(b"MQTT", 4, 0x08, CID), DecodeError::WillFlagsWithoutWill, 0x81),
            (connect(b"MQTT", 5, 0x20, CID), DecodeError::WillFlagsWithoutWill, 0x81),
            (connect(b"MQTT", 4, 0x40, &password_tail), DecodeError::PasswordWithoutUsername, 0x81),
            (connect(b"MQTT", 4, 0x04, &wild_will), DecodeError::WildcardInTopicName, 0x90),
            (connect(b"MQTT", 4, 0x04, &empty_will), DecodeError::EmptyTopicName, 0x90),
            (connect(b"MQTT", 4, 0x80, CID), DecodeError::UnexpectedEof("user name"), 0x81),
            (connect(b"MQTT", 4, 0, &[0x00, 0x01, 0x00]), DecodeError::NullCharInString, 0x81),
            (connect(b"MQTT", 4, 0, &[0x00, 0x01, b'c', 0xFF]), DecodeError::TrailingBytes(1), 0x81),
        ];
        for (bytes, err, code) in cases {
            let got = decode_all(&bytes, Protocol::V311).unwrap_err();
            assert_eq!(got, err, "{bytes:02x?}");
            assert_eq!(got.reason_code().0, code, "{got}");
        }
    }

    #[test]
    fn connack_vectors() {
        check_vector(
            &[0x20, 0x02, 0x01, 0x00],
            Protocol::V311,
            &Packet::ConnAck(ConnAck { session_present: true, ..Default::default() }),
        );
        check_vector(
            &[0x20, 0x02, 0x00, 0x05],
            Protocol::V311,
            &Packet::ConnAck(ConnAck { code: ReasonCode::NOT_AUTHORIZED, ..Default::default() }),
        );
        // MQTT 5 reason codes are mapped to 3.1.1 return codes.
        let p = Packet::ConnAck(ConnAck { code: ReasonCode::BAD_AUTHENTICATION_METHOD, ..Default::default() });
        assert_eq!(encode_vec(&p, Protocol::V311), [0x20, 0x02, 0x00, 0x04]);
        check_vector(&[0x20, 0x03, 0x00, 0x00, 0x00], Protocol::V5, &Packet::ConnAck(ConnAck::default()));
        check_vector(
            &[0x20, 0x0B, 0x00, 0x00, 0x08, 0x12, 0x00, 0x02, b'i', b'd', 0x22, 0x00, 0x0A],
            Protocol::V5,
            &Packet::ConnAck(ConnAck {
                session_present: false,
                code: ReasonCode::SUCCESS,
                properties: ConnAckProperties {
                    assigned_client_identifier: Some("id".into()),
                    topic_alias_maximum: Some(10),
                    ..Default::default()
                },
            }),
        );
        check_vector(
            &[0x20, 0x03, 0x00, 0x84, 0x00],
            Protocol::V5,
            &Packet::ConnAck(ConnAck { code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, ..Default::default() }),
        );
    }

    #[test]
    fn connack_negative_vectors() {
        assert_eq!(decode_all(&[0x20, 0x02, 0x02, 0x00], Protocol::V311), Err(DecodeError::InvalidConnAckFlags));
        assert_eq!(decode_all(&[0x20, 0x02, 0x00, 0x06], Protocol::V311), Err(DecodeError::InvalidReturnCode(6)));
        assert_eq!(
            decode_all(&[0x20, 0x02, 0x00, 0x00], Protocol::V5),
            Err(DecodeError::UnexpectedEof("property length"))
        );
        assert_eq!(decode_all(&[0x20, 0x03, 0x00, 0x00, 0x00], Protocol::V311), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn debug_output_redacts_password_and_authentication_data() {
        let secret = "s3cr3t-Password!";
        let auth = "auth-data-XYZ";
        let properties =
            ConnectProperties { authentication_data: Some(Bytes::from_static(b"auth-data-XYZ")), ..Default::default() };
        let c = Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 60,
            client_id: "cid".into(),
            will: None,
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"s3cr3t-Password!")),
            properties,
        };
        for shown in [format!("{c:?}"), format!("{c:#?}"), format!("{:?}", Packet::Connect(Box::new(c.clone())))] {
            assert!(!shown.contains(secret), "password shown: {shown}");
            assert!(!shown.contains(auth), "authentication data shown: {shown}");
            // Neither as the byte list `Bytes`' own Debug would print.
            assert!(!shown.contains("115, 51, 99") && !shown.contains("\\x"), "{shown}");
            assert!(shown.contains("<redacted>") && shown.contains("user") && shown.contains("cid"), "{shown}");
        }
    }
}
