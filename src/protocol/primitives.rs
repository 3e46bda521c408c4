//! Wire primitives shared by all packets: the bounds-checked [`Reader`] over a received
//! packet (integers, variable byte integers, UTF-8 strings, binary data as zero-copy
//! [`Bytes`] slices) and the [`Sink`] trait through which every packet is encoded once
//! and either measured ([`Counter`]) or written (`BytesMut`).

use super::error::{DecodeError, EncodeError};
use super::types::PacketId;
use bytes::{BufMut, Bytes, BytesMut};

/// Largest value of a variable byte integer (and thus of a remaining length).
pub(crate) const MAX_VARINT: usize = 268_435_455;

/// Bounds-checked cursor over `data[pos..end]`. Invariant: `pos <= end <= data.len()`.
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// Reader over `data[start..]`.
    pub(crate) fn new(data: &'a Bytes, start: usize) -> Self {
        let end = data.len();
        Reader { data, pos: start.min(end), end }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// Fails unless everything was consumed.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.end).ok_or(DecodeError::UnexpectedEof(what))?;
        let data: &'a Bytes = self.data;
        let s = data.get(self.pos..end).ok_or(DecodeError::UnexpectedEof(what))?;
        self.pos = end;
        Ok(s)
    }

    /// Zero-copy slice of the next `n` bytes.
    fn take_bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        // In bounds: `take` checked `start + n <= end <= data.len()`.
        Ok(self.data.slice(start..self.pos))
    }

    /// A reader over the next `n` bytes, which this reader skips.
    pub(crate) fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(Reader { data: self.data, pos: start, end: self.pos })
    }

    /// Zero-copy slice of everything left.
    pub(crate) fn rest(&mut self) -> Bytes {
        let start = self.pos;
        self.pos = self.end;
        self.data.slice(start..self.end)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        match self.take(1, what)? {
            [b] => Ok(*b),
            _ => Err(DecodeError::UnexpectedEof(what)),
        }
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        match self.take(2, what)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(DecodeError::UnexpectedEof(what)),
        }
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        match self.take(4, what)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(DecodeError::UnexpectedEof(what)),
        }
    }

    /// Variable byte integer, at most 4 bytes [MQTT-1.5.5].
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8(what)?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedVarInt)
    }

    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16("packet identifier")?).ok_or(DecodeError::ZeroPacketId)
    }

    /// Raw bytes of a two-byte-length-prefixed field.
    pub(crate) fn prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// UTF-8 encoded string without U+0000 [MQTT-1.5.3-1] [MQTT-1.5.3-2].
    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let raw = self.prefixed(what)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
        if raw.contains(&0) {
            return Err(DecodeError::NullCharInString);
        }
        Ok(s.to_owned())
    }

    /// Binary data, zero-copy.
    pub(crate) fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)?;
        self.take_bytes(usize::from(len), what)
    }
}

/// Number of bytes of `v` as a variable byte integer (1..=4; values above
/// [`MAX_VARINT`] are rejected when written).
pub(crate) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Destination of an encoding: counts bytes ([`Counter`]) or writes them (`BytesMut`).
/// Each packet's encoder is written once against this trait, so `encoded_len` and
/// `encode` cannot disagree.
pub(crate) trait Sink {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_slice(&mut self, v: &[u8]);

    fn put_varint(&mut self, v: usize) -> Result<(), EncodeError> {
        if v > MAX_VARINT {
            return Err(EncodeError::VarIntTooLarge(v));
        }
        let mut v = v;
        loop {
            // `v & 0x7F` fits a byte.
            let mut b = (v & 0x7F) as u8;
            v >>= 7;
            if v > 0 {
                b |= 0x80;
            }
            self.put_u8(b);
            if v == 0 {
                return Ok(());
            }
        }
    }

    fn put_str(&mut self, s: &str) -> Result<(), EncodeError> {
        let len = u16::try_from(s.len()).map_err(|_| EncodeError::StringTooLong(s.len()))?;
        self.put_u16(len);
        self.put_slice(s.as_bytes());
        Ok(())
    }

    fn put_binary(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        let len = u16::try_from(b.len()).map_err(|_| EncodeError::BinaryTooLong(b.len()))?;
        self.put_u16(len);
        self.put_slice(b);
        Ok(())
    }
}

/// A [`Sink`] that only counts.
#[derive(Default)]
pub(crate) struct Counter(pub(crate) usize);

impl Sink for Counter {
    fn put_u8(&mut self, _: u8) {
        self.0 = self.0.saturating_add(1);
    }
    fn put_u16(&mut self, _: u16) {
        self.0 = self.0.saturating_add(2);
    }
    fn put_u32(&mut self, _: u32) {
        self.0 = self.0.saturating_add(4);
    }
    fn put_slice(&mut self, v: &[u8]) {
        self.0 = self.0.saturating_add(v.len());
    }
    fn put_varint(&mut self, v: usize) -> Result<(), EncodeError> {
        if v > MAX_VARINT {
            return Err(EncodeError::VarIntTooLarge(v));
        }
        self.0 = self.0.saturating_add(varint_len(v));
        Ok(())
    }
}

impl Sink for BytesMut {
    fn put_u8(&mut self, v: u8) {
        BufMut::put_u8(self, v);
    }
    fn put_u16(&mut self, v: u16) {
        BufMut::put_u16(self, v);
    }
    fn put_u32(&mut self, v: u32) {
        BufMut::put_u32(self, v);
    }
    fn put_slice(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
}

/// Fails with [`DecodeError::WildcardInTopicName`] if a topic name contains `+` or `#`
/// [MQTT-3.3.2-2].
pub(crate) fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        Err(DecodeError::WildcardInTopicName)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_over(bytes: &'static [u8]) -> Bytes {
        Bytes::from_static(bytes)
    }

    #[test]
    fn varint_spec_boundaries() {
        let cases: &[(usize, &[u8])] = &[
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        for &(v, enc) in cases {
            let mut out = BytesMut::new();
            out.put_varint(v).unwrap();
            assert_eq!(&out[..], enc, "{v}");
            let mut c = Counter::default();
            c.put_varint(v).unwrap();
            assert_eq!(c.0, enc.len());
            let data = Bytes::copy_from_slice(enc);
            let mut r = Reader::new(&data, 0);
            assert_eq!(r.varint("x").unwrap() as usize, v);
            assert!(r.is_empty());
        }
        let mut out = BytesMut::new();
        assert_eq!(out.put_varint(MAX_VARINT + 1), Err(EncodeError::VarIntTooLarge(MAX_VARINT + 1)));
    }

    #[test]
    fn varint_too_long() {
        let data = reader_over(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
        let mut r = Reader::new(&data, 0);
        assert_eq!(r.varint("x"), Err(DecodeError::MalformedVarInt));
    }

    #[test]
    fn strings() {
        let data = reader_over(&[0x00, 0x02, b'h', b'i']);
        assert_eq!(Reader::new(&data, 0).string("s").unwrap(), "hi");
        let data = reader_over(&[0x00, 0x02, 0xC3, 0x28]);
        assert_eq!(Reader::new(&data, 0).string("s"), Err(DecodeError::InvalidUtf8));
        // Encoded surrogate U+D800 is not UTF-8 [MQTT-1.5.3-1].
        let data = reader_over(&[0x00, 0x03, 0xED, 0xA0, 0x80]);
        assert_eq!(Reader::new(&data, 0).string("s"), Err(DecodeError::InvalidUtf8));
        let data = reader_over(&[0x00, 0x02, b'a', 0x00]);
        assert_eq!(Reader::new(&data, 0).string("s"), Err(DecodeError::NullCharInString));
        let data = reader_over(&[0x00, 0x05, b'a']);
        assert_eq!(Reader::new(&data, 0).string("s"), Err(DecodeError::UnexpectedEof("s")));
        let long = "x".repeat(65_536);
        let mut out = BytesMut::new();
        assert_eq!(out.put_str(&long), Err(EncodeError::StringTooLong(65_536)));
    }

    #[test]
    fn binary_is_zero_copy() {
        let data = Bytes::from(vec![0x00, 0x03, 1, 2, 3]);
        let b = Reader::new(&data, 0).binary("b").unwrap();
        assert_eq!(&b[..], &[1, 2, 3]);
        assert_eq!(b.as_ptr(), data[2..].as_ptr());
    }
}
