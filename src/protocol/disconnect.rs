//! DISCONNECT [MQTT-3.14] and AUTH [MQTT-3.15] (MQTT 5 only).
//!
//! Both may omit their reason code and properties: remaining length 0 means Success /
//! Normal disconnection without properties, 1 means a reason code without properties. The
//! 3.1.1 DISCONNECT always has remaining length 0.

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties;
use super::types::{Auth, AuthProperties, Disconnect, DisconnectProperties, Protocol, ReasonCode};

pub(crate) fn decode_disconnect(r: &mut Reader<'_>, protocol: Protocol) -> Result<Disconnect, DecodeError> {
    let mut out = Disconnect::default();
    if protocol.is_v5() && !r.is_empty() {
        out.code = ReasonCode(r.u8("reason code")?);
        if !r.is_empty() {
            out.properties = properties::decode_disconnect(r)?;
        }
    }
    Ok(out)
}

fn disconnect_props_empty(p: &DisconnectProperties) -> bool {
    p.session_expiry_interval.is_none()
        && p.reason_string.is_none()
        && p.user_properties.is_empty()
        && p.server_reference.is_none()
}

pub(crate) fn write_disconnect<S: Sink>(d: &Disconnect, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    if !protocol.is_v5() {
        return Ok(());
    }
    let no_props = disconnect_props_empty(&d.properties);
    if d.code == ReasonCode::NORMAL_DISCONNECTION && no_props {
        return Ok(());
    }
    s.put_u8(d.code.0);
    if !no_props {
        properties::encode(&d.properties, s)?;
    }
    Ok(())
}

/// Only reached for MQTT 5: packet type 15 is reserved in 3.1.1.
pub(crate) fn decode_auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    let mut out = Auth::default();
    if !r.is_empty() {
        out.code = ReasonCode(r.u8("reason code")?);
        if !r.is_empty() {
            out.properties = properties::decode_auth(r)?;
        }
    }
    Ok(out)
}

fn auth_props_empty(p: &AuthProperties) -> bool {
    p.authentication_method.is_none()
        && p.authentication_data.is_none()
        && p.reason_string.is_none()
        && p.user_properties.is_empty()
}

pub(crate) fn write_auth<S: Sink>(a: &Auth, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    if !protocol.is_v5() {
        return Err(EncodeError::UnsupportedPacket("AUTH"));
    }
    let no_props = auth_props_empty(&a.properties);
    if a.code == ReasonCode::SUCCESS && no_props {
        return Ok(());
    }
    s.put_u8(a.code.0);
    if !no_props {
        properties::encode(&a.properties, s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::types::Packet;
    use super::super::{encode, encoded_len};
    use super::*;
    use bytes::{Bytes, BytesMut};

    #[test]
    fn disconnect_vectors() {
        let normal = Packet::Disconnect(Disconnect::default());
        check_vector(&[0xE0, 0x00], Protocol::V311, &normal);
        check_vector(&[0xE0, 0x00], Protocol::V5, &normal);
        // Explicit success with empty properties is the same packet.
        assert_eq!(decode_all(&[0xE0, 0x02, 0x00, 0x00], Protocol::V5).unwrap(), normal);
        let taken_over = Packet::Disconnect(Disconnect { code: ReasonCode::SESSION_TAKEN_OVER, ..Default::default() });
        check_vector(&[0xE0, 0x01, 0x8E], Protocol::V5, &taken_over);
        // 3.1.1 DISCONNECT has remaining length 0.
        assert_eq!(encode_vec(&taken_over, Protocol::V311), [0xE0, 0x00]);
        check_vector(
            &[0xE0, 0x0C, 0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x3C, 0x1F, 0x00, 0x02, b'b', b'y'],
            Protocol::V5,
            &Packet::Disconnect(Disconnect {
                code: ReasonCode::DISCONNECT_WITH_WILL,
                properties: DisconnectProperties {
                    session_expiry_interval: Some(60),
                    reason_string: Some("by".into()),
                    ..Default::default()
                },
            }),
        );
    }

    #[test]
    fn disconnect_negative_vectors() {
        assert_eq!(decode_all(&[0xE0, 0x01, 0x00], Protocol::V311), Err(DecodeError::TrailingBytes(1)));
        let err = decode_all(&[0xE0, 0x05, 0x00, 0x03, 0x21, 0x00, 0x01], Protocol::V5).unwrap_err();
        assert_eq!(err, DecodeError::InvalidProperty(0x21));
        assert_eq!(err.reason_code(), ReasonCode::MALFORMED_PACKET);
        assert_eq!(
            decode_all(&[0xE1, 0x00], Protocol::V5),
            Err(DecodeError::InvalidFlags { packet_type: 14, flags: 1 })
        );
    }

    #[test]
    fn auth_vectors() {
        check_vector(&[0xF0, 0x00], Protocol::V5, &Packet::Auth(Auth::default()));
        check_vector(
            &[0xF0, 0x0F, 0x18, 0x0D, 0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', 0x16, 0x00, 0x02, 0x01, 0x02],
            Protocol::V5,
            &Packet::Auth(Auth {
                code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: Some("SCRAM".into()),
                    authentication_data: Some(Bytes::from_static(&[1, 2])),
                    ..Default::default()
                },
            }),
        );
        let err = decode_all(&[0xF0, 0x0A, 0x18, 0x08, 0x15, 0x00, 0x01, b'a', 0x15, 0x00, 0x01, b'b'], Protocol::V5)
            .unwrap_err();
        assert_eq!(err, DecodeError::DuplicateProperty(0x15));
        assert_eq!(err.reason_code(), ReasonCode::PROTOCOL_ERROR);
        // AUTH cannot be encoded for 3.1.1.
        let p = Packet::Auth(Auth::default());
        assert_eq!(encoded_len(&p, Protocol::V311), Err(EncodeError::UnsupportedPacket("AUTH")));
        assert_eq!(encode(&p, Protocol::V311, &mut BytesMut::new()), Err(EncodeError::UnsupportedPacket("AUTH")));
    }
}
