//! Delayed PUBLISHes the gateway refuses: malformed or beyond 40 days, and targets the
//! publisher may not reach.

use super::*;
use crate::common::{raw_connect, Raw};
use crate::hostile::{login, open, persistent_connect, unique, USER};
use lmq_gateway::auth::signature::sign;

/// Signature mode; key `ak` may publish under `<parent>/allowed` only, and subscribe to all.
fn auth(parent: &str) -> String {
    format!(
        "auth:\n  allow_plain_client_ids: true\n  instance_id: inst\n  access_keys:\n    - id: ak\n      secret: s3cret\n      \
         publish: [\"{parent}/allowed/#\"]\n      subscribe: [\"#\"]\n"
    )
}

/// A refused PUBLISH: topic, user properties, whether the reason code is right, and which.
type Case = (String, Vec<(&'static str, String)>, fn(u8) -> bool, &'static str);

/// The reason code of the answer to a QoS 1 (PUBACK) or QoS 2 (PUBREC) PUBLISH.
async fn answer(raw: &mut Raw, publish: Packet) -> u8 {
    let topic = match &publish {
        Packet::Publish(m) => m.topic.clone(),
        _ => String::new(),
    };
    raw.send(&publish).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) | Some(Packet::PubRec(a)) => a.code.0,
        other => panic!("PUBLISH {topic}: expected PUBACK or PUBREC, got {other:?}"),
    }
}

/// MQTT 5 QoS 1: PUBACK 0x90 for `$delayed/abc/<t>`, `$delayed/10`, `$delayed/10/` and
/// `$delayed/3456001/<t>`; 0x99 for `__STARTDELIVERTIME` "soon" and now + 40 days + 1 s;
/// at least 0x80 for a delayed PUBLISH to a topic the key may not publish to or under a
/// reserved parent (under the reserved prefix, the status events), with `$delayed/…` or `__STARTDELIVERTIME`.
/// QoS 2: PUBREC 0x90. QoS 0, and MQTT 3.1.1 at any QoS: the connection is closed (DISCONNECT
/// 0x90 in 5.0), no PUBACK. The client stays connected after each refused QoS 1/2 PUBLISH;
/// none of them is stored (`lmq_delayed_accepted_total` counts only the one good message of
/// the check) or delivered, and `lmq_delayed_refused_total` counts each malformed or too long
/// one by its reason.
pub async fn out_of_range_or_forbidden_delayed_publishes_are_refused_and_never_delivered(core: &Core) {
    let _turn = serial().await;
    let parent = unique("delayrefuse");
    let (extra, reserved) = isolated_as(&format!("{}{DELAY}", auth(&parent)));
    let gw = core.start(&extra).await;
    wait_forwarding(&gw).await;
    let sub_id = unique("refuse-sub");
    let sub = Collector::start_with(
        gw.addr(),
        persistent_connect(&sub_id, true, USER, &sign("s3cret", &sub_id)),
        &[&format!("{parent}/#")],
    )
    .await;
    let (malformed, too_long) = (refused(&gw, "malformed"), refused(&gw, "too_long"));
    let accepted = gw.ctx.metrics.delay.accepted.get();

    let id = unique("refuse-pub");
    let (code, _, mut raw) = open(gw.addr(), persistent_connect(&id, true, USER, &sign("s3cret", &id))).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let allowed = format!("{parent}/allowed/x");
    let forbidden = format!("{parent}/forbidden/x");
    let soon = (now_ms() + 1000).to_string();
    let cases: Vec<Case> = vec![
        (format!("$delayed/abc/{allowed}"), vec![], |c| c == 0x90, "0x90"),
        ("$delayed/10".into(), vec![], |c| c == 0x90, "0x90"),
        ("$delayed/10/".into(), vec![], |c| c == 0x90, "0x90"),
        (format!("$delayed/3456001/{allowed}"), vec![], |c| c == 0x90, "0x90"),
        (allowed.clone(), vec![("__STARTDELIVERTIME", "soon".into())], |c| c == 0x99, "0x99"),
        (
            allowed.clone(),
            vec![("__STARTDELIVERTIME", (now_ms() + 40 * 86_400_000 + 1000).to_string())],
            |c| c == 0x99,
            "0x99",
        ),
        (format!("$delayed/1/{forbidden}"), vec![], |c| c >= 0x80, ">= 0x80"),
        (forbidden.clone(), vec![("__STARTDELIVERTIME", soon.clone())], |c| c >= 0x80, ">= 0x80"),
        (format!("$delayed/1/{reserved}delay-09"), vec![], |c| c >= 0x80, ">= 0x80"),
        (format!("$delayed/1/{reserved}x/y"), vec![], |c| c >= 0x80, ">= 0x80"),
        ("$delayed/1/GID_LMQ_STATUS/x".into(), vec![], |c| c >= 0x80, ">= 0x80"),
        (format!("{reserved}delay-09"), vec![("__STARTDELIVERTIME", soon.clone())], |c| c >= 0x80, ">= 0x80"),
    ];
    for (n, (topic, props, ok, want)) in cases.iter().enumerate() {
        let code = answer(&mut raw, publish_v5(n as u16 + 1, topic, &format!("refused-{n}"), false, props)).await;
        assert!(ok(code), "PUBLISH {topic} {props:?}: reason code {code:#04x}, want {want}");
    }
    // QoS 2: PUBREC with the reason.
    let mut qos2 = match publish_v5(100, &format!("$delayed/3456001/{allowed}"), "refused-qos2", false, &[]) {
        Packet::Publish(m) => m,
        _ => unreachable!(),
    };
    qos2.qos = QoS::ExactlyOnce;
    assert_eq!(answer(&mut raw, Packet::Publish(qos2)).await, 0x90, "PUBREC of a QoS 2 PUBLISH beyond 40 days");
    // Still connected: a good delayed message is accepted.
    assert_eq!(answer(&mut raw, publish_v5(101, &format!("$delayed/1/{allowed}"), "good", false, &[])).await, 0);

    // QoS 0 (5.0): DISCONNECT 0x90.
    let id = unique("refuse-qos0");
    let (_, _, mut raw0) = open(gw.addr(), persistent_connect(&id, true, USER, &sign("s3cret", &id))).await;
    raw0.send(&crate::common::publish_packet(1, &format!("$delayed/abc/{allowed}"), QoS::AtMostOnce, b"refused-qos0"))
        .await;
    let seen = raw0.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.code.0 == 0x90),
        "QoS 0 malformed delayed PUBLISH: expected DISCONNECT 0x90 and the close, got {seen:?}"
    );

    // MQTT 3.1.1: closed without PUBACK.
    let id = unique("refuse-v311");
    let (mut raw311, code) = raw_connect(gw.addr(), &id, Protocol::V311, login(&id), None).await;
    assert_eq!(code, 0);
    raw311
        .send(&crate::common::publish_packet(
            1,
            &format!("$delayed/3456001/{allowed}"),
            QoS::AtLeastOnce,
            b"refused-v311",
        ))
        .await;
    let seen = raw311.until_closed().await;
    assert!(seen.is_empty(), "MQTT 3.1.1 PUBLISH beyond 40 days: expected the close and nothing else, got {seen:?}");

    // Nothing refused is stored or delivered; the good one is.
    let got = sub.wait_for(2, Duration::from_secs(4)).await;
    let payloads: Vec<&str> = got.iter().map(|g| g.payload.as_str()).collect();
    assert_eq!(payloads, vec!["good"], "delivered");
    assert_eq!(gw.ctx.metrics.delay.accepted.get() - accepted, 1, "delayed messages stored");
    // abc, 10, 10/, soon, QoS 0 abc; 3456001 (5.0 QoS 1 and 2, 3.1.1), 40 days + 1 s.
    assert_eq!(refused(&gw, "malformed") - malformed, 5, "lmq_delayed_refused_total{{reason=malformed}}");
    assert_eq!(refused(&gw, "too_long") - too_long, 4, "lmq_delayed_refused_total{{reason=too_long}}");
    drop(raw);
    drop(gw);
}
