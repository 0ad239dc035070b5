//! The OCF side of a simulated device (spec §5.2 sign-up, §5.4 sign-in):
//! request bodies, the answers we read, a fleet of device identities (one
//! OCF identity certificate each, CN `uuid:<id>`, issued in memory by the
//! gateway's CA) and the embedded authority that mints their sign-up codes.

use std::path::Path;
use std::sync::Arc;

use coap_gateway::auth::authority::Authority;
use coap_gateway::auth::tls;
use coap_gateway::coap::{option, Code, MessageWriter};
use coap_gateway::config::Config;
use minicbor::data::Type;
use minicbor::{Decoder, Encoder};
use rustls::ClientConfig;

/// `authprovider` of the embedded authority (`authority.provider_name`).
pub const PROVIDER: &str = "plgd";
/// The owner every bench device is signed up to.
pub const OWNER: &str = "bench";
/// The owner of the devices `notify` follows on the hub's event stream:
/// the hub hands a subscriber the events of its owner only, so the
/// stream carries the sampled devices' events and not the whole fleet's.
pub const SAMPLE_OWNER: &str = "bench-sampled";
/// `application/vnd.ocf+cbor`.
pub const OCF_CBOR: u32 = 10000;
/// What a simulated device lists as its endpoint when the gateway asks
/// (`GET /oic/res?if=oic.if.ll&rt=oic.wk.d`, spec §8.1).
const LOCAL_ENDPOINT: &str = "coaps+tcp://127.0.0.1:1";

/// A CBOR value in the bodies we send.
pub enum Val<'a> {
    Text(&'a str),
    Bool(bool),
    Int(i64),
}

/// A CBOR map with text keys.
pub fn cbor_map(fields: &[(&str, Val<'_>)]) -> Vec<u8> {
    let mut e = Encoder::new(Vec::with_capacity(64 + fields.len() * 16));
    // Writing into a Vec cannot fail (its error type is Infallible).
    let _ = e.map(fields.len() as u64);
    for (k, v) in fields {
        let _ = e.str(k);
        let _ = match v {
            Val::Text(s) => e.str(s),
            Val::Bool(b) => e.bool(*b),
            Val::Int(i) => e.i64(*i),
        };
    }
    e.into_writer()
}

/// `POST /oic/sec/account` body (spec §5.2), as IoTivity-Lite sends it.
pub fn sign_up_body(device_id: &str, code: &str) -> Vec<u8> {
    cbor_map(&[
        ("di", Val::Text(device_id)),
        ("accesstoken", Val::Text(code)),
        ("authprovider", Val::Text(PROVIDER)),
        ("devicetype", Val::Text("device")),
    ])
}

/// `POST /oic/sec/session` body for a sign-in (spec §5.4).
pub fn sign_in_body(device_id: &str, user_id: &str, access_token: &str) -> Vec<u8> {
    cbor_map(&[
        ("di", Val::Text(device_id)),
        ("uid", Val::Text(user_id)),
        ("accesstoken", Val::Text(access_token)),
        ("login", Val::Bool(true)),
    ])
}

/// Appends a POST with Content-Format 10000 to `out`.
pub fn write_post(out: &mut Vec<u8>, token: &[u8], path: &[&str], body: &[u8]) {
    let mut w = MessageWriter::new(out, Code::POST, token);
    for segment in path {
        w.option_str(option::URI_PATH, segment);
    }
    w.option_uint(option::CONTENT_FORMAT, OCF_CBOR);
    w.payload(body);
    w.finish();
}

/// The answer to the gateway's `GET /oic/res` (`if=oic.if.ll`, spec §6.3
/// and §8.1): `/oic/d` with its endpoint, then `/oic/res` listed as not
/// batch observable, so the twin set-up (spec §6.6) observes the published
/// resources one by one, and finds none to observe: a device that only
/// signs in is IN_SYNC at once and sees no further request.
pub fn local_links_body() -> Vec<u8> {
    let mut e = Encoder::new(Vec::with_capacity(192));
    let _ = e.array(2).and_then(|e| e.map(3));
    let _ = e.str("href").and_then(|e| e.str("/oic/d"));
    let _ = e
        .str("rt")
        .and_then(|e| e.array(1))
        .and_then(|e| e.str("oic.wk.d"));
    let _ = e
        .str("eps")
        .and_then(|e| e.array(1))
        .and_then(|e| e.map(1))
        .and_then(|e| e.str("ep"))
        .and_then(|e| e.str(LOCAL_ENDPOINT));
    let _ = e.map(4);
    let _ = e.str("href").and_then(|e| e.str("/oic/res"));
    let _ = e
        .str("rt")
        .and_then(|e| e.array(1))
        .and_then(|e| e.str("oic.wk.res"));
    let _ = e
        .str("if")
        .and_then(|e| e.array(2))
        .and_then(|e| e.str("oic.if.ll"))
        .and_then(|e| e.str("oic.if.baseline"));
    let _ = e
        .str("p")
        .and_then(|e| e.map(1))
        .and_then(|e| e.str("bm"))
        .and_then(|e| e.u8(1));
    e.into_writer()
}

/// What a sign-up answered (spec §5.2).
#[derive(Debug, Clone)]
pub struct Registration {
    pub user_id: String,
    pub access_token: String,
}

/// Reads `uid` and `accesstoken` from a sign-up answer.
pub fn parse_sign_up(payload: &[u8]) -> Result<Registration, String> {
    let mut user_id = None;
    let mut access_token = None;
    walk_text_fields(payload, |key, value| match key {
        "uid" => user_id = Some(value.to_owned()),
        "accesstoken" => access_token = Some(value.to_owned()),
        _ => {}
    })
    .map_err(|e| format!("sign-up answer is not a CBOR map: {e}"))?;
    match (user_id, access_token) {
        (Some(user_id), Some(access_token)) if !user_id.is_empty() && !access_token.is_empty() => {
            Ok(Registration {
                user_id,
                access_token,
            })
        }
        _ => Err("sign-up answer without uid or accesstoken".into()),
    }
}

/// `accesstoken` of a request body (the baseline server's sign-in).
pub fn access_token_of(payload: &[u8]) -> Option<&str> {
    let mut d = Decoder::new(payload);
    let n = d.map().ok()??;
    for _ in 0..n {
        let key = d.str().ok()?;
        if key == "accesstoken" {
            return d.str().ok();
        }
        d.skip().ok()?;
    }
    None
}

/// Calls `f` for every text-valued entry of a definite CBOR map with text
/// keys; other values are skipped.
fn walk_text_fields(
    payload: &[u8],
    mut f: impl FnMut(&str, &str),
) -> Result<(), minicbor::decode::Error> {
    let mut d = Decoder::new(payload);
    let n = d
        .map()?
        .ok_or_else(|| minicbor::decode::Error::message("indefinite map"))?;
    for _ in 0..n {
        let key = d.str()?;
        if d.datatype()? == Type::String {
            let value = d.str()?;
            f(key, value);
        } else {
            d.skip()?;
        }
    }
    Ok(())
}

/// One device of the fleet: its ID and a client configuration presenting
/// its own identity certificate (no resumption: every handshake is full).
pub struct Identity {
    pub id: String,
    pub config: Arc<ClientConfig>,
    /// The owner it signs up to ([`OWNER`] unless changed).
    pub owner: &'static str,
}

/// `n` device identities issued by the CA in `pki_dir` (`ca.pem`,
/// `ca-key.pem`): cached on disk by [`crate::certcache`], the missing ones
/// issued over `threads` threads (P-256 key generation and signing, ~0.3
/// ms each here).
pub fn identities(pki_dir: &Path, n: usize, threads: usize) -> Result<Vec<Identity>, String> {
    identities_from(pki_dir, 0, n, threads)
}

/// Identities `skip..skip + n` of the cached list: a caller that enrolls
/// in batches takes distinct devices for each batch (the same device ID
/// twice would make its second sign-in close the first, spec §14 item 13).
pub fn identities_from(
    pki_dir: &Path,
    skip: usize,
    n: usize,
    threads: usize,
) -> Result<Vec<Identity>, String> {
    let roots = Arc::new(
        tls::load_roots(&pki_dir.join("ca.pem"))
            .map_err(|e| format!("cannot load the CA certificate: {e}"))?,
    );
    let provider = Arc::new(tls::provider());
    crate::certcache::device_certs(pki_dir, skip + n, threads)?
        .into_iter()
        .skip(skip)
        .map(|c| identity(c, &roots, &provider))
        .collect()
}

fn identity(
    cert: crate::certcache::DeviceCert,
    roots: &Arc<rustls::RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Identity, String> {
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(vec![cert.cert], cert.key.into())
        .map_err(|e| format!("device certificate: {e}"))?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Identity {
        id: cert.id.to_string(),
        config: Arc::new(config),
        owner: OWNER,
    })
}

/// The gateway's embedded authority, from the configuration the gateway
/// runs with (same key file, same issuer): mints sign-up codes in process.
pub fn authority(config: &Config) -> Result<Arc<Authority>, String> {
    coap_gateway::server::load_authority(config)
        .map(Arc::new)
        .map_err(|e| format!("cannot load the gateway's token authority: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_body_round_trips_the_token() {
        let body = sign_in_body("d", "u", "tok");
        assert_eq!(access_token_of(&body), Some("tok"));
    }

    #[test]
    fn sign_up_answer_is_read() {
        let body = cbor_map(&[
            ("accesstoken", Val::Text("a")),
            ("refreshtoken", Val::Text("r")),
            ("uid", Val::Text("u")),
            ("expiresin", Val::Int(3600)),
        ]);
        let r = parse_sign_up(&body).unwrap();
        assert_eq!((r.user_id.as_str(), r.access_token.as_str()), ("u", "a"));
        assert!(parse_sign_up(&cbor_map(&[("uid", Val::Text("u"))])).is_err());
    }

    #[test]
    fn links_body_lists_oic_d_then_a_non_batch_oic_res() {
        let body = local_links_body();
        let links = coap_gateway::ocf::rd::decode_link_list(&body).unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].href, "/oic/d");
        assert_eq!(links[1].href, "/oic/res");
        assert!(!links[1].policy.unwrap().observable());
    }
}
