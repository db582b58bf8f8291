//! A coordinate-wise robust rule in place of the mean (`robust = median | trimmed_mean:K`):
//! the clients of the inner strategy (FedAvg's plain clients, FedProx's proximal term), and a
//! server step that takes, at every coordinate of every tensor, the median or the trimmed
//! mean of the clients' updates (unweighted: one client, one vote). Memory: every client's
//! dense update at once (N·P floats), unlike the streaming rules.

use anyhow::{Context, Result, anyhow, bail};
use fedcdd_core::{TensorRole, TensorView, coordinate_median, trimmed_mean};

use crate::io::{Adapter, Tensor};
use crate::server::{AggregateReport, ClientInfo, ClientLoader, ServerStateStore};

use super::super::defense::RobustRule;
use super::NextGlobal;
use super::api::{ClientJob, ClientRun, ClientState, ServerRound, ServerStep, Strategy};

pub struct Robust {
    inner: Box<dyn Strategy>,
    rule: RobustRule,
    name: String,
}

impl Robust {
    pub fn new(inner: Box<dyn Strategy>, rule: RobustRule) -> Self {
        let name = format!("{}+{rule}", inner.name());
        Robust { inner, rule, name }
    }
}

impl Strategy for Robust {
    fn name(&self) -> &str {
        &self.name
    }

    fn sends(&self, role: TensorRole) -> bool {
        self.inner.sends(role)
    }

    fn configure_train(&self, global: &[Tensor]) -> Vec<Tensor> {
        self.inner.configure_train(global)
    }

    fn client_start(&self, global: &[Tensor], state: &ClientState) -> Vec<Tensor> {
        self.inner.client_start(global, state)
    }

    fn frozen(&self, role: TensorRole) -> bool {
        self.inner.frozen(role)
    }

    fn client_run(&self, job: &ClientJob<'_>, state: &ClientState) -> Result<Box<dyn ClientRun>> {
        self.inner.client_run(job, state)
    }

    fn aggregate_train(
        &mut self,
        global: &Adapter,
        replies: &mut dyn ClientLoader,
        _round: &ServerRound<'_>,
    ) -> Result<ServerStep> {
        let n = replies.count();
        if n == 0 {
            bail!("no client updates to aggregate");
        }
        let mut updates = Vec::with_capacity(n);
        let mut report = AggregateReport::default();
        for i in 0..n {
            let u = replies.load(i)?;
            report.clients.push(ClientInfo {
                label: replies.label(i),
                source: u.source.clone(),
                client_id: u.client_id,
                samples: u.samples,
                round: u.round,
                bytes: u.bytes,
            });
            updates.push(u);
        }
        report.sample_weights = vec![1.0 / n as f64; n];
        let mut scratch = vec![0.0f32; n];
        let mut out = Vec::with_capacity(global.tensors.len());
        for g in &global.tensors {
            if !self.inner.sends(g.role()) {
                out.push(g.clone());
                report.tensors_kept += 1;
                continue;
            }
            let mut views = Vec::with_capacity(n);
            for (i, u) in updates.iter().enumerate() {
                let d = u
                    .get(&g.name)
                    .with_context(|| format!("{}: no tensor {:?}", replies.label(i), g.name))?;
                views.push(TensorView::F32(&d.data));
            }
            let mut step = vec![0.0f32; g.data.len()];
            let result = match self.rule {
                RobustRule::Median => coordinate_median(&views, &mut step, &mut scratch),
                RobustRule::TrimmedMean(k) => trimmed_mean(&views, k, &mut step, &mut scratch),
                RobustRule::None => bail!("the robust strategy needs a rule"),
            };
            result.map_err(|e| {
                let who = e
                    .client
                    .map_or_else(String::new, |c| format!("{}: ", replies.label(c as usize)));
                anyhow!("{who}tensor {:?}: {} ({e})", g.name, self.rule)
            })?;
            let mut t = g.clone();
            for (v, s) in t.data.iter_mut().zip(&step) {
                *v += s;
            }
            out.push(t);
            report.tensors_aggregated += 1;
        }
        Ok(ServerStep {
            next: NextGlobal::Adapter(out),
            report,
        })
    }

    fn state(&self) -> &ServerStateStore {
        self.inner.state()
    }

    fn state_mut(&mut self) -> &mut ServerStateStore {
        self.inner.state_mut()
    }
}
