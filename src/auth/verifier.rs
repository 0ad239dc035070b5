//! The client-certificate check of spec §3.2, as a rustls verifier.
//!
//! Chain validation is webpki's (rustls's `WebPkiClientVerifier` with the ring
//! provider: roots from `[coap.tls] ca`, presented intermediates, current
//! time). On top of it this verifier applies the gateway's leaf policy:
//!
//! * step 3: the leaf EKU contains **both** clientAuth and serverAuth
//!   (modes `identity` and `any`);
//! * step 4: in mode `identity` the leaf is an OCF identity certificate: EKU
//!   contains 1.3.6.1.4.1.44924.1.6 and the Subject CN is `uuid:<UUID>`
//!   (§3.3).
//!
//! A failure aborts the handshake with `Error::InvalidCertificate`, so no
//! CoAP traffic is ever exchanged. Mode `none` does not use this verifier at
//! all (`with_no_client_auth`, §3.2).
//!
//! Step 2, revocation, uses the CRL files of `[coap.tls] crl` (checklist
//! item 11) rather than fetching the leaf's distribution points over HTTP:
//! webpki checks every certificate of the verified chain except the trust
//! anchor (the device certificate and any intermediate) against the CRLs
//! whose issuer signed it. A certificate whose issuer has no CRL configured
//! is allowed (unknown status is not an error), and a CRL past its
//! nextUpdate is still applied (an old list of revoked certificates is
//! better than none, and refusing every device because a CRL went stale
//! would turn a late CRL into an outage). A revoked certificate fails with
//! `CertificateError::Revoked`.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

use super::identity::{device_id_from_common_name, LeafFacts, OCF_IDENTITY_OID};
use super::ClientAuth;

/// The leaf checks applied after the chain check (spec §3.2 steps 3–4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafPolicy {
    /// `client_auth = "identity"`: EKU clientAuth + serverAuth + OCF
    /// identity OID, CN `uuid:<UUID>`.
    Identity,
    /// `client_auth = "any"`: EKU clientAuth + serverAuth only.
    Any,
}

impl LeafPolicy {
    /// The policy for a configured mode; `None` for `ClientAuth::None`, where
    /// no client certificate is requested at all.
    pub fn for_client_auth(mode: ClientAuth) -> Option<Self> {
        match mode {
            ClientAuth::Identity => Some(LeafPolicy::Identity),
            ClientAuth::Any => Some(LeafPolicy::Any),
            ClientAuth::None => None,
        }
    }
}

/// Why a client certificate that chains to the CA was still refused. It
/// travels inside `CertificateError::Other`, so its text is what shows up in
/// the gateway's handshake-failure log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertPolicyError {
    /// The leaf passed webpki but is not parseable X.509 for the policy
    /// checks (reported to the peer as a badly encoded certificate).
    #[error("client certificate cannot be parsed for the spec §3.2 checks")]
    Unparsable,
    /// The leaf EKU lacks a purpose step 3 requires.
    #[error(
        "client certificate EKU lacks {0} (spec §3.2: both clientAuth and serverAuth are required)"
    )]
    MissingEku(&'static str),
    /// Mode `identity`: the leaf EKU lacks the OCF identity OID.
    #[error("client certificate is not an OCF identity certificate: EKU lacks {OCF_IDENTITY_OID} (spec §3.2, client_auth = \"identity\")")]
    NotOcfIdentity,
    /// Mode `identity`: the Subject CN is not `uuid:<UUID>`.
    #[error("client certificate Subject CN {0:?} is not of the form uuid:<UUID> (spec §3.3, client_auth = \"identity\")")]
    BadCommonName(String),
    /// Mode `identity`: the Subject has no readable CN.
    #[error("client certificate has no Subject CN; uuid:<UUID> is required (spec §3.3, client_auth = \"identity\")")]
    MissingCommonName,
}

/// Applies the leaf policy to a certificate that already passed the chain
/// check (spec §3.2 steps 3–4).
pub fn check_leaf(
    policy: LeafPolicy,
    end_entity: &CertificateDer<'_>,
) -> Result<(), CertPolicyError> {
    let facts = LeafFacts::parse(end_entity).map_err(|_| CertPolicyError::Unparsable)?;
    check_facts(policy, &facts)
}

fn check_facts(policy: LeafPolicy, facts: &LeafFacts) -> Result<(), CertPolicyError> {
    // spec §3.2 step 3, both modes.
    if !facts.client_auth {
        return Err(CertPolicyError::MissingEku("clientAuth"));
    }
    if !facts.server_auth {
        return Err(CertPolicyError::MissingEku("serverAuth"));
    }
    if policy == LeafPolicy::Any {
        return Ok(());
    }
    // spec §3.2 step 4 (identityPropertiesRequired).
    if !facts.ocf_identity {
        return Err(CertPolicyError::NotOcfIdentity);
    }
    match facts.common_name.as_deref() {
        None => Err(CertPolicyError::MissingCommonName),
        Some(cn) if device_id_from_common_name(cn).is_none() => {
            Err(CertPolicyError::BadCommonName(cn.to_owned()))
        }
        Some(_) => Ok(()),
    }
}

/// webpki chain validation plus the gateway's leaf policy. Client
/// authentication is mandatory.
#[derive(Debug)]
pub struct DeviceCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: LeafPolicy,
}

impl DeviceCertVerifier {
    /// Builds the verifier over `roots` with the given crypto provider (the
    /// gateway passes ring's, explicitly, so no process default is needed).
    /// `crls` are the revocation lists of step 2 (empty: no revocation
    /// check); see the module documentation for the policy.
    pub fn new(
        roots: Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        policy: LeafPolicy,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .with_crls(crls)
            // The whole chain is checked (rustls's default), unknown
            // status is allowed, nextUpdate is not enforced (the default).
            .allow_unknown_revocation_status()
            .build()?;
        Ok(DeviceCertVerifier { inner, policy })
    }

    /// The leaf policy this verifier applies.
    pub fn policy(&self) -> LeafPolicy {
        self.policy
    }
}

impl ClientCertVerifier for DeviceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // spec §3.2: with client certificates requested they are required.
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // spec §3.2 step 1: chain to the CA roots.
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        // Steps 3 and 4 look only at the leaf, so the chain webpki chose does
        // not matter ("any chain passes" collapses to this one check).
        match check_leaf(self.policy, end_entity) {
            Ok(()) => Ok(verified),
            Err(CertPolicyError::Unparsable) => {
                Err(Error::InvalidCertificate(CertificateError::BadEncoding))
            }
            Err(policy) => Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(policy)),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> LeafFacts {
        LeafFacts {
            client_auth: true,
            server_auth: true,
            ocf_identity: true,
            common_name: Some("uuid:0f6ce5a2-54b5-4c5c-b46f-1c7b0e4f1a2b".into()),
            not_after: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn policy_for_modes() {
        assert_eq!(
            LeafPolicy::for_client_auth(ClientAuth::Identity),
            Some(LeafPolicy::Identity)
        );
        assert_eq!(
            LeafPolicy::for_client_auth(ClientAuth::Any),
            Some(LeafPolicy::Any)
        );
        assert_eq!(LeafPolicy::for_client_auth(ClientAuth::None), None);
    }

    #[test]
    fn identity_policy() {
        assert_eq!(check_facts(LeafPolicy::Identity, &facts()), Ok(()));
        let f = LeafFacts {
            server_auth: false,
            ..facts()
        };
        assert_eq!(
            check_facts(LeafPolicy::Identity, &f),
            Err(CertPolicyError::MissingEku("serverAuth"))
        );
        let f = LeafFacts {
            client_auth: false,
            ..facts()
        };
        assert_eq!(
            check_facts(LeafPolicy::Identity, &f),
            Err(CertPolicyError::MissingEku("clientAuth"))
        );
        let f = LeafFacts {
            ocf_identity: false,
            ..facts()
        };
        assert_eq!(
            check_facts(LeafPolicy::Identity, &f),
            Err(CertPolicyError::NotOcfIdentity)
        );
        let f = LeafFacts {
            common_name: Some("device-1".into()),
            ..facts()
        };
        assert_eq!(
            check_facts(LeafPolicy::Identity, &f),
            Err(CertPolicyError::BadCommonName("device-1".into()))
        );
        let f = LeafFacts {
            common_name: None,
            ..facts()
        };
        assert_eq!(
            check_facts(LeafPolicy::Identity, &f),
            Err(CertPolicyError::MissingCommonName)
        );
    }

    #[test]
    fn any_policy() {
        let f = LeafFacts {
            ocf_identity: false,
            common_name: None,
            ..facts()
        };
        assert_eq!(check_facts(LeafPolicy::Any, &f), Ok(()));
        let f = LeafFacts {
            server_auth: false,
            ..facts()
        };
        assert_eq!(
            check_facts(LeafPolicy::Any, &f),
            Err(CertPolicyError::MissingEku("serverAuth"))
        );
    }

    #[test]
    fn error_text_names_the_rule() {
        let text = CertPolicyError::MissingEku("serverAuth").to_string();
        assert!(
            text.contains("serverAuth") && text.contains("§3.2"),
            "{text}"
        );
        let text = CertPolicyError::NotOcfIdentity.to_string();
        assert!(text.contains("1.3.6.1.4.1.44924.1.6"), "{text}");
    }

    #[test]
    fn garbage_leaf_is_bad_encoding() {
        let garbage = CertificateDer::from(vec![0x30, 0x00]);
        assert_eq!(
            check_leaf(LeafPolicy::Any, &garbage),
            Err(CertPolicyError::Unparsable)
        );
    }
}
