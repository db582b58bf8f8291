//! `fedcdd base`: the built-in base models — where they are, their checksum, and a rebuild
//! from the recipe compared with the shipped (or cached) model.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::data::builtin::Benchmark;
use crate::fl::base::{
    BaseRecipe, BuiltinSize, build_base, cache_root, ensure_base, is_shipped, sha256_hex,
    shipped_model_sha256,
};
use crate::io::read_safetensors;
use crate::progress::line;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    fedcdd base                         # the default base model: path and sha256\n  \
    fedcdd base --out m/                # a copy to use with --model m/ elsewhere\n  \
    fedcdd base --rebuild --out m2/     # pre-train it again from its recipe and compare\n\n\
    The default benchmark's base model ships inside the binary (built by its recipe on the \
    project's machine); the others are pre-trained on first use and cached in \
    $FEDCDD_CACHE (else ~/.cache/fedcdd).")]
pub struct BaseArgs {
    /// The benchmark whose base model: v2 or v1.
    #[arg(long, default_value = "v2")]
    pub benchmark: String,
    /// builtin or builtin-small.
    #[arg(long, default_value = "builtin")]
    pub size: String,
    /// Copy the model directory here (with --rebuild: write the rebuilt model here).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Pre-train the model from its recipe, ignoring shipped and cached copies, and compare
    /// the result with the shipped (else cached) model.
    #[arg(long)]
    pub rebuild: bool,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

fn recipe_of(a: &BaseArgs) -> Result<BaseRecipe> {
    let bench = Benchmark::from_name(&a.benchmark)
        .with_context(|| format!("--benchmark {:?}: expected v2 or v1", a.benchmark))?;
    let size = BuiltinSize::from_name(&a.size)
        .with_context(|| format!("--size {:?}: expected builtin or builtin-small", a.size))?;
    Ok(BaseRecipe::builtin(bench, size))
}

fn model_sha256(dir: &Path) -> Result<String> {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// Copies the files of model directory `from` into `to` (created; must not hold a model).
fn copy_model(from: &Path, to: &Path) -> Result<()> {
    if to.join("model.safetensors").exists() {
        bail!(
            "{} already holds a model; choose another --out",
            to.display()
        );
    }
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).with_context(|| {
                format!("cannot copy {} to {}", e.path().display(), to.display())
            })?;
        }
    }
    Ok(())
}

/// The largest absolute and relative difference between the weights of two model files.
fn weight_difference(a: &Path, b: &Path) -> Result<(f64, f64)> {
    let (ta, _) = read_safetensors(a)?;
    let (tb, _) = read_safetensors(b)?;
    let (mut abs, mut scale) = (0.0f64, 0.0f64);
    for x in &ta {
        let y = tb
            .iter()
            .find(|t| t.name == x.name)
            .with_context(|| format!("{} has no tensor {}", b.display(), x.name))?;
        if x.data.len() != y.data.len() {
            bail!("tensor {}: sizes differ", x.name);
        }
        for (p, q) in x.data.iter().zip(&y.data) {
            abs = abs.max((p - q).abs() as f64);
            scale = scale.max(p.abs() as f64);
        }
    }
    Ok((abs, abs / scale.max(f64::MIN_POSITIVE)))
}

pub fn cmd_base(a: &BaseArgs) -> Result<()> {
    let recipe = recipe_of(a)?;
    let mut log = |s: &str| line(s);
    if !a.rebuild {
        let dir = ensure_base(&cache_root(), &recipe, a.threads, &mut log)?;
        let sum = model_sha256(&dir)?;
        println!("{}", dir.display());
        println!("recipe {}; model.safetensors sha256 {sum}", recipe.key());
        if is_shipped(&recipe) && sum != shipped_model_sha256() {
            bail!(
                "the cached copy in {} differs from the shipped model (sha256 {}): delete the \
                 directory to unpack it again",
                dir.display(),
                shipped_model_sha256()
            );
        }
        if let Some(out) = &a.out {
            copy_model(&dir, out)?;
            println!("copied to {}", out.display());
        }
        return Ok(());
    }
    let work = std::env::temp_dir().join(format!("fedcdd-rebuild-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let result = build_base(&work, &recipe, a.threads, &mut log);
    let rebuilt = work.join("model");
    let report = result.and_then(|()| {
        let sum = model_sha256(&rebuilt)?;
        println!("rebuilt {}: model.safetensors sha256 {sum}", recipe.key());
        // The model it is compared with: the shipped one, else a cached build.
        let reference = ensure_base(&cache_root(), &recipe, a.threads, &mut log)?;
        let want = model_sha256(&reference)?;
        if sum == want {
            println!(
                "identical to the {} model (sha256 {want})",
                origin_of(&recipe)
            );
        } else {
            let (abs, rel) = weight_difference(
                &rebuilt.join("model.safetensors"),
                &reference.join("model.safetensors"),
            )?;
            println!(
                "differs from the {} model (sha256 {want}): largest weight difference {abs:.3e} \
                 ({rel:.3e} of the largest weight). Floating-point sums depend on the CPU's \
                 vector width, so another machine may build a slightly different model; \
                 the one in {} is the reference runs use.",
                origin_of(&recipe),
                reference.display()
            );
        }
        if let Some(out) = &a.out {
            copy_model(&rebuilt, out)?;
            println!("rebuilt model written to {}", out.display());
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&work);
    report
}

fn origin_of(recipe: &BaseRecipe) -> &'static str {
    if is_shipped(recipe) {
        "shipped"
    } else {
        "cached"
    }
}
