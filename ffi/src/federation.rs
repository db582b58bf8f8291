//! The federated client and server of a deployment (Flower's ClientApp and ServerApp call
//! these): the same code `fedcdd run` runs in one process, split across machines. A client
//! trains on its own data and returns its masked upload; the server samples, configures,
//! takes the uploads, aggregates through the algorithm's strategy, evaluates, checkpoints and
//! writes the run directory. Tensors cross the boundary in `fedcdd_tensors` handles, uploads
//! and text in `fedcdd_bytes`.

use std::ffi::{CString, c_char};
use std::path::{Path, PathBuf};

use fedcdd_core::Algorithm;
use fedcdd_host::data::{Record, parse_records, tokenize_records};
use fedcdd_host::device;
use fedcdd_host::fl::RunConfig;
use fedcdd_host::fl::live::Live;
use fedcdd_host::fl::run::{finish_run, strategy_for};
use fedcdd_host::fl::runner::{ClientReply, Server, client_round};
use fedcdd_host::fl::seeds::{SEED_INIT, stream_seed};
use fedcdd_host::fl::session::{reorder, sorted};
use fedcdd_host::fl::setup::{Role, Setup, build_setup_for};
use fedcdd_host::fl::strategy::{ClientState, Strategy};
use fedcdd_host::io::{Tensor, write_atomic};
use fedcdd_host::model::llama::Workspace;
use fedcdd_host::progress::Reporter;
use fedcdd_host::report::summary_table;
use fedcdd_host::train::evaluate;
use fedcdd_kernels::Cpu;

use crate::error::{FfiError, FfiResult, invalid};
use crate::status::*;
use crate::types::{FEDCDD_MAX_DIMS, TensorIn};

/// An error of the federated layer: the host's message (with its whole cause chain).
fn run_err(status: fedcdd_status) -> impl Fn(anyhow::Error) -> FfiError {
    move |e| FfiError::new(status, format!("{e:#}"))
}

/// A list of named tensors (values kept as f32; the dtype they came in is remembered).
pub struct fedcdd_tensors {
    pub(crate) tensors: Vec<Tensor>,
    names: Vec<CString>,
}

/// One tensor of a `fedcdd_tensors`, borrowed: valid until the handle is changed or freed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct fedcdd_tensor_view {
    /// NUL-terminated UTF-8 name.
    pub name: *const c_char,
    /// The first `ndim` entries are the shape.
    pub shape: [usize; FEDCDD_MAX_DIMS],
    pub ndim: usize,
    /// Number of elements.
    pub len: usize,
    /// `len` f32 values, row-major.
    pub data: *const f32,
}

impl fedcdd_tensors {
    pub(crate) fn from_tensors(tensors: Vec<Tensor>) -> FfiResult<Self> {
        let mut names = Vec::with_capacity(tensors.len());
        for t in &tensors {
            names.push(
                CString::new(t.name.as_str())
                    .map_err(|_| invalid(format!("tensor name {:?} holds a NUL byte", t.name)))?,
            );
        }
        Ok(fedcdd_tensors { tensors, names })
    }

    pub(crate) fn add(&mut self, t: &TensorIn<'_>) -> FfiResult<()> {
        if self.tensors.iter().any(|x| x.name == t.name) {
            return Err(FfiError::new(
                FEDCDD_ERR_TENSOR_NAME,
                format!("tensor \"{}\" is already in the list", t.name),
            ));
        }
        if let Some(i) = t.first_non_finite() {
            return Err(FfiError::new(
                FEDCDD_ERR_NON_FINITE,
                format!(
                    "tensor \"{}\": value is NaN or infinite (element {i})",
                    t.name
                ),
            ));
        }
        let name = CString::new(t.name).map_err(|_| invalid("the name holds a NUL byte"))?;
        self.tensors.push(Tensor {
            name: t.name.to_string(),
            dims: t.dims.clone(),
            dtype: t.dtype,
            data: t.to_f32(),
        });
        self.names.push(name);
        Ok(())
    }

    pub(crate) fn view(&self, index: usize) -> FfiResult<fedcdd_tensor_view> {
        let t = self.tensors.get(index).ok_or_else(|| {
            invalid(format!(
                "tensor index {index} is out of range (the list holds {})",
                self.tensors.len()
            ))
        })?;
        let mut shape = [0usize; FEDCDD_MAX_DIMS];
        for (s, d) in shape.iter_mut().zip(&t.dims) {
            *s = *d;
        }
        Ok(fedcdd_tensor_view {
            name: self.names[index].as_ptr(),
            shape,
            ndim: t.dims.len(),
            len: t.data.len(),
            data: t.data.as_ptr(),
        })
    }
}

/// Owned bytes (an upload, a JSON or text result).
pub struct fedcdd_bytes {
    pub(crate) data: Vec<u8>,
}

/// One client of a deployment: the base model, its own data, the algorithm's client side.
pub struct fedcdd_client {
    setup: Setup<Cpu>,
    live: Live<Cpu>,
    strategy: Box<dyn Strategy>,
    ws: Workspace<Cpu>,
    /// The LoRA's parameters in training order (names and shapes).
    order: Vec<Tensor>,
}

/// What a client's round produced.
pub struct fedcdd_client_result {
    pub(crate) upload: Vec<u8>,
    pub(crate) extras: fedcdd_tensors,
    pub(crate) adapter: fedcdd_tensors,
    pub(crate) loss: f64,
    pub(crate) samples: u64,
}

/// Parses a run configuration (the keys of `config.toml`).
pub(crate) fn config_of(text: &str) -> FfiResult<RunConfig> {
    RunConfig::from_toml(text, "config").map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))
}

/// FLoRA replaces the base model after each round: every client would need the merged
/// weights, so it runs in one process only.
fn check_deployable(cfg: &RunConfig) -> FfiResult<()> {
    if cfg.algorithm == Algorithm::FLora {
        return Err(invalid(
            "flora merges the clients' adapters into the base model after every round, which \
             every client would then need; it runs in one process only (`fedcdd run`)",
        ));
    }
    Ok(())
}

fn quiet_log(_: &str) {}

impl fedcdd_client {
    pub(crate) fn new(config: &str, id: usize, data: Option<&Path>) -> FfiResult<Self> {
        let cfg = config_of(config)?;
        check_deployable(&cfg)?;
        let be = device::cpu(cfg.threads).map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))?;
        let role = Role::Client {
            id,
            data: data.map(Path::to_path_buf),
        };
        let setup = build_setup_for(&cfg, be, &role, &mut |s| quiet_log(s))
            .map_err(run_err(FEDCDD_ERR_IO))?;
        let lcfg = cfg.lora().map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))?;
        let live = Live::load(
            &setup.be,
            &setup.base_dir,
            &setup.model_config,
            lcfg.clone(),
        )
        .map_err(run_err(FEDCDD_ERR_IO))?;
        let order = live
            .fresh(&setup.be, stream_seed(cfg.seed, SEED_INIT, 0, 0))
            .map_err(run_err(FEDCDD_ERR_RUN))?;
        let ws = Workspace::new(
            &setup.be,
            &setup.model_config,
            &lcfg,
            cfg.micro_batch,
            cfg.seq,
        );
        let strategy = strategy_for(&cfg).map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))?;
        Ok(fedcdd_client {
            setup,
            live,
            strategy,
            ws,
            order,
        })
    }

    pub(crate) fn num_examples(&self) -> u64 {
        self.setup
            .clients
            .first()
            .map_or(0, |c| c.examples.len() as u64)
    }

    /// The federation's round-0 global adapter (the seeded PEFT init every process computes).
    pub(crate) fn initial_adapter(&self) -> FfiResult<fedcdd_tensors> {
        fedcdd_tensors::from_tensors(sorted(&self.order))
    }

    /// Replaces the client's training records (JSONL or a JSON array, in memory).
    pub(crate) fn set_records(&mut self, bytes: &[u8]) -> FfiResult<()> {
        let records = parse_records(bytes, Path::new("records")).map_err(run_err(FEDCDD_ERR_IO))?;
        let examples = self.tokenize(&records)?;
        let examples = fedcdd_host::data::trainable_examples(
            examples,
            self.setup.cfg.seq,
            Path::new("records"),
        )
        .map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))?;
        let client = self
            .setup
            .clients
            .first_mut()
            .ok_or_else(|| invalid("the client holds no data slot"))?;
        client.examples = examples;
        Ok(())
    }

    fn tokenize(&self, records: &[Record]) -> FfiResult<Vec<fedcdd_host::data::Example>> {
        tokenize_records(records, &self.setup.tok).map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))
    }

    /// Checks `tensors` against the LoRA's layout and puts them in training order.
    fn adapter(&self, tensors: &[Tensor], what: &str) -> FfiResult<Vec<Tensor>> {
        for t in tensors {
            match self.order.iter().find(|o| o.name == t.name) {
                Some(o) if o.dims == t.dims => {}
                Some(o) => {
                    return Err(FfiError::new(
                        FEDCDD_ERR_SHAPE,
                        format!(
                            "{what}: tensor \"{}\" has shape {:?}, the adapter's is {:?}",
                            t.name, t.dims, o.dims
                        ),
                    ));
                }
                None => {
                    return Err(FfiError::new(
                        FEDCDD_ERR_TENSOR_NAME,
                        format!("{what}: tensor \"{}\" is not in the adapter", t.name),
                    ));
                }
            }
        }
        reorder(tensors.to_vec(), &self.order)
            .map_err(|e| FfiError::new(FEDCDD_ERR_TENSOR_NAME, format!("{what}: {e:#}")))
    }

    /// One round: train from `global` (with the server's `extras`), update `state`, return
    /// the masked upload, the extra arrays and the trained adapter.
    pub(crate) fn train_round(
        &mut self,
        round: usize,
        global: &[Tensor],
        extras: &[Tensor],
        state: &mut Vec<Tensor>,
    ) -> FfiResult<fedcdd_client_result> {
        let global = self.adapter(global, "global adapter")?;
        let client = self
            .setup
            .clients
            .first()
            .ok_or_else(|| invalid("the client holds no data"))?;
        let mut st = ClientState {
            tensors: std::mem::take(state),
        };
        let reply = client_round(
            &self.setup.cfg,
            &self.setup.be,
            &self.live,
            client,
            self.strategy.as_ref(),
            &mut st,
            &mut self.ws,
            &global,
            extras,
            round,
            |_, _| {},
        );
        *state = st.tensors;
        let ClientReply {
            upload,
            extras,
            trained,
            loss,
            samples,
            ..
        } = reply.map_err(run_err(FEDCDD_ERR_RUN))?;
        Ok(fedcdd_client_result {
            upload,
            extras: fedcdd_tensors::from_tensors(extras)?,
            adapter: fedcdd_tensors::from_tensors(sorted(&trained))?,
            loss,
            samples,
        })
    }

    /// Token loss per domain of `adapter` on the records of `bytes`, as JSON.
    pub(crate) fn evaluate(&self, adapter: &[Tensor], bytes: &[u8]) -> FfiResult<Vec<u8>> {
        let tensors = self.adapter(adapter, "adapter")?;
        let records = parse_records(bytes, Path::new("records")).map_err(run_err(FEDCDD_ERR_IO))?;
        let examples = self.tokenize(&records)?;
        let lora = self
            .live
            .lora(&self.setup.be, &tensors, "adapter")
            .map_err(run_err(FEDCDD_ERR_RUN))?;
        let seq = self.setup.cfg.seq.max(256);
        let report = evaluate(
            &self.setup.be,
            &self.live.model,
            &lora,
            &examples,
            8,
            seq,
            |_, _| {},
        )
        .map_err(run_err(FEDCDD_ERR_RUN))?;
        serde_json::to_vec(&report).map_err(|e| invalid(e.to_string()))
    }
}

/// The server of a deployment.
pub struct fedcdd_server {
    server: Server<Cpu>,
    run_dir: PathBuf,
    rep: Reporter,
}

impl fedcdd_server {
    pub(crate) fn new(config: &str, run_dir: &Path, resume: bool) -> FfiResult<Self> {
        let cfg = config_of(config)?;
        check_deployable(&cfg)?;
        let rep = Reporter::new(false);
        let be = device::cpu(cfg.threads).map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))?;
        let setup = build_setup_for(&cfg, be, &Role::Server, &mut |s| rep.line(s))
            .map_err(run_err(FEDCDD_ERR_IO))?;
        let strategy = strategy_for(&cfg).map_err(run_err(FEDCDD_ERR_INVALID_ARGUMENT))?;
        let io = run_err(FEDCDD_ERR_IO);
        std::fs::create_dir_all(run_dir)
            .map_err(|e| io(anyhow::anyhow!("cannot create {}: {e}", run_dir.display())))?;
        let text = cfg.to_toml().map_err(run_err(FEDCDD_ERR_INTERNAL))?;
        write_atomic(&run_dir.join("config.toml"), text.as_bytes()).map_err(&io)?;
        let server = Server::open(setup, strategy, run_dir, resume, &rep)
            .map_err(run_err(FEDCDD_ERR_RUN))?;
        Ok(fedcdd_server {
            server,
            run_dir: run_dir.to_path_buf(),
            rep,
        })
    }

    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (
            self.server.rounds_done(),
            self.server.cfg().rounds,
            self.server.setup.num_clients,
        )
    }

    pub(crate) fn begin_round(&mut self, round: usize) -> FfiResult<Vec<usize>> {
        self.server
            .begin_round(round)
            .map_err(run_err(FEDCDD_ERR_CALL_ORDER))
    }

    pub(crate) fn global(&self) -> FfiResult<fedcdd_tensors> {
        fedcdd_tensors::from_tensors(sorted(self.server.global()))
    }

    pub(crate) fn configure_train(&self) -> FfiResult<fedcdd_tensors> {
        fedcdd_tensors::from_tensors(self.server.configure_train())
    }

    pub(crate) fn add_reply(
        &mut self,
        client: usize,
        upload: &[u8],
        extras: Vec<Tensor>,
        loss: f64,
    ) -> FfiResult<()> {
        self.server
            .add_reply(client, upload.to_vec(), extras, loss)
            .map_err(run_err(FEDCDD_ERR_BAD_ENCODING))
    }

    pub(crate) fn finish_round(&mut self) -> FfiResult<Vec<u8>> {
        let line = self
            .server
            .finish_round()
            .map_err(run_err(FEDCDD_ERR_RUN))?;
        self.rep.line(&line);
        Ok(line.into_bytes())
    }

    pub(crate) fn finish(&mut self) -> FfiResult<Vec<u8>> {
        let report = finish_run(&self.server, &self.run_dir, &self.rep)
            .map_err(run_err(FEDCDD_ERR_RUN))?
            .ok_or_else(|| FfiError::new(FEDCDD_ERR_RUN, "interrupted"))?;
        Ok(summary_table(&report).into_bytes())
    }
}
