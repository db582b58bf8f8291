//! LoRA training, evaluation and generation over a kernels backend: the optimizer loop,
//! gradient accumulation, clipping, per-domain evaluation, sampling with a KV cache.

mod adapter;
mod eval;
mod generate;
mod job;
mod step;

pub use adapter::{load_lora, save_lora};
pub use eval::{EvalReport, LossReport, evaluate};
pub use generate::{Sampling, generate, generate_greedy_batch, sample};
pub use job::{EvalJob, TrainJob, TrainSummary, run_eval_job, run_train_job};
pub use step::{
    OptState, Optimizer, OptimizerKind, Sampler, StepStats, TrainOptions, pad_id, train, train_step,
};
