//! Property tests of the MQTT codec: every valid packet of every kind survives
//! encode → decode for MQTT 3.1.1 and 5.0, `encoded_len` is exact, and `decode` never
//! panics on arbitrary or mutated input.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use bytes::{Bytes, BytesMut};
use lmq_gateway::protocol::{
    decode, encode, encoded_len, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, Disconnect, DisconnectProperties, LastWill, Packet, PacketId, Protocol, PubResponse, Publish,
    PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, SubscribeProperties, SubscriptionOptions,
    UnsubAck, Unsubscribe, UserProperties, WillProperties,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

const MAX_VARINT: u32 = 268_435_455;

fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn topic_name() -> impl Strategy<Value = String> {
    "[^\u{0}+#]{1,12}"
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn pid() -> impl Strategy<Value = PacketId> {
    (1..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap_or(PacketId::MIN))
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn user_props() -> impl Strategy<Value = UserProperties> {
    vec((text(), text()), 0..3)
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    option::of(0..=1u8)
}

fn reason() -> impl Strategy<Value = ReasonCode> {
    any::<u8>().prop_map(ReasonCode)
}

fn ack_props() -> impl Strategy<Value = AckProperties> {
    (option::of(text()), user_props())
        .prop_map(|(reason_string, user_properties)| AckProperties { reason_string, user_properties })
}

fn connect_props() -> impl Strategy<Value = ConnectProperties> {
    (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(1..=u32::MAX),
        option::of(any::<u16>()),
        flag(),
        flag(),
        user_props(),
        option::of(text()),
        option::of(binary()),
    )
        .prop_map(|(se, rm, mps, tam, rri, rpi, up, am, ad)| ConnectProperties {
            session_expiry_interval: se,
            receive_maximum: rm,
            maximum_packet_size: mps,
            topic_alias_maximum: tam,
            request_response_information: rri,
            request_problem_information: rpi,
            user_properties: up,
            authentication_method: am,
            authentication_data: ad,
        })
}

fn will_props() -> impl Strategy<Value = WillProperties> {
    (
        option::of(any::<u32>()),
        flag(),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(topic_name()),
        option::of(binary()),
        user_props(),
    )
        .prop_map(|(wd, pf, me, ct, rt, cd, up)| WillProperties {
            will_delay_interval: wd,
            payload_format_indicator: pf,
            message_expiry_interval: me,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        })
}

fn will(v5: bool) -> impl Strategy<Value = LastWill> {
    let props = if v5 { will_props().boxed() } else { Just(WillProperties::default()).boxed() };
    (topic_name(), binary(), qos(), any::<bool>(), props)
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill { topic, payload, qos, retain, properties })
}

fn connect(v5: bool) -> impl Strategy<Value = Packet> {
    let protocol =
        if v5 { Just(Protocol::V5).boxed() } else { prop_oneof![Just(Protocol::V311), Just(Protocol::V31)].boxed() };
    let props = if v5 { connect_props().boxed() } else { Just(ConnectProperties::default()).boxed() };
    (
        protocol,
        any::<bool>(),
        any::<u16>(),
        text(),
        option::of(will(v5)),
        option::of(text()),
        option::of(binary()),
        props,
    )
        .prop_map(move |(protocol, clean_start, keep_alive, client_id, will, username, password, properties)| {
            // A 3.x password needs a user name [MQTT-3.1.2-22].
            let password = if v5 || username.is_some() { password } else { None };
            Packet::Connect(Box::new(Connect {
                protocol,
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                password,
                properties,
            }))
        })
}

fn connack_props() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            option::of(any::<u32>()),
            option::of(1..=u16::MAX),
            flag(),
            flag(),
            option::of(1..=u32::MAX),
            option::of(text()),
            option::of(any::<u16>()),
            option::of(text()),
            user_props(),
        ),
        (
            flag(),
            flag(),
            flag(),
            option::of(any::<u16>()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
            option::of(binary()),
        ),
    )
        .prop_map(|((se, rm, mq, ra, mps, aci, tam, rs, up), (wsa, sia, ssa, ska, ri, sr, am, ad))| {
            ConnAckProperties {
                session_expiry_interval: se,
                receive_maximum: rm,
                maximum_qos: mq,
                retain_available: ra,
                maximum_packet_size: mps,
                assigned_client_identifier: aci,
                topic_alias_maximum: tam,
                reason_string: rs,
                user_properties: up,
                wildcard_subscription_available: wsa,
                subscription_identifiers_available: sia,
                shared_subscription_available: ssa,
                server_keep_alive: ska,
                response_information: ri,
                server_reference: sr,
                authentication_method: am,
                authentication_data: ad,
            }
        })
}

fn connack(v5: bool) -> BoxedStrategy<Packet> {
    if v5 {
        (any::<bool>(), reason(), connack_props())
            .prop_map(|(session_present, code, properties)| {
                Packet::ConnAck(ConnAck { session_present, code, properties })
            })
            .boxed()
    } else {
        (any::<bool>(), prop::sample::select(vec![0u8, 0x84, 0x85, 0x88, 0x86, 0x87]))
            .prop_map(|(session_present, code)| {
                Packet::ConnAck(ConnAck {
                    session_present,
                    code: ReasonCode(code),
                    properties: ConnAckProperties::default(),
                })
            })
            .boxed()
    }
}

fn publish_props() -> impl Strategy<Value = PublishProperties> {
    (
        flag(),
        option::of(any::<u32>()),
        option::of(any::<u16>()),
        option::of(topic_name()),
        option::of(binary()),
        user_props(),
        vec(1..=MAX_VARINT, 0..3),
        option::of(text()),
    )
        .prop_map(|(pf, me, ta, rt, cd, up, si, ct)| PublishProperties {
            payload_format_indicator: pf,
            message_expiry_interval: me,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
            subscription_identifiers: si,
            content_type: ct,
        })
}

fn publish(v5: bool) -> impl Strategy<Value = Packet> {
    let topic = if v5 { prop_oneof![Just(String::new()), topic_name()].boxed() } else { topic_name().boxed() };
    let props = if v5 { publish_props().boxed() } else { Just(PublishProperties::default()).boxed() };
    (any::<bool>(), qos(), any::<bool>(), topic, pid(), vec(any::<u8>(), 0..64), props).prop_map(
        |(dup, qos, retain, topic, id, payload, properties)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: if at_most_once { None } else { Some(id) },
                payload: Bytes::from(payload),
                properties,
            })
        },
    )
}

fn pub_response(v5: bool) -> impl Strategy<Value = Packet> {
    let rest = if v5 {
        (reason(), ack_props()).boxed()
    } else {
        Just((ReasonCode::SUCCESS, AckProperties::default())).boxed()
    };
    (0..4u8, pid(), rest).prop_map(|(kind, packet_id, (code, properties))| {
        let r = PubResponse { packet_id, code, properties };
        match kind {
            0 => Packet::PubAck(r),
            1 => Packet::PubRec(r),
            2 => Packet::PubRel(r),
            _ => Packet::PubComp(r),
        }
    })
}

fn sub_options(v5: bool) -> BoxedStrategy<SubscriptionOptions> {
    if v5 {
        (
            qos(),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![
                Just(RetainHandling::OnSubscribe),
                Just(RetainHandling::OnNewSubscription),
                Just(RetainHandling::Never)
            ],
        )
            .prop_map(|(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            })
            .boxed()
    } else {
        qos().prop_map(|qos| SubscriptionOptions { qos, ..Default::default() }).boxed()
    }
}

fn subscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let props = if v5 {
        (option::of(1..=MAX_VARINT), user_props())
            .prop_map(|(subscription_identifier, user_properties)| SubscribeProperties {
                subscription_identifier,
                user_properties,
            })
            .boxed()
    } else {
        Just(SubscribeProperties::default()).boxed()
    };
    (pid(), vec((text(), sub_options(v5)), 1..4), props)
        .prop_map(|(packet_id, filters, properties)| Packet::Subscribe(Subscribe { packet_id, filters, properties }))
}

fn suback(v5: bool) -> impl Strategy<Value = Packet> {
    let codes = if v5 {
        vec(reason(), 1..5).boxed()
    } else {
        vec(prop::sample::select(vec![0u8, 1, 2, 0x80]).prop_map(ReasonCode), 1..5).boxed()
    };
    let props = if v5 { ack_props().boxed() } else { Just(AckProperties::default()).boxed() };
    (pid(), codes, props)
        .prop_map(|(packet_id, codes, properties)| Packet::SubAck(SubAck { packet_id, codes, properties }))
}

fn unsubscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let props = if v5 { user_props().boxed() } else { Just(UserProperties::new()).boxed() };
    (pid(), vec(text(), 1..4), props).prop_map(|(packet_id, filters, user_properties)| {
        Packet::Unsubscribe(Unsubscribe { packet_id, filters, user_properties })
    })
}

fn unsuback(v5: bool) -> BoxedStrategy<Packet> {
    if v5 {
        (pid(), vec(reason(), 1..5), ack_props())
            .prop_map(|(packet_id, codes, properties)| Packet::UnsubAck(UnsubAck { packet_id, codes, properties }))
            .boxed()
    } else {
        pid()
            .prop_map(|packet_id| {
                Packet::UnsubAck(UnsubAck { packet_id, codes: Vec::new(), properties: AckProperties::default() })
            })
            .boxed()
    }
}

fn disconnect(v5: bool) -> BoxedStrategy<Packet> {
    if v5 {
        (reason(), option::of(any::<u32>()), option::of(text()), user_props(), option::of(text()))
            .prop_map(|(code, se, rs, up, sr)| {
                Packet::Disconnect(Disconnect {
                    code,
                    properties: DisconnectProperties {
                        session_expiry_interval: se,
                        reason_string: rs,
                        user_properties: up,
                        server_reference: sr,
                    },
                })
            })
            .boxed()
    } else {
        Just(Packet::Disconnect(Disconnect::default())).boxed()
    }
}

fn auth() -> impl Strategy<Value = Packet> {
    (reason(), option::of(text()), option::of(binary()), option::of(text()), user_props()).prop_map(
        |(code, am, ad, rs, up)| {
            Packet::Auth(Auth {
                code,
                properties: AuthProperties {
                    authentication_method: am,
                    authentication_data: ad,
                    reason_string: rs,
                    user_properties: up,
                },
            })
        },
    )
}

fn packet_v311() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect(false),
        connack(false),
        publish(false),
        pub_response(false),
        subscribe(false),
        suback(false),
        unsubscribe(false),
        unsuback(false),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(false),
    ]
}

fn packet_v5() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect(true),
        connack(true),
        publish(true),
        pub_response(true),
        subscribe(true),
        suback(true),
        unsubscribe(true),
        unsuback(true),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(true),
        auth(),
    ]
}

fn roundtrip(packet: &Packet, protocol: Protocol) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    encode(packet, protocol, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let len = encoded_len(packet, protocol).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(len, buf.len());
    // Followed by a second packet: the first must be consumed exactly.
    buf.extend_from_slice(&[0xC0, 0x00]);
    let decoded = decode(&mut buf, protocol, len);
    prop_assert_eq!(decoded, Ok(Some(packet.clone())));
    prop_assert_eq!(decode(&mut buf, protocol, 2), Ok(Some(Packet::PingReq)));
    prop_assert!(buf.is_empty());
    Ok(())
}

/// Decodes until the buffer is exhausted, incomplete or invalid; must not panic.
fn decode_all(mut buf: BytesMut, protocol: Protocol, max_size: usize) {
    while let Ok(Some(packet)) = decode(&mut buf, protocol, max_size) {
        // Anything that decodes can be encoded again.
        let _ = encoded_len(&packet, protocol);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn roundtrip_v311(packet in packet_v311()) {
        roundtrip(&packet, Protocol::V311)?;
    }

    #[test]
    fn roundtrip_v5(packet in packet_v5()) {
        roundtrip(&packet, Protocol::V5)?;
    }

    #[test]
    fn prefixes_are_incomplete(packet in packet_v5()) {
        let mut full = BytesMut::new();
        encode(&packet, Protocol::V5, &mut full).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for n in 0..full.len() {
            let mut buf = BytesMut::from(&full[..n]);
            prop_assert_eq!(decode(&mut buf, Protocol::V5, usize::MAX), Ok(None));
            prop_assert_eq!(&buf[..], &full[..n]);
        }
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..512),
        v5 in any::<bool>(),
        max_size in prop::sample::select(vec![2usize, 16, 256, usize::MAX]),
    ) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
        decode_all(BytesMut::from(&bytes[..]), protocol, max_size);
    }

    #[test]
    fn mutated_packets_never_panic(
        packet in packet_v5(),
        mutations in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        v5 in any::<bool>(),
    ) {
        let mut buf = BytesMut::new();
        encode(&packet, Protocol::V5, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (i, b) in mutations {
            let i = i.index(buf.len());
            if let Some(slot) = buf.get_mut(i) {
                *slot = b;
            }
        }
        let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
        decode_all(buf, protocol, usize::MAX);
    }
}
