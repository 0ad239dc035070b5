//! RFC 8323 CoAP-over-TCP codec (being written).
