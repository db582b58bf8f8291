//! The CUDA backend (work in progress).
pub mod nvrtc;
pub use nvrtc::compile_all_ptx;
