//! Fuzz target: decode arbitrary bytes as a stream of MQTT packets for 3.1.1 and 5.0 with
//! a small maximum packet size; every packet that decodes must encode, with `encoded_len`
//! matching, and decode back to itself.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lmq_gateway::protocol::{decode, encode, encoded_len, Protocol};

const MAX_SIZE: usize = 1024;

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(packet)) = decode(&mut buf, protocol, MAX_SIZE) {
            let mut out = BytesMut::new();
            encode(&packet, protocol, &mut out).expect("decoded packet must encode");
            assert_eq!(encoded_len(&packet, protocol), Ok(out.len()));
            let again = decode(&mut out, protocol, usize::MAX).expect("re-encoded packet must decode");
            assert_eq!(again.as_ref(), Some(&packet));
            assert!(out.is_empty(), "re-encoded packet not consumed exactly");
        }
    }
});
