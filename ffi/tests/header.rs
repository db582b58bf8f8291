//! The committed header `ffi/include/fedcdd.h` must be exactly what cbindgen generates from
//! the crate now. The build never writes it; after an API change, regenerate it on purpose:
//! `FEDCDD_BLESS=1 cargo test -p fedcdd-ffi --test header`.

use std::path::Path;

#[test]
fn committed_header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("ffi/cbindgen.toml is readable and valid");
    let bindings = cbindgen::Builder::new()
        // The sources alone (following `mod` declarations): no `cargo metadata`, so the
        // test needs no network and no other workspace crate.
        .with_src(crate_dir.join("src/lib.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen can generate the header from ffi/src");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("the generated header is UTF-8");

    let path = crate_dir.join("include/fedcdd.h");
    if std::env::var_os("FEDCDD_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("can write ffi/include/fedcdd.h");
        println!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || committed.lines().count().min(fresh.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "{} is stale: it differs from cbindgen's output from line {line} on \
             (committed: {:?}, fresh: {:?}).\nRegenerate it with \
             `FEDCDD_BLESS=1 cargo test -p fedcdd-ffi --test header` and commit it.",
            path.display(),
            committed.lines().nth(line - 1).unwrap_or("<end of file>"),
            fresh.lines().nth(line - 1).unwrap_or("<end of file>"),
        );
    }
}
