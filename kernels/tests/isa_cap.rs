//! The GEMM honours the same instruction-set cap as every other fast CPU op: the
//! `FEDCDD_CPU_ISA` environment variable (read once per process, so this test binary sets it
//! before any kernel runs) and `set_max_isa`.

use fedcdd_kernels::cpu::matmul::Simd;
use fedcdd_kernels::cpu::ops::{Isa, detected_isa, set_max_isa};

#[test]
fn gemm_tier_follows_the_env_cap_and_set_max_isa() {
    // SAFETY: the only test of this binary, before any thread or kernel reads the variable.
    unsafe { std::env::set_var("FEDCDD_CPU_ISA", "avx2") };
    let hw_avx2 = Simd::Avx2.available();
    let want = if hw_avx2 { Simd::Avx2 } else { Simd::Portable };
    assert!(detected_isa() <= Isa::Avx2);
    assert_eq!(
        Simd::detect(),
        want,
        "FEDCDD_CPU_ISA=avx2 must cap the GEMM"
    );
    set_max_isa(Isa::Generic);
    assert_eq!(
        Simd::detect(),
        Simd::Portable,
        "set_max_isa(Generic) must cap the GEMM"
    );
    set_max_isa(Isa::Avx512);
    assert_eq!(Simd::detect(), want, "the env cap still holds");
}
