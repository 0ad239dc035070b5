//! Bytes from a device through every OCF message decoder (spec §5): request
//! bodies are attacker-controlled CBOR, Uri-Query options attacker-chosen
//! text. Any panic is a bug; a wrong type must be an error (spec §5.0). What
//! decodes must also encode in every Accept format, and the publish echo
//! must decode back to the request it echoes.
#![no_main]

use coap_gateway::ocf::account::{SignOffQuery, SignUpRequest, SignUpResponse};
use coap_gateway::ocf::rd::{self, PublishRequest, UnpublishQuery};
use coap_gateway::ocf::res::{DeviceLinks, DiscoveryQuery, DiscoveryResponse};
use coap_gateway::ocf::session::SessionRequest;
use coap_gateway::ocf::tokenrefresh::{TokenRefreshRequest, TokenRefreshResponse};
use coap_gateway::ocf::{query, ContentFormat};
use libfuzzer_sys::fuzz_target;

const FORMATS: [ContentFormat; 3] = [
    ContentFormat::Json,
    ContentFormat::Cbor,
    ContentFormat::OcfCbor,
];

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();

    if let Ok(r) = SignUpRequest::decode(data) {
        assert!(!r.device_id.is_empty() && !r.authorization_code.is_empty());
        let response = SignUpResponse {
            access_token: r.authorization_code,
            user_id: r.device_id,
            refresh_token: r.authorization_provider,
            expires_in: -1,
            redirect_uri: "",
        };
        for format in FORMATS {
            response
                .encode(format, &mut out)
                .expect("sign-up response encodes");
        }
    }

    if let Ok(r) = SessionRequest::decode(data) {
        let _ = r.credentials.check();
    }

    if let Ok(r) = TokenRefreshRequest::decode(data) {
        let response = TokenRefreshResponse {
            access_token: r.refresh_token,
            refresh_token: r.user_id,
            expires_in: 0,
        };
        for format in FORMATS {
            response
                .encode(format, &mut out)
                .expect("refresh response encodes");
        }
    }

    if let Ok(r) = PublishRequest::decode(data) {
        for link in &r.links {
            assert_eq!(link.instance_id, rd::instance_id(&link.href));
            assert_ne!(link.href, "/");
        }
        for format in FORMATS {
            r.encode(format, &mut out).expect("publish echo encodes");
        }
        let mut echo = Vec::new();
        r.encode(ContentFormat::OcfCbor, &mut echo)
            .expect("publish echo encodes");
        let again = PublishRequest::decode(&echo).expect("the echo decodes");
        let mut expected = r.clone();
        for link in &mut expected.links {
            link.id = None;
        }
        assert_eq!(again, expected);

        let devices = [DeviceLinks {
            device_id: r.device_id,
            links: &r.links,
        }];
        let response = DiscoveryResponse {
            devices: &devices,
            endpoint: "coaps+tcp://gw:5684",
        };
        for format in FORMATS {
            response
                .encode(format, &mut out)
                .expect("discovery encodes");
        }
    }

    // The same bytes as Uri-Query options, one per 0x00-separated part.
    let options = || data.split(|b| *b == 0);
    let _ = SignOffQuery::parse(options());
    let _ = UnpublishQuery::parse(options());
    let _ = DiscoveryQuery::parse(options());
    if let Ok(pairs) = query::pairs(data) {
        for (key, value) in pairs {
            // Unescaping only ever shrinks (`%XX` and `+` become one byte).
            assert!(key.len() + value.len() <= data.len());
        }
    }
});
