//! Fuzz target: the decoders of what the gateway reads back from the core service and from
//! its own files — data another gateway, an application with write access, a newer or older
//! version, or a damaged disk may have produced.
//!
//! The first byte picks the decoder; the rest is the stored value. Properties: no decoder
//! panics; whatever decodes encodes again and decodes to the same value (and, for the
//! embedded log's binary frames, to the very same bytes); the values the gateway derives
//! from a decoded entry (session state, retained message, expiry) are computed without
//! panicking and are stable under a second round.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lmq_gateway::auth::credential::StoredCredential;
use lmq_gateway::backend::{CoreRecord, Record, TopicPartition};
use lmq_gateway::events::{ClientEvent, EventType, GATEWAY_HEADER};
use lmq_gateway::fuzzing;
use lmq_gateway::router::mapping::{decode_record, encode_record, message_headers, record_to_message};
use lmq_gateway::router::topic;
use lmq_gateway::session::persist::Stored;

/// Clocks at which expiry is evaluated: the gateway's (milliseconds since the epoch, never
/// negative). Stored times are whatever the data says.
fn times() -> [i64; 2] {
    [lmq_gateway::now_ms(), 0]
}

/// `session::persist`: a stored persistent session (JSON), as CONNECT and expiry read it.
fn session(data: &[u8]) {
    let Some(stored) = Stored::decode(data) else { return };
    assert_eq!(Stored::decode(&stored.encode()).as_ref(), Some(&stored), "session does not round-trip");
    for now in times() {
        let _ = stored.expired(now);
    }
    for inflight in &stored.inflight {
        let _ = (inflight.packet_id(), inflight.origin());
    }
    // Restoring normalises (unknown QoS, acknowledgements below the committed position);
    // saving what was restored and restoring again changes nothing more.
    let (state, _inflight) = stored.clone().into_state();
    let once = Stored::from_state(&state, stored.expiry_secs, stored.disconnected_at_ms);
    let (state, _) = once.clone().into_state();
    let twice = Stored::from_state(&state, stored.expiry_secs, stored.disconnected_at_ms);
    assert_eq!(once, twice, "restored session not stable");
}

/// `auth::credential`: a device credential (JSON), as the authenticator loads it.
fn credential(data: &[u8]) {
    let Some(cred) = StoredCredential::decode(data) else { return };
    let again = StoredCredential {
        v: lmq_gateway::auth::credential::FORMAT_VERSION,
        secret: cred.secret.expose().to_owned(),
        client_id: cred.client_id.clone(),
        publish: cred.acl.publish_filters().to_vec(),
        subscribe: cred.acl.subscribe_filters().to_vec(),
        created_ms: cred.created_ms,
    };
    let Some(back) = StoredCredential::decode(&again.encode()) else { panic!("credential does not round-trip") };
    assert_eq!(back.secret, cred.secret);
    assert_eq!(back.client_id, cred.client_id);
    assert_eq!(back.acl, cred.acl);
    assert_eq!(back.created_ms, cred.created_ms);
    // The granted filters were validated when the credential was built: checks on them
    // cannot fail, whatever is asked.
    for t in ["a", "a/b", "a/p2p/GID_x@@@1", "$SYS/x", "#", "a/+", "", "a//b"] {
        let _ = (cred.acl.can_publish(t), cred.acl.can_subscribe(t));
    }
}

/// `router::mapping`: a retained message (binary record encoding), and the message the
/// router makes of it for subscribers.
fn retained(data: &[u8]) {
    let Some(rec) = decode_record(Bytes::copy_from_slice(data)) else { return };
    assert_eq!(decode_record(encode_record(&rec)).as_ref(), Some(&rec), "retained record does not round-trip");
    let topic_name = rec.header("topic").and_then(|t| std::str::from_utf8(t).ok()).unwrap_or("p/q");
    let parent = topic::parent(topic_name);
    let Some(message) = record_to_message(parent, &rec) else { return };
    for now in times() {
        let _ = message.expired(now);
        let _ = message.publish_properties(now);
    }
    // The record the gateway would write for this message maps back to the same message, but
    // for its ID: a message written again gets a new one (`TopicMap::to_record`), which the
    // headers of the message alone do not carry.
    let written = CoreRecord {
        key: None,
        headers: message_headers(&message),
        value: message.payload.clone(),
        timestamp_ms: message.timestamp_ms,
    };
    let without_id = lmq_gateway::router::mapping::Message { msg_id: None, ..message.clone() };
    assert_eq!(record_to_message(parent, &written).as_ref(), Some(&without_id), "message not stable");
}

/// `backend::embedded::segment`: a log frame from a segment file.
fn segment_frame(data: &[u8]) {
    let Ok((offset, rec, used)) = fuzzing::segment_decode_frame(data) else { return };
    assert!(used <= data.len(), "frame of {used} bytes in {} bytes", data.len());
    let frame = fuzzing::segment_encode_record(offset, &rec).expect("a decoded record is storable");
    assert_eq!(frame, &data[..used], "frame does not re-encode to the same bytes");
}

/// `backend::embedded::segment`: a frame body (what follows length and crc).
fn segment_body(data: &[u8]) {
    let Ok((offset, rec)) = fuzzing::segment_decode_body(Bytes::copy_from_slice(data)) else { return };
    let frame = fuzzing::segment_encode_record(offset, &rec).expect("a decoded record is storable");
    assert_eq!(&frame[8..], data, "body does not re-encode to the same bytes");
    let (o, r, used) = fuzzing::segment_decode_frame(&frame).expect("an encoded frame decodes");
    assert_eq!((o, &r, used), (offset, &rec, frame.len()));
}

/// `backend::embedded::state`: a state store file, replayed frame by frame as on open.
fn state_file(data: &[u8]) {
    let mut rest = data;
    let mut consumed = 0;
    while let Ok(Some((body, used))) = fuzzing::state_read_frame(&mut rest) {
        let frame = &data[consumed..consumed + used];
        consumed += used;
        assert_eq!(consumed + rest.len(), data.len(), "frame sizes do not add up");
        let Some((key, value)) = fuzzing::state_decode(body) else { break };
        let again = fuzzing::state_encode(&key, value.as_ref()).expect("a decoded entry is storable");
        assert_eq!(again, frame, "state entry does not re-encode to the same bytes");
    }
}

/// `auth`: a revoked-token entry (JSON with the token's expiry).
fn revoked(data: &[u8]) {
    let until = fuzzing::revoked_until(data);
    assert_eq!(fuzzing::revoked_until(&fuzzing::revoked_encode(until)), until);
}

/// `session::takeover`: a record of the events topic: [gateway header length][header][body].
fn event(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else { return };
    let (marker, body) = rest.split_at(usize::from(n).min(rest.len()));
    let record = |rec: CoreRecord| Record { tp: TopicPartition::new("events", 0), offset: 0, record: rec };
    let rec = CoreRecord {
        key: None,
        headers: vec![(GATEWAY_HEADER.to_owned(), Bytes::copy_from_slice(marker))],
        value: Bytes::copy_from_slice(body),
        timestamp_ms: 0,
    };
    let Some((client_id, gateway_id, time)) = fuzzing::foreign_connect(&record(rec), "events", "self") else { return };
    assert!(gateway_id != "self" && gateway_id.as_bytes() == marker, "event accepted without a matching marker");
    let event = ClientEvent {
        event_type: EventType::Connect,
        client_id: client_id.clone(),
        channel_id: "c".into(),
        client_ip: "127.0.0.1".into(),
        time,
        gateway_id: gateway_id.clone(),
        username: None,
        reason: None,
    };
    assert_eq!(
        fuzzing::foreign_connect(&record(event.to_record()), "events", "self"),
        Some((client_id, gateway_id, time)),
        "event does not round-trip"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, data)) = data.split_first() else { return };
    match which % 8 {
        0 => session(data),
        1 => credential(data),
        2 => retained(data),
        3 => segment_frame(data),
        4 => segment_body(data),
        5 => state_file(data),
        6 => revoked(data),
        _ => event(data),
    }
});
