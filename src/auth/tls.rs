//! rustls configurations for the gateway's TLS listener (spec §3.1) and for
//! the test and benchmark clients that talk to it.
//!
//! The ring provider is passed explicitly to every builder, so nothing here
//! depends on a process-wide default provider. The server speaks TLS 1.3 and
//! TLS 1.2 with ring's default suites, which include the ECDHE-ECDSA
//! AES-128/256-GCM suites IoTivity-Lite devices offer (spec §3.1, Appendix
//! A). Those devices send neither SNI nor ALPN, so the server requires
//! neither: no ALPN protocol is configured and a single certificate answers
//! every name.
//!
//! The only IO is reading the PEM files named in `[coap.tls]` (and its CRL
//! files, PEM or DER); every error names the file and what is wrong with it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::VerifierBuilderError;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    ClientConfig, InconsistentKeys, RootCertStore, ServerConfig, SupportedCipherSuite,
    SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::verifier::{DeviceCertVerifier, LeafPolicy};
use super::ClientAuth;

/// The PEM files of `[coap.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates that device certificates must chain to (`ca`). Not
    /// read with `client_auth = "none"`.
    pub ca: PathBuf,
    /// The gateway certificate chain, leaf first, intermediates after
    /// (`cert`).
    pub cert: PathBuf,
    /// The gateway private key, PKCS#8 or SEC1 (`key`).
    pub key: PathBuf,
}

/// Why a TLS configuration could not be built. Every variant names the file
/// involved (or `<in-memory>` for configurations built from DER).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not valid PEM.
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's complaint.
        source: rustls_pki_types::pem::Error,
    },
    /// The file holds no certificate.
    #[error("{} holds no `CERTIFICATE` PEM block", path.display())]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key.
    #[error("{} holds no private key (expected a `PRIVATE KEY` (PKCS#8) or `EC PRIVATE KEY` (SEC1) PEM block)", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate is not usable as a trust anchor.
    #[error("{}: CA certificate rejected: {source}", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// rustls/webpki's complaint.
        source: rustls::Error,
    },
    /// The leaf certificate could not be parsed.
    #[error("{}: certificate rejected: {source}", path.display())]
    BadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// rustls/webpki's complaint.
        source: rustls::Error,
    },
    /// The private key is of a type the ring provider cannot sign with.
    #[error("{}: private key not usable: {source}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// The provider's complaint.
        source: rustls::Error,
    },
    /// The private key does not belong to the certificate.
    #[error("private key {} does not match certificate {} (the first certificate in the file must be the one the key belongs to)", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The client-certificate verifier could not be built from the CA file.
    #[error("{}: cannot verify client certificates with these CAs: {source}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// rustls's complaint.
        source: VerifierBuilderError,
    },
    /// A `coap.tls.crl` file could not be read.
    #[error("coap.tls.crl: cannot read {}: {source}", path.display())]
    CrlRead {
        /// The CRL file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A `coap.tls.crl` file is not a certificate revocation list.
    #[error("coap.tls.crl: {} is not a CRL: {problem}", path.display())]
    BadCrl {
        /// The CRL file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the protocol-version/cipher-suite combination.
    #[error("TLS settings rejected: {0}")]
    Settings(rustls::Error),
}

/// Label for material that did not come from a file.
const IN_MEMORY: &str = "<in-memory>";

/// TLS 1.3 and TLS 1.2 (spec §3.1: TLS 1.2 minimum, 1.3 negotiable).
const SERVER_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Only TLS 1.2, as IoTivity-Lite devices speak it.
pub const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// The crypto provider every configuration here uses: ring, with its default
/// suites and key-exchange groups.
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Builds the listener's `ServerConfig` from the `[coap.tls]` files.
///
/// `client_auth` selects the device-authentication mode of spec §3.2/§3.4:
/// `identity` and `any` require a client certificate checked by
/// [`DeviceCertVerifier`]; `none` requests none (and does not read `ca`).
pub fn server_config(
    settings: &TlsFiles,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_crls(settings, &[], client_auth)
}

/// [`server_config`] with the revocation lists of `[coap.tls] crl`
/// (checklist item 11): a device certificate they list as revoked is
/// refused at the handshake, see [`DeviceCertVerifier`] for the policy.
/// The CRL files are read and checked in every mode, so a bad one stops the
/// gateway at start even with `client_auth = "none"`.
pub fn server_config_with_crls(
    settings: &TlsFiles,
    crl_files: &[PathBuf],
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let crls = load_crls(crl_files)?;
    let roots = match client_auth {
        ClientAuth::None => RootCertStore::empty(),
        ClientAuth::Identity | ClientAuth::Any => load_roots(&settings.ca)?,
    };
    let chain = load_certificates(&settings.cert)?;
    let key = load_private_key(&settings.key)?;
    build_server_config(
        roots,
        crls,
        &settings.ca,
        chain,
        &settings.cert,
        key,
        &settings.key,
        client_auth,
    )
}

/// [`server_config`] from material already in memory (tests, benchmark,
/// hot reload). `roots` is ignored with `ClientAuth::None`.
pub fn server_config_from_parts(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let label = Path::new(IN_MEMORY);
    build_server_config(
        roots,
        Vec::new(),
        label,
        chain,
        label,
        key,
        label,
        client_auth,
    )
}

#[allow(clippy::too_many_arguments)]
fn build_server_config(
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
    ca_path: &Path,
    chain: Vec<CertificateDer<'static>>,
    cert_path: &Path,
    key: PrivateKeyDer<'static>,
    key_path: &Path,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(provider());
    let certified = certified_key(&provider, chain, cert_path, key, key_path)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(SERVER_VERSIONS)
        .map_err(TlsError::Settings)?;
    let builder = match LeafPolicy::for_client_auth(client_auth) {
        // spec §3.2: clientCertificateRequired = false, nothing requested.
        None => builder.with_no_client_auth(),
        Some(policy) => {
            let verifier = DeviceCertVerifier::new(Arc::new(roots), crls, policy, provider)
                .map_err(|source| TlsError::Verifier {
                    path: ca_path.to_owned(),
                    source,
                })?;
            builder.with_client_cert_verifier(Arc::new(verifier))
        }
    };
    // No ALPN protocols configured: a client offering ALPN is not refused and
    // one offering none (IoTivity-Lite) is fine (Appendix A). One
    // certificate for every SNI value, and for none.
    let config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(Arc::new(config))
}

/// A client configuration that trusts the CAs in `ca` (and verifies the
/// gateway certificate against them), optionally presenting `client_cert`
/// = (certificate chain file, key file). TLS 1.3 and 1.2, SNI on.
pub fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(ca, client_cert, &ClientOptions::default())
}

/// Knobs for [`client_config_with`], to imitate particular devices.
#[derive(Debug, Clone)]
pub struct ClientOptions<'a> {
    /// Protocol versions offered, e.g. [`TLS12_ONLY`].
    pub versions: &'a [&'static SupportedProtocolVersion],
    /// Cipher suites offered, in order; `None` = ring's defaults.
    pub cipher_suites: Option<&'a [SupportedCipherSuite]>,
    /// Send SNI (IoTivity-Lite devices do not).
    pub enable_sni: bool,
}

impl Default for ClientOptions<'_> {
    fn default() -> Self {
        ClientOptions {
            versions: rustls::ALL_VERSIONS,
            cipher_suites: None,
            enable_sni: true,
        }
    }
}

impl<'a> ClientOptions<'a> {
    /// What an IoTivity-Lite device offers: TLS 1.2 only, the given suites,
    /// no SNI (spec Appendix A).
    pub fn tls12_only(cipher_suites: &'a [SupportedCipherSuite]) -> Self {
        ClientOptions {
            versions: TLS12_ONLY,
            cipher_suites: Some(cipher_suites),
            enable_sni: false,
        }
    }
}

/// [`client_config`] with a restricted set of versions and suites.
pub fn client_config_with(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
    options: &ClientOptions<'_>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(ca)?;
    let client_cert = match client_cert {
        Some((cert, key)) => Some((load_certificates(cert)?, cert, load_private_key(key)?, key)),
        None => None,
    };
    let mut provider = provider();
    if let Some(suites) = options.cipher_suites {
        provider.cipher_suites = suites.to_vec();
    }
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(options.versions)
        .map_err(TlsError::Settings)?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((chain, cert_path, key, key_path)) => {
            let certified = certified_key(&provider, chain, cert_path, key, key_path)?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
    };
    config.enable_sni = options.enable_sni;
    Ok(Arc::new(config))
}

/// Reads every certificate in a PEM file, in file order.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// Reads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// Reads the trust anchors of a PEM file; every certificate in it must be
/// usable as one.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// Reads the CRLs of `[coap.tls] crl`: each file holds one or more PEM
/// `X509 CRL` blocks, or one DER-encoded CRL. Every CRL is parsed as webpki
/// will use it, so a file that is not a CRL is refused here, named, rather
/// than by the verifier without its name.
pub fn load_crls(
    paths: &[PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut crls = Vec::new();
    for path in paths {
        let bad = |problem: String| TlsError::BadCrl {
            path: path.clone(),
            problem,
        };
        let bytes = std::fs::read(path).map_err(|source| TlsError::CrlRead {
            path: path.clone(),
            source,
        })?;
        let in_file = if bytes.windows(10).any(|w| w == b"-----BEGIN") {
            let pem = CertificateRevocationListDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not valid PEM: {e}")))?;
            if pem.is_empty() {
                return Err(bad("holds no `X509 CRL` PEM block".into()));
            }
            pem
        } else {
            vec![CertificateRevocationListDer::from(bytes)]
        };
        for crl in &in_file {
            webpki::OwnedCertRevocationList::from_der(crl.as_ref())
                .map_err(|e| bad(format!("not a valid DER or PEM X.509 CRL ({e:?})")))?;
        }
        crls.extend(in_file);
    }
    Ok(crls)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads the key with the provider and checks it belongs to the chain's
/// leaf, so a mismatch is reported at start-up rather than as failing
/// handshakes.
fn certified_key(
    provider: &CryptoProvider,
    chain: Vec<CertificateDer<'static>>,
    cert_path: &Path,
    key: PrivateKeyDer<'static>,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::NoCertificates {
            path: cert_path.to_owned(),
        });
    }
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: key_path.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // ring's ECDSA and RSA keys always know their public key; a key that
        // does not cannot be checked here and is left to the handshake.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        Err(source) => Err(TlsError::BadCertificate {
            path: cert_path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use rustls::crypto::ring::cipher_suite;
    use rustls::pki_types::ServerName;
    use rustls::{
        CertificateError, CipherSuite, ClientConnection, ProtocolVersion, ServerConnection,
    };
    use uuid::Uuid;

    use super::*;
    use crate::auth::identity::peer_identity;
    use crate::auth::pki::{self, Ca, CertAndKey, LeafSpec};
    use crate::auth::verifier::CertPolicyError;

    /// A development PKI in a temporary directory, plus its CA in memory to
    /// issue further certificates.
    struct Fixture {
        dir: tempfile::TempDir,
        files: TlsFiles,
        ca: Ca,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let paths = pki::init(dir.path(), Uuid::new_v4(), false).unwrap();
            let ca = Ca::load(dir.path()).unwrap();
            Fixture {
                files: TlsFiles {
                    ca: paths.ca,
                    cert: paths.cert,
                    key: paths.key,
                },
                dir,
                ca,
            }
        }

        /// Writes a certificate (plus extra chain certificates) and its key;
        /// returns (cert path, key path).
        fn write(&self, name: &str, leaf: &CertAndKey, extra: &[&str]) -> (PathBuf, PathBuf) {
            let cert = self.dir.path().join(format!("{name}.pem"));
            let key = self.dir.path().join(format!("{name}-key.pem"));
            let mut pem = leaf.cert_pem.clone();
            for more in extra {
                pem.push_str(more);
            }
            fs::write(&cert, pem).unwrap();
            fs::write(&key, &leaf.key_pem).unwrap();
            (cert, key)
        }

        fn device(&self, name: &str, spec: &LeafSpec) -> (PathBuf, PathBuf) {
            let leaf = self.ca.issue(spec).unwrap();
            self.write(name, &leaf, &[])
        }

        fn client(&self, cert: Option<&(PathBuf, PathBuf)>) -> Arc<ClientConfig> {
            client_config(
                &self.files.ca,
                cert.map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .unwrap()
        }
    }

    #[derive(Debug)]
    enum Failed {
        Client(rustls::Error),
        Server(rustls::Error),
        Stalled,
    }

    /// Drives both ends in memory until both finished the handshake and the
    /// server received one application-data record from the client.
    fn connect(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(ClientConnection, ServerConnection), Failed> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(client, name).map_err(Failed::Client)?;
        let mut server = ServerConnection::new(server).map_err(Failed::Server)?;
        io::Write::write_all(&mut client.writer(), b"ping").unwrap();
        let mut received = Vec::new();
        for _ in 0..20 {
            let mut progressed = false;
            while client.wants_write() {
                let mut buf = Vec::new();
                client.write_tls(&mut buf).unwrap();
                progressed |= !buf.is_empty();
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                }
                server.process_new_packets().map_err(Failed::Server)?;
            }
            let _ = io::Read::read_to_end(&mut server.reader(), &mut received);
            while server.wants_write() {
                let mut buf = Vec::new();
                server.write_tls(&mut buf).unwrap();
                progressed |= !buf.is_empty();
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).unwrap();
                }
                client.process_new_packets().map_err(Failed::Client)?;
            }
            if !client.is_handshaking() && !server.is_handshaking() && received == b"ping" {
                return Ok((client, server));
            }
            if !progressed {
                break;
            }
        }
        Err(Failed::Stalled)
    }

    fn assert_policy_refusal(
        result: Result<(ClientConnection, ServerConnection), Failed>,
        want: &CertPolicyError,
    ) {
        match result {
            Err(Failed::Server(rustls::Error::InvalidCertificate(CertificateError::Other(
                other,
            )))) => {
                let got = other.0.downcast_ref::<CertPolicyError>();
                assert_eq!(got, Some(want), "{other:?}");
            }
            Err(e) => panic!("expected policy refusal {want:?}, got {e:?}"),
            Ok(_) => panic!("expected policy refusal {want:?}, handshake succeeded"),
        }
    }

    fn assert_unknown_issuer(result: Result<(ClientConnection, ServerConnection), Failed>) {
        match result {
            Err(Failed::Server(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ))) => {}
            Err(e) => panic!("expected unknown issuer, got {e:?}"),
            Ok(_) => panic!("expected unknown issuer, handshake succeeded"),
        }
    }

    fn assert_no_certificate(result: Result<(ClientConnection, ServerConnection), Failed>) {
        match result {
            Err(Failed::Server(rustls::Error::NoCertificatesPresented)) => {}
            Err(e) => panic!("expected NoCertificatesPresented, got {e:?}"),
            Ok(_) => panic!("expected NoCertificatesPresented, handshake succeeded"),
        }
    }

    // ---- identity mode ----

    #[test]
    fn identity_mode_accepts_ocf_identity_certificate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let id = Uuid::new_v4();
        let device = f.device("device", &LeafSpec::device(id));
        let (_, server) = connect(f.client(Some(&device)), server).unwrap();
        let identity = peer_identity(server.peer_certificates().unwrap());
        assert_eq!(identity.device_id, Some(id.hyphenated().to_string()));
        assert!(identity.not_after.is_some());
    }

    #[test]
    fn identity_mode_device_id_is_lower_case() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let mut spec = LeafSpec::device(Uuid::new_v4());
        spec.common_name = "UUID:0F6CE5A254B54C5CB46F1C7B0E4F1A2B".into();
        let device = f.device("upper", &spec);
        let (_, server) = connect(f.client(Some(&device)), server).unwrap();
        assert_eq!(
            peer_identity(server.peer_certificates().unwrap())
                .device_id
                .as_deref(),
            Some("0f6ce5a2-54b5-4c5c-b46f-1c7b0e4f1a2b")
        );
    }

    #[test]
    fn identity_mode_refuses_other_ca() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let other = Ca::generate("unrelated CA").unwrap();
        let leaf = other.issue(&LeafSpec::device(Uuid::new_v4())).unwrap();
        let device = f.write("stranger", &leaf, &[]);
        assert_unknown_issuer(connect(f.client(Some(&device)), server));
    }

    #[test]
    fn identity_mode_refuses_any_certificate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let device = f.device("any", &LeafSpec::any_device(Uuid::new_v4()));
        assert_policy_refusal(
            connect(f.client(Some(&device)), server),
            &CertPolicyError::NotOcfIdentity,
        );
    }

    #[test]
    fn identity_mode_refuses_non_uuid_common_name() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let mut spec = LeafSpec::device(Uuid::new_v4());
        spec.common_name = "uuid:not-a-uuid".into();
        let device = f.device("badcn", &spec);
        assert_policy_refusal(
            connect(f.client(Some(&device)), server),
            &CertPolicyError::BadCommonName("uuid:not-a-uuid".into()),
        );
    }

    #[test]
    fn identity_mode_refuses_missing_server_auth() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let mut spec = LeafSpec::device(Uuid::new_v4());
        spec.server_auth = false;
        let device = f.device("noserverauth", &spec);
        assert_policy_refusal(
            connect(f.client(Some(&device)), server),
            &CertPolicyError::MissingEku("serverAuth"),
        );
    }

    #[test]
    fn identity_mode_refuses_missing_certificate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        assert_no_certificate(connect(f.client(None), server));
    }

    #[test]
    fn identity_mode_refuses_expired_certificate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let mut spec = LeafSpec::device(Uuid::new_v4());
        spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
        spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let device = f.device("expired", &spec);
        match connect(f.client(Some(&device)), server) {
            Err(Failed::Server(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ))) => {}
            other => panic!("expected expiry refusal, got {:?}", other.err()),
        }
    }

    #[test]
    fn identity_mode_accepts_chain_with_intermediate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let intermediate = f.ca.intermediate("device issuing CA").unwrap();
        let id = Uuid::new_v4();
        let leaf = intermediate.issue(&LeafSpec::device(id)).unwrap();
        let device = f.write("chained", &leaf, &[intermediate.cert_pem()]);
        let (_, server) = connect(f.client(Some(&device)), server).unwrap();
        let chain = server.peer_certificates().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(peer_identity(chain).device_id, Some(id.to_string()));
    }

    // ---- any mode ----

    #[test]
    fn any_mode_accepts_identity_certificate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Any).unwrap();
        let id = Uuid::new_v4();
        let device = f.device("device", &LeafSpec::device(id));
        let (_, server) = connect(f.client(Some(&device)), server).unwrap();
        assert_eq!(
            peer_identity(server.peer_certificates().unwrap()).device_id,
            Some(id.to_string())
        );
    }

    #[test]
    fn any_mode_accepts_plain_certificate_without_device_id() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Any).unwrap();
        let device = f.device("any", &LeafSpec::any_device(Uuid::new_v4()));
        let (_, server) = connect(f.client(Some(&device)), server).unwrap();
        let identity = peer_identity(server.peer_certificates().unwrap());
        assert_eq!(identity.device_id, None);
        assert!(identity.not_after.is_some());
    }

    #[test]
    fn any_mode_refuses_other_ca() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Any).unwrap();
        let other = Ca::generate("unrelated CA").unwrap();
        let leaf = other.issue(&LeafSpec::any_device(Uuid::new_v4())).unwrap();
        let device = f.write("stranger", &leaf, &[]);
        assert_unknown_issuer(connect(f.client(Some(&device)), server));
    }

    #[test]
    fn any_mode_refuses_missing_server_auth() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Any).unwrap();
        let mut spec = LeafSpec::any_device(Uuid::new_v4());
        spec.server_auth = false;
        let device = f.device("noserverauth", &spec);
        assert_policy_refusal(
            connect(f.client(Some(&device)), server),
            &CertPolicyError::MissingEku("serverAuth"),
        );
    }

    #[test]
    fn any_mode_refuses_missing_certificate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Any).unwrap();
        assert_no_certificate(connect(f.client(None), server));
    }

    // ---- none mode ----

    #[test]
    fn none_mode_needs_no_client_certificate() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::None).unwrap();
        let (_, server) = connect(f.client(None), server).unwrap();
        assert!(server.peer_certificates().is_none());
        assert_eq!(peer_identity(&[]).device_id, None);
    }

    #[test]
    fn none_mode_does_not_request_a_certificate() {
        // A client that has a certificate does not send it: the server sent
        // no CertificateRequest.
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::None).unwrap();
        let device = f.device("device", &LeafSpec::device(Uuid::new_v4()));
        let (_, server) = connect(f.client(Some(&device)), server).unwrap();
        assert!(server.peer_certificates().is_none());
    }

    #[test]
    fn none_mode_does_not_read_the_ca_file() {
        let f = Fixture::new();
        let files = TlsFiles {
            ca: f.dir.path().join("absent.pem"),
            ..f.files.clone()
        };
        assert!(server_config(&files, ClientAuth::None).is_ok());
    }

    // ---- TLS 1.2 as IoTivity-Lite speaks it ----

    fn tls12_with(suite: SupportedCipherSuite, want: CipherSuite) {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::Identity).unwrap();
        let id = Uuid::new_v4();
        let (cert, key) = f.device("device", &LeafSpec::device(id));
        let suites = [suite];
        let client = client_config_with(
            &f.files.ca,
            Some((&cert, &key)),
            &ClientOptions::tls12_only(&suites),
        )
        .unwrap();
        assert!(!client.enable_sni);
        let (client, server) = connect(client, server).unwrap();
        assert_eq!(server.protocol_version(), Some(ProtocolVersion::TLSv1_2));
        assert_eq!(
            server.negotiated_cipher_suite().map(|s| s.suite()),
            Some(want)
        );
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(want)
        );
        assert_eq!(server.server_name(), None, "no SNI sent");
        assert_eq!(server.alpn_protocol(), None);
        assert_eq!(
            peer_identity(server.peer_certificates().unwrap()).device_id,
            Some(id.to_string())
        );
    }

    #[test]
    fn tls12_ecdhe_ecdsa_aes128_gcm() {
        tls12_with(
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        );
    }

    #[test]
    fn tls12_ecdhe_ecdsa_aes256_gcm() {
        tls12_with(
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        );
    }

    #[test]
    fn tls13_by_default_and_alpn_is_ignored() {
        let f = Fixture::new();
        let server = server_config(&f.files, ClientAuth::None).unwrap();
        let mut client = (*f.client(None)).clone();
        client.alpn_protocols = vec![b"coap".to_vec()];
        let (_, server) = connect(Arc::new(client), server).unwrap();
        assert_eq!(server.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(server.alpn_protocol(), None);
        assert_eq!(server.server_name(), Some("localhost"));
    }

    #[test]
    fn gateway_chain_with_intermediate_verifies() {
        let f = Fixture::new();
        let intermediate = f.ca.intermediate("gateway issuing CA").unwrap();
        let gateway = intermediate
            .issue(&LeafSpec::gateway(Uuid::new_v4()))
            .unwrap();
        let (cert, key) = f.write("gw-chain", &gateway, &[intermediate.cert_pem()]);
        let files = TlsFiles {
            cert,
            key,
            ..f.files.clone()
        };
        let server = server_config(&files, ClientAuth::None).unwrap();
        connect(f.client(None), server).unwrap();
    }

    #[test]
    fn client_refuses_gateway_from_other_ca() {
        let f = Fixture::new();
        let other = Fixture::new();
        let server = server_config(&other.files, ClientAuth::None).unwrap();
        match connect(f.client(None), server) {
            Err(Failed::Client(rustls::Error::InvalidCertificate(_))) => {}
            other => panic!("expected client refusal, got {:?}", other.err()),
        }
    }

    #[test]
    fn foreign_ca_devices_are_accepted() {
        // Devices issued by a CA made with OpenSSL, reloaded by the pki
        // module: the chain webpki builds must hold.
        let f = Fixture::new();
        let ca_path = f.dir.path().join("foreign-ca.pem");
        fs::write(&ca_path, pki::FOREIGN_CA_PEM).unwrap();
        let files = TlsFiles {
            ca: ca_path,
            ..f.files.clone()
        };
        let server = server_config(&files, ClientAuth::Identity).unwrap();
        let foreign = Ca::from_pem(pki::FOREIGN_CA_PEM, pki::FOREIGN_CA_KEY_PEM).unwrap();
        let id = Uuid::new_v4();
        let leaf = foreign.issue(&LeafSpec::device(id)).unwrap();
        let device = f.write("foreign-device", &leaf, &[]);
        let (_, server) = connect(f.client(Some(&device)), server).unwrap();
        assert_eq!(
            peer_identity(server.peer_certificates().unwrap()).device_id,
            Some(id.to_string())
        );
    }

    #[test]
    fn sec1_gateway_key_is_accepted() {
        // `openssl ecparam -genkey` writes SEC1 `EC PRIVATE KEY` files.
        let f = Fixture::new();
        let cert = f.dir.path().join("self.pem");
        let key = f.dir.path().join("self-key.pem");
        fs::write(&cert, pki::FOREIGN_CA_PEM).unwrap();
        fs::write(&key, pki::FOREIGN_CA_KEY_SEC1_PEM).unwrap();
        assert!(matches!(
            load_private_key(&key).unwrap(),
            PrivateKeyDer::Sec1(_)
        ));
        let files = TlsFiles {
            cert,
            key,
            ..f.files.clone()
        };
        server_config(&files, ClientAuth::Identity).unwrap();
    }

    #[test]
    fn server_config_from_parts_works() {
        let f = Fixture::new();
        let roots = load_roots(&f.files.ca).unwrap();
        let chain = load_certificates(&f.files.cert).unwrap();
        let key = load_private_key(&f.files.key).unwrap();
        let server = server_config_from_parts(roots, chain, key, ClientAuth::Identity).unwrap();
        let device = f.device("device", &LeafSpec::device(Uuid::new_v4()));
        connect(f.client(Some(&device)), server).unwrap();
    }

    // ---- configuration errors ----

    fn error_text(files: &TlsFiles, mode: ClientAuth) -> (TlsError, String) {
        let err = server_config(files, mode).unwrap_err();
        let text = err.to_string();
        (err, text)
    }

    #[test]
    fn missing_files_are_named() {
        let f = Fixture::new();
        for (which, mode) in [
            ("ca", ClientAuth::Identity),
            ("cert", ClientAuth::Any),
            ("key", ClientAuth::None),
        ] {
            let mut files = f.files.clone();
            let absent = f.dir.path().join(format!("absent-{which}.pem"));
            match which {
                "ca" => files.ca = absent.clone(),
                "cert" => files.cert = absent.clone(),
                _ => files.key = absent.clone(),
            }
            let (err, text) = error_text(&files, mode);
            assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
            assert!(text.contains(&absent.display().to_string()), "{text}");
            assert!(text.starts_with("cannot read"), "{text}");
        }
    }

    #[test]
    fn garbage_pem_is_reported() {
        let f = Fixture::new();
        let no_pem = f.dir.path().join("text.pem");
        fs::write(&no_pem, "hello, I am not PEM\n").unwrap();
        let broken = f.dir.path().join("broken.pem");
        fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bad_der = f.dir.path().join("bad-der.pem");
        fs::write(
            &bad_der,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();

        let files = TlsFiles {
            cert: no_pem.clone(),
            ..f.files.clone()
        };
        let (err, text) = error_text(&files, ClientAuth::None);
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err:?}");
        assert!(
            text.contains("text.pem") && text.contains("CERTIFICATE"),
            "{text}"
        );

        let files = TlsFiles {
            key: no_pem.clone(),
            ..f.files.clone()
        };
        let (err, text) = error_text(&files, ClientAuth::None);
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");
        assert!(
            text.contains("text.pem") && text.contains("private key"),
            "{text}"
        );

        let files = TlsFiles {
            ca: broken.clone(),
            ..f.files.clone()
        };
        let (err, text) = error_text(&files, ClientAuth::Identity);
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
        assert!(
            text.contains("broken.pem") && text.contains("not valid PEM"),
            "{text}"
        );

        let files = TlsFiles {
            ca: bad_der.clone(),
            ..f.files.clone()
        };
        let (err, text) = error_text(&files, ClientAuth::Identity);
        assert!(matches!(err, TlsError::BadCa { .. }), "{err:?}");
        assert!(text.contains("bad-der.pem"), "{text}");

        let files = TlsFiles {
            cert: bad_der,
            ..f.files.clone()
        };
        let (err, text) = error_text(&files, ClientAuth::None);
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err:?}");
        assert!(text.contains("bad-der.pem"), "{text}");
    }

    #[test]
    fn key_not_matching_certificate() {
        let f = Fixture::new();
        let files = TlsFiles {
            key: f.dir.path().join("ca-key.pem"),
            ..f.files.clone()
        };
        let (err, text) = error_text(&files, ClientAuth::Identity);
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        assert!(
            text.contains("ca-key.pem") && text.contains("gateway.pem"),
            "{text}"
        );
        assert!(text.contains("does not match"), "{text}");

        // The same check guards client certificates.
        let device = f.device("device", &LeafSpec::device(Uuid::new_v4()));
        let err = client_config(&f.files.ca, Some((&device.0, &files.key))).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    }

    fn assert_revoked(result: Result<(ClientConnection, ServerConnection), Failed>) {
        match result {
            Err(Failed::Server(rustls::Error::InvalidCertificate(CertificateError::Revoked))) => {}
            Err(e) => panic!("expected a revoked certificate, got {e:?}"),
            Ok(_) => panic!("expected a revoked certificate, handshake succeeded"),
        }
    }

    /// Writes a CRL of `ca` revoking `revoked`, as PEM or DER.
    fn write_crl(f: &Fixture, name: &str, ca: &Ca, revoked: &[&Path], der: bool) -> PathBuf {
        let revoked: Vec<_> = revoked
            .iter()
            .map(|path| load_certificates(path).unwrap().remove(0))
            .collect();
        let pem = ca.revoke(&revoked).unwrap();
        let path = f.dir.path().join(name);
        if der {
            let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
            fs::write(&path, der.as_ref()).unwrap();
        } else {
            fs::write(&path, pem).unwrap();
        }
        path
    }

    #[test]
    fn crl_refuses_revoked_devices_only() {
        let f = Fixture::new();
        let revoked = f.device("revoked", &LeafSpec::device(Uuid::new_v4()));
        let kept = f.device("kept", &LeafSpec::device(Uuid::new_v4()));
        let any = f.device("any", &LeafSpec::any_device(Uuid::new_v4()));
        for der in [false, true] {
            let crl = write_crl(&f, "ca.crl", &f.ca, &[&revoked.0, &any.0], der);
            let crls = [crl];
            for mode in [ClientAuth::Identity, ClientAuth::Any] {
                let server = server_config_with_crls(&f.files, &crls, mode).unwrap();
                assert_revoked(connect(f.client(Some(&revoked)), server.clone()));
                connect(f.client(Some(&kept)), server.clone()).expect("not revoked");
                if mode == ClientAuth::Any {
                    assert_revoked(connect(f.client(Some(&any)), server));
                }
            }
            // Without the CRL the same certificate is served.
            let server = server_config(&f.files, ClientAuth::Identity).unwrap();
            connect(f.client(Some(&revoked)), server).expect("no CRL configured");
        }
    }

    #[test]
    fn crl_checks_the_whole_chain_and_allows_unknown_status() {
        let f = Fixture::new();
        let intermediate = f.ca.intermediate("device issuing CA").unwrap();
        let leaf = intermediate
            .issue(&LeafSpec::device(Uuid::new_v4()))
            .unwrap();
        let device = f.write("chained", &leaf, &[intermediate.cert_pem()]);
        let intermediate_path = f.dir.path().join("intermediate.pem");
        fs::write(&intermediate_path, intermediate.cert_pem()).unwrap();

        // A root CRL that does not list the intermediate; the intermediate
        // has no CRL: its leaf's status is unknown, which is allowed.
        let other = f.device("other", &LeafSpec::device(Uuid::new_v4()));
        let crls = [write_crl(&f, "root.crl", &f.ca, &[&other.0], false)];
        let server = server_config_with_crls(&f.files, &crls, ClientAuth::Identity).unwrap();
        connect(f.client(Some(&device)), server).expect("unknown status is allowed");

        // The root revokes the intermediate: its leaf is refused.
        let crls = [write_crl(
            &f,
            "root.crl",
            &f.ca,
            &[&intermediate_path],
            false,
        )];
        let server = server_config_with_crls(&f.files, &crls, ClientAuth::Identity).unwrap();
        assert_revoked(connect(f.client(Some(&device)), server));

        // The intermediate revokes the leaf (its CRL only).
        let crls = [write_crl(
            &f,
            "inter.crl",
            &intermediate,
            &[&device.0],
            false,
        )];
        let server = server_config_with_crls(&f.files, &crls, ClientAuth::Identity).unwrap();
        assert_revoked(connect(f.client(Some(&device)), server));
    }

    #[test]
    fn bad_crl_files_are_named() {
        let f = Fixture::new();
        let check = |path: &Path, mode: ClientAuth| {
            let err = server_config_with_crls(&f.files, &[path.to_owned()], mode).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("coap.tls.crl") && text.contains(&*path.to_string_lossy()),
                "{text}"
            );
            (err, text)
        };
        let absent = f.dir.path().join("absent.crl");
        let (err, _) = check(&absent, ClientAuth::Identity);
        assert!(matches!(err, TlsError::CrlRead { .. }), "{err:?}");

        let garbage = f.dir.path().join("garbage.crl");
        fs::write(&garbage, b"this is not a CRL\n").unwrap();
        let (err, _) = check(&garbage, ClientAuth::Any);
        assert!(matches!(err, TlsError::BadCrl { .. }), "{err:?}");
        // Read and checked in mode none too: the file is wrong either way.
        check(&garbage, ClientAuth::None);

        // A certificate is PEM, but not a CRL.
        let (err, text) = check(&f.files.ca, ClientAuth::Identity);
        assert!(matches!(err, TlsError::BadCrl { .. }), "{err:?}");
        assert!(text.contains("X509 CRL"), "{text}");

        // A DER certificate is not a DER CRL.
        let der = f.dir.path().join("ca.der");
        fs::write(&der, f.ca.cert_der().as_ref()).unwrap();
        let (err, _) = check(&der, ClientAuth::Identity);
        assert!(matches!(err, TlsError::BadCrl { .. }), "{err:?}");
    }
}
