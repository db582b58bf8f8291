//! Cross-crate test suite of `fedcdd-core`. The crate itself is empty: the tests live in
//! `tests/*.rs` and share helpers (a SplitMix64 test-data generator and plain-f64 reference
//! implementations written from `fedcdd-spec.md`) in `tests/common/mod.rs`.
