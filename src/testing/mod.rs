//! Test support shared by `tests/`, `benches/` and `examples/` (feature `testing`): never part of
//! a release build.

pub mod fake_apiserver;
