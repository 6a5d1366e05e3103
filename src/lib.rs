//! meshd: an Istio-compatible control plane.
//!
//! The crate is one library plus the `meshd` binary. Modules follow `docs/architecture.md`:
//! `config` owns every knob, `pki` parses and checks certificates, `ca` holds the signing
//! material and the CreateCertificate handler, `auth` turns request credentials into an
//! [`auth::Identity`], `tls` builds the rustls side of the listeners, `admin` serves metrics
//! and readiness, and `app` wires them together.

pub mod admin;
pub mod app;
pub mod auth;
pub mod bench;
pub mod ca;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod duration;
pub mod fsutil;
pub mod grpc;
pub mod limits;
pub mod logging;
pub mod meshconfig;
pub mod pki;
pub mod proto;
pub mod proxy_status;
pub mod registry;
pub mod remote_secret;
pub mod rootcert;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod webhook;
pub mod xds;
