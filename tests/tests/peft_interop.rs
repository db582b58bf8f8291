//! PEFT interoperability: runs `tests/interop/peft_check.py`, which builds a tiny LLaMA with
//! PEFT LoRA adapters (no download), aggregates them with the `fedcdd` binary, checks the
//! results against numpy references and loads them back with `PeftModel.from_pretrained`.
//!
//! Needs `python3` (or `$FEDCDD_PYTHON`) with torch, transformers, peft, safetensors and
//! numpy; without them the test prints a `SKIPPED:` line and passes.

mod python_util;
use python_util::{PY_ENV, python, python_has_modules};

mod cli_util;

use std::process::Command;

use cli_util::{TempDir, fedcdd_bin, workspace_root};

#[test]
fn peft_adapters_roundtrip_through_fedcdd() {
    if let Err(why) = python_has_modules("torch, transformers, peft, safetensors, numpy") {
        println!(
            "SKIPPED: peft interop needs python3 with torch, transformers, peft, safetensors and \
             numpy ({why})"
        );
        return;
    }
    let bin = fedcdd_bin();
    let work = TempDir::new("peft");
    let script = workspace_root().join("tests/interop/peft_check.py");
    let out = Command::new(python())
        .arg(&script)
        .arg("--fedcdd")
        .arg(bin)
        .arg("--work")
        .arg(work.path())
        .envs(PY_ENV)
        .output()
        .expect("cannot run the PEFT interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        script.display(),
        out.status
    );
    assert!(
        stdout.contains("all PEFT interop checks passed"),
        "the script did not report success:\n{stdout}\n{stderr}"
    );
}
