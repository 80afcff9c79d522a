//! TLS for the load side of `tether bench proxies --tls`: the certificate every proxy under
//! test terminates TLS with, and the `wss` client the load generator speaks.
//!
//! Every proxy gets the same leaf — ECDSA P-256, signed by a CA made for the run with
//! [`tether_kit::certs`] — and every client offers exactly one protocol version, one cipher
//! suite and one key-exchange group ([`PINNED`]), so whichever server answers, the hand-shake
//! that is measured is the same one; [`Negotiated`] reads back what was agreed, for the report.
//! Unless the run asks for resumption, clients keep no session (rustls
//! `Resumption::disabled()`): every connect is a full hand-shake, and [`Negotiated::kind`]
//! says so per connection.
//!
//! The client config is built here rather than taken from
//! [`tether_kit::certs::client_config`] because that one offers rustls' whole default set
//! (and its order would decide the suite against rustls servers, while OpenSSL servers pick
//! their own): a comparison needs the offer pinned. The trust anchor is the same: the CA
//! certificate [`tether_kit::certs::DevCa`] made, and nothing else.

use anyhow::{ensure, Context as _, Result};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::HandshakeKind;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tether_kit::certs::{DevCa, LOCAL_NAMES};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// What every client offers, in the words of the report.
pub const PINNED: &str = "TLS 1.3 only, TLS13_AES_128_GCM_SHA256, X25519, ALPN http/1.1";
/// The certificate's key, in the words of the report.
pub const CERT_KIND: &str = "ECDSA P-256 leaf for localhost/127.0.0.1 signed by a CA made for the run";
/// The name clients ask for (SNI) and verify: one of the names the leaf certifies.
const SERVER_NAME: &str = "localhost";

/// The files the servers are given.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The leaf's certificate, PEM (nginx `ssl_certificate`, the balancer's `--tls-cert`).
    pub cert: PathBuf,
    /// The leaf's private key, PEM (nginx `ssl_certificate_key`, `--tls-key`).
    pub key: PathBuf,
    /// Certificate and key in one file, as HAProxy's `crt` wants them.
    pub combined: PathBuf,
    /// The CA certificate, PEM: what clients (and the workers, through their spec) trust.
    pub ca_pem: String,
}

/// Makes a CA and a [`LOCAL_NAMES`] leaf and writes the servers' files under `dir`.
pub fn server_files(dir: &Path) -> Result<ServerFiles> {
    let ca = DevCa::generate("tether bench proxies CA")?;
    let leaf = ca.leaf(&LOCAL_NAMES)?;
    let files = ca.write_leaf(&dir.join("tls"), &leaf)?;
    let combined = dir.join("tls").join("haproxy.pem");
    std::fs::write(&combined, format!("{}{}", leaf.cert_pem, leaf.key_pem))
        .with_context(|| format!("writing {}", combined.display()))?;
    Ok(ServerFiles { cert: files.cert, key: files.key, combined, ca_pem: ca.cert_pem().to_owned() })
}

/// What a load generator needs to speak `wss` (serialisable: a worker gets it in its spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSpec {
    /// The CA certificate(s) to trust, PEM.
    pub ca_pem: String,
    /// Keep sessions and resume them (otherwise every connect is a full hand-shake).
    pub resume: bool,
}

/// A `wss` client: one rustls config shared by all of a process's connections (which is what
/// lets resumption work when it is on).
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// The pinned client of [`PINNED`], trusting the CA certificates of `spec`.
    pub fn new(spec: &TlsSpec) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(spec.ca_pem.as_bytes()) {
            roots.add(cert.context("reading the CA certificate")?).context("adding the CA certificate")?;
        }
        ensure!(!roots.is_empty(), "no certificate in the CA PEM");
        let ring = rustls::crypto::ring::default_provider();
        let provider = CryptoProvider {
            cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
            kx_groups: vec![rustls::crypto::ring::kx_group::X25519],
            ..ring
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = if spec.resume { Resumption::default() } else { Resumption::disabled() };
        let name = ServerName::try_from(SERVER_NAME).context("server name")?.to_owned();
        Ok(Self { connector: TlsConnector::from(Arc::new(config)), name })
    }

    /// The client hand-shake over an established TCP connection.
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }
}

/// What one connection negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: String,
    pub suite: String,
    pub group: String,
    pub alpn: String,
    /// Full, full with a HelloRetryRequest, or resumed.
    pub kind: String,
}

impl Negotiated {
    /// Reads the agreement off an established client connection.
    pub fn of(conn: &rustls::ClientConnection) -> Self {
        let unknown = || "?".to_owned();
        Self {
            version: conn.protocol_version().map_or_else(unknown, |v| format!("{v:?}")),
            suite: conn.negotiated_cipher_suite().map_or_else(unknown, |s| format!("{:?}", s.suite())),
            group: conn.negotiated_key_exchange_group().map_or_else(unknown, |g| format!("{:?}", g.name())),
            alpn: conn.alpn_protocol().map_or_else(|| "none".to_owned(), |p| String::from_utf8_lossy(p).into_owned()),
            kind: conn.handshake_kind().map_or_else(unknown, |k| kind_label(k).to_owned()),
        }
    }
}

impl std::fmt::Display for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}, ALPN {}, {} hand-shake", self.version, self.suite, self.group, self.alpn, self.kind)
    }
}

/// Whether a hand-shake resumed a session.
pub fn resumed(conn: &rustls::ClientConnection) -> bool {
    conn.handshake_kind() == Some(HandshakeKind::Resumed)
}

fn kind_label(k: HandshakeKind) -> &'static str {
    match k {
        HandshakeKind::Full => "full",
        HandshakeKind::FullWithHelloRetryRequest => "full (with HelloRetryRequest)",
        HandshakeKind::Resumed => "resumed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_refuses_an_empty_trust_store_and_reads_a_real_one() {
        assert!(ClientTls::new(&TlsSpec { ca_pem: "no pem here".into(), resume: false }).is_err());
        let dir = tempfile::tempdir().unwrap();
        let files = server_files(dir.path()).unwrap();
        assert!(ClientTls::new(&TlsSpec { ca_pem: files.ca_pem.clone(), resume: false }).is_ok());
        let combined = std::fs::read_to_string(&files.combined).unwrap();
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        let key = std::fs::read_to_string(&files.key).unwrap();
        assert!(combined.starts_with(&cert) && combined.ends_with(&key), "HAProxy's crt file is cert then key");
        assert!(key.contains("PRIVATE KEY"));
    }
}
