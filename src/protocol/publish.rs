//! PUBLISH [MQTT-3.3]: the hot path. The payload is a zero-copy slice of the received
//! frame; the only allocation is the topic name (plus MQTT 5 properties when present).

use super::error::{DecodeError, EncodeError};
use super::primitives::{check_topic_name, Reader, Sink};
use super::properties;
use super::types::{Protocol, Publish, PublishProperties, QoS};

const DUP: u8 = 0b1000;
const RETAIN: u8 = 0b0001;

/// `flags` are the low four bits of the fixed header, already checked for QoS 3.
pub(crate) fn decode(r: &mut Reader<'_>, flags: u8, protocol: Protocol) -> Result<Publish, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidPublishQoS)?;
    let dup = flags & DUP != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupWithQoS0);
    }
    let topic = r.string("topic name")?;
    // In MQTT 5 an empty topic name is legal with a Topic Alias; the session checks that.
    if topic.is_empty() && !protocol.is_v5() {
        return Err(DecodeError::EmptyTopicName);
    }
    check_topic_name(&topic)?;
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(r.packet_id()?) };
    let properties = if protocol.is_v5() { properties::decode_publish(r)? } else { PublishProperties::default() };
    Ok(Publish { dup, qos, retain: flags & RETAIN != 0, topic, packet_id, payload: r.rest(), properties })
}

/// Low four bits of the fixed header. DUP is never set for QoS 0 [MQTT-3.3.1-2].
pub(crate) fn flags(p: &Publish) -> u8 {
    let mut f = (p.qos as u8) << 1;
    if p.dup && p.qos != QoS::AtMostOnce {
        f |= DUP;
    }
    if p.retain {
        f |= RETAIN;
    }
    f
}

pub(crate) fn write<S: Sink>(p: &Publish, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    s.put_str(&p.topic)?;
    if p.qos != QoS::AtMostOnce {
        let id = p.packet_id.ok_or(EncodeError::MissingPacketId)?;
        s.put_u16(id.get());
    }
    if protocol.is_v5() {
        properties::encode(&p.properties, s)?;
    }
    s.put_slice(&p.payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::types::{Packet, ReasonCode};
    use super::super::{decode as decode_packet, encode};
    use super::*;
    use bytes::{Bytes, BytesMut};

    fn publish(qos: QoS, topic: &str, packet_id: Option<u16>, payload: &'static [u8]) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: packet_id.map(pid),
            payload: Bytes::from_static(payload),
            properties: PublishProperties::default(),
        }
    }

    #[test]
    fn v311_qos0_qos1_qos2() {
        check_vector(
            &[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'],
            Protocol::V311,
            &Packet::Publish(publish(QoS::AtMostOnce, "a/b", None, b"hi")),
        );
        check_vector(
            &[0x33, 0x07, 0x00, 0x01, b'a', 0x00, 0x0A, b'h', b'i'],
            Protocol::V311,
            &Packet::Publish(Publish { retain: true, ..publish(QoS::AtLeastOnce, "a", Some(10), b"hi") }),
        );
        check_vector(
            &[0x3C, 0x05, 0x00, 0x01, b'a', 0x12, 0x34],
            Protocol::V311,
            &Packet::Publish(Publish { dup: true, ..publish(QoS::ExactlyOnce, "a", Some(0x1234), b"") }),
        );
    }

    #[test]
    fn payload_is_zero_copy() {
        let mut buf = BytesMut::from(&[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'][..]);
        let base = buf.as_ptr() as usize;
        let Some(Packet::Publish(p)) = decode_packet(&mut buf, Protocol::V311, 64).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(p.payload.as_ptr() as usize, base + 7);
    }

    #[rustfmt::skip]
    const V5_PUBLISH: &[u8] = &[
        0x32, 0x1D,
        0x00, 0x03, b'a', b'/', b'b',
        0x00, 0x01,
        0x13, // property length 19
        0x01, 0x01, // payload format: UTF-8
        0x02, 0x00, 0x00, 0x00, 0x3C, // message expiry 60
        0x23, 0x00, 0x05, // topic alias 5
        0x0B, 0x02, // subscription identifier 2
        0x03, 0x00, 0x04, b't', b'e', b'x', b't', // content type
        b'h', b'i',
    ];

    #[test]
    fn v5_publish_with_properties() {
        let expected = Packet::Publish(Publish {
            properties: PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                topic_alias: Some(5),
                subscription_identifiers: vec![2],
                content_type: Some("text".into()),
                ..Default::default()
            },
            ..publish(QoS::AtLeastOnce, "a/b", Some(1), b"hi")
        });
        check_vector(V5_PUBLISH, Protocol::V5, &expected);
        // Empty topic name with a topic alias is decoded for MQTT 5.
        check_vector(
            &[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01],
            Protocol::V5,
            &Packet::Publish(Publish {
                properties: PublishProperties { topic_alias: Some(1), ..Default::default() },
                ..publish(QoS::AtMostOnce, "", None, b"")
            }),
        );
        // 3.1.1 encoding drops the properties.
        assert_eq!(
            encode_vec(&expected, Protocol::V311),
            [0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'h', b'i']
        );
    }

    #[test]
    fn publish_negative_vectors() {
        let cases: &[(&[u8], Protocol, DecodeError, ReasonCode)] = &[
            (
                &[0x36, 0x03, 0x00, 0x01, b'a'],
                Protocol::V5,
                DecodeError::InvalidPublishQoS,
                ReasonCode::MALFORMED_PACKET,
            ),
            (&[0x38, 0x03, 0x00, 0x01, b'a'], Protocol::V311, DecodeError::DupWithQoS0, ReasonCode::MALFORMED_PACKET),
            (
                &[0x30, 0x03, 0x00, 0x01, b'+'],
                Protocol::V311,
                DecodeError::WildcardInTopicName,
                ReasonCode::TOPIC_NAME_INVALID,
            ),
            (
                &[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'#'],
                Protocol::V5,
                DecodeError::WildcardInTopicName,
                ReasonCode::TOPIC_NAME_INVALID,
            ),
            (
                &[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00],
                Protocol::V311,
                DecodeError::ZeroPacketId,
                ReasonCode::MALFORMED_PACKET,
            ),
            (&[0x30, 0x02, 0x00, 0x00], Protocol::V311, DecodeError::EmptyTopicName, ReasonCode::TOPIC_NAME_INVALID),
            (
                &[0x30, 0x03, 0x00, 0x02, b'a'],
                Protocol::V311,
                DecodeError::UnexpectedEof("topic name"),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x32, 0x04, 0x00, 0x01, b'a', 0x00],
                Protocol::V311,
                DecodeError::UnexpectedEof("packet identifier"),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x30, 0x05, 0x00, 0x01, b'a', 0x02, 0x01],
                Protocol::V5,
                DecodeError::UnexpectedEof("properties"),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x30, 0x06, 0x00, 0x01, b'a', 0x02, 0x11, 0x00],
                Protocol::V5,
                DecodeError::InvalidProperty(0x11),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x30, 0x0A, 0x00, 0x01, b'a', 0x06, 0x23, 0x00, 0x01, 0x23, 0x00, 0x02],
                Protocol::V5,
                DecodeError::DuplicateProperty(0x23),
                ReasonCode::PROTOCOL_ERROR,
            ),
            (
                &[0x30, 0x04, 0x00, 0x02, 0xC0, 0x80],
                Protocol::V311,
                DecodeError::InvalidUtf8,
                ReasonCode::MALFORMED_PACKET,
            ),
        ];
        for (bytes, proto, err, code) in cases {
            let got = decode_all(bytes, *proto).unwrap_err();
            assert_eq!(&got, err, "{bytes:02x?}");
            assert_eq!(got.reason_code(), *code, "{got}");
        }
    }

    #[test]
    fn encode_errors() {
        let mut buf = BytesMut::new();
        let p = Packet::Publish(publish(QoS::AtLeastOnce, "a", None, b""));
        assert_eq!(encode(&p, Protocol::V311, &mut buf), Err(EncodeError::MissingPacketId));
        let long = "t".repeat(70_000);
        let p = Packet::Publish(Publish { topic: long, ..publish(QoS::AtMostOnce, "", None, b"") });
        assert_eq!(encode(&p, Protocol::V5, &mut buf), Err(EncodeError::StringTooLong(70_000)));
        assert!(buf.is_empty());
        // DUP is dropped for QoS 0 [MQTT-3.3.1-2].
        let p = Packet::Publish(Publish { dup: true, ..publish(QoS::AtMostOnce, "a", None, b"") });
        assert_eq!(encode_vec(&p, Protocol::V311), [0x30, 0x03, 0x00, 0x01, b'a']);
    }

    #[test]
    fn remaining_length_too_large_to_encode() {
        let p = Packet::Publish(publish(QoS::AtMostOnce, "a", None, b""));
        let Packet::Publish(mut big) = p else { unreachable!() };
        big.payload = Bytes::from(vec![0u8; 268_435_455]);
        let p = Packet::Publish(big);
        assert_eq!(super::super::encoded_len(&p, Protocol::V311), Err(EncodeError::PacketTooLarge(268_435_455 + 3)));
    }
}
