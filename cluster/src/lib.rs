//! Shoal cluster membership credentials: the cluster CA, this node's certificate,
//! and the mutual-TLS configurations built from them.
//!
//! `--cluster-dir` holds either `ca.crt` + `ca.key` (the node issues itself a
//! short-lived leaf certificate at start) or `ca.crt` + `node.crt` +
//! `node.key` (an operator-issued leaf; the CA key stays off the node).
//! `shoald cluster-init DIR` writes a new CA for quick starts and tests.
//! Or the CA key stays on the tracker alone: a node with only `ca.crt` and
//! a join token makes a key and a certificate request
//! ([`certificate_request`]), the tracker signs it ([`Signer`]) and the node
//! keeps the pair ([`write_node_identity`]).
//!
//! Every peer connection (QUIC) and every tracker request (HTTPS) is mutual
//! TLS 1.3 against the cluster CA: a node without a certificate of this CA
//! gets nothing. A node's certificate names it (SAN = its node id as a DNS
//! name), and clients check that name when they dial a peer, so a member
//! cannot answer for another.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Lifetime of a leaf certificate a node issues itself from `ca.key`.
const SELF_ISSUED_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `id` can name a node: DNS labels of `[a-z0-9-]` joined by dots,
/// at most 63 characters, so it can be the certificate's SAN.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// What a node's certificate says: its name (SAN and CN), server and client
/// use, valid from `slack` ago (clock skew) for `validity`.
fn leaf_params(
    node_id: &str,
    slack: time::Duration,
    validity: Duration,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![node_id.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, node_id);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - slack;
    params.not_after = now + validity;
    Ok(params)
}

/// A new key pair for `node_id` and a certificate request for it: the key
/// (PEM, stays on the node) and the request (PEM, goes to the tracker).
pub fn certificate_request(node_id: &str) -> anyhow::Result<(String, String)> {
    if !valid_node_id(node_id) {
        bail!("node id {node_id:?} must be lowercase DNS labels ([a-z0-9-], dots between), at most 63 characters");
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node_id.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, node_id);
    let csr = params
        .serialize_request(&key)
        .context("making the certificate request")?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// TLS for a node that has no certificate yet: `ca.crt` in `dir` as the
/// only root, no client certificate (for joining).
pub fn ca_only_client_tls(dir: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let ca = read_certs(&dir.join("ca.crt"))?.remove(0);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).context("adding the cluster CA")?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Writes `node.crt` and `node.key` (mode 0600) into `dir`, replacing any
/// there, each through a temporary file renamed into place.
pub fn write_node_identity(dir: &Path, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
    for (name, contents) in [("node.key", key_pem), ("node.crt", cert_pem)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        write_private(&tmp, contents)?;
        fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("writing {}", dir.join(name).display()))?;
    }
    Ok(())
}

/// The cluster CA's signing side, where `ca.key` lives (the tracker):
/// issues node certificates for certificate requests of joining nodes.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Signer> {
        let (ca_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        let key_pem = fs::read_to_string(&key_path).with_context(|| {
            format!(
                "reading {} (signing node certificates needs the CA key)",
                key_path.display()
            )
        })?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a PEM private key", key_path.display()))?;
        let ca_pem = fs::read_to_string(&ca_path)
            .with_context(|| format!("reading {}", ca_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .with_context(|| format!("{}: not a usable CA certificate", ca_path.display()))?;
        Ok(Signer { issuer })
    }

    /// A certificate for `node_id` over the public key of `csr_pem`, valid
    /// for `validity`. Only the key is taken from the request: the names
    /// (exactly `node_id`), usages and lifetime are the signer's.
    pub fn sign(&self, node_id: &str, csr_pem: &str, validity: Duration) -> anyhow::Result<String> {
        if !valid_node_id(node_id) {
            bail!("node id {node_id:?} must be lowercase DNS labels ([a-z0-9-], dots between), at most 63 characters");
        }
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .context("not a PEM certificate request")?;
        csr.params = leaf_params(node_id, time::Duration::minutes(5), validity)?;
        let cert = csr
            .signed_by(&self.issuer)
            .context("signing the node certificate")?;
        Ok(cert.pem())
    }
}

/// Writes a new cluster CA (`ca.crt`, `ca.key`) into `dir`. Refuses to
/// replace an existing one: that would cut every node off the cluster.
pub fn init(dir: &Path) -> anyhow::Result<()> {
    for f in ["ca.crt", "ca.key"] {
        if dir.join(f).exists() {
            bail!(
                "{} already exists: refusing to replace a cluster CA",
                dir.join(f).display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Shoal cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    fs::write(dir.join("ca.crt"), cert.pem())?;
    Ok(())
}

/// This node's credentials in the cluster.
#[derive(Debug)]
pub struct Identity {
    /// The node id its certificate names.
    pub node_id: String,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            node_id: self.node_id.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

impl Identity {
    /// Loads the credentials in `dir` for `node_id`, issuing a leaf
    /// certificate from `ca.key` when no `node.crt` is there.
    pub fn load(dir: &Path, node_id: &str) -> anyhow::Result<Identity> {
        if !valid_node_id(node_id) {
            bail!("node id {node_id:?} must be lowercase DNS labels ([a-z0-9-], dots between), at most 63 characters");
        }
        let ca_path = dir.join("ca.crt");
        let ca = read_certs(&ca_path)?.remove(0);
        let (node_crt, node_key) = (dir.join("node.crt"), dir.join("node.key"));
        if node_crt.exists() || node_key.exists() {
            let chain = read_certs(&node_crt)?;
            let key = PrivateKeyDer::from_pem_file(&node_key)
                .with_context(|| format!("{}: not a PEM private key", node_key.display()))?;
            let id = Identity {
                node_id: node_id.to_owned(),
                ca,
                chain,
                key,
            };
            // Fail at start, not at the first connection.
            id.server_tls()
                .context("node.crt/node.key do not form a usable identity")?;
            return Ok(id);
        }
        let ca_key_path = dir.join("ca.key");
        if !ca_key_path.exists() {
            bail!(
                "{} holds neither node.crt + node.key nor ca.key: cannot get a node certificate",
                dir.display()
            );
        }
        let ca_key_pem = fs::read_to_string(&ca_key_path)
            .with_context(|| format!("reading {}", ca_key_path.display()))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)
            .with_context(|| format!("{}: not a PEM private key", ca_key_path.display()))?;
        let ca_pem = fs::read_to_string(&ca_path)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .with_context(|| format!("{}: not a usable CA certificate", ca_path.display()))?;
        let key = KeyPair::generate()?;
        let params = leaf_params(node_id, time::Duration::hours(1), SELF_ISSUED_VALIDITY)?;
        let leaf = params
            .signed_by(&key, &issuer)
            .context("issuing the node certificate")?;
        Ok(Identity {
            node_id: node_id.to_owned(),
            ca,
            chain: vec![leaf.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der())
                .map_err(|e| anyhow::anyhow!("node key: {e}"))?,
        })
    }

    fn roots(&self) -> anyhow::Result<Arc<rustls::RootCertStore>> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .context("adding the cluster CA")?;
        Ok(Arc::new(roots))
    }

    /// TLS for serving members: client certificates of the cluster CA required.
    pub fn server_tls(&self) -> anyhow::Result<rustls::ServerConfig> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .context("building the client certificate verifier")?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("node certificate and key")?;
        Ok(cfg)
    }

    /// TLS for serving nodes that have no certificate yet (the tracker's
    /// join listener): this node's certificate, no client certificates.
    pub fn server_tls_without_client_auth(&self) -> anyhow::Result<rustls::ServerConfig> {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("node certificate and key")?;
        Ok(cfg)
    }

    /// TLS for dialing members: the cluster CA as the only root, this node's
    /// certificate as the client certificate.
    pub fn client_tls(&self) -> anyhow::Result<rustls::ClientConfig> {
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("node certificate and key")?;
        Ok(cfg)
    }

    /// QUIC server config for the peer data plane (ALPN `shoal/1`).
    pub fn quic_server(&self) -> anyhow::Result<quinn::ServerConfig> {
        let mut tls = self.server_tls()?;
        tls.alpn_protocols = vec![shoal_proto::wire::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
    }

    /// QUIC client config for the peer data plane (ALPN `shoal/1`).
    pub fn quic_client(&self) -> anyhow::Result<quinn::ClientConfig> {
        let mut tls = self.client_tls()?;
        tls.alpn_protocols = vec![shoal_proto::wire::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        Ok(quinn::ClientConfig::new(Arc::new(crypto)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_with_only_the_ca_certificate_joins_through_the_signer() {
        let ca_dir = tempfile::tempdir().unwrap();
        init(ca_dir.path()).unwrap();
        let node_dir = tempfile::tempdir().unwrap();
        fs::copy(ca_dir.path().join("ca.crt"), node_dir.path().join("ca.crt")).unwrap();
        // Without node.crt or ca.key the node has no identity yet.
        assert!(Identity::load(node_dir.path(), "node-j").is_err());
        let (key, csr) = certificate_request("node-j").unwrap();
        let signer = Signer::load(ca_dir.path()).unwrap();
        let cert = signer
            .sign("node-j", &csr, Duration::from_secs(3600))
            .unwrap();
        write_node_identity(node_dir.path(), &cert, &key).unwrap();
        let mode = fs::metadata(node_dir.path().join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let id = Identity::load(node_dir.path(), "node-j").unwrap();
        assert_eq!(id.node_id, "node-j");
        // Garbage is refused, and so is a bad name.
        assert!(signer
            .sign("node-j", "not a csr", Duration::from_secs(60))
            .is_err());
        assert!(signer
            .sign("Not_A_Name", &csr, Duration::from_secs(60))
            .is_err());
        // A signer needs the CA key.
        assert!(Signer::load(node_dir.path()).is_err());
    }
    use std::net::{Ipv4Addr, SocketAddr};

    fn endpoint(
        server: Option<quinn::ServerConfig>,
        client: quinn::ClientConfig,
    ) -> quinn::Endpoint {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let mut ep = match server {
            Some(s) => quinn::Endpoint::server(s, addr).unwrap(),
            None => quinn::Endpoint::client(addr).unwrap(),
        };
        ep.set_default_client_config(client);
        ep
    }

    /// Dials `server` as `client_id` and reports whether a stream round trip worked.
    async fn handshake(server: &Identity, client: &Identity, name: &str) -> bool {
        let srv = endpoint(
            Some(server.quic_server().unwrap()),
            server.quic_client().unwrap(),
        );
        let addr = srv.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = srv.accept().await?.await.ok()?;
            let (mut send, mut recv) = conn.accept_bi().await.ok()?;
            let got = recv.read_to_end(16).await.ok()?;
            send.write_all(&got).await.ok()?;
            send.finish().ok()?;
            conn.closed().await;
            Some(())
        });
        let cli = endpoint(None, client.quic_client().unwrap());
        let ok = async {
            let conn = cli.connect(addr, name).ok()?.await.ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            send.write_all(b"ping").await.ok()?;
            send.finish().ok()?;
            let back = recv.read_to_end(16).await.ok()?;
            conn.close(0u32.into(), b"done");
            (back == b"ping").then_some(())
        };
        let ok = tokio::time::timeout(Duration::from_secs(10), ok)
            .await
            .ok()
            .flatten()
            .is_some();
        accept.abort();
        ok
    }

    #[tokio::test]
    async fn members_talk_outsiders_and_impostors_do_not() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(a.path()).unwrap();
        init(b.path()).unwrap();
        let n1 = Identity::load(a.path(), "node-1").unwrap();
        let n2 = Identity::load(a.path(), "node-2").unwrap();
        let outsider = Identity::load(b.path(), "node-3").unwrap();
        assert!(
            handshake(&n1, &n2, "node-1").await,
            "two members must connect"
        );
        assert!(
            !handshake(&n1, &outsider, "node-1").await,
            "a client of another CA got in"
        );
        assert!(
            !handshake(&outsider, &n2, "node-3").await,
            "a server of another CA was trusted"
        );
        assert!(
            !handshake(&n1, &n2, "node-9").await,
            "a member answered for another name"
        );
    }

    #[tokio::test]
    async fn operator_issued_node_certificates_work_without_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let issued = Identity::load(dir.path(), "node-7").unwrap();
        let node_dir = tempfile::tempdir().unwrap();
        fs::copy(dir.path().join("ca.crt"), node_dir.path().join("ca.crt")).unwrap();
        let pem = |der: &[u8], tag: &str| {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
                lines.join("\n")
            )
        };
        fs::write(
            node_dir.path().join("node.crt"),
            pem(&issued.chain[0], "CERTIFICATE"),
        )
        .unwrap();
        fs::write(
            node_dir.path().join("node.key"),
            pem(issued.key.secret_der(), "PRIVATE KEY"),
        )
        .unwrap();
        let loaded = Identity::load(node_dir.path(), "node-7").unwrap();
        let other = Identity::load(dir.path(), "node-8").unwrap();
        assert!(handshake(&loaded, &other, "node-7").await);
    }

    #[test]
    fn init_refuses_to_replace_and_keeps_the_key_private() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = init(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    }

    #[test]
    fn bad_directories_and_ids_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(dir.path(), "node-1").unwrap_err();
        assert!(format!("{err:#}").contains("ca.crt"), "{err:#}");
        init(dir.path()).unwrap();
        assert!(Identity::load(dir.path(), "Node_1").is_err());
        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = Identity::load(dir.path(), "node-1").unwrap_err();
        assert!(format!("{err:#}").contains("neither"), "{err:#}");
        for bad in ["", "-a", "a..b", "UPPER", "a_b"] {
            assert!(!valid_node_id(bad), "{bad}");
        }
        assert!(valid_node_id("node-1.rack-2"));
    }
}
