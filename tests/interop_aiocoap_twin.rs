//! End to end over the HTTP API with an independent device: aiocoap
//! (tests/aiocoap_twin_device.py) serves an observable `/light` on the
//! connection it opened to the `coap-gateway` binary. The test reads the
//! twin through `GET .../resources/light`, sees a change the device pushes,
//! updates it with `PUT` and sees the device receive the POST; then the
//! device disconnects, a `PUT` becomes a pending command (202), and the
//! device receives it when it comes back (spec §6, §7; issue 4).

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::process::{python, Api, Setup};
use serde_json::{json, Value};

const DEVICE_ID: &str = "9d2e6a40-4b5f-4e9f-8a4d-5e2d3c8b0f12";
const OWNER: &str = "alice";
const PATIENCE: Duration = Duration::from_secs(15);

/// The aiocoap device, driven line by line.
struct Device {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Device {
    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("device stdin");
        self.stdin.flush().expect("device stdin");
    }

    /// The next event named `name` (earlier ones are kept in `seen`).
    fn expect(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    assert_ne!(
                        e["event"], "error",
                        "device error: {e}; seen {:?}",
                        self.seen
                    );
                    if e["event"] == name {
                        return e;
                    }
                }
                Err(_) => panic!("no {name} event from the device; seen {:?}", self.seen),
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        if let Ok(None) = self.child.try_wait() {
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `probe` until it gives a value.
fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn light(api: &Api) -> (u16, Value) {
    api.get(&format!("/api/v1/devices/{DEVICE_ID}/resources/light"))
}

fn online(api: &Api) -> bool {
    let (status, device) = api.get(&format!("/api/v1/devices/{DEVICE_ID}"));
    status == 200 && device["metadata"]["connection"]["status"] == "ONLINE"
}

#[test]
fn aiocoap_device_twin_update_and_pending_command_over_the_http_api() {
    let python = python();
    let setup = Setup::new("");
    let gw = setup.serve();
    let (cert, key) = setup.device_certificate(DEVICE_ID);
    let code = setup.cli(&["token", "code", "--owner", OWNER]);
    let token = setup.cli(&["token", "user", "--owner", OWNER]);
    let api = setup.api(token.trim());

    let mut child = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aiocoap_twin_device.py"))
        .arg(format!("127.0.0.1:{}", setup.port))
        .arg(setup.pki().join("ca.pem"))
        .arg(&cert)
        .arg(&key)
        .arg(DEVICE_ID)
        .arg(code.trim())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python starts");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    let mut dev = Device {
        child,
        stdin,
        events,
        seen: Vec::new(),
    };
    let context = |gw: &common::process::Gateway| format!("gateway log:\n{}", gw.log());

    // Sign up, sign in, publish; the twin gets /light from the observation.
    dev.send("connect");
    dev.expect("connected");
    let twin = eventually("the twin of /light", || {
        let (status, body) = light(&api);
        (status == 200).then_some(body)
    });
    assert_eq!(
        twin["content"],
        json!({"state": false}),
        "{twin}\n{}",
        context(&gw)
    );

    // A change the device pushes reaches the twin.
    dev.send("set true");
    dev.expect("set");
    eventually("the pushed change in the twin", || {
        let (_, body) = light(&api);
        (body["content"] == json!({"state": true})).then_some(())
    });

    // An update through the API reaches the device and answers with its
    // answer.
    let (status, answer) = api.put(
        &format!("/api/v1/devices/{DEVICE_ID}/resources/light"),
        &json!({"state": false}),
    );
    assert_eq!(status, 200, "{answer}\n{}", context(&gw));
    assert_eq!(answer["status"], "OK", "{answer}");
    assert_eq!(answer["content"], json!({"state": false}), "{answer}");
    let post = dev.expect("post");
    assert_eq!(post["body"], json!({"state": false}), "{post}");
    assert_eq!(post["content_format"], 10000, "{post}");

    // Offline: the update waits as a pending command.
    dev.send("drop");
    dev.expect("dropped");
    eventually("OFFLINE", || (!online(&api)).then_some(()));
    let (status, pending) = api.put(
        &format!("/api/v1/devices/{DEVICE_ID}/resources/light?timeToLive=1m"),
        &json!({"state": true}),
    );
    assert_eq!(status, 202, "{pending}");
    let (_, list) = api.get(&format!("/api/v1/devices/{DEVICE_ID}/pending-commands"));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // Back online: the device gets it, once.
    dev.send("connect");
    dev.expect("connected");
    // The command may reach the device while it is still publishing,
    // before it reports `connected` (spec §7.1: right after sign-in).
    let dropped = dev
        .seen
        .iter()
        .rposition(|e| e["event"] == "dropped")
        .expect("dropped");
    let early = dev.seen[dropped..]
        .iter()
        .find(|e| e["event"] == "post")
        .cloned();
    let post = early.unwrap_or_else(|| dev.expect("post"));
    assert_eq!(post["body"], json!({"state": true}), "{post}");
    eventually("the pending command answered", || {
        let (_, list) = api.get(&format!("/api/v1/devices/{DEVICE_ID}/pending-commands"));
        (list.as_array().is_some_and(Vec::is_empty)).then_some(())
    });
    eventually("the twin shows the delivered update", || {
        let (_, body) = light(&api);
        (body["content"] == json!({"state": true})).then_some(())
    });
    let posts = dev.seen.iter().filter(|e| e["event"] == "post").count();
    assert_eq!(
        posts, 2,
        "each update reached the device once: {:?}",
        dev.seen
    );
}
