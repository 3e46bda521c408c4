//! MQTT 5 properties [MQTT-2.2.2]: the property identifier table and, per packet kind,
//! decoding (rejecting identifiers not allowed in that packet, duplicates of
//! single-valued properties and out-of-range values) and encoding.
//!
//! User properties (0x26) may repeat in every packet, and Subscription Identifier (0x0B)
//! may repeat in PUBLISH; every other property may appear at most once.

use super::error::{DecodeError, EncodeError};
use super::primitives::{Counter, Reader, Sink};
use super::types::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties, PublishProperties,
    SubscribeProperties, UserProperties, WillProperties,
};
use bytes::Bytes;

pub(crate) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(crate) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(crate) const CONTENT_TYPE: u8 = 0x03;
pub(crate) const RESPONSE_TOPIC: u8 = 0x08;
pub(crate) const CORRELATION_DATA: u8 = 0x09;
pub(crate) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(crate) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(crate) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub(crate) const SERVER_KEEP_ALIVE: u8 = 0x13;
pub(crate) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(crate) const AUTHENTICATION_DATA: u8 = 0x16;
pub(crate) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(crate) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(crate) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(crate) const RESPONSE_INFORMATION: u8 = 0x1A;
pub(crate) const SERVER_REFERENCE: u8 = 0x1C;
pub(crate) const REASON_STRING: u8 = 0x1F;
pub(crate) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(crate) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(crate) const TOPIC_ALIAS: u8 = 0x23;
pub(crate) const MAXIMUM_QOS: u8 = 0x24;
pub(crate) const RETAIN_AVAILABLE: u8 = 0x25;
pub(crate) const USER_PROPERTY: u8 = 0x26;
pub(crate) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub(crate) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub(crate) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub(crate) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

// ---------------------------------------------------------------------------------------
// Decoding helpers

/// Reads the property length and returns a reader over exactly the properties.
fn block<'a>(r: &mut Reader<'a>) -> Result<Reader<'a>, DecodeError> {
    let len = r.varint("property length")?;
    let len = usize::try_from(len).map_err(|_| DecodeError::UnexpectedEof("properties"))?;
    r.sub(len, "properties")
}

/// Property identifiers are variable byte integers, but every defined one is below 0x80,
/// so reading one byte and rejecting unknown values is equivalent.
fn id(p: &mut Reader<'_>) -> Result<u8, DecodeError> {
    p.u8("property identifier")
}

fn set<T>(slot: &mut Option<T>, id: u8, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(v);
    Ok(())
}

/// A byte property whose only valid values are 0 and 1.
fn flag(p: &mut Reader<'_>, slot: &mut Option<u8>, id: u8) -> Result<(), DecodeError> {
    let v = p.u8("property value")?;
    if v > 1 {
        return Err(DecodeError::InvalidPropertyValue { id, value: u32::from(v) });
    }
    set(slot, id, v)
}

fn u16_prop(p: &mut Reader<'_>, slot: &mut Option<u16>, id: u8) -> Result<(), DecodeError> {
    let v = p.u16("property value")?;
    set(slot, id, v)
}

fn nonzero_u16(p: &mut Reader<'_>, slot: &mut Option<u16>, id: u8) -> Result<(), DecodeError> {
    let v = p.u16("property value")?;
    if v == 0 {
        return Err(DecodeError::InvalidPropertyValue { id, value: 0 });
    }
    set(slot, id, v)
}

fn u32_prop(p: &mut Reader<'_>, slot: &mut Option<u32>, id: u8) -> Result<(), DecodeError> {
    let v = p.u32("property value")?;
    set(slot, id, v)
}

fn nonzero_u32(p: &mut Reader<'_>, slot: &mut Option<u32>, id: u8) -> Result<(), DecodeError> {
    let v = p.u32("property value")?;
    if v == 0 {
        return Err(DecodeError::InvalidPropertyValue { id, value: 0 });
    }
    set(slot, id, v)
}

fn str_prop(p: &mut Reader<'_>, slot: &mut Option<String>, id: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(p.string("property value")?);
    Ok(())
}

fn bin_prop(p: &mut Reader<'_>, slot: &mut Option<Bytes>, id: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(p.binary("property value")?);
    Ok(())
}

fn user_prop(p: &mut Reader<'_>, list: &mut UserProperties) -> Result<(), DecodeError> {
    let k = p.string("user property name")?;
    let v = p.string("user property value")?;
    list.push((k, v));
    Ok(())
}

/// Subscription identifier: variable byte integer 1..=268,435,455 [MQTT-3.8.2.1.2].
fn subscription_id(p: &mut Reader<'_>) -> Result<u32, DecodeError> {
    let v = p.varint("subscription identifier")?;
    if v == 0 {
        return Err(DecodeError::InvalidPropertyValue { id: SUBSCRIPTION_IDENTIFIER, value: 0 });
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// Decoding per packet kind

pub(crate) fn decode_connect(r: &mut Reader<'_>) -> Result<ConnectProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = ConnectProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            SESSION_EXPIRY_INTERVAL => u32_prop(&mut p, &mut out.session_expiry_interval, SESSION_EXPIRY_INTERVAL)?,
            RECEIVE_MAXIMUM => nonzero_u16(&mut p, &mut out.receive_maximum, RECEIVE_MAXIMUM)?,
            MAXIMUM_PACKET_SIZE => nonzero_u32(&mut p, &mut out.maximum_packet_size, MAXIMUM_PACKET_SIZE)?,
            TOPIC_ALIAS_MAXIMUM => u16_prop(&mut p, &mut out.topic_alias_maximum, TOPIC_ALIAS_MAXIMUM)?,
            REQUEST_RESPONSE_INFORMATION => {
                flag(&mut p, &mut out.request_response_information, REQUEST_RESPONSE_INFORMATION)?
            }
            REQUEST_PROBLEM_INFORMATION => {
                flag(&mut p, &mut out.request_problem_information, REQUEST_PROBLEM_INFORMATION)?
            }
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            AUTHENTICATION_METHOD => str_prop(&mut p, &mut out.authentication_method, AUTHENTICATION_METHOD)?,
            AUTHENTICATION_DATA => bin_prop(&mut p, &mut out.authentication_data, AUTHENTICATION_DATA)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

pub(crate) fn decode_will(r: &mut Reader<'_>) -> Result<WillProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = WillProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            WILL_DELAY_INTERVAL => u32_prop(&mut p, &mut out.will_delay_interval, WILL_DELAY_INTERVAL)?,
            PAYLOAD_FORMAT_INDICATOR => flag(&mut p, &mut out.payload_format_indicator, PAYLOAD_FORMAT_INDICATOR)?,
            MESSAGE_EXPIRY_INTERVAL => u32_prop(&mut p, &mut out.message_expiry_interval, MESSAGE_EXPIRY_INTERVAL)?,
            CONTENT_TYPE => str_prop(&mut p, &mut out.content_type, CONTENT_TYPE)?,
            RESPONSE_TOPIC => str_prop(&mut p, &mut out.response_topic, RESPONSE_TOPIC)?,
            CORRELATION_DATA => bin_prop(&mut p, &mut out.correlation_data, CORRELATION_DATA)?,
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

pub(crate) fn decode_connack(r: &mut Reader<'_>) -> Result<ConnAckProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = ConnAckProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            SESSION_EXPIRY_INTERVAL => u32_prop(&mut p, &mut out.session_expiry_interval, SESSION_EXPIRY_INTERVAL)?,
            RECEIVE_MAXIMUM => nonzero_u16(&mut p, &mut out.receive_maximum, RECEIVE_MAXIMUM)?,
            MAXIMUM_QOS => flag(&mut p, &mut out.maximum_qos, MAXIMUM_QOS)?,
            RETAIN_AVAILABLE => flag(&mut p, &mut out.retain_available, RETAIN_AVAILABLE)?,
            MAXIMUM_PACKET_SIZE => nonzero_u32(&mut p, &mut out.maximum_packet_size, MAXIMUM_PACKET_SIZE)?,
            ASSIGNED_CLIENT_IDENTIFIER => {
                str_prop(&mut p, &mut out.assigned_client_identifier, ASSIGNED_CLIENT_IDENTIFIER)?
            }
            TOPIC_ALIAS_MAXIMUM => u16_prop(&mut p, &mut out.topic_alias_maximum, TOPIC_ALIAS_MAXIMUM)?,
            REASON_STRING => str_prop(&mut p, &mut out.reason_string, REASON_STRING)?,
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                flag(&mut p, &mut out.wildcard_subscription_available, WILDCARD_SUBSCRIPTION_AVAILABLE)?
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                flag(&mut p, &mut out.subscription_identifiers_available, SUBSCRIPTION_IDENTIFIER_AVAILABLE)?
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                flag(&mut p, &mut out.shared_subscription_available, SHARED_SUBSCRIPTION_AVAILABLE)?
            }
            SERVER_KEEP_ALIVE => u16_prop(&mut p, &mut out.server_keep_alive, SERVER_KEEP_ALIVE)?,
            RESPONSE_INFORMATION => str_prop(&mut p, &mut out.response_information, RESPONSE_INFORMATION)?,
            SERVER_REFERENCE => str_prop(&mut p, &mut out.server_reference, SERVER_REFERENCE)?,
            AUTHENTICATION_METHOD => str_prop(&mut p, &mut out.authentication_method, AUTHENTICATION_METHOD)?,
            AUTHENTICATION_DATA => bin_prop(&mut p, &mut out.authentication_data, AUTHENTICATION_DATA)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

pub(crate) fn decode_publish(r: &mut Reader<'_>) -> Result<PublishProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = PublishProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            PAYLOAD_FORMAT_INDICATOR => flag(&mut p, &mut out.payload_format_indicator, PAYLOAD_FORMAT_INDICATOR)?,
            MESSAGE_EXPIRY_INTERVAL => u32_prop(&mut p, &mut out.message_expiry_interval, MESSAGE_EXPIRY_INTERVAL)?,
            // Alias 0 and aliases above the negotiated maximum are the session's to reject
            // (Topic Alias invalid, 0x94).
            TOPIC_ALIAS => u16_prop(&mut p, &mut out.topic_alias, TOPIC_ALIAS)?,
            RESPONSE_TOPIC => str_prop(&mut p, &mut out.response_topic, RESPONSE_TOPIC)?,
            CORRELATION_DATA => bin_prop(&mut p, &mut out.correlation_data, CORRELATION_DATA)?,
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            SUBSCRIPTION_IDENTIFIER => {
                let v = subscription_id(&mut p)?;
                out.subscription_identifiers.push(v);
            }
            CONTENT_TYPE => str_prop(&mut p, &mut out.content_type, CONTENT_TYPE)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK.
pub(crate) fn decode_ack(r: &mut Reader<'_>) -> Result<AckProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = AckProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            REASON_STRING => str_prop(&mut p, &mut out.reason_string, REASON_STRING)?,
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

pub(crate) fn decode_subscribe(r: &mut Reader<'_>) -> Result<SubscribeProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = SubscribeProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            SUBSCRIPTION_IDENTIFIER => {
                let v = subscription_id(&mut p)?;
                set(&mut out.subscription_identifier, SUBSCRIPTION_IDENTIFIER, v)?;
            }
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

/// UNSUBSCRIBE carries user properties only.
pub(crate) fn decode_unsubscribe(r: &mut Reader<'_>) -> Result<UserProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = UserProperties::new();
    while !p.is_empty() {
        match id(&mut p)? {
            USER_PROPERTY => user_prop(&mut p, &mut out)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

pub(crate) fn decode_disconnect(r: &mut Reader<'_>) -> Result<DisconnectProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = DisconnectProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            SESSION_EXPIRY_INTERVAL => u32_prop(&mut p, &mut out.session_expiry_interval, SESSION_EXPIRY_INTERVAL)?,
            REASON_STRING => str_prop(&mut p, &mut out.reason_string, REASON_STRING)?,
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            SERVER_REFERENCE => str_prop(&mut p, &mut out.server_reference, SERVER_REFERENCE)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

pub(crate) fn decode_auth(r: &mut Reader<'_>) -> Result<AuthProperties, DecodeError> {
    let mut p = block(r)?;
    let mut out = AuthProperties::default();
    while !p.is_empty() {
        match id(&mut p)? {
            AUTHENTICATION_METHOD => str_prop(&mut p, &mut out.authentication_method, AUTHENTICATION_METHOD)?,
            AUTHENTICATION_DATA => bin_prop(&mut p, &mut out.authentication_data, AUTHENTICATION_DATA)?,
            REASON_STRING => str_prop(&mut p, &mut out.reason_string, REASON_STRING)?,
            USER_PROPERTY => user_prop(&mut p, &mut out.user_properties)?,
            other => return Err(DecodeError::InvalidProperty(other)),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Encoding

/// A property set that can be written (without its length prefix) to a [`Sink`].
pub(crate) trait Props {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError>;
}

/// Writes the property length followed by the properties.
pub(crate) fn encode<S: Sink, P: Props + ?Sized>(p: &P, s: &mut S) -> Result<(), EncodeError> {
    let mut c = Counter::default();
    p.write(&mut c)?;
    s.put_varint(c.0)?;
    p.write(s)
}

fn opt_u8<S: Sink>(s: &mut S, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_u8(v);
    }
}

fn opt_u16<S: Sink>(s: &mut S, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_u16(v);
    }
}

fn opt_u32<S: Sink>(s: &mut S, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_u32(v);
    }
}

fn opt_str<S: Sink>(s: &mut S, id: u8, v: &Option<String>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_str(v)?;
    }
    Ok(())
}

fn opt_bin<S: Sink>(s: &mut S, id: u8, v: &Option<Bytes>) -> Result<(), EncodeError> {
    if let Some(v) = v {
        s.put_u8(id);
        s.put_binary(v)?;
    }
    Ok(())
}

fn sub_id<S: Sink>(s: &mut S, v: u32) -> Result<(), EncodeError> {
    if v == 0 {
        return Err(EncodeError::ZeroSubscriptionIdentifier);
    }
    s.put_u8(SUBSCRIPTION_IDENTIFIER);
    // u32 always fits usize on supported targets; saturate otherwise so the range check fails.
    s.put_varint(usize::try_from(v).unwrap_or(usize::MAX))
}

impl Props for UserProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        for (k, v) in self {
            s.put_u8(USER_PROPERTY);
            s.put_str(k)?;
            s.put_str(v)?;
        }
        Ok(())
    }
}

impl Props for ConnectProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        opt_u16(s, RECEIVE_MAXIMUM, self.receive_maximum);
        opt_u32(s, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        opt_u16(s, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        opt_u8(s, REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        opt_u8(s, REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        self.user_properties.write(s)?;
        opt_str(s, AUTHENTICATION_METHOD, &self.authentication_method)?;
        opt_bin(s, AUTHENTICATION_DATA, &self.authentication_data)
    }
}

impl Props for WillProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, WILL_DELAY_INTERVAL, self.will_delay_interval);
        opt_u8(s, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        opt_u32(s, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        opt_str(s, CONTENT_TYPE, &self.content_type)?;
        opt_str(s, RESPONSE_TOPIC, &self.response_topic)?;
        opt_bin(s, CORRELATION_DATA, &self.correlation_data)?;
        self.user_properties.write(s)
    }
}

impl Props for ConnAckProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        opt_u16(s, RECEIVE_MAXIMUM, self.receive_maximum);
        opt_u8(s, MAXIMUM_QOS, self.maximum_qos);
        opt_u8(s, RETAIN_AVAILABLE, self.retain_available);
        opt_u32(s, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        opt_str(s, ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier)?;
        opt_u16(s, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        opt_str(s, REASON_STRING, &self.reason_string)?;
        self.user_properties.write(s)?;
        opt_u8(s, WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        opt_u8(s, SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifiers_available);
        opt_u8(s, SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
        opt_u16(s, SERVER_KEEP_ALIVE, self.server_keep_alive);
        opt_str(s, RESPONSE_INFORMATION, &self.response_information)?;
        opt_str(s, SERVER_REFERENCE, &self.server_reference)?;
        opt_str(s, AUTHENTICATION_METHOD, &self.authentication_method)?;
        opt_bin(s, AUTHENTICATION_DATA, &self.authentication_data)
    }
}

impl Props for PublishProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u8(s, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        opt_u32(s, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        opt_u16(s, TOPIC_ALIAS, self.topic_alias);
        opt_str(s, RESPONSE_TOPIC, &self.response_topic)?;
        opt_bin(s, CORRELATION_DATA, &self.correlation_data)?;
        self.user_properties.write(s)?;
        for &id in &self.subscription_identifiers {
            sub_id(s, id)?;
        }
        opt_str(s, CONTENT_TYPE, &self.content_type)
    }
}

impl Props for AckProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_str(s, REASON_STRING, &self.reason_string)?;
        self.user_properties.write(s)
    }
}

impl Props for SubscribeProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        if let Some(id) = self.subscription_identifier {
            sub_id(s, id)?;
        }
        self.user_properties.write(s)
    }
}

impl Props for DisconnectProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        opt_str(s, REASON_STRING, &self.reason_string)?;
        self.user_properties.write(s)?;
        opt_str(s, SERVER_REFERENCE, &self.server_reference)
    }
}

impl Props for AuthProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_str(s, AUTHENTICATION_METHOD, &self.authentication_method)?;
        opt_bin(s, AUTHENTICATION_DATA, &self.authentication_data)?;
        opt_str(s, REASON_STRING, &self.reason_string)?;
        self.user_properties.write(s)
    }
}

pub(crate) fn ack_is_empty(p: &AckProperties) -> bool {
    p.reason_string.is_none() && p.user_properties.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn reader(bytes: &[u8]) -> Bytes {
        Bytes::copy_from_slice(bytes)
    }

    #[test]
    fn connect_properties_decode_and_encode() {
        let raw = [
            0x0E, // property length 14
            0x11, 0x00, 0x00, 0x00, 0x0A, // session expiry interval 10
            0x21, 0x00, 0x14, // receive maximum 20
            0x26, 0x00, 0x01, b'k', 0x00, 0x00, // user property ("k", "")
        ];
        let v = raw.to_vec();
        let data = reader(&v);
        let mut r = Reader::new(&data, 0);
        let p = decode_connect(&mut r).unwrap();
        assert!(r.is_empty());
        assert_eq!(p.session_expiry_interval, Some(10));
        assert_eq!(p.receive_maximum, Some(20));
        assert_eq!(p.user_properties, vec![("k".to_string(), String::new())]);
        let mut out = BytesMut::new();
        encode(&p, &mut out).unwrap();
        assert_eq!(&out[..], &v[..]);
    }

    #[test]
    fn duplicate_single_valued_property_is_protocol_error() {
        let data = reader(&[0x06, 0x21, 0x00, 0x01, 0x21, 0x00, 0x02]);
        let err = decode_connect(&mut Reader::new(&data, 0)).unwrap_err();
        assert_eq!(err, DecodeError::DuplicateProperty(RECEIVE_MAXIMUM));
        assert_eq!(err.reason_code().0, 0x82);
    }

    #[test]
    fn user_properties_and_subscription_ids_repeat() {
        let data = reader(&[0x0C, 0x26, 0x00, 0x01, b'a', 0x00, 0x00, 0x26, 0x00, 0x00, 0x00, 0x00, 0x0B]);
        // The trailing 0x0B lacks its value.
        assert_eq!(
            decode_publish(&mut Reader::new(&data, 0)).unwrap_err(),
            DecodeError::UnexpectedEof("subscription identifier")
        );
        // Property length 4 cuts the second identifier's varint short.
        let data = reader(&[0x04, 0x0B, 0x01, 0x0B, 0x80, 0x01]);
        assert_eq!(
            decode_publish(&mut Reader::new(&data, 0)).unwrap_err(),
            DecodeError::UnexpectedEof("subscription identifier")
        );
        let data = reader(&[0x05, 0x0B, 0x01, 0x0B, 0x80, 0x01]);
        let p = decode_publish(&mut Reader::new(&data, 0)).unwrap();
        assert_eq!(p.subscription_identifiers, vec![1, 128]);
    }

    #[test]
    fn property_not_allowed_in_packet() {
        // Topic Alias (0x23) in CONNECT.
        let data = reader(&[0x03, 0x23, 0x00, 0x01]);
        let err = decode_connect(&mut Reader::new(&data, 0)).unwrap_err();
        assert_eq!(err, DecodeError::InvalidProperty(0x23));
        assert_eq!(err.reason_code().0, 0x81);
        // Subscription identifier repeated in SUBSCRIBE.
        let data = reader(&[0x04, 0x0B, 0x01, 0x0B, 0x02]);
        assert_eq!(
            decode_subscribe(&mut Reader::new(&data, 0)).unwrap_err(),
            DecodeError::DuplicateProperty(SUBSCRIPTION_IDENTIFIER)
        );
        // Multi-byte identifier is never valid.
        let data = reader(&[0x02, 0x81, 0x00]);
        assert_eq!(decode_ack(&mut Reader::new(&data, 0)).unwrap_err(), DecodeError::InvalidProperty(0x81));
    }

    #[test]
    fn property_values_checked() {
        for raw in [
            &[0x02, 0x01, 0x02][..],                   // payload format 2
            &[0x03, 0x21, 0x00, 0x00][..],             // receive maximum 0
            &[0x05, 0x27, 0x00, 0x00, 0x00, 0x00][..], // maximum packet size 0
            &[0x02, 0x17, 0x05][..],                   // request problem information 5
        ] {
            let data = reader(raw);
            let res = if raw[1] == 0x01 {
                decode_publish(&mut Reader::new(&data, 0)).map(|_| ())
            } else {
                decode_connect(&mut Reader::new(&data, 0)).map(|_| ())
            };
            let err = res.unwrap_err();
            assert!(matches!(err, DecodeError::InvalidPropertyValue { .. }), "{err:?}");
            assert_eq!(err.reason_code().0, 0x82);
        }
        let data = reader(&[0x02, 0x0B, 0x00]);
        assert_eq!(
            decode_subscribe(&mut Reader::new(&data, 0)).unwrap_err(),
            DecodeError::InvalidPropertyValue { id: SUBSCRIPTION_IDENTIFIER, value: 0 }
        );
    }

    #[test]
    fn property_length_overruns_packet() {
        let data = reader(&[0x05, 0x26, 0x00]);
        assert_eq!(decode_ack(&mut Reader::new(&data, 0)).unwrap_err(), DecodeError::UnexpectedEof("properties"));
    }
}
