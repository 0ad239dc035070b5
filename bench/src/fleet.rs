//! The set-up phase of the OCF scenarios: every device of the fleet
//! connects with its own identity certificate, sends our CSM and a sign-up
//! (spec §5.2) with a code minted in process by the gateway's authority,
//! and then closes (`connect`) or signs in once and stays connected
//! (`signin`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use coap_gateway::auth::authority::Authority;
use rustls::ClientConfig;

use crate::device::{Device, DeviceError, Stage};
use crate::load::{Errors, LoadResult, StageHistograms, IO_TIMEOUT};
use crate::ocf::{self, Identity, Registration};
use crate::twin::TwinModel;

/// How long a device waits for the gateway's `GET /oic/res` after its
/// first sign-in.
const LOCAL_ENDPOINTS_WAIT: Duration = Duration::from_secs(2);

/// How long a twin device waits for the gateway to observe all its
/// resources after publishing them (spec §6.6).
const TWIN_SYNC_WAIT: Duration = Duration::from_secs(10);
/// How often a set-up thread answers its kept devices' Pings (the
/// gateway pings after 10 s of silence and closes 8 s later by default).
const KEEPALIVE_SWEEP: Duration = Duration::from_secs(1);

/// What a device does after its sign-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Close the connection.
    Close,
    /// Sign in, answer the gateway's `GET /oic/res`, stay connected.
    SignedIn,
    /// Keep a twin of this many resources (`twin.rs`): sign in, publish
    /// them (spec §5.7), answer the gateway's twin requests until it
    /// observes every one (spec §6.6), stay connected.
    Twin(usize),
}

/// A device that signed up.
pub struct Registered {
    pub config: Arc<ClientConfig>,
    pub registration: Registration,
    /// Its sign-in request body ([`ocf::sign_in_body`]), built once.
    pub sign_in_body: Vec<u8>,
}

/// What the set-up did.
pub struct Enrolled {
    /// Per client thread, the devices it signed up, with their connection
    /// when it was kept.
    pub groups: Vec<Vec<(Registered, Option<Device>)>>,
    pub load: LoadResult,
}

impl Enrolled {
    /// All registered devices (kept connections closed), and the set-up's
    /// figures.
    pub fn into_registered(self) -> (Vec<Registered>, LoadResult) {
        let registered = self
            .groups
            .into_iter()
            .flatten()
            .map(|(r, d)| {
                if let Some(d) = d {
                    d.close();
                }
                r
            })
            .collect();
        (registered, self.load)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs up every identity from `threads` client threads (identity `i` on
/// thread `i % threads`), then does what `keep` says; kept connections
/// are in blocking mode, with socket timeouts.
pub fn enroll(
    addr: SocketAddr,
    identities: Vec<Identity>,
    authority: &Arc<Authority>,
    threads: usize,
    deadline: Instant,
    interrupted: &Arc<AtomicBool>,
    keep: Keep,
) -> Enrolled {
    let threads = threads.clamp(1, identities.len().max(1));
    let mut shares: Vec<Vec<Identity>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, identity) in identities.into_iter().enumerate() {
        shares[i % threads].push(identity);
    }
    let total: u64 = shares.iter().map(|s| s.len() as u64).sum();
    let max_failures = (total / 10).max(50);
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let bar = crate::progress::counter("signing up", total);
    let handles: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let (authority, failed, interrupted, bar) = (
                authority.clone(),
                failed.clone(),
                interrupted.clone(),
                bar.clone(),
            );
            std::thread::spawn(move || {
                let mut latency = StageHistograms::new();
                let mut errors = Errors::default();
                let mut done: Vec<(Registered, Option<Device>)> = Vec::with_capacity(share.len());
                let mut last_sweep = Instant::now();
                for identity in share {
                    // The devices kept so far are idle while the rest
                    // enroll: answer the gateway's keepalive Pings (it
                    // closes a device that stays silent, spec §2.4), or a
                    // fleet whose set-up outlasts the keepalive timeout
                    // loses its first devices before the run begins.
                    if last_sweep.elapsed() >= KEEPALIVE_SWEEP {
                        last_sweep = Instant::now();
                        for device in done.iter_mut().filter_map(|(_, d)| d.as_mut()) {
                            let _ = device.pump_once();
                        }
                    }
                    if Instant::now() >= deadline
                        || interrupted.load(Ordering::Relaxed)
                        || failed.load(Ordering::Relaxed) >= max_failures
                    {
                        break;
                    }
                    bar.inc(1);
                    match enroll_one(addr, identity, &authority, keep) {
                        Ok((registered, device, timings)) => {
                            latency.record(&timings);
                            done.push((registered, device));
                        }
                        Err(e) => {
                            errors.record(&e);
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                (done, errors, latency)
            })
        })
        .collect();
    let mut load = LoadResult::empty();
    let mut groups = Vec::with_capacity(handles.len());
    for h in handles {
        match h.join() {
            Ok((done, errors, latency)) => {
                load.ok += done.len() as u64;
                load.errors.add(&errors);
                load.latency.add(&latency);
                groups.push(done);
            }
            Err(_) => load.cut_short = Some("a client thread panicked".into()),
        }
    }
    bar.finish_and_clear();
    load.wall = started.elapsed();
    if load.ok + load.errors.total < total && load.cut_short.is_none() {
        load.cut_short = Some(if interrupted.load(Ordering::Relaxed) {
            "interrupted".into()
        } else if load.errors.total >= max_failures {
            format!("stopped after {} failures", load.errors.total)
        } else {
            "deadline reached".into()
        });
    }
    Enrolled { groups, load }
}

type EnrollOne = (Registered, Option<Device>, crate::device::Timings);

fn enroll_one(
    addr: SocketAddr,
    identity: Identity,
    authority: &Authority,
    keep: Keep,
) -> Result<EnrollOne, DeviceError> {
    let (mut device, mut timings) = Device::connect(addr, &identity.config, IO_TIMEOUT)?;
    if let Keep::Twin(resources) = keep {
        device.twin = Some(TwinModel::new(&identity.id, resources));
    }
    let code = authority
        .issue_code(identity.owner, Some(&identity.id), now_unix())
        .map_err(|e| DeviceError::new(Stage::SignUp, format!("cannot mint a code: {e}")))?;
    let (registration, took) = device.sign_up(&identity.id, &code, true)?;
    timings.sign_up = Some(took);
    let sign_in_body = ocf::sign_in_body(
        &identity.id,
        &registration.user_id,
        &registration.access_token,
    );
    let registered = Registered {
        config: identity.config,
        registration,
        sign_in_body,
    };
    if keep == Keep::Close {
        device.close();
        return Ok((registered, None, timings));
    }
    timings.sign_in = Some(device.sign_in(&registered.sign_in_body, false)?);
    if keep == Keep::SignedIn {
        device
            .serve_request(LOCAL_ENDPOINTS_WAIT)
            .map_err(|e| DeviceError::new(Stage::SignIn, e))?;
        return Ok((registered, Some(device), timings));
    }
    let body = device
        .twin
        .as_ref()
        .map(TwinModel::publish_body)
        .unwrap_or_default();
    device.publish(&body)?;
    let observed = device
        .serve_until(TWIN_SYNC_WAIT, |d| {
            d.twin.as_ref().is_some_and(TwinModel::all_observed)
        })
        .map_err(|e| DeviceError::new(Stage::Request, e))?;
    if !observed {
        return Err(DeviceError::new(
            Stage::Request,
            format!(
                "the gateway did not observe every resource within {TWIN_SYNC_WAIT:?} (spec §6.6)"
            ),
        ));
    }
    Ok((registered, Some(device), timings))
}
