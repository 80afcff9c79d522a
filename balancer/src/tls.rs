//! TLS on the client listener: the rustls server config made from the `[tls]` PEM files
//! ([`server_config`], at validation and at every reload), the handshake each accepted
//! connection makes in its own task before hyper sees it ([`handshake`]), and the stream type
//! that carries a client connection either way ([`ClientStream`]).
//!
//! Where it sits in a connection's life: `server` accepts a TCP connection, and when the live
//! config has TLS the connection's task runs the handshake (bounded by
//! `header_read_timeout`, so a client that connects and says nothing costs one task for that
//! long at most), then hyper serves HTTP over the decrypted stream. After a 101 the tunnel
//! takes the stream back from hyper: a plain one goes down the zero-buffer path over the bare
//! `TcpStream`, a TLS one through `tokio::io::split` (see [`crate::tunnel`]).
//!
//! A client that speaks plain HTTP to a TLS listener fails the handshake: it gets at most a
//! TLS alert, never an HTTP answer, and nothing reaches a node. Failures are counted in
//! `tether_balancer_tls_handshake_failures_total`, logged at debug (a client's business).
//!
//! The admin listener never speaks TLS: it belongs on a private address.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tracing::debug;

use crate::metrics::{Metrics, TlsFailure};
use crate::Error;

/// The one application protocol the listener offers: hyper serves HTTP/1.1 only, and a
/// WebSocket upgrade is an HTTP/1.1 affair. A client that offers ALPN without it is refused
/// in the handshake (`no_application_protocol`); one that offers none is served.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Largest certificate or key file read: far above any real chain, it keeps a mistyped path
/// (a log file, a disk image) from being read whole into memory.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// The rustls server config for the certificate chain in `cert` and the private key in `key`
/// (both PEM): the ring provider, TLS 1.3 and 1.2, ALPN `http/1.1`. Every failure — a file
/// that cannot be read, holds no certificate or key, or a key that does not belong to the
/// leaf certificate — is a config error naming the field and the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Error> {
    let cert_pem = read_pem("tls.cert", cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("tls.cert", cert, format!("not a PEM certificate chain: {}", pem_error(&e))))?;
    if chain.is_empty() {
        return Err(file_error("tls.cert", cert, "no CERTIFICATE block found".into()));
    }
    let key_pem = read_pem("tls.key", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let why = match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block found".to_owned(),
            other => format!("not a PEM private key: {}", pem_error(&other)),
        };
        file_error("tls.key", key, why)
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config { field: "tls".into(), reason: format!("TLS versions: {e}") })?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                file_error("tls.key", key, format!("does not match the certificate in {} ({e})", cert.display()))
            }
            other => file_error("tls.key", key, format!("unusable with {}: {other}", cert.display())),
        })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// A PEM error for an operator: the markers it names as text, not as byte lists.
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as Pem;
    match e {
        Pem::MissingSectionEnd { end_marker } => {
            format!("a section does not end (no \"-----END {}-----\" line)", String::from_utf8_lossy(end_marker))
        }
        Pem::IllegalSectionStart { line } => format!("bad section start {:?}", String::from_utf8_lossy(line)),
        other => other.to_string(),
    }
}

fn file_error(field: &str, path: &Path, reason: String) -> Error {
    Error::Config { field: field.into(), reason: format!("{}: {reason}", path.display()) }
}

/// Reads a PEM file whole, up to [`MAX_PEM_BYTES`].
fn read_pem(field: &str, path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| file_error(field, path, e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes).map_err(|e| file_error(field, path, e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(file_error(field, path, format!("larger than {MAX_PEM_BYTES} bytes")));
    }
    Ok(bytes)
}

/// Runs the server side of the TLS handshake on `stream` within `timeout`. `None` when it
/// failed or timed out (counted and logged at debug): the caller drops the connection, which
/// has seen nothing but, at most, a TLS alert.
pub(crate) async fn handshake(
    config: Arc<ServerConfig>,
    stream: TcpStream,
    timeout: Duration,
    metrics: &Metrics,
) -> Option<TlsStream<TcpStream>> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(tls)) => {
            let (_, session) = tls.get_ref();
            debug!(version = ?session.protocol_version(), "TLS handshake done");
            Some(tls)
        }
        Ok(Err(e)) => {
            metrics.tls_handshake_failed(TlsFailure::error);
            debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics.tls_handshake_failed(TlsFailure::timeout);
            debug!(timeout_ms = timeout.as_millis() as u64, "TLS handshake timed out");
            None
        }
    }
}

/// A client connection as hyper serves it: the bare TCP stream (`Left`), or TLS over it
/// (`Right`; boxed: a rustls connection is a few hundred bytes of state, and a plain connection
/// should not carry that much room for nothing). tokio-util's `Either` passes reads and writes
/// to whichever it is. The tunnel takes it back after a 101 and sends each kind down its own
/// path.
pub(crate) type ClientStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Whether the client reached us over TLS (for `X-Forwarded-Proto`, logs).
pub(crate) fn is_tls(stream: &ClientStream) -> bool {
    matches!(stream, Either::Right(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_kit::certs::{DevCa, LOCAL_NAMES};

    fn field_and_reason(err: Error) -> (String, String) {
        match err {
            Error::Config { field, reason } => (field, reason),
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn a_good_pair_gives_tls12_and_tls13_with_alpn_http1() {
        let dir = tempfile::tempdir().unwrap();
        let files = DevCa::generate("test CA").unwrap().write(dir.path()).unwrap();
        let config = server_config(&files.cert, &files.key).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn bad_files_are_refused_naming_the_field_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let files = ca.write(dir.path()).unwrap();
        let other = ca.leaf(&LOCAL_NAMES).unwrap();
        let other_key = dir.path().join("other-key.pem");
        std::fs::write(&other_key, &other.key_pem).unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "this is not PEM at all\n").unwrap();
        let missing = dir.path().join("missing.pem");
        // A key where the certificate belongs: PEM, but no CERTIFICATE block.
        let cases = [
            (&missing, &files.key, "tls.cert", &missing),
            (&garbage, &files.key, "tls.cert", &garbage),
            (&files.key, &files.key, "tls.cert", &files.key),
            (&files.cert, &missing, "tls.key", &missing),
            (&files.cert, &garbage, "tls.key", &garbage),
            (&files.cert, &files.cert, "tls.key", &files.cert),
            (&files.cert, &other_key, "tls.key", &other_key),
        ];
        for (cert, key, field, named) in cases {
            let (got, reason) = field_and_reason(server_config(cert, key).unwrap_err());
            assert_eq!(got, field, "{cert:?} {key:?}: {reason}");
            assert!(reason.contains(named.to_str().unwrap()), "{reason}");
        }
        let (_, reason) = field_and_reason(server_config(&files.cert, &other_key).unwrap_err());
        assert!(reason.contains("does not match"), "{reason}");
    }
}
