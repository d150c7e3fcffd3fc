//! systemd unit management.
