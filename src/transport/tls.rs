//! TLS for `tls` and `wss` listeners: rustls (ring provider), TLS 1.2 and 1.3, ALPN, optional
//! client-certificate authentication, and certificates that are reloaded without a restart.
//!
//! [`ReloadingTls`] holds the current `ServerConfig`; each handshake takes the config in
//! force when it starts, so a reload affects new connections only. [`ReloadingTls::watch`]
//! re-reads the PEM files every `reload_interval_secs` (and on SIGHUP) and swaps the config
//! when their content changed and loads cleanly; a broken file keeps the previous config.
//! This module must not decide what a client may do: it only reports the verified
//! certificate's CN.

use parking_lot::{Mutex, RwLock};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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
}

/// The TLS configuration of one listener, replaceable while it serves.
pub struct ReloadingTls {
    spec: TlsConfig,
    alpn: Vec<u8>,
    current: RwLock<Arc<ServerConfig>>,
    /// File contents the current config was built from, to notice changes.
    loaded: Mutex<Vec<Vec<u8>>>,
}

impl ReloadingTls {
    /// Load the files once; errors here stop the gateway at start-up with the file named.
    pub fn load(spec: &TlsConfig, alpn: &[u8]) -> Result<Arc<ReloadingTls>, TlsError> {
        let files = read_files(spec)?;
        let config = build(&files, spec, alpn)?;
        Ok(Arc::new(ReloadingTls {
            spec: spec.clone(),
            alpn: alpn.to_vec(),
            current: RwLock::new(config),
            loaded: Mutex::new(files.contents()),
        }))
    }

    /// TLS handshake with the config in force now; returns the stream and the client
    /// certificate's CN if one was presented and verified.
    pub async fn accept<S>(&self, stream: S) -> Result<(TlsStream<S>, Option<String>), TransportError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.current.read().clone();
        let tls = TlsAcceptor::from(config).accept(stream).await.map_err(TransportError::Tls)?;
        let cn = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| subject_cn(c));
        Ok((tls, cn))
    }

    /// Re-read the files; swap the config if they changed. `Ok(true)` when swapped.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = read_files(&self.spec)?;
        let contents = files.contents();
        if *self.loaded.lock() == contents {
            return Ok(false);
        }
        let config = build(&files, &self.spec, &self.alpn)?;
        *self.current.write() = config;
        *self.loaded.lock() = contents;
        Ok(true)
    }

    /// Reload on file change (polled) and on SIGHUP until `shutdown`.
    pub async fn watch(self: Arc<Self>, listener: Arc<str>, shutdown: CancellationToken) {
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
    Ok(Files {
        cert: read(&spec.cert_path())?,
        key: read(&spec.key_path())?,
        ca: spec.client_ca.as_deref().map(read).transpose()?,
    })
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

fn build(files: &Files, spec: &TlsConfig, alpn: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(&files.cert.0, &files.cert.1)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key.1)
        .map_err(|e| TlsError::Pem { path: files.key.0.clone(), msg: format!("no usable private key: {e}") })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &files.ca {
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
    Ok(Arc::new(config))
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
    fn garbage_is_not_a_certificate() {
        for bad in [&b""[..], b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x30\x01\x00", b"\x30\x80"] {
            assert_eq!(subject_cn(bad), None);
        }
    }
}
