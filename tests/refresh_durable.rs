//! Refresh tokens outlive the gateway (issue 13, spec Appendix A item 8):
//! a real device refreshes before it signs in on every reconnect, so a
//! refresh token the gateway forgot at a restart locks the device out.
//! Sign up, `kill -9` the gateway, restart it on the same data dir: the
//! refresh token still works; a retry with it after a lost answer (the
//! gateway killed again) gets the same pair, and the device signs in.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use coap_gateway::coap::Code;
use common::ocf::*;
use common::process::Setup;
use common::DEVICE_ID;

#[test]
fn a_refresh_token_survives_kill_9_and_a_lost_answer_gets_the_same_pair() {
    let setup = Setup::new("");
    let mut gw = setup.serve();
    let (cert, key) = setup.device_certificate(DEVICE_ID);
    let tls = coap_gateway::auth::tls::client_config(
        &setup.pki().join("ca.pem"),
        Some((cert.as_path(), key.as_path())),
    )
    .expect("device TLS config");
    let addr = format!("127.0.0.1:{}", setup.port).parse().expect("addr");
    let code = setup.cli(&["token", "code", "--owner", OWNER]);
    let connect = || OcfDevice::connect_to(addr, tls.clone());

    let mut dev = connect();
    let m = dev.sign_up_with(&sign_up_body(code.trim()));
    assert_eq!(m.code, Code::CHANGED, "sign-up: {}", text(&m));
    let reg = Registration::from_sign_up(&m);
    drop(dev);

    // The crash, then the device's reconnect: refresh before sign-in.
    gw.kill_9();
    let mut gw = setup.serve();
    let mut dev = connect();
    let m = dev.refresh(&reg.uid, &reg.refresh_token);
    assert_eq!(
        m.code,
        Code::CHANGED,
        "refresh after a restart: {}\n{}",
        text(&m),
        gw.log()
    );
    let first = body(&m);
    drop(dev);

    // The answer was lost (the gateway died again): the device retries
    // with the old refresh token and gets the same pair.
    gw.kill_9();
    let gw = setup.serve();
    let mut dev = connect();
    let m = dev.refresh(&reg.uid, &reg.refresh_token);
    assert_eq!(
        m.code,
        Code::CHANGED,
        "retried refresh: {}\n{}",
        text(&m),
        gw.log()
    );
    let again = body(&m);
    assert_eq!(again["accesstoken"], first["accesstoken"]);
    assert_eq!(again["refreshtoken"], first["refreshtoken"]);
    let access = again["accesstoken"].as_str().expect("accesstoken");
    dev.sign_in_ok(&reg.uid, access);

    // The new refresh token rotates; then the old one is refused.
    let next = again["refreshtoken"].as_str().expect("refreshtoken");
    let m = dev.refresh(&reg.uid, next);
    assert_eq!(m.code, Code::CHANGED, "{}", text(&m));
    drop(dev);
    let mut dev = connect();
    let m = dev.refresh(&reg.uid, &reg.refresh_token);
    assert_eq!(m.code, Code::SERVICE_UNAVAILABLE, "{}", text(&m));
}
