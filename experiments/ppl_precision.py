"""How far a float32 token loss reads from the float64 one prunelab sums (README, "Evaluation presets").

Scores the default model's first WikiText-2 windows twice on the same logits: with prunelab's
perplexity (float64 losses) and with a float32 ``cross_entropy`` as prunelab did until cf4a162.

    python experiments/ppl_precision.py --windows 2
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from prunelab.cli import CONFIG_DIR
from prunelab.data import sources
from prunelab.data.tokens import eval_stream
from prunelab.device import device_info
from prunelab.eval.perplexity import perplexity
from prunelab.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config")
    model, tokenizer = load_model(cfg.model, torch.device("cpu"), cfg.cache_dir)
    stream = eval_stream(sources.eval_source("wikitext2", cfg.data_root), tokenizer, args.seqlen)
    exact = perplexity(model, stream, args.seqlen, args.windows, progress=False)["ppl"]
    float32 = []
    with torch.inference_mode():
        for window in stream.ids[0, : args.windows * args.seqlen].view(args.windows, args.seqlen):
            logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
            float32.append(F.cross_entropy(logits, window[1:], reduction="none").mean().item())
    old = math.exp(sum(float32) / len(float32))
    print(f"float64 losses {exact:.6f}  float32 losses {old:.6f}  relative {old / exact - 1:+.2e}  "
          f"({args.windows} windows of {args.seqlen}; {device_info(torch.device('cpu'))['cpu_capability']})")


if __name__ == "__main__":
    main()
