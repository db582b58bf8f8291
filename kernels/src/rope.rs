//! Rotary-embedding tables computed the way HF `transformers` computes them (f32 inverse
//! frequencies, `position · inv_freq` in f32, cos/sin of that), including `rope_scaling`.

/// `rope_scaling` / `rope_parameters` of an HF LLaMA config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"` (or no scaling at all).
    None,
    /// `rope_type: "linear"`: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// `rope_type: "llama3"` (Llama 3.1+): low frequencies divided by `factor`, high ones kept,
    /// a smooth blend in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// `cos`/`sin` of every (position, frequency) pair: `[positions, head_dim/2]` each.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    pub head_dim: usize,
    pub positions: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// HF's inverse frequencies: `1 / theta^(2i/d)` in f32, then the scaling rule.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    let half = head_dim / 2;
    let base: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta as f32).powf(exponent)
        })
        .collect();
    match scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let factor = factor as f32;
            let low_freq_wavelen = (old_len / low_freq_factor) as f32;
            let high_freq_wavelen = (old_len / high_freq_factor) as f32;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    // HF: ~(wavelen < high) & ~(wavelen > low), i.e. high <= wavelen <= low.
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old_len as f32 / wavelen - low_freq_factor as f32)
                            / (high_freq_factor - low_freq_factor) as f32;
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling, positions: usize) -> Self {
        assert!(
            head_dim.is_multiple_of(2),
            "RoPE needs an even head_dim, got {head_dim}"
        );
        let freqs = inv_freq(head_dim, theta, scaling);
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &freqs {
                // HF multiplies in f32, then takes cos/sin of that f32 angle.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable {
            head_dim,
            positions,
            cos,
            sin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(128, 500_000.0, RopeScaling::None);
        let scaled = inv_freq(
            128,
            500_000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        );
        // wavelength 2π/f: the first frequency (wavelength 6.3) is high, the last is low.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() <= 1e-12);
        // in between the blend stays between f/8 and f
        for i in 0..64 {
            assert!(scaled[i] <= plain[i] && scaled[i] >= plain[i] / 8.0 * 0.999_999);
        }
    }
}
