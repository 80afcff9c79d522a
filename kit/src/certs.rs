//! Development and test certificates: a private CA made on the spot, leaf certificates it
//! signs, the PEM files a balancer's `[tls]` section names, and the rustls client config that
//! trusts that CA (for `wss://` clients: the CLI, the tests, the benches).
//!
//! Nothing here is for production: the CA's key lives in memory (and in the files written for
//! `tether up --tls`), and certificates are valid from 1975 to 4096, rcgen's defaults, so
//! that a test never depends on the clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

/// The names a local balancer answers to: what [`DevCa::leaf`] certifies by default.
pub const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate authority that exists for one test run or one `tether up`.
pub struct DevCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where [`DevCa::write`] put the files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The CA's certificate: what clients trust (`--ca`).
    pub ca: PathBuf,
    /// The leaf's certificate (`[tls] cert`).
    pub cert: PathBuf,
    /// The leaf's private key (`[tls] key`), mode 0600.
    pub key: PathBuf,
}

impl DevCa {
    /// A fresh CA (ECDSA P-256) named `name`.
    pub fn generate(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationName, "Tether development");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Result<Leaf> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).context("leaf parameters")?;
        params.distinguished_name.push(DnType::CommonName, names.first().map_or("tether", String::as_str));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().context("generating the leaf key")?;
        let cert = params.signed_by(&key, &self.issuer).context("signing the leaf")?;
        Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes the CA certificate and a [`LOCAL_NAMES`] leaf under `dir` as `ca.pem`,
    /// `cert.pem` and `key.pem` (the key readable by its owner only).
    pub fn write(&self, dir: &Path) -> Result<CertFiles> {
        self.write_leaf(dir, &self.leaf(&LOCAL_NAMES)?)
    }

    /// Writes the CA certificate and `leaf` under `dir` (see [`DevCa::write`]).
    pub fn write_leaf(&self, dir: &Path, leaf: &Leaf) -> Result<CertFiles> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = CertFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        write_file(&files.ca, &self.cert_pem, 0o644)?;
        write_file(&files.cert, &leaf.cert_pem, 0o644)?;
        write_file(&files.key, &leaf.key_pem, 0o600)?;
        Ok(files)
    }
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// A rustls client config that trusts exactly the CA certificates in `ca_pem` (one or more
/// PEM blocks) and offers ALPN `http/1.1`, as a `wss://` client needs.
pub fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("reading a CA certificate")?).context("adding a CA certificate")?;
        found += 1;
    }
    anyhow::ensure!(found > 0, "no certificate in the CA PEM");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`client_config`] from a CA file.
pub fn client_config_from_file(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read_to_string(ca).with_context(|| format!("reading CA file {}", ca.display()))?;
    client_config(&pem).with_context(|| format!("CA file {}", ca.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls_pki_types::{ServerName, UnixTime};

    /// Whether `leaf` verifies for `name` against the CA certificate `ca_pem`.
    fn verifies(ca_pem: &str, leaf: &Leaf, name: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).map(Result::unwrap).collect();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()).is_ok()
    }

    #[test]
    fn a_leaf_verifies_against_its_ca_for_its_names_only() {
        let ca = DevCa::generate("test CA").unwrap();
        let leaf = ca.leaf(&LOCAL_NAMES).unwrap();
        assert!(verifies(ca.cert_pem(), &leaf, "localhost"));
        assert!(verifies(ca.cert_pem(), &leaf, "127.0.0.1"));
        assert!(!verifies(ca.cert_pem(), &leaf, "example.com"));
        let other = DevCa::generate("other CA").unwrap();
        assert!(!verifies(other.cert_pem(), &leaf, "localhost"));
    }

    #[test]
    fn files_are_written_with_a_private_key_and_a_config_reads_them() {
        use std::os::unix::fs::PermissionsExt as _;
        let ca = DevCa::generate("test CA").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = ca.write(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777, 0o600);
        let config = client_config_from_file(&files.ca).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(client_config("not a pem").is_err());
        assert!(client_config_from_file(&dir.path().join("missing.pem")).is_err());
    }
}
