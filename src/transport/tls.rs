//! TLS for `tls` and `wss` listeners: rustls (ring provider), TLS 1.2 and 1.3, ALPN, optional
//! client-certificate authentication, and certificates that are reloaded without a restart.
//!
//! [`ReloadingTls`] holds the current `ServerConfig`; each handshake takes the config in
//! force when it starts, so a reload affects new connections only. [`ReloadingTls::watch`]
//! re-reads the PEM files every `reload_interval_secs` (and on SIGHUP) and swaps the config
//! when their content changed and loads cleanly; a broken file keeps the previous config.
//! A listener with `self_signed: true` gets a certificate made here at start (rcgen), kept in
//! memory and never reloaded; its SHA-256 fingerprint is what clients check it by.
//! This module must not decide what a client may do: it only reports the verified
//! certificate's CN.

use parking_lot::{Mutex, RwLock};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::TransportError;
use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Pem { path: PathBuf, msg: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(String),
    #[error("tls needs cert and key, or self_signed: true")]
    NoCertificate,
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(String),
}

/// The TLS configuration of one listener, replaceable while it serves.
pub struct ReloadingTls {
    spec: TlsConfig,
    alpn: Vec<u8>,
    current: RwLock<Current>,
    /// File contents the current config was built from, to notice changes.
    loaded: Mutex<Vec<Vec<u8>>>,
    /// Names a self-signed certificate was made for (empty for certificates from files).
    names: Vec<String>,
}

/// The config in force and the fingerprint of the certificate it presents.
struct Current {
    config: Arc<ServerConfig>,
    fingerprint: String,
}

impl ReloadingTls {
    /// Load the files once, or make the self-signed certificate; errors here stop the
    /// gateway at start-up with the file named.
    pub fn load(spec: &TlsConfig, alpn: &[u8]) -> Result<Arc<ReloadingTls>, TlsError> {
        let (current, loaded, names) = if spec.self_signed {
            let ca = spec.client_ca.as_deref().map(read).transpose()?;
            let names = certificate_names(&spec.self_signed_names);
            let (cert, key) = self_signed(&names)?;
            (build(vec![cert], key, ca.as_ref(), spec, alpn)?, Vec::new(), names)
        } else {
            let files = read_files(spec)?;
            (build_from(&files, spec, alpn)?, files.contents(), Vec::new())
        };
        Ok(Arc::new(ReloadingTls {
            spec: spec.clone(),
            alpn: alpn.to_vec(),
            current: RwLock::new(current),
            loaded: Mutex::new(loaded),
            names,
        }))
    }

    /// The certificate was made by the gateway (`self_signed: true`).
    pub fn is_self_signed(&self) -> bool {
        self.spec.self_signed
    }

    /// DNS names and addresses of a self-signed certificate (empty for one from files).
    pub fn self_signed_names(&self) -> &[String] {
        &self.names
    }

    /// SHA-256 fingerprint of the server certificate presented now, as colon-separated
    /// upper-case hex (the form `openssl x509 -fingerprint -sha256` prints).
    pub fn fingerprint(&self) -> String {
        self.current.read().fingerprint.clone()
    }

    /// TLS handshake with the config in force now; returns the stream and the client
    /// certificate's CN if one was presented and verified.
    pub async fn accept<S>(&self, stream: S) -> Result<(TlsStream<S>, Option<String>), TransportError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.current.read().config.clone();
        let tls = TlsAcceptor::from(config).accept(stream).await.map_err(TransportError::Tls)?;
        let cn = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| subject_cn(c));
        Ok((tls, cn))
    }

    /// Re-read the files; swap the config if they changed. `Ok(true)` when swapped. A
    /// self-signed certificate has no files and is never replaced.
    pub fn reload(&self) -> Result<bool, TlsError> {
        if self.spec.self_signed {
            return Ok(false);
        }
        let files = read_files(&self.spec)?;
        let contents = files.contents();
        if *self.loaded.lock() == contents {
            return Ok(false);
        }
        let current = build_from(&files, &self.spec, &self.alpn)?;
        *self.current.write() = current;
        *self.loaded.lock() = contents;
        Ok(true)
    }

    /// Reload on file change (polled) and on SIGHUP until `shutdown`; returns at once for a
    /// self-signed certificate.
    pub async fn watch(self: Arc<Self>, listener: Arc<str>, shutdown: CancellationToken) {
        if self.spec.self_signed {
            return;
        }
        let every = Duration::from_secs(self.spec.reload_interval_secs.max(1));
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
                _ = hangup => tracing::info!(listener = %listener, "SIGHUP: reloading TLS certificates"),
            }
            match self.reload() {
                Ok(true) => tracing::info!(listener = %listener, "TLS certificates reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(listener = %listener, error = %e, "TLS reload failed; keeping the previous certificates")
                }
            }
        }
    }
}

struct Files {
    cert: (PathBuf, Vec<u8>),
    key: (PathBuf, Vec<u8>),
    ca: Option<(PathBuf, Vec<u8>)>,
}

impl Files {
    fn contents(&self) -> Vec<Vec<u8>> {
        let mut v = vec![self.cert.1.clone(), self.key.1.clone()];
        if let Some((_, ca)) = &self.ca {
            v.push(ca.clone());
        }
        v
    }
}

fn read(path: &Path) -> Result<(PathBuf, Vec<u8>), TlsError> {
    std::fs::read(path).map(|b| (path.to_owned(), b)).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn read_files(spec: &TlsConfig) -> Result<Files, TlsError> {
    let (Some(cert), Some(key)) = (spec.cert_path(), spec.key_path()) else {
        return Err(TlsError::NoCertificate);
    };
    Ok(Files { cert: read(&cert)?, key: read(&key)?, ca: spec.client_ca.as_deref().map(read).transpose()? })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), msg: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_owned(), msg: "no CERTIFICATE found".into() });
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_from(files: &Files, spec: &TlsConfig, alpn: &[u8]) -> Result<Current, TlsError> {
    let chain = certs(&files.cert.0, &files.cert.1)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key.1)
        .map_err(|e| TlsError::Pem { path: files.key.0.clone(), msg: format!("no usable private key: {e}") })?;
    build(chain, key, files.ca.as_ref(), spec, alpn)
}

fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: Option<&(PathBuf, Vec<u8>)>,
    spec: &TlsConfig,
    alpn: &[u8],
) -> Result<Current, TlsError> {
    let fingerprint = chain.first().map(|c| fingerprint(c)).unwrap_or_default();
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match ca {
        Some((path, pem)) => {
            let mut roots = RootCertStore::empty();
            for c in certs(path, pem)? {
                roots.add(c).map_err(|e| TlsError::Pem { path: path.clone(), msg: e.to_string() })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if spec.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Verifier(e.to_string()))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Current { config: Arc::new(config), fingerprint })
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex pairs.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The names a self-signed certificate is made for: loopback by name and address, this
/// host's name (when it is one a certificate can carry), then `extra`, without repeats.
pub fn certificate_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    names.extend(host_name());
    for n in extra {
        if !names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
            names.push(n.clone());
        }
    }
    names
}

/// This machine's host name: `HOSTNAME`, else the kernel's, if it is a plain DNS name.
fn host_name() -> Option<String> {
    let name = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())?;
    let name = name.trim().to_ascii_lowercase();
    let plain = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    (plain && name != "localhost").then_some(name)
}

/// A certificate for `names` (DNS names or IP addresses) signed by its own new P-256 key,
/// valid from a day ago for a year: browsers and Apple clients refuse server certificates
/// valid for much longer, even ones the user chose to trust.
pub fn self_signed(names: &[String]) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let err = |e: rcgen::Error| TlsError::SelfSigned(e.to_string());
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "lmq-gateway self-signed");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "lmq-gateway");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((cert.der().clone(), key))
}

/// Subject common name of a DER certificate. The certificate has been verified by rustls
/// already; this walks only Certificate → TBSCertificate → subject, bounds-checked, and
/// returns None on anything unexpected.
pub fn subject_cn(der: &[u8]) -> Option<String> {
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, tbs, _) = tlv(cert)? else { return None };
    let mut fields = Vec::with_capacity(7);
    let mut rest = tbs;
    while !rest.is_empty() && fields.len() < 7 {
        let (tag, content, r) = tlv(rest)?;
        if !(fields.is_empty() && tag == 0xa0) {
            fields.push((tag, content)); // serial, signature, issuer, validity, subject, ...
        }
        rest = r;
    }
    let &(0x30, subject) = fields.get(4)? else { return None };
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, set, r) = tlv(rdns)?;
        rdns = r;
        if tag != 0x31 {
            return None;
        }
        let mut atvs = set;
        while !atvs.is_empty() {
            let (tag, atv, r) = tlv(atvs)?;
            atvs = r;
            if tag != 0x30 {
                return None;
            }
            let (0x06, oid, value) = tlv(atv)? else { return None };
            if oid == [0x55, 0x04, 0x03] {
                let (tag, s, _) = tlv(value)?;
                return match tag {
                    // UTF8String, PrintableString, IA5String, TeletexString (ASCII in practice)
                    0x0c | 0x13 | 0x16 | 0x14 => String::from_utf8(s.to_vec()).ok(),
                    // BMPString: UTF-16BE
                    0x1e => {
                        let units: Vec<u16> = s.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
                        String::from_utf16(&units).ok()
                    }
                    _ => None,
                };
            }
        }
    }
    None
}

/// One DER tag-length-value: (tag, content, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cn_is_read_from_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Acme");
        params.distinguished_name.push(rcgen::DnType::CommonName, "GID_dev@@@device-42");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_cn(cert.der()).as_deref(), Some("GID_dev@@@device-42"));

        let params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        let mut params = params;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_cn(cert.der()), None);
    }

    #[test]
    fn self_signed_certificate_names_the_host_and_extra_names() {
        let names = certificate_names(&["gw.example.com".into(), "LOCALHOST".into(), "10.1.2.3".into()]);
        assert_eq!(&names[..3], ["localhost", "127.0.0.1", "::1"]);
        assert_eq!(names.iter().filter(|n| n.eq_ignore_ascii_case("localhost")).count(), 1);
        assert!(names.ends_with(&["gw.example.com".to_string(), "10.1.2.3".to_string()]), "{names:?}");
        let (cert, _key) = self_signed(&names).unwrap();
        assert_eq!(subject_cn(&cert).as_deref(), Some("lmq-gateway self-signed"));
        // Every name is in the certificate (DNS names as text, addresses as their bytes).
        let der = cert.as_ref();
        let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"gw.example.com") && has(b"localhost") && has(&[10, 1, 2, 3]) && has(&[127, 0, 0, 1]));
    }

    #[test]
    fn fingerprint_is_openssl_style() {
        // SHA-256("abc"), a FIPS 180-2 test vector.
        assert_eq!(
            fingerprint(b"abc"),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        for bad in [&b""[..], b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x30\x01\x00", b"\x30\x80"] {
            assert_eq!(subject_cn(bad), None);
        }
    }
}
