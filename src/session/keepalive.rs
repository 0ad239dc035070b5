//! Keepalive (spec §2.4).
//!
//! The reference pings a device that has been silent for more than
//! `timeout / 2` (maxRetries = 1) on a 4 s sweep and closes it if it is still
//! silent at the next sweep: a ping after 10–14 s of silence and a close
//! within ~18 s of the last inbound frame with the default 20 s. We keep
//! precise timers instead of a sweep (spec §14 item 6) and the same
//! envelope: ping at `last + timeout/2`, close at `last + 9/10 × timeout`
//! if nothing at all arrived in between. Any inbound frame counts as
//! activity, not only the Pong.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Ping,
    Close,
    Wait,
}

#[derive(Debug, Clone)]
pub struct Keepalive {
    last_activity: Instant,
    /// Token of the outstanding ping, if one is.
    ping: Option<[u8; 8]>,
}

impl Keepalive {
    pub fn new(now: Instant) -> Self {
        Keepalive {
            last_activity: now,
            ping: None,
        }
    }

    pub fn on_activity(&mut self, now: Instant) {
        self.last_activity = now;
        // A frame after our ping proves the device alive (spec §2.4 step 1).
        self.ping = None;
    }

    /// spec §2.3: a Pong carrying the token of our latest ping.
    pub fn pong(&mut self, token: &[u8]) {
        if self.ping.is_some_and(|t| t.as_slice() == token) {
            self.ping = None;
        }
    }

    pub fn ping_sent(&mut self, token: [u8; 8]) {
        self.ping = Some(token);
    }

    pub fn deadline(&self, timeout: Duration) -> Instant {
        if self.ping.is_some() {
            self.last_activity + timeout.mul_f32(0.9)
        } else {
            self.last_activity + timeout / 2
        }
    }

    pub fn on_deadline(&mut self, now: Instant, timeout: Duration) -> Action {
        if now < self.deadline(timeout) {
            Action::Wait
        } else if self.ping.is_some() {
            Action::Close
        } else {
            Action::Ping
        }
    }
}
