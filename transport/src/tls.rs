//! The cluster's certificates and the mutual-TLS configurations built from them.
//!
//! Checkpoints carry a container's memory, secrets included, so every connection between
//! nodes is mutually authenticated: each side presents a certificate signed by the cluster's
//! CA and verifies the other's before any data moves. [`init_certs`] creates a development
//! CA and one certificate per node; [`NodeIdentity`] loads one node's directory (which never
//! holds the CA key) and turns it into quinn server and client configurations; [`peer_name`]
//! tells which node is on the other end of an established connection.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The ALPN protocol both sides must agree on.
pub const ALPN: &[u8] = b"migrate/1";

/// The SNI name clients send; certificates carry it as a DNS SAN besides their node name.
pub const SERVER_NAME: &str = "migrate-node";

/// Also carried by every node certificate, so it can never identify one node.
const LOCALHOST: &str = "localhost";

/// File names inside a node directory (and, for the CA, inside the `init_certs` output).
const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
const NODE_CERT_FILE: &str = "node.crt";
const NODE_KEY_FILE: &str = "node.key";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a node certificate is valid.
const NODE_VALIDITY_DAYS: u32 = 365;
/// How long the CA certificate is valid.
const CA_VALIDITY_DAYS: u32 = 3650;
/// Certificates start being valid this long before they are made, to tolerate clock skew.
const BACKDATE: Duration = DAY;

/// Longest node name: one DNS label.
const MAX_NAME_LEN: usize = 63;

/// What went wrong while creating, loading or using the cluster's certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A node name that cannot be used: names become directory names and DNS SANs.
    #[error(
        "invalid node name {name:?}: {reason}; use 1 to {MAX_NAME_LEN} lowercase letters, digits \
         and '-', not starting or ending with '-'"
    )]
    InvalidName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// A file a node directory (or the CA directory) must hold is not there.
    #[error(
        "{}: not found; a node directory holds ca.crt, node.crt and node.key: create them with \
         `migrate certs init` and copy this node's directory to it",
        path.display()
    )]
    Missing {
        /// The missing file.
        path: PathBuf,
    },

    /// Reading a file failed for another reason than its absence.
    #[error("cannot read {}: {source}; check its permissions", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Creating a directory or writing a file failed.
    #[error("cannot write {}: {source}; check that the directory is writable", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A file exists but does not hold what it should.
    #[error(
        "{}: {reason}; it should be a PEM file written by `migrate certs init`",
        path.display()
    )]
    Unparsable {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        reason: String,
    },

    /// Only one of the CA's two files exists, so the CA can neither be reused nor recreated
    /// without orphaning the nodes it signed.
    #[error(
        "{} exists but {} does not: restore the missing file to reuse this CA, or remove both \
         to create a new CA (every existing node certificate then stops being trusted)",
        present.display(),
        missing.display()
    )]
    IncompleteCa {
        /// The CA file that exists.
        present: PathBuf,
        /// The CA file that is missing.
        missing: PathBuf,
    },

    /// The CA certificate and key on disk do not belong together, or were not made by
    /// `migrate certs init`.
    #[error(
        "{} does not match {}: the CA certificate was not made from this key by `migrate certs \
         init`; restore the matching pair, or remove both to create a new CA",
        cert.display(),
        key.display()
    )]
    CaMismatch {
        /// The CA certificate.
        cert: PathBuf,
        /// The CA key.
        key: PathBuf,
    },

    /// A node's private key does not belong to its certificate.
    #[error(
        "{} does not belong to {}: copy both files from the same `migrate certs init` run",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The node certificate.
        cert: PathBuf,
        /// The node key.
        key: PathBuf,
    },

    /// A node certificate does not verify against the cluster's CA (wrong CA, expired,
    /// missing key usage, ...).
    #[error(
        "{}: certificate was not signed by this cluster's CA in {}, or is not valid now \
         ({reason}); check that both files come from the same CA and re-issue the node with \
         `migrate certs init`",
        cert.display(),
        ca.display()
    )]
    Untrusted {
        /// The node certificate.
        cert: PathBuf,
        /// The CA certificate it was checked against.
        ca: PathBuf,
        /// Why verification failed.
        reason: String,
    },

    /// A node certificate carries no node name.
    #[error(
        "{}: the certificate names no node (no DNS name besides {SERVER_NAME:?} and \
         {LOCALHOST:?}); re-issue it with `migrate certs init`",
        path.display()
    )]
    NoNodeName {
        /// The node certificate.
        path: PathBuf,
    },

    /// rcgen refused to create a key or certificate.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },

    /// The CA certificate in a node directory cannot be turned into a certificate verifier.
    #[error("{}: cannot use it as the cluster's CA: {source}", path.display())]
    Verifier {
        /// The CA certificate.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: VerifierBuilderError,
    },

    /// rustls refused the configuration built from a node directory.
    #[error("{}: rustls refused this node's certificate or key: {source}", dir.display())]
    Config {
        /// The node directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },

    /// The TLS configuration lacks the cipher suite QUIC needs for its initial packets.
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

/// Checks that `name` can be a node name: a DNS label of `[a-z0-9-]`, not reserved.
///
/// Node names become directory names under the `init_certs` output and DNS SANs of the
/// node's certificate, and are what `expect_peer` matches.
pub fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let refuse = |reason: String| {
        Err(TlsError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("it is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return refuse(format!("it is {} bytes long", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return refuse(format!("it contains {c:?}"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return refuse("it starts or ends with '-'".into());
    }
    if name == SERVER_NAME || name == LOCALHOST {
        return refuse("every node certificate carries it, so it cannot identify one node".into());
    }
    if rustls::pki_types::DnsName::try_from(name).is_err() {
        return refuse("it is not a valid DNS name".into());
    }
    Ok(())
}

/// Creates (or reuses, if OUT/ca.crt + OUT/ca.key exist) a dev CA in OUT and one certificate
/// per name: OUT/ca.crt, OUT/ca.key (0600), and for each name OUT/<name>/ca.crt,
/// OUT/<name>/node.crt, OUT/<name>/node.key (0600). Directories are 0700.
///
/// Names must be DNS-label-like (see [`validate_node_name`]); all are checked before anything
/// is written. A name whose directory already exists gets a fresh key and certificate.
/// Returns the node directories written, in the order of `names`.
pub fn init_certs(out: &Path, names: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    let mut seen = HashSet::new();
    for name in names {
        validate_node_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(TlsError::InvalidName {
                name: name.clone(),
                reason: "it is given more than once".into(),
            });
        }
    }

    create_private_dir(out, false)?;
    let ca = load_or_create_ca(out)?;

    let mut dirs = Vec::with_capacity(names.len());
    for name in names {
        let dir = out.join(name);
        create_private_dir(&dir, true)?;
        let (cert_pem, key_pem) = issue_node_cert(&ca, name)?;
        // Check the result the way a peer will before handing it out.
        verify_node_cert(
            &dir.join(NODE_CERT_FILE),
            &pem_to_certs(&cert_pem),
            &ca.cert_path,
            &ca.roots,
        )?;
        write_file(&dir.join(CA_CERT_FILE), ca.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(NODE_KEY_FILE), key_pem.as_bytes(), 0o600)?;
        write_file(&dir.join(NODE_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        tracing::info!(node = %name, dir = %dir.display(), "issued node certificate");
        dirs.push(dir);
    }
    Ok(dirs)
}

/// The CA as `init_certs` uses it: its files, and what rcgen needs to sign with it.
struct Ca {
    cert_path: PathBuf,
    /// The PEM text of OUT/ca.crt, copied verbatim into each node directory.
    cert_pem: String,
    /// The CA as rcgen's issuer (its subject and key identifier match OUT/ca.crt).
    issuer: Certificate,
    key: KeyPair,
    roots: Arc<RootCertStore>,
}

fn load_or_create_ca(out: &Path) -> Result<Ca, TlsError> {
    let cert_path = out.join(CA_CERT_FILE);
    let key_path = out.join(CA_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let key_pem = read_to_string(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Unparsable {
                path: key_path.clone(),
                reason: format!("not a private key ({e})"),
            })?;
            let cert_pem = read_to_string(&cert_path)?;
            let on_disk = pem_to_certs(&cert_pem);
            let [on_disk] = on_disk.as_slice() else {
                return Err(TlsError::Unparsable {
                    path: cert_path,
                    reason: format!("expected exactly one certificate, found {}", on_disk.len()),
                });
            };
            warn_if_exposed(&key_path);
            // rcgen 0.13 cannot parse a certificate back, so rebuild the issuer from the key and
            // the subject `init_certs` gives its CAs, and check that it is the one on disk.
            let issuer = self_signed_ca(&key)?;
            if !same_subject_and_key(on_disk, issuer.der()) {
                return Err(TlsError::CaMismatch {
                    cert: cert_path,
                    key: key_path,
                });
            }
            let roots = root_store(&cert_path, std::slice::from_ref(on_disk))?;
            tracing::info!(ca = %cert_path.display(), "reusing the existing CA");
            Ok(Ca {
                cert_path,
                cert_pem,
                issuer,
                key,
                roots,
            })
        }
        (true, false) | (false, true) => {
            let (present, missing) = if cert_path.exists() {
                (cert_path, key_path)
            } else {
                (key_path, cert_path)
            };
            Err(TlsError::IncompleteCa { present, missing })
        }
        (false, false) => {
            let key = generate_key("the CA key")?;
            let issuer = self_signed_ca(&key)?;
            let cert_pem = issuer.pem();
            // Key first: a crash between the two writes leaves an IncompleteCa error, never
            // a CA certificate nobody can sign with.
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
            let roots = root_store(&cert_path, std::slice::from_ref(issuer.der()))?;
            tracing::info!(ca = %cert_path.display(), "created a new CA");
            Ok(Ca {
                cert_path,
                cert_pem,
                issuer,
                key,
                roots,
            })
        }
    }
}

/// The CA certificate `init_certs` makes from `key`: the same key always gives the same
/// subject, so an existing CA can be rebuilt and compared with the one on disk.
fn self_signed_ca(key: &KeyPair) -> Result<rcgen::Certificate, TlsError> {
    ca_params(key)?
        .self_signed(key)
        .map_err(|source| TlsError::Generate {
            what: "the CA certificate".into(),
            source,
        })
}

/// The CA's parameters; its subject depends only on its key, so they can be rebuilt.
fn ca_params(key: &KeyPair) -> Result<CertificateParams, TlsError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|source| TlsError::Generate {
            what: "the CA certificate".into(),
            source,
        })?;
    // A per-CA tag in the subject keeps two clusters' CAs apart in logs and path building.
    let tag = blake3::hash(&key.public_key_der());
    let tag: String = tag.as_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "migrate");
    dn.push(DnType::CommonName, format!("migrate cluster CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY_DAYS);
    Ok(params)
}

/// Creates a node's key and its certificate signed by `ca`; returns both as PEM.
fn issue_node_cert(ca: &Ca, name: &str) -> Result<(String, String), TlsError> {
    let what = || format!("the certificate of node {name:?}");
    let key = generate_key(&format!("the key of node {name:?}"))?;
    let mut params = CertificateParams::new(vec![
        name.to_owned(),
        SERVER_NAME.to_owned(),
        LOCALHOST.to_owned(),
    ])
    .map_err(|source| TlsError::Generate {
        what: what(),
        source,
    })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "migrate");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_VALIDITY_DAYS);
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(|source| TlsError::Generate {
            what: what(),
            source,
        })?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn generate_key(what: &str) -> Result<KeyPair, TlsError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| TlsError::Generate {
        what: what.to_owned(),
        source,
    })
}

/// Valid from a day ago (clock skew) to `days` from now.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + DAY * days;
}

/// Whether two certificates have the same subject and public key.
fn same_subject_and_key(a: &CertificateDer<'_>, b: &CertificateDer<'_>) -> bool {
    match (
        webpki::EndEntityCert::try_from(a),
        webpki::EndEntityCert::try_from(b),
    ) {
        (Ok(a), Ok(b)) => {
            a.subject() == b.subject() && a.subject_public_key_info() == b.subject_public_key_info()
        }
        _ => false,
    }
}

/// A node's identity as loaded from a node directory (ca.crt, node.crt, node.key).
///
/// Loading checks that the three files belong together, so a misplaced file is reported by
/// path at startup rather than as a failed handshake later.
pub struct NodeIdentity {
    dir: PathBuf,
    name: String,
    ca_path: PathBuf,
    roots: Arc<RootCertStore>,
    ca: CertificateDer<'static>,
    /// The node certificate first, then any intermediates.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads and checks a node directory: ca.crt, node.crt and node.key.
    ///
    /// Fails, naming the file, when one is missing or unparsable, when the key does not belong
    /// to the certificate, or when the certificate does not verify against ca.crt (for both
    /// client and server use). A node.key readable by group or others is only warned about.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(NODE_CERT_FILE);
        let key_path = dir.join(NODE_KEY_FILE);

        let cas = read_certs(&ca_path)?;
        let chain = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        warn_if_exposed(&key_path);

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        check_key_matches(&provider, &key, &chain[0], &cert_path, &key_path)?;
        let roots = root_store(&ca_path, &cas)?;
        verify_node_cert(&cert_path, &chain, &ca_path, &roots)?;
        let name = name_from_cert(&chain[0]).ok_or_else(|| TlsError::NoNodeName {
            path: cert_path.clone(),
        })?;

        Ok(Self {
            dir: dir.to_owned(),
            name,
            ca_path,
            roots,
            ca: cas[0].clone(),
            chain,
            key,
            provider,
        })
    }

    /// The node name from its certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory this identity was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster CA's certificate (the first one of ca.crt).
    pub fn ca_certificate(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// This node's certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// A quinn server configuration that presents this node's certificate and requires and
    /// verifies a client certificate signed by the cluster's CA. TLS 1.3 only, ALPN
    /// [`ALPN`], no session resumption (every connection verifies the peer's certificate);
    /// quinn's transport parameters are left at their defaults.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: self.ca_path.clone(),
                    source,
                })?;
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_error(e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_error(e))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.max_early_data_size = 0;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        let quic = QuicServerConfig::try_from(config)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
    }

    /// A quinn client configuration that presents this node's certificate and verifies the
    /// server's chain against the cluster's CA (and the name given to `connect`, normally
    /// [`SERVER_NAME`]).
    ///
    /// With `expect_peer: Some(name)` the server's certificate must also carry `name` among
    /// its DNS names; with `None` any node certificate of this CA is accepted. TLS 1.3 only,
    /// ALPN [`ALPN`], no session resumption, no 0-RTT.
    pub fn client_config(
        &self,
        expect_peer: Option<&str>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        if let Some(name) = expect_peer {
            validate_node_name(name)?;
        }
        let webpki =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: self.ca_path.clone(),
                    source,
                })?;
        let verifier: Arc<dyn ServerCertVerifier> = match expect_peer {
            Some(name) => Arc::new(ExpectPeer {
                inner: webpki,
                peer: name.to_owned(),
            }),
            None => webpki,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_error(e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_error(e))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_early_data = false;
        let quic = QuicClientConfig::try_from(config)?;
        Ok(quinn::ClientConfig::new(Arc::new(quic)))
    }

    fn config_error(&self, source: rustls::Error) -> TlsError {
        TlsError::Config {
            dir: self.dir.clone(),
            source,
        }
    }
}

/// The node name of the peer on an established connection (from its verified certificate),
/// if any.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    name_from_cert(certs.first()?)
}

/// The node name a certificate carries: its first DNS SAN other than those every node carries.
fn name_from_cert(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let name = cert
        .valid_dns_names()
        .find(|n| !n.eq_ignore_ascii_case(SERVER_NAME) && !n.eq_ignore_ascii_case(LOCALHOST))?;
    Some(name.to_ascii_lowercase())
}

/// Verifies the server's certificate as rustls does, then requires the expected node name.
#[derive(Debug)]
struct ExpectPeer {
    inner: Arc<WebPkiServerVerifier>,
    peer: String,
}

impl ServerCertVerifier for ExpectPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if cert
            .valid_dns_names()
            .any(|n| n.eq_ignore_ascii_case(&self.peer))
        {
            Ok(verified)
        } else {
            tracing::warn!(
                expected = %self.peer,
                presented = ?name_from_cert(end_entity),
                "refusing server: its certificate is for another node"
            );
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a node certificate chain against the CA the way peers will: as a client
/// certificate, and as a server certificate for [`SERVER_NAME`].
fn verify_node_cert(
    cert_path: &Path,
    chain: &[CertificateDer<'static>],
    ca_path: &Path,
    roots: &Arc<RootCertStore>,
) -> Result<(), TlsError> {
    let untrusted = |e: String| TlsError::Untrusted {
        cert: cert_path.to_owned(),
        ca: ca_path.to_owned(),
        reason: e,
    };
    let verifier_error = |source| TlsError::Verifier {
        path: ca_path.to_owned(),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (end_entity, intermediates) = chain
        .split_first()
        .ok_or_else(|| untrusted("no certificate".into()))?;
    let now = UnixTime::now();

    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(verifier_error)?;
    client
        .verify_client_cert(end_entity, intermediates, now)
        .map_err(|e| untrusted(format!("as a client certificate: {e}")))?;

    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider)
        .build()
        .map_err(verifier_error)?;
    let server_name = ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name");
    server
        .verify_server_cert(end_entity, intermediates, &server_name, &[], now)
        .map_err(|e| untrusted(format!("as a server certificate: {e}")))?;
    Ok(())
}

fn check_key_matches(
    provider: &CryptoProvider,
    key: &PrivateKeyDer<'static>,
    cert: &CertificateDer<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), TlsError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Unparsable {
            path: key_path.to_owned(),
            reason: format!("unsupported private key ({e})"),
        })?;
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| TlsError::Unparsable {
        path: cert_path.to_owned(),
        reason: format!("not an X.509 certificate ({e})"),
    })?;
    match signing_key.public_key() {
        Some(public) if public.as_ref() != parsed.subject_public_key_info().as_ref() => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        // A provider that cannot tell the public key: rustls checks the pair when it signs.
        _ => Ok(()),
    }
}

fn root_store(
    ca_path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(|e| TlsError::Unparsable {
            path: ca_path.to_owned(),
            reason: format!("not a usable CA certificate ({e})"),
        })?;
    }
    Ok(Arc::new(roots))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TlsError::Missing {
                path: path.to_owned(),
            }
        } else {
            TlsError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    String::from_utf8(read_file(path)?).map_err(|_| TlsError::Unparsable {
        path: path.to_owned(),
        reason: "not text".into(),
    })
}

/// The certificates in a PEM text; anything unparsable is skipped.
fn pem_to_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// Reads a PEM file holding at least one certificate.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Unparsable {
            path: path.to_owned(),
            reason: format!("malformed PEM ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Unparsable {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Reads a PEM file holding a private key.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| TlsError::Unparsable {
            path: path.to_owned(),
            reason: format!("malformed PEM ({e})"),
        })?
        .ok_or_else(|| TlsError::Unparsable {
            path: path.to_owned(),
            reason: "no PRIVATE KEY block".into(),
        })
}

/// Warns when a key file can be read by group or others.
fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "private key is accessible to group or others; run `chmod 600` on it"
            );
        }
    }
}

/// Creates a directory (and its parents) with mode 0700. An existing directory is set to 0700
/// when `ours` (a node directory), else only warned about if group or others can enter it.
fn create_private_dir(dir: &Path, ours: bool) -> Result<(), TlsError> {
    let write_error = |source| TlsError::Write {
        path: dir.to_owned(),
        source,
    };
    let existed = dir.is_dir();
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_error)?;
    if ours || !existed {
        fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(write_error)?;
    } else if let Ok(meta) = fs::metadata(dir) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format_args!("{mode:04o}"),
                "certificate directory is accessible to group or others"
            );
        }
    }
    Ok(())
}

/// Writes `contents` to `path` with exactly `mode`, atomically (temporary file and rename), so
/// a key is never briefly readable and a crash never leaves half a file.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let result = (|| {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        // The umask may have narrowed the mode; set it exactly.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        TlsError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn init_creates_files_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs");
        let dirs = init_certs(&out, &names(&["node-a", "node-b"])).unwrap();
        assert_eq!(dirs, vec![out.join("node-a"), out.join("node-b")]);

        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join("ca.key")), 0o600);
        assert!(out.join("ca.crt").is_file());
        for (dir, name) in dirs.iter().zip(["node-a", "node-b"]) {
            assert_eq!(mode(dir), 0o700);
            assert_eq!(mode(&dir.join("node.key")), 0o600);
            assert!(dir.join("node.crt").is_file());
            assert!(
                !dir.join("ca.key").exists(),
                "a node must never get the CA key"
            );
            assert_eq!(
                fs::read(dir.join("ca.crt")).unwrap(),
                fs::read(out.join("ca.crt")).unwrap()
            );
            let id = NodeIdentity::load(dir).unwrap();
            assert_eq!(id.name(), name);
        }
        // No temporary files left behind.
        for entry in fs::read_dir(&out).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(!name.to_string_lossy().ends_with(".tmp"), "{name:?}");
        }
    }

    #[test]
    fn second_init_reuses_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs");
        init_certs(&out, &names(&["alpha"])).unwrap();
        let ca_before = fs::read(out.join("ca.crt")).unwrap();
        let key_before = fs::read(out.join("ca.key")).unwrap();

        init_certs(&out, &names(&["beta"])).unwrap();
        assert_eq!(fs::read(out.join("ca.crt")).unwrap(), ca_before);
        assert_eq!(fs::read(out.join("ca.key")).unwrap(), key_before);
        assert_eq!(fs::read(out.join("beta/ca.crt")).unwrap(), ca_before);
        // Both nodes verify against the same CA.
        assert_eq!(
            NodeIdentity::load(&out.join("alpha")).unwrap().name(),
            "alpha"
        );
        assert_eq!(
            NodeIdentity::load(&out.join("beta")).unwrap().name(),
            "beta"
        );
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs");
        let long = "a".repeat(64);
        for bad in [
            "",
            "Node",
            "a/b",
            "..",
            "../x",
            "a b",
            "-a",
            "a-",
            "a.b",
            "é",
            long.as_str(),
            SERVER_NAME,
            "localhost",
        ] {
            let err = init_certs(&out, &names(&["good", bad])).unwrap_err();
            assert!(
                matches!(&err, TlsError::InvalidName { name, .. } if name == bad),
                "{bad:?}: {err}"
            );
        }
        let err = init_certs(&out, &names(&["twin", "twin"])).unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
        assert!(
            !out.exists(),
            "nothing may be written for a refused name list"
        );

        assert!(validate_node_name(&"a".repeat(63)).is_ok());
        assert!(validate_node_name("node-7").is_ok());
    }

    #[test]
    fn incomplete_ca_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs");
        init_certs(&out, &names(&["a"])).unwrap();
        fs::remove_file(out.join("ca.key")).unwrap();
        let err = init_certs(&out, &names(&["b"])).unwrap_err();
        assert!(matches!(err, TlsError::IncompleteCa { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn mismatched_ca_pair_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let one = tmp.path().join("one");
        let two = tmp.path().join("two");
        init_certs(&one, &names(&["a"])).unwrap();
        init_certs(&two, &names(&["a"])).unwrap();
        fs::copy(two.join("ca.key"), one.join("ca.key")).unwrap();
        let err = init_certs(&one, &names(&["b"])).unwrap_err();
        assert!(matches!(err, TlsError::CaMismatch { .. }), "{err}");
    }

    #[test]
    fn load_errors_name_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs");
        let dirs = init_certs(&out, &names(&["n1"])).unwrap();
        for file in ["ca.crt", "node.crt", "node.key"] {
            let dir = tmp.path().join(format!("without-{file}"));
            fs::create_dir(&dir).unwrap();
            for other in ["ca.crt", "node.crt", "node.key"] {
                if other != file {
                    fs::copy(dirs[0].join(other), dir.join(other)).unwrap();
                }
            }
            let err = NodeIdentity::load(&dir).unwrap_err();
            match &err {
                TlsError::Missing { path } => assert_eq!(path, &dir.join(file)),
                other => panic!("{file}: {other}"),
            }
            assert!(err.to_string().contains(file), "{err}");
            assert!(err.to_string().contains("migrate certs init"), "{err}");
        }
    }

    #[test]
    fn load_refuses_garbage_and_foreign_files() {
        let tmp = tempfile::tempdir().unwrap();
        let ours = init_certs(&tmp.path().join("ours"), &names(&["n1", "n2"])).unwrap();
        let theirs = init_certs(&tmp.path().join("theirs"), &names(&["n1"])).unwrap();

        // Unparsable certificate.
        let dir = tmp.path().join("garbage");
        fs::create_dir(&dir).unwrap();
        for f in ["ca.crt", "node.key"] {
            fs::copy(ours[0].join(f), dir.join(f)).unwrap();
        }
        fs::write(dir.join("node.crt"), "not a certificate\n").unwrap();
        let err = NodeIdentity::load(&dir).unwrap_err();
        assert!(matches!(&err, TlsError::Unparsable { path, .. } if path.ends_with("node.crt")));

        // A node certificate from another CA.
        fs::copy(theirs[0].join("ca.crt"), dir.join("ca.crt")).unwrap();
        fs::copy(ours[0].join("node.crt"), dir.join("node.crt")).unwrap();
        let err = NodeIdentity::load(&dir).unwrap_err();
        assert!(matches!(err, TlsError::Untrusted { .. }), "{err}");
        assert!(
            err.to_string().contains("not signed by this cluster's CA"),
            "{err}"
        );

        // Another node's key.
        fs::copy(ours[0].join("ca.crt"), dir.join("ca.crt")).unwrap();
        fs::copy(ours[1].join("node.key"), dir.join("node.key")).unwrap();
        let err = NodeIdentity::load(&dir).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn exposed_key_is_only_warned_about() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = init_certs(&tmp.path().join("c"), &names(&["n1"])).unwrap();
        let key = dirs[0].join("node.key");
        fs::set_permissions(&key, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(NodeIdentity::load(&dirs[0]).unwrap().name(), "n1");
        // Re-issuing puts the mode back.
        init_certs(&tmp.path().join("c"), &names(&["n1"])).unwrap();
        assert_eq!(mode(&key), 0o600);
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = init_certs(&tmp.path().join("c"), &names(&["n1"])).unwrap();
        let id = NodeIdentity::load(&dirs[0]).unwrap();
        let key = fs::read_to_string(dirs[0].join("node.key")).unwrap();
        let debug = format!("{id:?}");
        assert!(
            debug.contains("n1") && debug.contains("redacted"),
            "{debug}"
        );
        let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!debug.contains(&key_body[..20]), "{debug}");
    }

    #[test]
    fn configs_build_and_expect_peer_is_validated() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = init_certs(&tmp.path().join("c"), &names(&["n1"])).unwrap();
        let id = NodeIdentity::load(&dirs[0]).unwrap();
        id.server_config().unwrap();
        id.client_config(None).unwrap();
        id.client_config(Some("n2")).unwrap();
        for bad in [SERVER_NAME, "localhost", "Bad/Name"] {
            assert!(matches!(
                id.client_config(Some(bad)),
                Err(TlsError::InvalidName { .. })
            ));
        }
    }
}
