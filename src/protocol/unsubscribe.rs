//! UNSUBSCRIBE [MQTT-3.10] and UNSUBACK [MQTT-3.11]. The 3.1.1 UNSUBACK carries only the
//! packet identifier; the MQTT 5 one has properties and one reason code per filter.

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties;
use super::types::{AckProperties, Protocol, ReasonCode, UnsubAck, Unsubscribe, UserProperties};

pub(crate) fn decode_unsubscribe(r: &mut Reader<'_>, protocol: Protocol) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let user_properties = if protocol.is_v5() { properties::decode_unsubscribe(r)? } else { UserProperties::new() };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string("topic filter")?);
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptyUnsubscribe);
    }
    Ok(Unsubscribe { packet_id, filters, user_properties })
}

pub(crate) fn write_unsubscribe<S: Sink>(p: &Unsubscribe, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    s.put_u16(p.packet_id.get());
    if protocol.is_v5() {
        properties::encode(&p.user_properties, s)?;
    }
    for filter in &p.filters {
        s.put_str(filter)?;
    }
    Ok(())
}

pub(crate) fn decode_unsuback(r: &mut Reader<'_>, protocol: Protocol) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    if !protocol.is_v5() {
        return Ok(UnsubAck { packet_id, codes: Vec::new(), properties: AckProperties::default() });
    }
    let properties = properties::decode_ack(r)?;
    let mut codes = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        codes.push(ReasonCode(r.u8("reason code")?));
    }
    if codes.is_empty() {
        return Err(DecodeError::EmptyAck);
    }
    Ok(UnsubAck { packet_id, codes, properties })
}

pub(crate) fn write_unsuback<S: Sink>(p: &UnsubAck, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    s.put_u16(p.packet_id.get());
    if protocol.is_v5() {
        properties::encode(&p.properties, s)?;
        for code in &p.codes {
            s.put_u8(code.0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::types::Packet;
    use super::*;

    #[test]
    fn unsubscribe_vectors() {
        check_vector(
            &[0xA2, 0x0A, 0x00, 0x0B, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'c'],
            Protocol::V311,
            &Packet::Unsubscribe(Unsubscribe {
                packet_id: pid(11),
                filters: vec!["a/b".into(), "c".into()],
                user_properties: Vec::new(),
            }),
        );
        let p = Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(1),
            filters: vec!["t".into()],
            user_properties: vec![("k".into(), "v".into())],
        });
        check_vector(
            &[0xA2, 0x0D, 0x00, 0x01, 0x07, 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', 0x00, 0x01, b't'],
            Protocol::V5,
            &p,
        );
        assert_eq!(encode_vec(&p, Protocol::V311), [0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, b't']);
    }

    #[test]
    fn unsuback_vectors() {
        let v5 = Packet::UnsubAck(UnsubAck {
            packet_id: pid(11),
            codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: AckProperties::default(),
        });
        check_vector(&[0xB0, 0x05, 0x00, 0x0B, 0x00, 0x00, 0x11], Protocol::V5, &v5);
        // 3.1.1 UNSUBACK has no payload.
        assert_eq!(encode_vec(&v5, Protocol::V311), [0xB0, 0x02, 0x00, 0x0B]);
        check_vector(
            &[0xB0, 0x02, 0x00, 0x0B],
            Protocol::V311,
            &Packet::UnsubAck(UnsubAck { packet_id: pid(11), codes: Vec::new(), properties: AckProperties::default() }),
        );
    }

    #[test]
    fn negative_vectors() {
        let cases: &[(&[u8], Protocol, DecodeError, ReasonCode)] = &[
            (&[0xA2, 0x02, 0x00, 0x01], Protocol::V311, DecodeError::EmptyUnsubscribe, ReasonCode::PROTOCOL_ERROR),
            (&[0xA2, 0x03, 0x00, 0x01, 0x00], Protocol::V5, DecodeError::EmptyUnsubscribe, ReasonCode::PROTOCOL_ERROR),
            (
                &[0xA2, 0x09, 0x00, 0x01, 0x03, 0x1F, 0x00, 0x00, 0x00, 0x01, b't'],
                Protocol::V5,
                DecodeError::InvalidProperty(0x1F),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0xA2, 0x05, 0x00, 0x01, 0x00, 0x02, b't'],
                Protocol::V311,
                DecodeError::UnexpectedEof("topic filter"),
                ReasonCode::MALFORMED_PACKET,
            ),
            (
                &[0xB0, 0x03, 0x00, 0x01, 0x00],
                Protocol::V311,
                DecodeError::TrailingBytes(1),
                ReasonCode::MALFORMED_PACKET,
            ),
            (&[0xB0, 0x03, 0x00, 0x01, 0x00], Protocol::V5, DecodeError::EmptyAck, ReasonCode::MALFORMED_PACKET),
        ];
        for (bytes, proto, err, code) in cases {
            let got = decode_all(bytes, *proto).unwrap_err();
            assert_eq!(&got, err, "{bytes:02x?}");
            assert_eq!(got.reason_code(), *code, "{got}");
        }
    }
}
