//! The ready-made sweep files in `experiments/` stay runnable: each loads, names only known
//! keys, and expands into valid run configs with distinct run directories per seed.

use std::collections::HashSet;
use std::path::Path;

use fedcdd_host::fl::sweep::SweepSpec;

#[test]
fn every_sweep_file_expands_into_valid_runs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        files += 1;
        let spec = SweepSpec::load(Some(&path), &[], &[], None)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let points = spec
            .points()
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert!(
            points.len() >= 2,
            "{}: {} points",
            path.display(),
            points.len()
        );
        for p in &points {
            p.cfg
                .validate()
                .unwrap_or_else(|e| panic!("{}: {:?}: {e:#}", path.display(), p.values));
        }
        // Two seeds of one grid point never share a run directory.
        let ids: HashSet<(&str, u64)> = points.iter().map(|p| (p.id.as_str(), p.seed)).collect();
        let dirs: HashSet<&str> = points.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), dirs.len(), "{}", path.display());
    }
    assert!(files >= 7, "only {files} sweep files in {}", dir.display());
}
