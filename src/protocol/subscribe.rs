//! SUBSCRIBE [MQTT-3.8] and SUBACK [MQTT-3.9].
//!
//! Topic filter syntax is not checked here: an invalid filter is answered per filter in the
//! SUBACK (0x8F in MQTT 5, 0x80 in 3.1.1) by the session, not by closing the connection.

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties;
use super::types::{
    AckProperties, Protocol, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, SubscribeProperties,
    SubscriptionOptions,
};

const NO_LOCAL: u8 = 0x04;
const RETAIN_AS_PUBLISHED: u8 = 0x08;
const RETAIN_HANDLING_SHIFT: u8 = 4;

pub(crate) fn decode_subscribe(r: &mut Reader<'_>, protocol: Protocol) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if protocol.is_v5() { properties::decode_subscribe(r)? } else { SubscribeProperties::default() };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string("topic filter")?;
        let options = decode_options(r.u8("subscription options")?, protocol)?;
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptySubscribe);
    }
    Ok(Subscribe { packet_id, filters, properties })
}

fn decode_options(b: u8, protocol: Protocol) -> Result<SubscriptionOptions, DecodeError> {
    // 3.1.1: upper six bits reserved [MQTT-3.8.3-4]; 5.0: upper two bits [MQTT-3.8.3-5].
    let reserved = if protocol.is_v5() { 0xC0 } else { 0xFC };
    if b & reserved != 0 {
        return Err(DecodeError::InvalidSubscriptionOptions(b));
    }
    let qos = QoS::from_u8(b & 0x03).ok_or(DecodeError::InvalidQoS(b & 0x03))?;
    let retain_handling = match (b >> RETAIN_HANDLING_SHIFT) & 0x03 {
        0 => RetainHandling::OnSubscribe,
        1 => RetainHandling::OnNewSubscription,
        2 => RetainHandling::Never,
        _ => return Err(DecodeError::InvalidRetainHandling),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: b & NO_LOCAL != 0,
        retain_as_published: b & RETAIN_AS_PUBLISHED != 0,
        retain_handling,
    })
}

fn encode_options(o: &SubscriptionOptions, protocol: Protocol) -> u8 {
    let mut b = o.qos as u8;
    if protocol.is_v5() {
        if o.no_local {
            b |= NO_LOCAL;
        }
        if o.retain_as_published {
            b |= RETAIN_AS_PUBLISHED;
        }
        b |= (o.retain_handling as u8) << RETAIN_HANDLING_SHIFT;
    }
    b
}

pub(crate) fn write_subscribe<S: Sink>(p: &Subscribe, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    s.put_u16(p.packet_id.get());
    if protocol.is_v5() {
        properties::encode(&p.properties, s)?;
    }
    for (filter, options) in &p.filters {
        s.put_str(filter)?;
        s.put_u8(encode_options(options, protocol));
    }
    Ok(())
}

pub(crate) fn decode_suback(r: &mut Reader<'_>, protocol: Protocol) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if protocol.is_v5() { properties::decode_ack(r)? } else { AckProperties::default() };
    let mut codes = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let code = r.u8("reason code")?;
        if !protocol.is_v5() && !matches!(code, 0x00..=0x02 | 0x80) {
            return Err(DecodeError::InvalidReturnCode(code));
        }
        codes.push(ReasonCode(code));
    }
    if codes.is_empty() {
        return Err(DecodeError::EmptyAck);
    }
    Ok(SubAck { packet_id, codes, properties })
}

pub(crate) fn write_suback<S: Sink>(p: &SubAck, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    s.put_u16(p.packet_id.get());
    if protocol.is_v5() {
        properties::encode(&p.properties, s)?;
        for code in &p.codes {
            s.put_u8(code.0);
        }
    } else {
        for code in &p.codes {
            s.put_u8(if code.is_error() { 0x80 } else { code.0 });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::puback::reason;
    use super::super::test_util::*;
    use super::super::types::Packet;
    use super::*;

    fn opts(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions { qos, ..Default::default() }
    }

    #[test]
    fn v311_subscribe() {
        check_vector(
            &[0x82, 0x0E, 0x00, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x03, b'c', b'/', b'd', 0x02],
            Protocol::V311,
            &Packet::Subscribe(Subscribe {
                packet_id: pid(10),
                filters: vec![("a/b".into(), opts(QoS::AtLeastOnce)), ("c/d".into(), opts(QoS::ExactlyOnce))],
                properties: SubscribeProperties::default(),
            }),
        );
    }

    #[test]
    fn v5_subscribe_with_options_and_identifier() {
        let p = Packet::Subscribe(Subscribe {
            packet_id: pid(1),
            filters: vec![(
                "t".into(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::Never,
                },
            )],
            properties: SubscribeProperties { subscription_identifier: Some(5), user_properties: Vec::new() },
        });
        check_vector(&[0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x05, 0x00, 0x01, b't', 0x2D], Protocol::V5, &p);
        // 3.1.1 keeps only the QoS bits.
        assert_eq!(encode_vec(&p, Protocol::V311), [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x01]);
    }

    #[test]
    fn suback_vectors() {
        check_vector(
            &[0x90, 0x05, 0x00, 0x0A, 0x00, 0x02, 0x80],
            Protocol::V311,
            &Packet::SubAck(SubAck {
                packet_id: pid(10),
                codes: vec![ReasonCode::GRANTED_QOS_0, ReasonCode::GRANTED_QOS_2, ReasonCode(0x80)],
                properties: AckProperties::default(),
            }),
        );
        let v5 = Packet::SubAck(SubAck {
            packet_id: pid(10),
            codes: vec![
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::NOT_AUTHORIZED,
                ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
            ],
            properties: AckProperties::default(),
        });
        check_vector(&[0x90, 0x06, 0x00, 0x0A, 0x00, 0x01, 0x87, 0x9E], Protocol::V5, &v5);
        // Every MQTT 5 failure becomes 0x80 in 3.1.1.
        assert_eq!(encode_vec(&v5, Protocol::V311), [0x90, 0x05, 0x00, 0x0A, 0x01, 0x80, 0x80]);
        check_vector(
            &[0x90, 0x07, 0x00, 0x03, 0x03, 0x1F, 0x00, 0x00, 0x02],
            Protocol::V5,
            &Packet::SubAck(SubAck {
                packet_id: pid(3),
                codes: vec![ReasonCode::GRANTED_QOS_2],
                properties: reason(""),
            }),
        );
    }

    #[test]
    fn negative_vectors() {
        let cases: &[(&[u8], Protocol, DecodeError, ReasonCode)] = &[
            (&[0x82, 0x02, 0x00, 0x01], Protocol::V311, DecodeError::EmptySubscribe, ReasonCode::PROTOCOL_ERROR),
            (&[0x82, 0x03, 0x00, 0x01, 0x00], Protocol::V5, DecodeError::EmptySubscribe, ReasonCode::PROTOCOL_ERROR),
            (
                &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04],
                Protocol::V311,
                DecodeError::InvalidSubscriptionOptions(0x04),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40],
                Protocol::V5,
                DecodeError::InvalidSubscriptionOptions(0x40),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03],
                Protocol::V311,
                DecodeError::InvalidQoS(3),
                ReasonCode::PROTOCOL_ERROR,
            ),
            (
                &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30],
                Protocol::V5,
                DecodeError::InvalidRetainHandling,
                ReasonCode::PROTOCOL_ERROR,
            ),
            (
                &[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
                Protocol::V311,
                DecodeError::UnexpectedEof("subscription options"),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x82, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00],
                Protocol::V311,
                DecodeError::ZeroPacketId,
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0x82, 0x06, 0x00, 0x01, 0x04, 0x26, 0x00, 0x00],
                Protocol::V5,
                DecodeError::UnexpectedEof("properties"),
                ReasonCode::MALFORMED_PACKET,
            ),
            (&[0x90, 0x02, 0x00, 0x01], Protocol::V311, DecodeError::EmptyAck, ReasonCode::MALFORMED_PACKET),
            (
                &[0x90, 0x03, 0x00, 0x01, 0x03],
                Protocol::V311,
                DecodeError::InvalidReturnCode(3),
                ReasonCode::MALFORMED_PACKET,
            ),
        ];
        for (bytes, proto, err, code) in cases {
            let got = decode_all(bytes, *proto).unwrap_err();
            assert_eq!(&got, err, "{bytes:02x?}");
            assert_eq!(got.reason_code(), *code, "{got}");
        }
    }
}
