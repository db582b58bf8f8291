//! SCAFFOLD (Karimireddy et al. 2020). The server sends its control `c`; each local gradient
//! is corrected by `c − c_i`; afterwards the client updates its own `c_i` and sends the
//! change `c_i⁺ − c_i` beside its upload; the server steps `G ← G + λ·Δ̄` and
//! `c ← c + (|S|/N)·mean(c_i⁺ − c_i)`. Every formula is the core's.
//!
//! `c_i⁺` is option II's `c_i − c + (G − θ_i)/(K·η)` with SGD clients. With an adaptive
//! client optimizer (AdamW), whose steps are not `η·g`, it is option I's estimate instead:
//! the mean raw (uncorrected) gradient of the local steps.

use anyhow::{Context, Result, bail};
use fedcdd_core::{
    Algorithm, DType, TensorView, scaffold_client_control, scaffold_correct_gradient,
    scaffold_server_update,
};

use crate::io::{Adapter, Tensor};
use crate::server::{ClientLoader, ServerOptions, ServerStateStore, aggregate_mean, tensor_err};
use crate::train::OptimizerKind;

use super::api::{ClientJob, ClientRun, ClientState, ServerRound, ServerStep, Strategy};

pub struct Scaffold {
    server_lr: f32,
    /// `c` per tensor name in `state.c`.
    state: ServerStateStore,
    progress: bool,
}

impl Scaffold {
    pub fn new(opts: &ServerOptions) -> Self {
        Scaffold {
            server_lr: opts.opt.server_lr,
            state: ServerStateStore::new(Algorithm::Scaffold.name(), opts.opt.variant),
            progress: opts.progress,
        }
    }
}

fn f32_tensor(name: &str, data: Vec<f32>) -> Tensor {
    Tensor {
        name: name.to_string(),
        dims: vec![data.len()],
        dtype: DType::F32,
        data,
    }
}

/// The values of `name` among `tensors`, or zeros of `len` (a control never set is 0).
fn values_or_zero(tensors: &[Tensor], name: &str, len: usize) -> Result<Vec<f32>> {
    match tensors.iter().find(|t| t.name == name) {
        Some(t) if t.data.len() == len => Ok(t.data.clone()),
        Some(t) => bail!(
            "SCAFFOLD: the control of {name:?} has {} values, the tensor {len}",
            t.data.len()
        ),
        None => Ok(vec![0.0; len]),
    }
}

/// One client's round.
struct ScaffoldClient {
    names: Vec<String>,
    global: Vec<Vec<f32>>,
    control: Vec<Vec<f32>>,
    client_control: Vec<Vec<f32>>,
    steps: usize,
    lr: f32,
    /// Option I: the running sum of the raw gradients.
    gradient_sums: Option<Vec<Vec<f32>>>,
}

impl ClientRun for ScaffoldClient {
    fn adjusts_gradients(&self) -> bool {
        true
    }

    fn adjust_gradients(&mut self, _params: &[Vec<f32>], grads: &mut [Vec<f32>]) -> Result<()> {
        if let Some(sums) = self.gradient_sums.as_mut() {
            for (s, g) in sums.iter_mut().zip(grads.iter()) {
                s.iter_mut().zip(g).for_each(|(s, g)| *s += g);
            }
        }
        for ((g, c), ci) in grads
            .iter_mut()
            .zip(&self.control)
            .zip(&self.client_control)
        {
            scaffold_correct_gradient(g, c, ci).map_err(|e| anyhow::anyhow!("SCAFFOLD: {e}"))?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>, trained: &[Tensor], state: &mut ClientState) -> Result<Vec<Tensor>> {
        let k = self.steps.max(1) as f32;
        let mut extras = Vec::with_capacity(self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            let old = &self.client_control[i];
            let next = match &self.gradient_sums {
                Some(sums) => sums[i].iter().map(|s| s / k).collect(),
                None => {
                    let mut c = old.clone();
                    scaffold_client_control(
                        &mut c,
                        &self.control[i],
                        &self.global[i],
                        &trained[i].data,
                        self.steps,
                        self.lr,
                    )
                    .map_err(|e| anyhow::anyhow!("SCAFFOLD control of {name:?}: {e}"))?;
                    c
                }
            };
            let change = next.iter().zip(old).map(|(a, b)| a - b).collect();
            extras.push(f32_tensor(name, change));
            state.set(f32_tensor(name, next));
        }
        Ok(extras)
    }
}

impl Strategy for Scaffold {
    fn name(&self) -> &str {
        Algorithm::Scaffold.name()
    }

    fn configure_train(&self, global: &[Tensor]) -> Vec<Tensor> {
        global
            .iter()
            .map(|t| {
                let c = self.state.c.get(&t.name).cloned();
                f32_tensor(&t.name, c.unwrap_or_else(|| vec![0.0; t.data.len()]))
            })
            .collect()
    }

    fn client_run(&self, job: &ClientJob<'_>, state: &ClientState) -> Result<Box<dyn ClientRun>> {
        let mut run = ScaffoldClient {
            names: Vec::new(),
            global: Vec::new(),
            control: Vec::new(),
            client_control: Vec::new(),
            steps: job.steps,
            lr: job.lr,
            gradient_sums: (job.optimizer != OptimizerKind::Sgd).then(Vec::new),
        };
        for g in job.global {
            let n = g.data.len();
            run.names.push(g.name.clone());
            run.global.push(g.data.clone());
            run.control.push(values_or_zero(job.extras, &g.name, n)?);
            run.client_control
                .push(values_or_zero(&state.tensors, &g.name, n)?);
            if let Some(s) = run.gradient_sums.as_mut() {
                s.push(vec![0.0; n]);
            }
        }
        Ok(Box::new(run))
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        // mean_i(c_i⁺ − c_i), per tensor: the arrays the clients sent beside their uploads.
        let n = replies.count();
        let mut mean_dc: Vec<Vec<f32>> = global
            .tensors
            .iter()
            .map(|t| vec![0.0; t.data.len()])
            .collect();
        for i in 0..n {
            let u = replies.load(i)?;
            if u.extras.is_empty() {
                bail!(
                    "{}: SCAFFOLD's server step also needs the clients' control variates, which \
                     adapters and uploads do not carry; it is part of the federated training \
                     loop, not of `fedcdd aggregate`",
                    u.label()
                );
            }
            for (g, acc) in global.tensors.iter().zip(mean_dc.iter_mut()) {
                let dc = u
                    .extras
                    .iter()
                    .find(|t| t.name == g.name)
                    .with_context(|| {
                        format!("{}: no control change for {:?}", u.label(), g.name)
                    })?;
                if dc.data.len() != acc.len() {
                    bail!(
                        "{}: the control change of {:?} has the wrong size",
                        u.label(),
                        g.name
                    );
                }
                acc.iter_mut().zip(&dc.data).for_each(|(a, d)| *a += d);
            }
        }
        for acc in mean_dc.iter_mut() {
            acc.iter_mut().for_each(|a| *a /= n.max(1) as f32);
        }
        let server_lr = self.server_lr;
        let total = round.total_clients.max(n);
        let controls = &mut self.state.c;
        let agg = aggregate_mean(
            global,
            replies,
            &|_| true,
            &|w| w,
            Algorithm::Scaffold.name(),
            self.progress,
            &mut |g, acc, out| {
                let fail = tensor_err(&g.name);
                let mut mean = vec![0.0f32; g.data.len()];
                acc.mean_into(&mut mean).map_err(&fail)?;
                let gi = global
                    .tensors
                    .iter()
                    .position(|t| t.name == g.name)
                    .context("internal: tensor not in the global adapter")?;
                let c = controls
                    .entry(g.name.clone())
                    .or_insert_with(|| vec![0.0; g.data.len()]);
                scaffold_server_update(
                    TensorView::F32(&g.data),
                    &mean,
                    server_lr,
                    c,
                    &mean_dc[gi],
                    n,
                    total,
                    out,
                )
                .map_err(fail)
            },
        )?;
        self.state.steps += 1;
        Ok(agg.into())
    }

    fn state(&self) -> &ServerStateStore {
        &self.state
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        &mut self.state
    }
}
