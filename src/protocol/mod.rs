//! MQTT 3.1.1 and 5.0 codec: pure functions from bytes to packets and back, no I/O.
//!
//! - [`decode`] parses one packet from the front of a receive buffer (zero-copy for
//!   payloads and binary data),
//! - [`encode`] appends a packet's encoding to a send buffer,
//! - [`encoded_len`] says how many bytes `encode` would write.
//!
//! This file holds the fixed header [MQTT-2.2] and the dispatch to one module per packet
//! kind; `primitives` and `properties` hold what the packet modules share.

mod connect;
mod disconnect;
pub mod error;
mod primitives;
mod properties;
mod puback;
mod publish;
mod subscribe;
pub mod types;
mod unsubscribe;

pub use error::{DecodeError, EncodeError};
pub use types::*;

use bytes::{BufMut, BytesMut};
use primitives::{varint_len, Counter, Reader, Sink, MAX_VARINT};

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// Packet type of CONNECT (high nibble of the first byte): before CONNECT, a first byte of
/// any other type is enough to close the connection [MQTT-3.1.0-1].
pub const CONNECT_TYPE: u8 = CONNECT;

/// Decode one packet from the front of `buf`, consuming its bytes.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet; `buf` is then left
/// untouched. `protocol` is the version negotiated on this connection (use
/// [`Protocol::V311`] before CONNECT); a CONNECT packet is decoded according to its own
/// protocol level whatever `protocol` says. A packet larger than `max_size` bytes (fixed
/// header included) is refused with [`DecodeError::PacketTooLarge`] as soon as its fixed
/// header is readable, before its body is buffered.
///
/// After an error the connection must be closed (after sending the CONNACK or DISCONNECT
/// with [`DecodeError::reason_code`] where the protocol allows); `buf` is then unspecified.
pub fn decode(buf: &mut BytesMut, protocol: Protocol, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    check_flags(packet_type, flags, protocol)?;

    // Remaining length: variable byte integer of at most 4 bytes [MQTT-2.2.3].
    let mut remaining: usize = 0;
    let mut header_len = 1;
    loop {
        if header_len > 4 {
            return Err(DecodeError::MalformedRemainingLength);
        }
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * (header_len - 1));
        header_len += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let size = header_len + remaining;
    if size > max_size {
        return Err(DecodeError::PacketTooLarge { size, max: max_size });
    }
    if buf.len() < size {
        return Ok(None);
    }

    let frame = buf.split_to(size).freeze();
    let mut r = Reader::new(&frame, header_len);
    let packet = match packet_type {
        CONNECT => Packet::Connect(Box::new(connect::decode_connect(&mut r)?)),
        CONNACK => Packet::ConnAck(connect::decode_connack(&mut r, protocol)?),
        PUBLISH => Packet::Publish(publish::decode(&mut r, flags, protocol)?),
        PUBACK => Packet::PubAck(puback::decode(&mut r, protocol)?),
        PUBREC => Packet::PubRec(puback::decode(&mut r, protocol)?),
        PUBREL => Packet::PubRel(puback::decode(&mut r, protocol)?),
        PUBCOMP => Packet::PubComp(puback::decode(&mut r, protocol)?),
        SUBSCRIBE => Packet::Subscribe(subscribe::decode_subscribe(&mut r, protocol)?),
        SUBACK => Packet::SubAck(subscribe::decode_suback(&mut r, protocol)?),
        UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe::decode_unsubscribe(&mut r, protocol)?),
        UNSUBACK => Packet::UnsubAck(unsubscribe::decode_unsuback(&mut r, protocol)?),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect(disconnect::decode_disconnect(&mut r, protocol)?),
        AUTH => Packet::Auth(disconnect::decode_auth(&mut r)?),
        other => return Err(DecodeError::InvalidPacketType(other)),
    };
    r.finish()?;
    Ok(Some(packet))
}

/// Packet type and reserved flag bits of the first byte [MQTT-2.2.2-1] [MQTT-2.2.2-2].
fn check_flags(packet_type: u8, flags: u8, protocol: Protocol) -> Result<(), DecodeError> {
    let expected = match packet_type {
        // DUP, QoS and RETAIN; QoS 3 is malformed [MQTT-3.3.1-4].
        PUBLISH => {
            if flags & 0b0110 == 0b0110 {
                return Err(DecodeError::InvalidPublishQoS);
            }
            return Ok(());
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0b0010,
        CONNECT | CONNACK | PUBACK | PUBREC | PUBCOMP | SUBACK | UNSUBACK | PINGREQ | PINGRESP | DISCONNECT => 0,
        AUTH if protocol.is_v5() => 0,
        other => return Err(DecodeError::InvalidPacketType(other)),
    };
    if flags != expected {
        return Err(DecodeError::InvalidFlags { packet_type, flags });
    }
    Ok(())
}

/// Append the encoding of `packet` for `protocol` to `buf`.
///
/// Fields that do not exist in 3.1.1 (properties, most reason codes) are ignored for
/// [`Protocol::V31`]/[`Protocol::V311`]. CONNECT is encoded for its own `protocol` field.
/// On error `buf` is left as it was.
pub fn encode(packet: &Packet, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let remaining = remaining_len(packet, protocol)?;
    buf.reserve(1 + varint_len(remaining) + remaining);
    let start = buf.len();
    let res = write_packet(packet, protocol, remaining, buf);
    if res.is_err() {
        buf.truncate(start);
    }
    res
}

/// Exact number of bytes [`encode`] would write for `packet`.
pub fn encoded_len(packet: &Packet, protocol: Protocol) -> Result<usize, EncodeError> {
    let remaining = remaining_len(packet, protocol)?;
    Ok(1 + varint_len(remaining) + remaining)
}

fn remaining_len(packet: &Packet, protocol: Protocol) -> Result<usize, EncodeError> {
    let mut c = Counter::default();
    write_body(packet, protocol, &mut c)?;
    if c.0 > MAX_VARINT {
        return Err(EncodeError::PacketTooLarge(c.0));
    }
    Ok(c.0)
}

fn write_packet(packet: &Packet, protocol: Protocol, remaining: usize, buf: &mut BytesMut) -> Result<(), EncodeError> {
    BufMut::put_u8(buf, first_byte(packet));
    Sink::put_varint(buf, remaining)?;
    write_body(packet, protocol, buf)
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => CONNECT << 4,
        Packet::ConnAck(_) => CONNACK << 4,
        Packet::Publish(p) => PUBLISH << 4 | publish::flags(p),
        Packet::PubAck(_) => PUBACK << 4,
        Packet::PubRec(_) => PUBREC << 4,
        Packet::PubRel(_) => PUBREL << 4 | 0b0010,
        Packet::PubComp(_) => PUBCOMP << 4,
        Packet::Subscribe(_) => SUBSCRIBE << 4 | 0b0010,
        Packet::SubAck(_) => SUBACK << 4,
        Packet::Unsubscribe(_) => UNSUBSCRIBE << 4 | 0b0010,
        Packet::UnsubAck(_) => UNSUBACK << 4,
        Packet::PingReq => PINGREQ << 4,
        Packet::PingResp => PINGRESP << 4,
        Packet::Disconnect(_) => DISCONNECT << 4,
        Packet::Auth(_) => AUTH << 4,
    }
}

fn write_body<S: Sink>(packet: &Packet, protocol: Protocol, s: &mut S) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => connect::write_connect(c, s),
        Packet::ConnAck(c) => connect::write_connack(c, protocol, s),
        Packet::Publish(p) => publish::write(p, protocol, s),
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => puback::write(p, protocol, s),
        Packet::Subscribe(p) => subscribe::write_subscribe(p, protocol, s),
        Packet::SubAck(p) => subscribe::write_suback(p, protocol, s),
        Packet::Unsubscribe(p) => unsubscribe::write_unsubscribe(p, protocol, s),
        Packet::UnsubAck(p) => unsubscribe::write_unsuback(p, protocol, s),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => disconnect::write_disconnect(d, protocol, s),
        Packet::Auth(a) => disconnect::write_auth(a, protocol, s),
    }
}

/// Helpers for the per-packet spec vector tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// Decodes `bytes` as exactly one packet, checking that every proper prefix is
    /// incomplete and leaves the buffer untouched.
    pub(crate) fn decode_all(bytes: &[u8], protocol: Protocol) -> Result<Packet, DecodeError> {
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            match decode(&mut buf, protocol, usize::MAX) {
                Ok(None) => assert_eq!(&buf[..], &bytes[..n], "prefix {n} modified"),
                // A malformed packet may be detected from its fixed header already.
                Err(e) => return Err(e),
                Ok(Some(p)) => panic!("prefix of {n} bytes decoded to {p:?}"),
            }
        }
        let mut buf = BytesMut::from(bytes);
        let res = decode(&mut buf, protocol, usize::MAX);
        if let Ok(p) = &res {
            assert!(p.is_some(), "whole packet reported incomplete");
            assert!(buf.is_empty(), "packet not consumed");
        }
        res.map(|p| p.unwrap_or(Packet::PingReq))
    }

    pub(crate) fn encode_vec(packet: &Packet, protocol: Protocol) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode(packet, protocol, &mut buf).unwrap();
        assert_eq!(encoded_len(packet, protocol).unwrap(), buf.len());
        buf.to_vec()
    }

    /// `bytes` decodes to `packet` and `packet` encodes to `bytes`.
    pub(crate) fn check_vector(bytes: &[u8], protocol: Protocol, packet: &Packet) {
        assert_eq!(&decode_all(bytes, protocol).unwrap(), packet);
        assert_eq!(encode_vec(packet, protocol), bytes);
    }

    pub(crate) fn pid(v: u16) -> PacketId {
        PacketId::new(v).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn ping_vectors() {
        for proto in [Protocol::V311, Protocol::V5] {
            check_vector(&[0xC0, 0x00], proto, &Packet::PingReq);
            check_vector(&[0xD0, 0x00], proto, &Packet::PingResp);
        }
        assert_eq!(decode_all(&[0xC0, 0x01, 0x00], Protocol::V311), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn reserved_flags_rejected() {
        for (bytes, packet_type, flags) in [
            (&[0xC1, 0x00][..], PINGREQ, 1),
            (&[0x60, 0x02, 0x00, 0x01][..], PUBREL, 0),
            (&[0x80, 0x00][..], SUBSCRIBE, 0),
            (&[0xA3, 0x00][..], UNSUBSCRIBE, 3),
            (&[0x42, 0x02, 0x00, 0x01][..], PUBACK, 2),
            (&[0x18, 0x00][..], CONNECT, 8),
        ] {
            let mut buf = BytesMut::from(&bytes[..1]);
            let err = decode(&mut buf, Protocol::V5, 1024).unwrap_err();
            assert_eq!(err, DecodeError::InvalidFlags { packet_type, flags });
            assert_eq!(err.reason_code(), ReasonCode::MALFORMED_PACKET);
        }
    }

    #[test]
    fn invalid_packet_types() {
        let mut buf = BytesMut::from(&[0x00, 0x00][..]);
        assert_eq!(decode(&mut buf, Protocol::V5, 1024), Err(DecodeError::InvalidPacketType(0)));
        // AUTH does not exist in 3.1.1.
        let mut buf = BytesMut::from(&[0xF0, 0x00][..]);
        let err = decode(&mut buf, Protocol::V311, 1024).unwrap_err();
        assert_eq!(err, DecodeError::InvalidPacketType(15));
        assert_eq!(err.reason_code(), ReasonCode::MALFORMED_PACKET);
    }

    #[test]
    fn remaining_length_longer_than_four_bytes() {
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        let err = decode(&mut buf, Protocol::V311, usize::MAX).unwrap_err();
        assert_eq!(err, DecodeError::MalformedRemainingLength);
        assert_eq!(err.reason_code(), ReasonCode::MALFORMED_PACKET);
        // Three continuation bytes are still a valid prefix.
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF][..]);
        assert_eq!(decode(&mut buf, Protocol::V311, usize::MAX), Ok(None));
    }

    #[test]
    fn packet_too_large_from_fixed_header_alone() {
        // PUBLISH announcing 200 bytes; only the fixed header is buffered.
        let mut buf = BytesMut::from(&[0x30, 0xC8, 0x01][..]);
        let err = decode(&mut buf, Protocol::V5, 100).unwrap_err();
        assert_eq!(err, DecodeError::PacketTooLarge { size: 203, max: 100 });
        assert_eq!(err.reason_code(), ReasonCode::PACKET_TOO_LARGE);
        // Exactly at the limit is accepted (waits for the body).
        let mut buf = BytesMut::from(&[0x30, 0xC8, 0x01][..]);
        assert_eq!(decode(&mut buf, Protocol::V5, 203), Ok(None));
        // The size limit counts the fixed header too.
        let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
        assert!(matches!(decode(&mut buf, Protocol::V5, 1), Err(DecodeError::PacketTooLarge { size: 2, max: 1 })));
    }

    #[test]
    fn back_to_back_packets_decode_in_order() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i']); // PUBLISH a "hi"
        buf.extend_from_slice(&[0x40, 0x02, 0x00, 0x07]); // PUBACK 7
        buf.extend_from_slice(&[0xC0, 0x00]); // PINGREQ
        buf.extend_from_slice(&[0xE0]); // start of DISCONNECT
        let p = decode(&mut buf, Protocol::V311, 1024).unwrap().unwrap();
        match p {
            Packet::Publish(p) => {
                assert_eq!(p.topic, "a");
                assert_eq!(&p.payload[..], b"hi");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(&mut buf, Protocol::V311, 1024).unwrap(), Some(Packet::PubAck(PubResponse::new(pid(7)))));
        assert_eq!(decode(&mut buf, Protocol::V311, 1024).unwrap(), Some(Packet::PingReq));
        assert_eq!(decode(&mut buf, Protocol::V311, 1024).unwrap(), None);
        assert_eq!(&buf[..], &[0xE0]);
        buf.extend_from_slice(&[0x00]);
        assert_eq!(decode(&mut buf, Protocol::V311, 1024).unwrap(), Some(Packet::Disconnect(Disconnect::default())));
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf, Protocol::V311, 1024).unwrap(), None);
    }

    #[test]
    fn encode_leaves_buffer_alone_on_error() {
        let mut buf = BytesMut::from(&b"xy"[..]);
        let p = Packet::Auth(Auth::default());
        assert!(encode(&p, Protocol::V311, &mut buf).is_err());
        assert_eq!(&buf[..], b"xy");
    }
}
