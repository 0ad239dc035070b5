//! What a client certificate says about the device behind it.
//!
//! Two users: the client-certificate verifier (spec §3.2 steps 3 and 4, run
//! inside the TLS handshake) and the session, which asks once per connection
//! right after the handshake for the device ID and the certificate's NotAfter
//! (spec §3.3, §3.5). Both read the same [`LeafFacts`], so the handshake check
//! and the device ID can never disagree about what the certificate contains.
//!
//! This module does not verify signatures or chains (webpki does that in
//! `verifier`), and it never fails the connection itself: a certificate
//! without identity properties simply yields no device ID.

use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use uuid::Uuid;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Content octets of the DER encoding of the OCF identity-certificate EKU
/// OID 1.3.6.1.4.1.44924.1.6 (spec §3.2 step 4). Compared as bytes so the
/// per-connection check does not allocate an OID string.
pub(crate) const OCF_IDENTITY_OID_DER: &[u8] =
    &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0xde, 0x7c, 0x01, 0x06];

/// The OCF identity EKU OID in dotted form, for messages and generators.
pub const OCF_IDENTITY_OID: &str = "1.3.6.1.4.1.44924.1.6";

/// The OCF identity EKU OID as arcs, in the form rcgen takes.
pub const OCF_IDENTITY_OID_ARCS: [u64; 9] = [1, 3, 6, 1, 4, 1, 44924, 1, 6];

/// Who the peer is, as far as its certificate tells (spec §3.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The "TLS device ID": the UUID from a `uuid:<UUID>` Subject CN,
    /// re-rendered canonical lower-case hyphenated. `None` when the leaf is
    /// not an OCF identity certificate (or there is no certificate).
    pub device_id: Option<String>,
    /// The leaf certificate's NotAfter: the certificate validity limit that
    /// §3.5 may turn into a session deadline.
    pub not_after: Option<SystemTime>,
}

/// Reads the device identity from a peer certificate chain, leaf first (as
/// `rustls::ServerConnection::peer_certificates` returns it).
///
/// Spec §3.3: the device ID needs EKU clientAuth, the OCF identity OID and a
/// `uuid:<UUID>` Subject CN; on any failure it is empty and the connection
/// stays up (whether the device can sign in is decided later, §4.3). The
/// leaf's NotAfter is remembered whenever the leaf parses.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> PeerIdentity {
    let Some(leaf) = chain.first() else {
        return PeerIdentity::default();
    };
    let Ok(facts) = LeafFacts::parse(leaf) else {
        return PeerIdentity::default();
    };
    let device_id = if facts.client_auth && facts.ocf_identity {
        facts
            .common_name
            .as_deref()
            .and_then(device_id_from_common_name)
            .map(|id| id.hyphenated().to_string())
    } else {
        None
    };
    PeerIdentity {
        device_id,
        not_after: Some(facts.not_after),
    }
}

/// The earliest NotAfter of `certificates` (spec §3.5: a presented chain
/// stops being valid when its first certificate expires); `None` when
/// none can be read.
pub fn earliest_not_after(certificates: &[CertificateDer<'_>]) -> Option<SystemTime> {
    certificates
        .iter()
        .filter_map(|der| LeafFacts::parse(der).ok())
        .map(|facts| facts.not_after)
        .min()
}

/// Parses a Subject CN of the form `uuid:<UUID>` (spec §3.3): split on `:`,
/// exactly two parts, the first compared case-insensitively with `uuid`, the
/// second in any form the UUID parser accepts (hyphenated, simple, braced).
pub fn device_id_from_common_name(common_name: &str) -> Option<Uuid> {
    let mut parts = common_name.split(':');
    let (Some(prefix), Some(id), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    if !prefix.eq_ignore_ascii_case("uuid") {
        return None;
    }
    Uuid::parse_str(id).ok()
}

/// The few leaf-certificate properties the device-authentication policy looks
/// at (spec §3.2 steps 3–4, §3.3, §3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafFacts {
    /// EKU contains id-kp-clientAuth.
    pub client_auth: bool,
    /// EKU contains id-kp-serverAuth.
    pub server_auth: bool,
    /// EKU contains the OCF identity OID 1.3.6.1.4.1.44924.1.6.
    pub ocf_identity: bool,
    /// The Subject CN, when present and a readable string. With several CNs
    /// the last one counts, as in the Go reference (`pkix.Name.CommonName`).
    pub common_name: Option<String>,
    /// The certificate's NotAfter.
    pub not_after: SystemTime,
}

impl LeafFacts {
    /// Parses the DER certificate. Fails only when the certificate (or its
    /// EKU extension) is not valid DER/X.509.
    pub(crate) fn parse(der: &CertificateDer<'_>) -> Result<Self, x509_parser::error::X509Error> {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => {
                x509_parser::error::X509Error::InvalidCertificate
            }
        })?;
        let (client_auth, server_auth, ocf_identity) = match cert.extended_key_usage()? {
            Some(eku) => (
                eku.value.client_auth,
                eku.value.server_auth,
                eku.value
                    .other
                    .iter()
                    .any(|oid| oid.as_bytes() == OCF_IDENTITY_OID_DER),
            ),
            None => (false, false, false),
        };
        let common_name = cert
            .subject()
            .iter_common_name()
            .last()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(LeafFacts {
            client_auth,
            server_auth,
            ocf_identity,
            common_name,
            not_after: unix_seconds_to_system_time(cert.validity().not_after.timestamp()),
        })
    }
}

/// X.509 times can predate 1970 (GeneralizedTime); `SystemTime` can hold
/// those on every platform we build for, but saturate rather than panic.
fn unix_seconds_to_system_time(seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH
            .checked_add(magnitude)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(magnitude)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::pki::{Ca, LeafSpec};

    fn ca() -> Ca {
        Ca::generate("identity test CA").unwrap()
    }

    #[test]
    fn ocf_oid_bytes_match_dotted_form() {
        let oid = x509_parser::der_parser::oid::Oid::from(&OCF_IDENTITY_OID_ARCS).unwrap();
        assert_eq!(oid.as_bytes(), OCF_IDENTITY_OID_DER);
        assert_eq!(oid.to_id_string(), OCF_IDENTITY_OID);
    }

    #[test]
    fn common_name_forms() {
        let id = "0f6ce5a2-54b5-4c5c-b46f-1c7b0e4f1a2b";
        let want = Uuid::parse_str(id).ok();
        assert_eq!(device_id_from_common_name(&format!("uuid:{id}")), want);
        assert_eq!(
            device_id_from_common_name(&format!("UUID:{}", id.to_uppercase())),
            want
        );
        assert_eq!(
            device_id_from_common_name(&format!("Uuid:{}", id.replace('-', ""))),
            want
        );
        assert_eq!(device_id_from_common_name(&format!("uuid:{{{id}}}")), want);
        // Exactly two parts (spec §3.3).
        assert_eq!(device_id_from_common_name(&format!("uuid:{id}:x")), None);
        assert_eq!(device_id_from_common_name(&format!("urn:uuid:{id}")), None);
        assert_eq!(device_id_from_common_name(id), None);
        assert_eq!(device_id_from_common_name(&format!("uid:{id}")), None);
        assert_eq!(device_id_from_common_name("uuid:not-a-uuid"), None);
        assert_eq!(device_id_from_common_name("uuid:"), None);
        assert_eq!(device_id_from_common_name(""), None);
    }

    #[test]
    fn identity_certificate_gives_lower_case_device_id() {
        let ca = ca();
        let id = Uuid::parse_str("0F6CE5A2-54B5-4C5C-B46F-1C7B0E4F1A2B").unwrap();
        let mut spec = LeafSpec::device(id);
        // An upper-case CN as some device manufacturers issue it.
        spec.common_name = "UUID:0F6CE5A2-54B5-4C5C-B46F-1C7B0E4F1A2B".into();
        let leaf = ca.issue(&spec).unwrap();
        let identity = peer_identity(std::slice::from_ref(&leaf.cert_der));
        assert_eq!(
            identity.device_id.as_deref(),
            Some("0f6ce5a2-54b5-4c5c-b46f-1c7b0e4f1a2b")
        );
        let not_after = identity.not_after.unwrap();
        let want = SystemTime::UNIX_EPOCH
            + Duration::from_secs(spec.not_after.unix_timestamp().try_into().unwrap());
        assert_eq!(not_after, want);
    }

    #[test]
    fn non_identity_certificates_give_no_device_id() {
        let ca = ca();
        let id = Uuid::new_v4();

        let any = ca.issue(&LeafSpec::any_device(id)).unwrap();
        let identity = peer_identity(std::slice::from_ref(&any.cert_der));
        assert_eq!(identity.device_id, None);
        assert!(identity.not_after.is_some());

        // `uuid:` CN but no OCF OID.
        let mut spec = LeafSpec::device(id);
        spec.ocf_identity = false;
        let leaf = ca.issue(&spec).unwrap();
        assert_eq!(
            peer_identity(std::slice::from_ref(&leaf.cert_der)).device_id,
            None
        );

        // OCF OID but no clientAuth.
        let mut spec = LeafSpec::device(id);
        spec.client_auth = false;
        let leaf = ca.issue(&spec).unwrap();
        assert_eq!(
            peer_identity(std::slice::from_ref(&leaf.cert_der)).device_id,
            None
        );

        // serverAuth is not needed for the device ID (§3.3 lists only
        // clientAuth and the OCF OID; the handshake check enforces it).
        let mut spec = LeafSpec::device(id);
        spec.server_auth = false;
        let leaf = ca.issue(&spec).unwrap();
        assert_eq!(
            peer_identity(std::slice::from_ref(&leaf.cert_der)).device_id,
            Some(id.to_string())
        );
    }

    #[test]
    fn empty_or_garbage_chain() {
        assert_eq!(peer_identity(&[]), PeerIdentity::default());
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(peer_identity(&[garbage]), PeerIdentity::default());
    }

    #[test]
    fn leaf_facts_of_gateway_certificate() {
        let ca = ca();
        let hub = Uuid::new_v4();
        let leaf = ca.issue(&LeafSpec::gateway(hub)).unwrap();
        let facts = LeafFacts::parse(&leaf.cert_der).unwrap();
        assert!(facts.client_auth && facts.server_auth && !facts.ocf_identity);
        assert_eq!(facts.common_name, Some(format!("uuid:{hub}")));
    }
}
