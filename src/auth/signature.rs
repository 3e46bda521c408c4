//! Signature mode and device credential mode (SPEC §4): password =
//! Base64(HMAC-SHA1(key = secret, data = full ClientId)).
//!
//! Verification decodes the presented password and hands it to [`Mac::verify_slice`], which
//! compares in constant time (`subtle`), so the time taken does not reveal how many bytes of
//! a guess were right. There is no other comparison of MACs in this crate; [`ct_eq`] is the
//! constant-time comparison for everything else (it is what `verify_slice` does inside).
//! This module never logs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

type HmacSha1 = Hmac<Sha1>;

/// HMAC accepts keys of any length, so this is always `Some`; it is an `Option` only so that
/// no code path here can panic.
fn mac(secret: &[u8], client_id: &str) -> Option<HmacSha1> {
    let mut mac = HmacSha1::new_from_slice(secret).ok()?;
    mac.update(client_id.as_bytes());
    Some(mac)
}

/// The password of signature / device credential mode for `client_id`.
pub fn sign(secret: &str, client_id: &str) -> String {
    mac(secret.as_bytes(), client_id).map_or_else(String::new, |m| STANDARD.encode(m.finalize().into_bytes()))
}

/// Does `password` (as sent in CONNECT) equal `sign(secret, client_id)`? Constant-time in the
/// MAC; a password that is not UTF-8 or not Base64 is simply wrong.
pub fn verify(secret: &str, client_id: &str, password: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(password) else {
        return false;
    };
    let Ok(presented) = STANDARD.decode(text) else {
        return false;
    };
    mac(secret.as_bytes(), client_id).is_some_and(|m| m.verify_slice(&presented).is_ok())
}

/// Constant-time equality of two byte strings (length is not hidden).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// The expected password computed by OpenSSL, independently of this crate's code.
    fn openssl_password(secret: &str, client_id: &str) -> String {
        let run = |cmd: &mut Command| {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap_or_else(|e| {
                panic!("this test needs the `openssl` command line tool to compute the expected value: {e}")
            })
        };
        let mut dgst = run(Command::new("openssl").args(["dgst", "-sha1", "-hmac", secret, "-binary"]));
        dgst.stdin.take().unwrap().write_all(client_id.as_bytes()).unwrap();
        let digest = dgst.wait_with_output().unwrap();
        assert!(digest.status.success(), "openssl dgst failed");
        assert_eq!(digest.stdout.len(), 20, "HMAC-SHA1 is 20 bytes");
        let mut b64 = run(Command::new("openssl").args(["base64", "-A"]));
        b64.stdin.take().unwrap().write_all(&digest.stdout).unwrap();
        let out = b64.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl base64 failed");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn known_answer_matches_openssl() {
        for (secret, client_id) in [
            ("demo-secret-change-me", "GID_demo@@@dev1"),
            ("s", "c1"),
            ("a much longer secret ".repeat(8).as_str(), "x"),
        ] {
            let expected = openssl_password(secret, client_id);
            assert_eq!(sign(secret, client_id), expected);
            assert!(verify(secret, client_id, expected.as_bytes()));
        }
    }

    #[test]
    fn wrong_inputs_are_refused() {
        let good = sign("secret", "GID_a@@@d1");
        assert!(verify("secret", "GID_a@@@d1", good.as_bytes()));
        assert!(!verify("secret2", "GID_a@@@d1", good.as_bytes()), "wrong secret");
        assert!(!verify("secret", "GID_a@@@d2", good.as_bytes()), "signature of another ClientId");
        assert!(!verify("secret", "GID_a@@@d1", b""), "empty");
        assert!(!verify("secret", "GID_a@@@d1", b"\xff\xfe\x00"), "not UTF-8");
        assert!(!verify("secret", "GID_a@@@d1", b"%%%not base64"), "not Base64");
        assert!(!verify("secret", "GID_a@@@d1", &good.as_bytes()[..good.len() - 4]), "truncated MAC");
        // Flip the first and the last MAC byte: both wrong.
        let raw = STANDARD.decode(&good).unwrap();
        for i in [0, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[i] ^= 1;
            assert!(!verify("secret", "GID_a@@@d1", STANDARD.encode(&bad).as_bytes()), "byte {i} flipped");
        }
    }

    /// The MAC comparison is constant-time by construction: `verify` never compares bytes
    /// itself; it passes the decoded password to `Mac::verify_slice`, which compares with
    /// `subtle::ConstantTimeEq` — the primitive behind `ct_eq`, checked here. (Timing itself
    /// is not measured: a unit test on a shared machine cannot tell a few nanoseconds apart.)
    #[test]
    fn comparison_is_the_constant_time_one() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        let good = sign("k", "c");
        assert!(verify("k", "c", good.as_bytes()));
        assert!(!verify("k", "c", format!("{good}\n").as_bytes()), "exact Base64 only");
    }
}
