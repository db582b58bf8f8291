//! Building a run's [`Setup`]: the base model (built-in or a directory), client data
//! (built-in benchmark, one file partitioned by domain, or one file per client) and the
//! evaluation sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcdd_kernels::Backend;

use crate::data::builtin::Split;
use crate::data::{Example, Record, Tokenizer, load_records, tokenize_records, trainable_examples};
use crate::model::config::LlamaConfig;
use crate::rng::Rng;

use super::attack::{Attack, flip_labels};
use super::base::{BaseRecipe, BuiltinSize, cache_root, ensure_base};
use super::config::{Partition, RunConfig};
use super::evaluate::{EvalSet, eval_set};
use super::seeds::{SEED_ATTACK, SEED_PARTITION, stream_seed};

/// One client's local data.
pub struct Client {
    pub id: usize,
    /// The domains it holds, for reports (`arithmetic`, `arithmetic+facts`, a file name).
    pub label: String,
    pub examples: Vec<Example>,
}

/// What stays fixed during a run: configuration, backend, tokenizer, data, evaluation sets.
pub struct Setup<B: Backend> {
    pub cfg: RunConfig,
    pub be: B,
    /// The base model directory the run starts from.
    pub base_dir: PathBuf,
    pub model_config: LlamaConfig,
    pub tok: Tokenizer,
    /// Clients in the federation (sampled or not).
    pub num_clients: usize,
    /// The clients whose data this process holds: all of them in one process, one on a
    /// Flower SuperNode, none on the server of a deployment.
    pub clients: Vec<Client>,
    pub eval_sets: Vec<EvalSet>,
    pub domains: Vec<String>,
}

impl<B: Backend> Setup<B> {
    /// Client `id`'s data, when this process holds it.
    pub fn client(&self, id: usize) -> Option<&Client> {
        self.clients.iter().find(|c| c.id == id)
    }
}

/// Which part of a federation a process plays; decides what [`build_setup_for`] loads.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// Everything in one process (`fedcdd run`).
    All,
    /// A deployment's server: the model and the evaluation sets, no client data.
    Server,
    /// One client of a deployment: its own data (partition `id` of the config's data, or the
    /// records of `data` when given) and the model; no evaluation sets.
    Client { id: usize, data: Option<PathBuf> },
}

/// Records of one domain (or one client's file).
type Group = (String, Vec<Record>);

/// Builds everything a run needs on backend `be`; `log` gets one-line messages.
pub fn build_setup<B: Backend>(
    cfg: &RunConfig,
    be: B,
    log: &mut dyn FnMut(&str),
) -> Result<Setup<B>> {
    build_setup_for(cfg, be, &Role::All, log)
}

/// Builds what `role` needs on backend `be`.
pub fn build_setup_for<B: Backend>(
    cfg: &RunConfig,
    be: B,
    role: &Role,
    log: &mut dyn FnMut(&str),
) -> Result<Setup<B>> {
    let base_dir = match cfg.model_path() {
        Some(p) => p,
        None => {
            let size = cfg.builtin_size().unwrap_or(BuiltinSize::Base);
            let recipe = BaseRecipe::builtin(cfg.benchmark, size);
            ensure_base(&cache_root(), &recipe, cfg.threads, log)?
        }
    };
    let model_config = LlamaConfig::load(&base_dir)?;
    let tok = Tokenizer::load(&base_dir)?;
    if cfg.seq > model_config.max_position_embeddings {
        bail!(
            "seq {} exceeds max_position_embeddings {} of {}",
            cfg.seq,
            model_config.max_position_embeddings,
            base_dir.display()
        );
    }

    if let Role::Client {
        id,
        data: Some(path),
    } = role
    {
        let recs = load_records(path)?;
        if recs.is_empty() {
            bail!("client data {}: no records", path.display());
        }
        let ex = tokenize_records(&recs, &tok)
            .with_context(|| format!("client data {}", path.display()))?;
        let examples = trainable_examples(ex, cfg.seq, path)?;
        let num_clients = cfg.num_clients.max(id + 1);
        let mut clients = vec![Client {
            id: *id,
            label: path.display().to_string(),
            examples,
        }];
        flip_attackers_labels(cfg, num_clients, &mut clients);
        return Ok(Setup {
            cfg: cfg.clone(),
            be,
            base_dir,
            model_config,
            tok,
            num_clients,
            clients,
            eval_sets: Vec::new(),
            domains: Vec::new(),
        });
    }
    let server = *role == Role::Server;
    // Training records per domain (or per client) and evaluation records per domain.
    let (train_groups, eval_groups): (Vec<Group>, Vec<Group>) = if cfg.builtin_data() {
        let bench = cfg.benchmark;
        let train = bench
            .domains()
            .iter()
            .map(|d| {
                let items = bench.items(d, Split::Train, cfg.builtin_train_items, cfg.seed);
                (d.to_string(), items.iter().map(|i| i.to_record()).collect())
            })
            .collect();
        let eval = bench
            .domains()
            .iter()
            .map(|d| {
                let items = bench.held_out_distinct(d, cfg.eval_questions, cfg.seed);
                (d.to_string(), items.iter().map(|i| i.to_record()).collect())
            })
            .collect();
        (train, eval)
    } else {
        let train = if server {
            Vec::new()
        } else if cfg.client_data.is_empty() {
            group_by_domain(&load_records(Path::new(&cfg.data))?, &cfg.data)?
        } else {
            let mut v = Vec::new();
            for f in &cfg.client_data {
                let r = load_records(Path::new(f))?;
                if r.is_empty() {
                    bail!("client data {f}: no records");
                }
                v.push((f.clone(), r));
            }
            v
        };
        let eval = group_by_domain(&load_records(Path::new(&cfg.eval_data))?, &cfg.eval_data)?;
        (train, eval)
    };

    let mut eval_sets = Vec::new();
    let eval_groups = if matches!(role, Role::Client { .. }) {
        Vec::new()
    } else {
        eval_groups
    };
    for (d, recs) in &eval_groups {
        let recs: Vec<Record> = recs
            .iter()
            .take(cfg.eval_questions.max(1) * 4)
            .cloned()
            .collect();
        eval_sets.push(eval_set(d, &recs, &tok, cfg.eval_questions)?);
    }
    let domains: Vec<String> = eval_groups.iter().map(|(d, _)| d.clone()).collect();

    let num_clients = if cfg.client_data.is_empty() {
        cfg.num_clients
    } else {
        cfg.client_data.len()
    };
    let mut clients = if server {
        Vec::new()
    } else if !cfg.client_data.is_empty() {
        let mut out = Vec::new();
        for (i, (f, recs)) in train_groups.iter().enumerate() {
            let ex = tokenize_records(recs, &tok).with_context(|| format!("client data {f}"))?;
            let ex = trainable_examples(ex, cfg.seq, Path::new(f))?;
            out.push(Client {
                id: i,
                label: f.clone(),
                examples: ex,
            });
        }
        out
    } else {
        let mut per_domain = Vec::new();
        for (d, recs) in &train_groups {
            let ex = tokenize_records(recs, &tok).with_context(|| format!("domain {d:?}"))?;
            let ex = trainable_examples(ex, cfg.seq, Path::new(&cfg.data))?;
            per_domain.push((d.clone(), ex));
        }
        partition(cfg, per_domain)?
    };
    if clients.iter().any(|c| c.examples.is_empty()) {
        let empty: Vec<usize> = clients
            .iter()
            .filter(|c| c.examples.is_empty())
            .map(|c| c.id)
            .collect();
        bail!(
            "clients {empty:?} got no training data under partition {:?}; use fewer clients \
             or more data",
            cfg.partition.to_string()
        );
    }
    flip_attackers_labels(cfg, num_clients, &mut clients);
    if let Role::Client { id, .. } = role {
        if *id >= num_clients {
            bail!(
                "client {id} is not one of the federation's {num_clients} clients (0..{num_clients})"
            );
        }
        clients.retain(|c| c.id == *id);
    }
    Ok(Setup {
        cfg: cfg.clone(),
        be,
        base_dir,
        model_config,
        tok,
        num_clients,
        clients,
        eval_sets,
        domains,
    })
}

/// `attack = labelflip:K`: the attacking clients train on their questions with the answers
/// shuffled among them.
fn flip_attackers_labels(cfg: &RunConfig, num_clients: usize, clients: &mut [Client]) {
    if let Attack::LabelFlip(_) = cfg.attack {
        let attackers = cfg.attack.attackers(cfg.seed, num_clients);
        for c in clients.iter_mut().filter(|c| attackers.contains(&c.id)) {
            c.examples = flip_labels(&c.examples, stream_seed(cfg.seed, SEED_ATTACK, 0, c.id));
        }
    }
}

/// Records grouped by their `domain` field (order of first appearance).
fn group_by_domain(records: &[Record], origin: &str) -> Result<Vec<Group>> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        let d = r.domain().with_context(|| {
            format!("{origin}: record {i} has no domain (or category) field; every record needs one to be partitioned and evaluated per domain")
        })?;
        if !groups.contains_key(d) {
            order.push(d.to_string());
        }
        groups.entry(d.to_string()).or_default().push(r.clone());
    }
    if order.is_empty() {
        bail!("{origin}: no records");
    }
    Ok(order
        .into_iter()
        .map(|d| {
            let g = groups.remove(&d).unwrap_or_default();
            (d, g)
        })
        .collect())
}

/// Splits each domain's examples among `num_clients` clients.
pub fn partition(cfg: &RunConfig, per_domain: Vec<(String, Vec<Example>)>) -> Result<Vec<Client>> {
    let n = cfg.num_clients;
    let mut rng = Rng::new(stream_seed(cfg.seed, SEED_PARTITION, 0, 0));
    let mut buckets: Vec<(Vec<String>, Vec<Example>)> = vec![(Vec::new(), Vec::new()); n];
    let give = |b: &mut (Vec<String>, Vec<Example>), d: &str, ex: &[Example]| {
        if !ex.is_empty() && !b.0.iter().any(|x| x == d) {
            b.0.push(d.to_string());
        }
        b.1.extend_from_slice(ex);
    };
    match cfg.partition {
        Partition::Domain => {
            // Client k holds domain k mod D; a domain's data is shared by its clients. With
            // fewer clients than domains, client k holds every domain d with d mod n = k.
            let nd = per_domain.len();
            for (di, (d, ex)) in per_domain.iter().enumerate() {
                let owners: Vec<usize> = if n >= nd {
                    (0..n).filter(|k| k % nd == di).collect()
                } else {
                    vec![di % n]
                };
                let chunk = ex.len().div_ceil(owners.len());
                for (j, &k) in owners.iter().enumerate() {
                    let lo = (j * chunk).min(ex.len());
                    let hi = ((j + 1) * chunk).min(ex.len());
                    give(&mut buckets[k], d, &ex[lo..hi]);
                }
            }
        }
        Partition::Iid => {
            let mut all: Vec<(String, Example)> = per_domain
                .iter()
                .flat_map(|(d, ex)| ex.iter().map(move |e| (d.clone(), e.clone())))
                .collect();
            rng.shuffle(&mut all);
            for (i, (d, e)) in all.into_iter().enumerate() {
                give(&mut buckets[i % n], &d, std::slice::from_ref(&e));
            }
        }
        Partition::Dirichlet(alpha) => {
            for (d, ex) in &per_domain {
                let w: Vec<f64> = (0..n).map(|_| rng.gamma(alpha)).collect();
                let total: f64 = w.iter().sum();
                let mut start = 0usize;
                let mut acc = 0.0;
                for (k, wk) in w.iter().enumerate() {
                    acc += wk / total;
                    let end = if k + 1 == n {
                        ex.len()
                    } else {
                        ((acc * ex.len() as f64).round() as usize).clamp(start, ex.len())
                    };
                    give(&mut buckets[k], d, &ex[start..end]);
                    start = end;
                }
            }
        }
    }
    Ok(buckets
        .into_iter()
        .enumerate()
        .map(|(k, (ds, ex))| Client {
            id: k,
            label: if ds.is_empty() {
                "-".into()
            } else {
                ds.join("+")
            },
            examples: ex,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize, tag: u32) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                ids: vec![tag, i as u32],
                is_target: vec![false, true],
                domain: None,
            })
            .collect()
    }

    #[test]
    fn partitions_keep_every_example_once() {
        let data = vec![
            ("a".to_string(), examples(50, 1)),
            ("b".to_string(), examples(30, 2)),
            ("c".to_string(), examples(20, 3)),
        ];
        for (p, n) in [
            ("domain", 6),
            ("iid", 4),
            ("dirichlet:0.3", 5),
            ("dirichlet:10", 3),
        ] {
            let cfg = RunConfig {
                partition: p.parse().unwrap(),
                num_clients: n,
                sample_clients: 1,
                ..Default::default()
            };
            let clients = partition(&cfg, data.clone()).unwrap();
            assert_eq!(clients.len(), n);
            let mut all: Vec<Vec<u32>> = clients
                .iter()
                .flat_map(|c| c.examples.iter().map(|e| e.ids.clone()))
                .collect();
            all.sort();
            let mut want: Vec<Vec<u32>> = data
                .iter()
                .flat_map(|(_, e)| e.iter().map(|e| e.ids.clone()))
                .collect();
            want.sort();
            assert_eq!(all, want, "{p}");
            if p == "domain" && n == 6 {
                // Client k holds domain k mod 3 only.
                for c in &clients {
                    assert_eq!(c.label, ["a", "b", "c"][c.id % 3]);
                    assert!(c.examples.iter().all(|e| e.ids[0] == (c.id % 3) as u32 + 1));
                }
            }
            if p == "domain" && n == 2 {
                assert_eq!(
                    (clients[0].label.as_str(), clients[1].label.as_str()),
                    ("a+c", "b")
                );
            }
            // Same seed, same split.
            let again = partition(&cfg, data.clone()).unwrap();
            assert!(
                clients
                    .iter()
                    .zip(&again)
                    .all(|(x, y)| x.examples == y.examples)
            );
        }
    }

    #[test]
    fn client_sampling_is_seeded_and_exact() {
        use super::super::seeds::sample_round;
        let a = sample_round(1, 3, 10, 4);
        assert_eq!(a, sample_round(1, 3, 10, 4));
        assert_eq!(a.len(), 4);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&k| k < 10));
        // Different rounds sample differently somewhere.
        assert!((0..10).any(|r| sample_round(1, r, 10, 4) != a));
        assert_eq!(sample_round(1, 0, 3, 3), vec![0, 1, 2]);
    }
}
