//! The development PKI behind `coap-gateway certs init|device` and the first
//! start on the embedded defaults (SURFACE.md).
//!
//! Everything is P-256 / ECDSA-SHA256: rcgen with ring cannot make RSA keys,
//! and ECDHE-ECDSA is what IoTivity-Lite devices negotiate (spec §3.1). The
//! certificates follow spec §3: the gateway certificate is identity-style
//! (CN `uuid:<hubId>`, EKU serverAuth + clientAuth, §3.1); device identity
//! certificates carry EKU clientAuth + serverAuth + the OCF identity OID and
//! CN `uuid:<deviceId>` (§3.2, §3.3).
//!
//! This is command-line tooling, not protocol logic: it reads the clock for
//! validity periods and writes files. Key files are created with mode 0600,
//! and nothing is overwritten unless the caller asks.
//!
//! The in-memory API ([`Ca`], [`LeafSpec`], [`CertAndKey`]) is what the file
//! commands are built on; tests use it to make unrelated CAs and certificates
//! that break one rule at a time.

use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::{device_id_from_common_name, OCF_IDENTITY_OID_ARCS};

/// CA certificate file name in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name in a PKI directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Gateway certificate file name written by [`init`].
pub const GATEWAY_CERT_FILE: &str = "gateway.pem";
/// Gateway private key file name written by [`init`].
pub const GATEWAY_KEY_FILE: &str = "gateway-key.pem";
/// Device certificate file name written by [`device`].
pub const DEVICE_CERT_FILE: &str = "device.pem";
/// Device private key file name written by [`device`].
pub const DEVICE_KEY_FILE: &str = "device-key.pem";

/// Validity of CA and gateway certificates.
const LONG_VALIDITY: Duration = Duration::days(3653);
/// Validity of device certificates.
const DEVICE_VALIDITY: Duration = Duration::days(365);
/// Back-dating of every NotBefore, so a device whose clock is a little behind
/// does not see a certificate from the future.
const BACKDATE: Duration = Duration::hours(1);

/// Label used in error messages for PEM text that did not come from a file.
const IN_MEMORY: &str = "<in-memory PEM>";

/// Why a development-PKI operation failed. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The output file exists and overwriting was not asked for.
    #[error("{} already exists; refusing to overwrite it (remove it or choose another output directory)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The output directory could not be created.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An output file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An input file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An input certificate is unusable.
    #[error("{}: {problem}", path.display())]
    BadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// An input private key is unusable.
    #[error("{} is not a usable private key (expected a PKCS#8 `PRIVATE KEY` PEM block): {source}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// The parser's complaint.
        source: rcgen::Error,
    },
    /// The CA key does not belong to the CA certificate.
    #[error("CA key {} does not belong to CA certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
    /// rcgen refused to build a certificate or key.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's complaint.
        source: rcgen::Error,
    },
}

/// Where a PKI operation put (or found) its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    /// The CA certificate: written by [`init`]; for [`device`] the CA the
    /// device certificate was signed by (the trust anchor peers need).
    pub ca: PathBuf,
    /// The CA private key; `Some` only when this operation wrote it.
    pub ca_key: Option<PathBuf>,
    /// The certificate written: `gateway.pem` or `device.pem`.
    pub cert: PathBuf,
    /// Its private key: `gateway-key.pem` or `device-key.pem`.
    pub key: PathBuf,
}

impl PkiPaths {
    /// The files this operation wrote, for printing.
    pub fn written(&self) -> Vec<&Path> {
        let mut files = Vec::with_capacity(4);
        if let Some(ca_key) = &self.ca_key {
            files.push(self.ca.as_path());
            files.push(ca_key.as_path());
        }
        files.push(self.cert.as_path());
        files.push(self.key.as_path());
        files
    }
}

/// `certs init`: creates `ca.pem`, `ca-key.pem`, `gateway.pem` and
/// `gateway-key.pem` in `out` (created if missing). The gateway certificate
/// has CN `uuid:<hubId>`, EKU serverAuth + clientAuth and SANs `localhost`,
/// `127.0.0.1`, `::1` (spec §3.1). Existing files are an error unless
/// `overwrite` is set; the check happens before anything is written.
pub fn init(out: &Path, hub_id: Uuid, overwrite: bool) -> Result<PkiPaths, PkiError> {
    let ca_key = out.join(CA_KEY_FILE);
    let paths = PkiPaths {
        ca: out.join(CA_CERT_FILE),
        ca_key: Some(ca_key.clone()),
        cert: out.join(GATEWAY_CERT_FILE),
        key: out.join(GATEWAY_KEY_FILE),
    };
    if !overwrite {
        refuse_existing(&paths.written())?;
    }
    let ca = Ca::generate(&format!("coap-gateway development CA (hub {hub_id})"))?;
    let gateway = ca.issue(&LeafSpec::gateway(hub_id))?;
    create_dir(out)?;
    let ca_key_pem = ca.key_pem();
    write_file(
        &paths.ca,
        ca.cert_pem().as_bytes(),
        Secrecy::Public,
        overwrite,
    )?;
    write_file(&ca_key, ca_key_pem.as_bytes(), Secrecy::Secret, overwrite)?;
    write_file(
        &paths.cert,
        gateway.cert_pem.as_bytes(),
        Secrecy::Public,
        overwrite,
    )?;
    write_file(
        &paths.key,
        gateway.key_pem.as_bytes(),
        Secrecy::Secret,
        overwrite,
    )?;
    Ok(paths)
}

/// `certs device`: creates `device.pem` and `device-key.pem` in `out`, signed
/// by the CA in `ca_dir` (`ca.pem` + `ca-key.pem`). By default an OCF
/// identity certificate (CN `uuid:<id>`, EKU clientAuth + serverAuth + OCF
/// identity OID, spec §3.2/§3.3); with `any` a plain client certificate
/// without the identity properties (CN `device-<id>`, EKU clientAuth +
/// serverAuth), as accepted by `client_auth = "any"`. Existing files are
/// an error (see [`device_with`]).
pub fn device(ca_dir: &Path, device_id: Uuid, out: &Path, any: bool) -> Result<PkiPaths, PkiError> {
    device_with(ca_dir, device_id, out, any, false)
}

/// [`device`], overwriting existing `device.pem`/`device-key.pem` when
/// `overwrite` is set.
pub fn device_with(
    ca_dir: &Path,
    device_id: Uuid,
    out: &Path,
    any: bool,
    overwrite: bool,
) -> Result<PkiPaths, PkiError> {
    let paths = PkiPaths {
        ca: ca_dir.join(CA_CERT_FILE),
        ca_key: None,
        cert: out.join(DEVICE_CERT_FILE),
        key: out.join(DEVICE_KEY_FILE),
    };
    if !overwrite {
        refuse_existing(&paths.written())?;
    }
    let ca = Ca::load(ca_dir)?;
    let spec = if any {
        LeafSpec::any_device(device_id)
    } else {
        LeafSpec::device(device_id)
    };
    let leaf = ca.issue(&spec)?;
    create_dir(out)?;
    write_file(
        &paths.cert,
        leaf.cert_pem.as_bytes(),
        Secrecy::Public,
        overwrite,
    )?;
    write_file(
        &paths.key,
        leaf.key_pem.as_bytes(),
        Secrecy::Secret,
        overwrite,
    )?;
    Ok(paths)
}

/// First start on the embedded defaults (SURFACE.md): creates the development
/// PKI in `dir` with a fresh random hub ID when `dir/ca.pem` is absent and
/// returns its paths; returns `None` when a CA is already there. The hub ID
/// can be read back with [`hub_id_from_certificate`].
pub fn ensure_dev_pki(dir: &Path) -> Result<Option<PkiPaths>, PkiError> {
    ensure_dev_pki_for(dir, Uuid::new_v4())
}

/// [`ensure_dev_pki`] with a given hub ID (the gateway certificate's CN must
/// carry the hub ID the devices are provisioned with, spec §3.1).
pub fn ensure_dev_pki_for(dir: &Path, hub_id: Uuid) -> Result<Option<PkiPaths>, PkiError> {
    let ca = dir.join(CA_CERT_FILE);
    match ca.try_exists() {
        Ok(true) => Ok(None),
        Ok(false) => init(dir, hub_id, false).map(Some),
        Err(source) => Err(PkiError::Read { path: ca, source }),
    }
}

/// Reads the hub ID from a gateway certificate whose CN is `uuid:<hubId>`
/// (spec §3.1). `None` when the first certificate's CN has another form.
pub fn hub_id_from_certificate(cert: &Path) -> Result<Option<Uuid>, PkiError> {
    let pem = read_file(cert)?;
    let der = first_certificate(&pem, cert)?;
    let (_, parsed) = parse_certificate(&der, cert)?;
    Ok(parsed
        .subject()
        .iter_common_name()
        .last()
        .and_then(|cn| cn.as_str().ok())
        .and_then(device_id_from_common_name))
}

/// A certificate with its freshly generated private key.
pub struct CertAndKey {
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 DER.
    pub key_der: PrivatePkcs8KeyDer<'static>,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl CertAndKey {
    /// The private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }

    fn new(cert: rcgen::Certificate, key: &KeyPair) -> Self {
        CertAndKey {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Clone for CertAndKey {
    fn clone(&self) -> Self {
        // Key types do not derive Clone so that copies of secrets are
        // explicit; a test fixture needing one is such a case.
        CertAndKey {
            cert_der: self.cert_der.clone(),
            cert_pem: self.cert_pem.clone(),
            key_der: self.key_der.clone_key(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl std::fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("CertAndKey")
            .field("cert_pem", &self.cert_pem)
            .field("key", &"[elided]")
            .finish()
    }
}

/// What a leaf certificate issued by [`Ca::issue`] should contain. The
/// constructors give the profiles of spec §3; tests flip single fields to
/// break one rule at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// Subject CN.
    pub common_name: String,
    /// EKU id-kp-clientAuth.
    pub client_auth: bool,
    /// EKU id-kp-serverAuth.
    pub server_auth: bool,
    /// EKU OCF identity OID 1.3.6.1.4.1.44924.1.6.
    pub ocf_identity: bool,
    /// SAN DNS names.
    pub dns_names: Vec<String>,
    /// SAN IP addresses.
    pub ip_addresses: Vec<IpAddr>,
    /// NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// The gateway certificate (spec §3.1): CN `uuid:<hubId>`, EKU serverAuth
    /// + clientAuth, SANs `localhost`, `127.0.0.1`, `::1`; valid 10 years.
    pub fn gateway(hub_id: Uuid) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: format!("uuid:{hub_id}"),
            client_auth: true,
            server_auth: true,
            ocf_identity: false,
            dns_names: vec!["localhost".to_owned()],
            ip_addresses: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            not_before: now - BACKDATE,
            not_after: now + LONG_VALIDITY,
        }
    }

    /// An OCF identity certificate (spec §3.2 step 4, §3.3): CN
    /// `uuid:<deviceId>`, EKU clientAuth + serverAuth + OCF identity OID;
    /// valid one year.
    pub fn device(device_id: Uuid) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: format!("uuid:{device_id}"),
            client_auth: true,
            server_auth: true,
            ocf_identity: true,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + DEVICE_VALIDITY,
        }
    }

    /// A plain client certificate for `client_auth = "any"` (spec §3.4): EKU
    /// clientAuth + serverAuth, no OCF OID, CN `device-<deviceId>`.
    pub fn any_device(device_id: Uuid) -> Self {
        LeafSpec {
            common_name: format!("device-{device_id}"),
            ocf_identity: false,
            ..LeafSpec::device(device_id)
        }
    }
}

/// A certificate authority that can sign leaves: the development CA, one
/// loaded from files, or an intermediate.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    /// The CA certificate's encoded Subject: every issued certificate's
    /// Issuer must equal it byte for byte, or chain building fails.
    subject_raw: Vec<u8>,
    /// Where the CA certificate came from, for error messages.
    origin: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed root CA (basicConstraints CA, keyCertSign), valid
    /// from an hour ago for 10 years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        Ca::generate_until(common_name, OffsetDateTime::now_utc() + LONG_VALIDITY)
    }

    /// [`Ca::generate`], valid until `not_after` (tests of CA expiry).
    pub fn generate_until(common_name: &str, not_after: OffsetDateTime) -> Result<Self, PkiError> {
        let key = new_key("CA key")?;
        let mut params = ca_params(common_name);
        params.not_after = not_after;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "CA certificate",
                source,
            })?;
        Ca::assemble(cert, params, key)
    }

    /// A new intermediate CA signed by this one (path length 0), so tests
    /// can exercise chains that carry intermediates.
    pub fn intermediate(&self, common_name: &str) -> Result<Self, PkiError> {
        let key = new_key("intermediate CA key")?;
        let mut params = ca_params(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "intermediate CA certificate",
                source,
            })?;
        Ca::assemble(cert, params, key)
    }

    /// Loads `ca.pem` and `ca-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_file(&cert_path)?;
        let key_pem = read_file(&key_path)?;
        Ca::from_pem_named(&cert_pem, &cert_path, &key_pem, &key_path)
    }

    /// Builds a CA from PEM text: the first certificate of `cert_pem` and
    /// the PKCS#8 key in `key_pem`, which must belong to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Ca::from_pem_named(
            cert_pem.as_bytes(),
            Path::new(IN_MEMORY),
            key_pem.as_bytes(),
            Path::new(IN_MEMORY),
        )
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A CRL signed by this CA that lists `revoked` (certificates it
    /// issued) as revoked an hour ago, valid from an hour ago for 30 days;
    /// PEM (`X509 CRL`). For tests and operators of the development PKI
    /// (`[coap.tls] crl`).
    pub fn revoke(&self, revoked: &[CertificateDer<'_>]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|der| {
                let (_, cert) = parse_certificate(der, Path::new(IN_MEMORY))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: now - BACKDATE,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update: now + Duration::days(30),
            crl_number: SerialNumber::from(now.unix_timestamp().unsigned_abs()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "CRL",
                source,
            })?;
        crl.pem().map_err(|source| PkiError::Generate {
            what: "CRL PEM",
            source,
        })
    }

    /// Issues a leaf certificate with a fresh P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<CertAndKey, PkiError> {
        let key = new_key("certificate key")?;
        let mut params = CertificateParams::default();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        // digitalSignature for the ECDHE-ECDSA handshake signature;
        // keyAgreement as OCF identity certificates carry it.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        if spec.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if spec.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.ocf_identity {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::Other(
                    OCF_IDENTITY_OID_ARCS.to_vec(),
                ));
        }
        for name in &spec.dns_names {
            let name = Ia5String::try_from(name.as_str()).map_err(|source| PkiError::Generate {
                what: "certificate DNS name",
                source,
            })?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(spec.ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        // OpenSSL-based peers (libcoap) pick the issuer by key identifier.
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "certificate",
                source,
            })?;
        self.check_issuer_name(cert.der())?;
        Ok(CertAndKey::new(cert, &key))
    }

    fn assemble(
        cert: rcgen::Certificate,
        params: CertificateParams,
        key: KeyPair,
    ) -> Result<Self, PkiError> {
        let cert_der = cert.der().clone();
        let (_, parsed) = parse_certificate(&cert_der, Path::new(IN_MEMORY))?;
        let subject_raw = parsed.subject().as_raw().to_vec();
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            cert_der,
            subject_raw,
            origin: PathBuf::from(IN_MEMORY),
        })
    }

    /// Builds the CA from PEM. rcgen's [`Issuer::from_ca_cert_der`] rebuilds
    /// the issuer name and key identifier but checks nothing else, so the
    /// basicConstraints CA flag and the key's ownership are checked here.
    fn from_pem_named(
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
    ) -> Result<Self, PkiError> {
        let cert_der = first_certificate(cert_pem, cert_path)?;
        let key_text = std::str::from_utf8(key_pem).map_err(|_| PkiError::BadKey {
            path: key_path.to_owned(),
            source: rcgen::Error::CouldNotParseKeyPair,
        })?;
        let key = KeyPair::from_pem(key_text).map_err(|source| PkiError::BadKey {
            path: key_path.to_owned(),
            source,
        })?;
        let (_, parsed) = parse_certificate(&cert_der, cert_path)?;
        let bad = |problem: String| PkiError::BadCertificate {
            path: cert_path.to_owned(),
            problem,
        };
        let is_ca = parsed
            .basic_constraints()
            .map_err(|e| bad(format!("invalid basicConstraints: {e}")))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(bad(
                "not a CA certificate (basicConstraints CA is not set)".to_owned()
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let subject_raw = parsed.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            bad(format!(
                "cannot sign with this CA (its Subject uses a multi-valued RDN or an \
                 unsupported string type?): {e}"
            ))
        })?;
        let cert_pem = String::from_utf8_lossy(cert_pem).into_owned();
        Ok(Ca {
            issuer,
            cert_der,
            cert_pem,
            subject_raw,
            origin: cert_path.to_owned(),
        })
    }

    /// Guards the issuer name rcgen rebuilt: a certificate whose Issuer
    /// differs from the CA's Subject would never chain (rcgen keeps only the
    /// last of repeated attributes such as two OUs).
    fn check_issuer_name(&self, der: &CertificateDer<'_>) -> Result<(), PkiError> {
        let (_, parsed) = parse_certificate(der, Path::new(IN_MEMORY))?;
        if parsed.issuer().as_raw() == self.subject_raw.as_slice() {
            Ok(())
        } else {
            Err(PkiError::BadCertificate {
                path: self.origin.clone(),
                problem: "the CA's Subject cannot be reproduced exactly (unusual string types \
                          or repeated attributes); issue certificates with the tool that made this CA"
                    .to_owned(),
            })
        }
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.not_before = now - BACKDATE;
    params.not_after = now + LONG_VALIDITY;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "coap-gateway");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn new_key(what: &'static str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| PkiError::Generate { what, source })
}

fn parse_certificate<'a>(
    der: &'a CertificateDer<'_>,
    path: &Path,
) -> Result<(&'a [u8], X509Certificate<'a>), PkiError> {
    X509Certificate::from_der(der.as_ref()).map_err(|e| PkiError::BadCertificate {
        path: path.to_owned(),
        problem: format!("not a valid X.509 certificate: {e}"),
    })
}

fn first_certificate(pem: &[u8], path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(PkiError::BadCertificate {
            path: path.to_owned(),
            problem: format!("invalid PEM: {e}"),
        }),
        None => Err(PkiError::BadCertificate {
            path: path.to_owned(),
            problem: "no `CERTIFICATE` PEM block found".to_owned(),
        }),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    for path in paths {
        // symlink_metadata: a dangling symlink is "existing" too.
        if fs::symlink_metadata(path).is_ok() {
            return Err(PkiError::Exists {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrecy {
    Public,
    Secret,
}

/// Writes a whole file. Without `overwrite` the file must not exist
/// (`create_new`, so a file appearing after the pre-check is not clobbered
/// either). With `overwrite` the old file is removed first, so a key file
/// always gets a fresh inode created with mode 0600 rather than inheriting
/// the old file's permissions.
fn write_file(
    path: &Path,
    contents: &[u8],
    secrecy: Secrecy,
    overwrite: bool,
) -> Result<(), PkiError> {
    let write_error = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    if overwrite {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_error(e)),
        }
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match secrecy {
            Secrecy::Secret => 0o600,
            Secrecy::Public => 0o644,
        });
    }
    #[cfg(not(unix))]
    let _ = secrecy;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_owned(),
            }
        } else {
            write_error(e)
        }
    })?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

/// A CA made by OpenSSL (`openssl req -x509 -newkey ec -subj
/// "/C=DE/O=Example Org/OU=IoT/CN=Foreign Root"`): PrintableString and
/// UTF8String attributes and a SHA-1 key identifier, unlike rcgen's CAs.
/// Test-only key material.
#[cfg(test)]
pub(crate) const FOREIGN_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIB5jCCAY2gAwIBAgIUOdzGOswBghPP25SezSxbSq+zLqAwCgYIKoZIzj0EAwIw
SDELMAkGA1UEBhMCREUxFDASBgNVBAoMC0V4YW1wbGUgT3JnMQwwCgYDVQQLDANJ
b1QxFTATBgNVBAMMDEZvcmVpZ24gUm9vdDAgFw0yNjExMjUyMjQzMDNaGA8yMTI2
MTEwMTIyNDMwM1owSDELMAkGA1UEBhMCREUxFDASBgNVBAoMC0V4YW1wbGUgT3Jn
MQwwCgYDVQQLDANJb1QxFTATBgNVBAMMDEZvcmVpZ24gUm9vdDBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABAHBvxKNXRfFN9AmE7A4YUqNMxkkz4FQ0iBZiLT3B+sj
6tpEME8NuZTz+CktwSwFfGM1LHKDUbAoR+savqmowKajUzBRMB0GA1UdDgQWBBSF
ufgx6O7Yjnd3Opt5ZGEfA9uBnTAfBgNVHSMEGDAWgBSFufgx6O7Yjnd3Opt5ZGEf
A9uBnTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIC1En67ngCMc
IYUvhhnOdzcxEQ/a25Q4/GNAb9doTw/RAiAflpG3Aol4sUjE7kIYCWyv3Nxo6EF+
gpZH89bmMZ9MHA==
-----END CERTIFICATE-----
";
#[cfg(test)]
pub(crate) const FOREIGN_CA_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg2STT/15BTCAq3Cjn
wPA1aiEIZ56HNT4svHfiWn3SVWehRANCAAQBwb8SjV0XxTfQJhOwOGFKjTMZJM+B
UNIgWYi09wfrI+raRDBPDbmU8/gpLcEsBXxjNSxyg1GwKEfrGr6pqMCm
-----END PRIVATE KEY-----
";
/// The same key as SEC1 `EC PRIVATE KEY` (`openssl ec`).
#[cfg(test)]
pub(crate) const FOREIGN_CA_KEY_SEC1_PEM: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEINkk0/9eQUwgKtwo58DwNWohCGeehzU+LLx34lp90lVnoAoGCCqGSM49
AwEHoUQDQgAEAcG/Eo1dF8U30CYTsDhhSo0zGSTPgVDSIFmItPcH6yPq2kQwTw25
lPP4KS3BLAV8YzUscoNRsChH6xq+qajApg==
-----END EC PRIVATE KEY-----
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::LeafFacts;
    use x509_parser::prelude::ParsedExtension;

    #[test]
    fn init_writes_the_four_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pki");
        let hub = Uuid::new_v4();
        let paths = init(&out, hub, false).unwrap();
        assert_eq!(paths.ca, out.join("ca.pem"));
        assert_eq!(
            paths.ca_key.as_deref(),
            Some(out.join("ca-key.pem").as_path())
        );
        assert_eq!(paths.cert, out.join("gateway.pem"));
        assert_eq!(paths.key, out.join("gateway-key.pem"));
        assert_eq!(paths.written().len(), 4);
        for file in paths.written() {
            let text = fs::read_to_string(file).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{}", file.display());
        }
        assert_eq!(hub_id_from_certificate(&paths.cert).unwrap(), Some(hub));

        // The gateway certificate: CN uuid:<hubId>, EKU both, SANs (§3.1).
        let der = first_certificate(&fs::read(&paths.cert).unwrap(), &paths.cert).unwrap();
        let facts = LeafFacts::parse(&der).unwrap();
        assert!(facts.server_auth && facts.client_auth && !facts.ocf_identity);
        let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().any(|n| n.contains("localhost")));

        // The CA: basicConstraints CA, keyCertSign.
        let ca_der = first_certificate(&fs::read(&paths.ca).unwrap(), &paths.ca).unwrap();
        let (_, ca) = X509Certificate::from_der(ca_der.as_ref()).unwrap();
        assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
        assert!(ca.key_usage().unwrap().unwrap().value.key_cert_sign());
    }

    #[cfg(unix)]
    #[test]
    fn key_files_have_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = init(dir.path(), Uuid::new_v4(), false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(paths.ca_key.as_deref().unwrap()), 0o600);
        assert_eq!(mode(&paths.key), 0o600);
        let devices = dir.path().join("dev");
        let device_paths = device(dir.path(), Uuid::new_v4(), &devices, false).unwrap();
        assert_eq!(mode(&device_paths.key), 0o600);

        // Overwriting an existing, too-open key file still yields 0600.
        fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o644)).unwrap();
        let paths = init(dir.path(), Uuid::new_v4(), true).unwrap();
        assert_eq!(mode(&paths.key), 0o600);
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let first = init(dir.path(), Uuid::new_v4(), false).unwrap();
        let before = fs::read(&first.ca).unwrap();
        let err = init(dir.path(), Uuid::new_v4(), false).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("ca.pem") && text.contains("refusing to overwrite"),
            "{text}"
        );
        assert_eq!(fs::read(&first.ca).unwrap(), before, "nothing was written");

        // Only one of the four present is enough to refuse.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("gateway-key.pem"), b"keep me").unwrap();
        let err = init(other.path(), Uuid::new_v4(), false).unwrap_err();
        assert!(err.to_string().contains("gateway-key.pem"), "{err}");
        assert!(!other.path().join("ca.pem").exists());

        // Asked to overwrite: new CA.
        let second = init(dir.path(), Uuid::new_v4(), true).unwrap();
        assert_ne!(fs::read(&second.ca).unwrap(), before);
    }

    #[test]
    fn device_certificates() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), Uuid::new_v4(), false).unwrap();
        let id = Uuid::new_v4();

        let out = dir.path().join("device");
        let paths = device(dir.path(), id, &out, false).unwrap();
        assert_eq!(paths.ca, dir.path().join("ca.pem"));
        assert_eq!(paths.ca_key, None);
        assert_eq!(
            paths.written(),
            vec![out.join("device.pem"), out.join("device-key.pem")]
        );
        let der = first_certificate(&fs::read(&paths.cert).unwrap(), &paths.cert).unwrap();
        let facts = LeafFacts::parse(&der).unwrap();
        assert!(facts.client_auth && facts.server_auth && facts.ocf_identity);
        assert_eq!(facts.common_name, Some(format!("uuid:{id}")));

        // Issued by the loaded CA: Issuer equals the CA Subject.
        let ca_der = first_certificate(&fs::read(&paths.ca).unwrap(), &paths.ca).unwrap();
        let (_, ca) = X509Certificate::from_der(ca_der.as_ref()).unwrap();
        let (_, leaf) = X509Certificate::from_der(der.as_ref()).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());

        let err = device(dir.path(), id, &out, false).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
        let again = device_with(dir.path(), id, &out, false, true).unwrap();
        assert_eq!(again.cert, paths.cert);

        let any_out = dir.path().join("any");
        let paths = device(dir.path(), id, &any_out, true).unwrap();
        let der = first_certificate(&fs::read(&paths.cert).unwrap(), &paths.cert).unwrap();
        let facts = LeafFacts::parse(&der).unwrap();
        assert!(facts.client_auth && facts.server_auth && !facts.ocf_identity);
        assert_eq!(facts.common_name, Some(format!("device-{id}")));
    }

    #[test]
    fn device_with_bad_ca_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let err = device(dir.path(), Uuid::new_v4(), &out, false).unwrap_err();
        assert!(matches!(err, PkiError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.pem"), "{err}");

        // CA key from another CA.
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(a.path(), Uuid::new_v4(), false).unwrap();
        init(b.path(), Uuid::new_v4(), false).unwrap();
        fs::copy(b.path().join("ca-key.pem"), a.path().join("ca-key.pem")).unwrap();
        let err = device(a.path(), Uuid::new_v4(), &out, false).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err:?}");

        // A leaf is not a CA.
        fs::copy(b.path().join("gateway.pem"), a.path().join("ca.pem")).unwrap();
        fs::copy(
            b.path().join("gateway-key.pem"),
            a.path().join("ca-key.pem"),
        )
        .unwrap();
        let err = device(a.path(), Uuid::new_v4(), &out, false).unwrap_err();
        assert!(err.to_string().contains("not a CA certificate"), "{err}");

        // Garbage key.
        fs::copy(b.path().join("ca.pem"), a.path().join("ca.pem")).unwrap();
        fs::write(a.path().join("ca-key.pem"), b"not a key").unwrap();
        let err = device(a.path(), Uuid::new_v4(), &out, false).unwrap_err();
        assert!(matches!(err, PkiError::BadKey { .. }), "{err:?}");
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        assert!(!out.exists(), "nothing written on failure");
    }

    #[test]
    fn ensure_dev_pki_creates_once() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("data").join("pki");
        let created = ensure_dev_pki(&pki).unwrap().unwrap();
        assert!(created.ca.exists() && created.key.exists());
        assert!(hub_id_from_certificate(&created.cert).unwrap().is_some());
        assert_eq!(ensure_dev_pki(&pki).unwrap(), None);

        let hub = Uuid::new_v4();
        let other = dir.path().join("other");
        let created = ensure_dev_pki_for(&other, hub).unwrap().unwrap();
        assert_eq!(hub_id_from_certificate(&created.cert).unwrap(), Some(hub));
    }

    #[test]
    fn reloaded_ca_keeps_key_identifier() {
        let ca = Ca::generate("key id CA").unwrap();
        let reloaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let leaf = reloaded.issue(&LeafSpec::device(Uuid::new_v4())).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der().as_ref()).unwrap();
        let (_, leaf_cert) = X509Certificate::from_der(leaf.cert_der.as_ref()).unwrap();
        let ski = ca_cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        let aki = leaf_cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => None,
            });
        assert!(aki.is_some());
        if ski.is_some() {
            assert_eq!(aki, ski);
        }
    }

    #[test]
    fn foreign_ca_issues_chaining_certificates() {
        let ca = Ca::from_pem(FOREIGN_CA_PEM, FOREIGN_CA_KEY_PEM).unwrap();
        // `issue` itself refuses when the Issuer would not equal the CA
        // Subject byte for byte.
        let leaf = ca.issue(&LeafSpec::device(Uuid::new_v4())).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der().as_ref()).unwrap();
        let (_, leaf_cert) = X509Certificate::from_der(leaf.cert_der.as_ref()).unwrap();
        assert_eq!(leaf_cert.issuer().as_raw(), ca_cert.subject().as_raw());
        let ski = ca_cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        let aki = leaf_cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => None,
            });
        assert_eq!(
            aki.as_ref().map(|id| id.len()),
            Some(20),
            "OpenSSL's SHA-1 key id"
        );
        assert_eq!(aki, ski);

        // A SEC1 CA key is refused with a message naming the expected form.
        let err = Ca::from_pem(FOREIGN_CA_PEM, FOREIGN_CA_KEY_SEC1_PEM).unwrap_err();
        assert!(err.to_string().contains("PKCS#8"), "{err}");
    }

    #[test]
    fn hub_id_of_non_uuid_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("hub test CA").unwrap();
        let leaf = ca.issue(&LeafSpec::any_device(Uuid::new_v4())).unwrap();
        let path = dir.path().join("leaf.pem");
        fs::write(&path, &leaf.cert_pem).unwrap();
        assert_eq!(hub_id_from_certificate(&path).unwrap(), None);
        fs::write(&path, b"garbage").unwrap();
        let err = hub_id_from_certificate(&path).unwrap_err();
        assert!(
            err.to_string().contains("no `CERTIFICATE` PEM block"),
            "{err}"
        );
    }
}
