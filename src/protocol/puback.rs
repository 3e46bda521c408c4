//! PUBACK [MQTT-3.4], PUBREC [MQTT-3.5], PUBREL [MQTT-3.6] and PUBCOMP [MQTT-3.7]: one
//! layout, one implementation (the packet type is carried by the [`Packet`] variant).
//!
//! In MQTT 5 the reason code and properties may be omitted: remaining length 2 means
//! Success without properties, 3 means a reason code without properties. The encoder uses
//! the shortest form.
//!
//! [`Packet`]: super::types::Packet

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties;
use super::types::{Protocol, PubResponse, ReasonCode};

pub(crate) fn decode(r: &mut Reader<'_>, protocol: Protocol) -> Result<PubResponse, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut out = PubResponse::new(packet_id);
    if protocol.is_v5() && !r.is_empty() {
        out.code = ReasonCode(r.u8("reason code")?);
        if !r.is_empty() {
            out.properties = properties::decode_ack(r)?;
        }
    }
    Ok(out)
}

pub(crate) fn write<S: Sink>(p: &PubResponse, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    s.put_u16(p.packet_id.get());
    if protocol.is_v5() {
        let no_props = properties::ack_is_empty(&p.properties);
        if p.code == ReasonCode::SUCCESS && no_props {
            return Ok(());
        }
        s.put_u8(p.code.0);
        if !no_props {
            properties::encode(&p.properties, s)?;
        }
    }
    Ok(())
}

/// Properties of a v5 acknowledgement, for the tests of the other ack kinds.
#[cfg(test)]
pub(crate) fn reason(reason: &str) -> super::types::AckProperties {
    super::types::AckProperties { reason_string: Some(reason.into()), user_properties: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::types::Packet;
    use super::*;

    fn all_kinds(r: PubResponse) -> [(u8, Packet); 4] {
        [
            (0x40, Packet::PubAck(r.clone())),
            (0x50, Packet::PubRec(r.clone())),
            (0x62, Packet::PubRel(r.clone())),
            (0x70, Packet::PubComp(r)),
        ]
    }

    #[test]
    fn v311_vectors() {
        for (first, p) in all_kinds(PubResponse::new(pid(0x1234))) {
            check_vector(&[first, 0x02, 0x12, 0x34], Protocol::V311, &p);
        }
        // Reason codes and properties do not exist in 3.1.1.
        let r = PubResponse {
            code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            properties: reason("x"),
            ..PubResponse::new(pid(1))
        };
        for (first, p) in all_kinds(r) {
            assert_eq!(encode_vec(&p, Protocol::V311), [first, 0x02, 0x00, 0x01]);
        }
    }

    #[test]
    fn v5_short_forms() {
        for (first, p) in all_kinds(PubResponse::new(pid(7))) {
            check_vector(&[first, 0x02, 0x00, 0x07], Protocol::V5, &p);
            // Property length omitted / zero: still success without properties.
            assert_eq!(decode_all(&[first, 0x03, 0x00, 0x07, 0x00], Protocol::V5).unwrap(), p);
            assert_eq!(decode_all(&[first, 0x04, 0x00, 0x07, 0x00, 0x00], Protocol::V5).unwrap(), p);
        }
        let r = PubResponse { code: ReasonCode::NO_MATCHING_SUBSCRIBERS, ..PubResponse::new(pid(7)) };
        for (first, p) in all_kinds(r) {
            check_vector(&[first, 0x03, 0x00, 0x07, 0x10], Protocol::V5, &p);
        }
    }

    #[test]
    fn v5_with_reason_string() {
        let r = PubResponse {
            code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            properties: reason("gone"),
            ..PubResponse::new(pid(2))
        };
        for (first, p) in all_kinds(r) {
            check_vector(
                &[first, 0x0B, 0x00, 0x02, 0x92, 0x07, 0x1F, 0x00, 0x04, b'g', b'o', b'n', b'e'],
                Protocol::V5,
                &p,
            );
        }
    }

    #[test]
    fn negative_vectors() {
        assert_eq!(decode_all(&[0x40, 0x02, 0x00, 0x00], Protocol::V311), Err(DecodeError::ZeroPacketId));
        assert_eq!(decode_all(&[0x40, 0x01, 0x00], Protocol::V5), Err(DecodeError::UnexpectedEof("packet identifier")));
        let err = decode_all(&[0x50, 0x03, 0x00, 0x01, 0x00], Protocol::V311).unwrap_err();
        assert_eq!(err, DecodeError::TrailingBytes(1));
        assert_eq!(err.reason_code(), ReasonCode::MALFORMED_PACKET);
        // User property missing its value.
        assert_eq!(
            decode_all(&[0x40, 0x08, 0x00, 0x01, 0x00, 0x04, 0x26, 0x00, 0x01, b'k'], Protocol::V5),
            Err(DecodeError::UnexpectedEof("user property value"))
        );
        // Reason string twice.
        let err =
            decode_all(&[0x40, 0x0B, 0x00, 0x01, 0x00, 0x07, 0x1F, 0x00, 0x00, 0x1F, 0x00, 0x01, b'a'], Protocol::V5)
                .unwrap_err();
        assert_eq!(err, DecodeError::DuplicateProperty(0x1F));
        assert_eq!(err.reason_code(), ReasonCode::PROTOCOL_ERROR);
    }
}
