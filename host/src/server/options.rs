//! The server-side switches of every rule, built once from settings (the CLI's flags or a run
//! config's keys): FedCDD's ablation switches and the FedOpt family's hyper-parameters.

use anyhow::Result;
use fedcdd_core::{
    Algorithm, Components, FedCddConfig, FedOptVariant, NormAxis, ServerOpt, ServerOptConfig,
    Target, Weighting,
};

/// What a user sets on the server side; `server_lr` None = the rule's default
/// ([`ServerOptConfig::defaults`], the spec's: 1 for FedAvg/FedAvgM/FedCDD, 1e-3 for FedOpt).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServerSettings {
    pub server_lr: Option<f32>,
    /// β1 of FedYogi/FedAdam, and FedAvgM's momentum β.
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    pub variant: FedOptVariant,
    pub norm_axis: NormAxis,
    pub target: Target,
    pub weighting: Weighting,
    pub renormalize: bool,
    pub components: Components,
}

impl Default for ServerSettings {
    fn default() -> Self {
        let opt = ServerOptConfig::defaults(ServerOpt::FedAdam);
        let cdd = FedCddConfig::default();
        ServerSettings {
            server_lr: None,
            beta1: opt.beta1,
            beta2: opt.beta2,
            tau: opt.tau,
            variant: FedOptVariant::Reddi,
            norm_axis: cdd.norm_axis,
            target: cdd.target,
            weighting: cdd.weighting,
            renormalize: cdd.renormalize,
            components: cdd.components,
        }
    }
}

/// The validated options of every server rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServerOptions {
    pub fedcdd: FedCddConfig,
    /// The mean family's rule (FedAvg for the algorithms without a server optimiser) and its
    /// hyper-parameters.
    pub opt: ServerOptConfig,
    /// Show a progress bar over the clients (on a terminal).
    pub progress: bool,
}

impl ServerSettings {
    /// The options `algorithm` runs with.
    pub fn options(&self, algorithm: Algorithm, progress: bool) -> Result<ServerOptions> {
        let rule = algorithm.server_opt().unwrap_or(ServerOpt::FedAvg);
        let mut opt = ServerOptConfig::defaults(rule);
        opt.beta1 = self.beta1;
        opt.beta2 = self.beta2;
        opt.tau = self.tau;
        opt.variant = self.variant;
        if let Some(lr) = self.server_lr {
            opt.server_lr = lr;
        }
        let fedcdd = FedCddConfig {
            norm_axis: self.norm_axis,
            target: self.target,
            weighting: self.weighting,
            renormalize: self.renormalize,
            server_lr: self.server_lr.unwrap_or(1.0),
            components: self.components,
        };
        fedcdd.validate()?;
        opt.validate()?;
        Ok(ServerOptions {
            fedcdd,
            opt,
            progress,
        })
    }
}
