//! Fuzz target bodies, shared by the cargo-fuzz crate (`fuzz/`) and the stable
//! replay harness (`tests/fuzz_corpus.rs`), so that both run exactly the same code.
//!
//! Each target is a `fn(&[u8])` that must not panic, hang or leak for any input;
//! checks of properties beyond "does not crash" are assertions inside the targets.
//! `docs/fuzzing.md` describes the input layouts and how to run long sessions.

pub mod desc_chain;
pub mod input;
pub mod mutate;
pub mod options;
pub mod vhost_user_msg;

pub use blocklayer::drivers::luks::fuzzing::luks_header;
pub use desc_chain::desc_chain;
pub use options::keyval;
pub use vhost_user_msg::vhost_user_msg;
