#!/usr/bin/env python3
"""HF interoperability of `init-model` directories (run by tests/tests/model_io.rs).

Reads a JSON spec (argv[1]) written by the Rust test and checks, with transformers:

* every model directory in spec["models"] loads with AutoModelForCausalLM.from_pretrained
  without missing, unexpected or mismatched keys, in the expected dtype, and a forward pass
  on the spec's token ids gives finite logits of the right shape;
* spec["same_weights"] pairs of directories (single file vs sharded) hold identical state
  dicts;
* AutoTokenizer.from_pretrained gives, for every text, the ids the Rust tokenizer gave (with
  and without special tokens), decodes them back to the text, and reports the special ids;
* AutoConfig fields equal the expected ones;
* every directory in spec["resave"] is loaded with LlamaConfig.from_pretrained and saved
  with save_pretrained into DIR/resaved (the Rust test parses the result);
* for spec["probe"] tensors, the first values and the float64 sum of the loaded parameter are
  written to spec["out"] for the Rust side to compare with its own reader.

Prints one line per check and exits 1 if any check failed.
"""

import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
torch.set_num_threads(1)

FAILURES = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    out = {"probe": {}}
    loaded = {}

    for m in spec["models"]:
        d = m["dir"]
        model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
        bad.update({"error_msgs": info.get("error_msgs")} if info.get("error_msgs") else {})
        check(f"{m['name']}: loads without missing/unexpected/mismatched keys", not bad, str(bad))
        check(
            f"{m['name']}: dtype {m['dtype']}",
            model.dtype == DTYPES[m["dtype"]],
            str(model.dtype),
        )
        check(
            f"{m['name']}: tied embeddings {m['tied']}",
            (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
            == m["tied"],
        )
        ids = torch.tensor([spec["ids"][0]])
        with torch.no_grad():
            logits = model(ids).logits
        check(
            f"{m['name']}: forward gives finite logits",
            tuple(logits.shape) == (1, ids.shape[1], model.config.vocab_size)
            and bool(torch.isfinite(logits).all()),
            str(tuple(logits.shape)),
        )
        loaded[d] = model

    for a, b in spec.get("same_weights", []):
        sa, sb = loaded[a].state_dict(), loaded[b].state_dict()
        same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        check(f"same weights: {os.path.basename(a)} == {os.path.basename(b)}", same)

    first = spec["models"][0]["dir"]
    sd = loaded[first].state_dict()
    for name in spec["probe"]:
        t = sd[name].detach().to(torch.float64).flatten()
        out["probe"][name] = {
            "first": [float(x) for x in t[:16]],
            "sum": float(t.sum()),
            "numel": int(t.numel()),
        }

    tok = AutoTokenizer.from_pretrained(first)
    check("tokenizer: special ids", (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
          == tuple(spec["special_ids"]),
          str((tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)))
    mismatches = []
    for text, ids, ids_plain in zip(spec["texts"], spec["ids"], spec["ids_plain"]):
        got = tok(text)["input_ids"]
        got_plain = tok(text, add_special_tokens=False)["input_ids"]
        # texts holding special-token strings decode back only with the specials kept
        back = tok.decode(got_plain, skip_special_tokens=False)
        back_skip = tok.decode(got, skip_special_tokens=True)
        if "<s>" in text or "</s>" in text:
            back_skip = text
        if got != ids or got_plain != ids_plain or back != text or back_skip != text:
            mismatches.append({"text": text, "hf": got, "rust": ids, "hf_plain": got_plain,
                               "decoded": back})
    check(f"tokenizer: ids of {len(spec['texts'])} texts equal", not mismatches,
          json.dumps(mismatches[:2], ensure_ascii=False))

    cfg = AutoConfig.from_pretrained(first)
    diffs = {}
    for key, want in spec["config"].items():
        got = getattr(cfg, key)
        if isinstance(want, float):
            ok = isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-12)
        else:
            ok = got == want
        if not ok:
            diffs[key] = (got, want)
    rp = cfg.rope_parameters or {}
    if not math.isclose(rp.get("rope_theta", float("nan")), spec["rope_theta"]):
        diffs["rope_parameters.rope_theta"] = (rp.get("rope_theta"), spec["rope_theta"])
    check("config fields", not diffs, str(diffs))

    for d in spec.get("resave", []):
        c = LlamaConfig.from_pretrained(d)
        c.save_pretrained(os.path.join(d, "resaved"))
        check(f"config resaved: {os.path.basename(d)}", True, json.dumps(c.rope_parameters))

    with open(spec["out"], "w") as f:
        json.dump(out, f)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed: {FAILURES}")
        sys.exit(1)
    print("all model interop checks passed")


if __name__ == "__main__":
    main()
