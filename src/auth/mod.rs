//! Device authentication: TLS server configuration, client-certificate
//! verification for the three `[coap.tls] client_auth` modes, device identity
//! from OCF identity certificates, and the development PKI.

use serde::{Deserialize, Serialize};

/// How the gateway authenticates devices at the TLS layer
/// (`[coap.tls] client_auth`, spec §3.2 and §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Mutual TLS with an OCF identity certificate: chain to the CA, EKU
    /// clientAuth + serverAuth + OCF identity OID, CN `uuid:<deviceId>`.
    #[default]
    Identity,
    /// Mutual TLS with any certificate that chains to the CA (EKU
    /// clientAuth + serverAuth), without the OCF identity properties.
    Any,
    /// Server-side TLS only; no client certificate is requested.
    None,
}

pub mod authority;
pub mod grants;
pub mod identity;
pub mod jwks;
pub mod jwks_fetch;
pub mod jwt;
pub mod oauth;
pub mod pki;
pub mod provider;
pub mod tls;
pub mod validator;
pub mod verifier;

pub use identity::{peer_identity, PeerIdentity};
pub use pki::PkiError;
pub use tls::{client_config, server_config, TlsError, TlsFiles};
pub use verifier::{CertPolicyError, DeviceCertVerifier, LeafPolicy};
