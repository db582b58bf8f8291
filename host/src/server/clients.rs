//! Where the server's client updates come from: in memory (the federated runner), or files
//! given on the command line (adapters or uploads), read one at a time.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::io::{ADAPTER_MODEL_FILE, Adapter, load_adapter};
use crate::upload::{
    ClientUpdate, load_client, looks_like_safetensors, looks_like_upload, parse_upload,
};

/// Hands the server one client's update at a time: FedCDD asks for every client twice (its
/// two passes), the other rules once. So `fedcdd aggregate` holds one client in memory,
/// whatever the number of clients.
pub trait ClientLoader {
    fn count(&self) -> usize;
    /// How errors name client `index`.
    fn label(&self, index: usize) -> String;
    /// Client `index`'s sample count, if known, without loading its whole update.
    fn samples(&mut self, index: usize) -> Result<Option<u64>>;
    fn load(&mut self, index: usize) -> Result<ClientUpdate>;
}

/// Updates already in memory.
impl ClientLoader for &[ClientUpdate] {
    fn count(&self) -> usize {
        self.len()
    }
    fn label(&self, index: usize) -> String {
        self[index].label()
    }
    fn samples(&mut self, index: usize) -> Result<Option<u64>> {
        Ok(self[index].samples)
    }
    fn load(&mut self, index: usize) -> Result<ClientUpdate> {
        Ok(self[index].clone())
    }
}

/// Clients given on the command line: adapters or uploads, each optionally with a sample
/// count that overrides the upload's. Each is read from disk when the server asks for it.
pub struct FileClients<'a> {
    pub global: &'a Adapter,
    /// Path and sample count (`PATH:N`) of each client.
    pub specs: Vec<(PathBuf, Option<u64>)>,
}

impl ClientLoader for FileClients<'_> {
    fn count(&self) -> usize {
        self.specs.len()
    }

    fn label(&self, index: usize) -> String {
        format!("client {index} ({})", self.specs[index].0.display())
    }

    fn samples(&mut self, index: usize) -> Result<Option<u64>> {
        // Also a cheap first look at every client, so that a wrong path is reported as such
        // rather than as a missing sample count.
        let (path, given) = &self.specs[index];
        if path.is_dir() {
            if !path.join(ADAPTER_MODEL_FILE).is_file() {
                load_adapter(path)?; // its error says what is missing
            }
            return Ok(*given);
        }
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read client {}", path.display()))?;
        if !looks_like_upload(&bytes) {
            if !looks_like_safetensors(&bytes) {
                bail!(
                    "client file {} is neither a fedcdd upload nor a safetensors adapter",
                    path.display()
                );
            }
            return Ok(*given);
        }
        let h = parse_upload(&bytes, path)?.header;
        Ok(given.or((h.num_samples > 0).then_some(h.num_samples)))
    }

    fn load(&mut self, index: usize) -> Result<ClientUpdate> {
        let (path, given) = &self.specs[index];
        let mut update = load_client(path, index as u32, self.global)?;
        if given.is_some() {
            update.samples = *given;
        }
        Ok(update)
    }
}
