//! Placeholder: see the helper building the fake API server.
