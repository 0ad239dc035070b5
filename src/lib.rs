//! coap-gateway: a thread-per-core CoAP gateway that connects OCF devices
//! (RFC 8323 `coaps+tcp`) to an IoT hub.
//!
//! Layers, in the one direction data flows (ARCHITECTURE.md): the `shards`
//! crate moves bytes, [`coap`] frames them, [`session`] decides. Everything in
//! this crate is sans-IO: no sockets, no clocks, no executor types.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod coap;
pub mod config;
pub mod gateway;
pub mod hub;
pub mod ocf;
pub mod server;
pub mod session;
