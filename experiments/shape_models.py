"""LLaMA-shaped checkpoints with random weights, written layer by layer (never more than one in memory).

The streaming benchmark (``bench_streaming.py``) prunes these from disk. Their weights are random
(normal, std 0.02; norms 1), so only cost is measured, never quality. Every shape uses the default
model's tokenizer (SmolLM2, vocabulary 49,152), so calibration is real C4 text; the 7B shape thus
has 6.87B parameters (LLaMA-7B's 6.74B with a 32,000 vocabulary), 27.5 GB in float32.

A folder is complete when ``model.safetensors.index.json`` exists (``prunelab.io.shards`` writes it
last) and ``shape.json`` records the shape and seed it was written with; anything else is written
again. Usage::

    python experiments/shape_models.py 7b --root /tmp/prunelab-shapes
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("shape_models")

# name -> LlamaConfig fields; vocab_size comes from the tokenizer
SHAPES: dict[str, dict[str, int | bool]] = {
    # SmolLM2-135M: d=576, MLP 1536, 30 layers, 9 heads / 3 KV heads, tied embeddings
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True),
    # TinyLlama-1.1B: d=2048, MLP 5632, 22 layers, 32 heads / 4 KV heads
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, tie_word_embeddings=False),
    # LLaMA-7B (Touvron et al. 2023): d=4096, MLP 11008, 32 layers, 32 heads
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, tie_word_embeddings=False),
    # LLaMA-7B's width at depth 2 (3.2 GB): the 7B per-layer peak in minutes rather than the full 32 layers
    "7b-2l": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                  num_key_value_heads=32, tie_word_embeddings=False),
}
SHAPE_FILE = "shape.json"


def tokenizer_folder(cache_dir: str) -> Path:
    """The default model's converted folder (its tokenizer is copied into every shape)."""
    from omegaconf import OmegaConf

    from prunelab.models.loading import prepare_gguf_model

    model_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "prunelab" / "conf" / "model" / "smollm2-135m.yaml"))
    return prepare_gguf_model(model_cfg, cache_dir).folder


def is_complete(folder: Path, name: str, seed: int) -> bool:
    from prunelab.io.shards import INDEX, ShardError, ShardReader

    record = folder / SHAPE_FILE
    if not (folder / INDEX).is_file() or not record.is_file():
        return False
    if json.loads(record.read_text()) != {"shape": name, "fields": SHAPES[name], "seed": seed}:
        return False
    try:
        ShardReader(folder)  # every shard the index names is there
    except ShardError:
        return False
    return True


@torch.no_grad()
def write_shape(name: str, root: Path, cache_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write (or find complete) the ``name`` shape under ``root/<name>``; returns the folder."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunelab.io.shards import ShardWriter
    from prunelab.progress import progress

    folder = root / f"llama-{name}-random"
    if is_complete(folder, name, seed):
        log.info("%s is complete (index and shape record match); reusing it", folder)
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished or different earlier write, inside the benchmark's root
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(cache_dir))
    config = LlamaConfig(**SHAPES[name], vocab_size=len(tokenizer), max_position_embeddings=2048, dtype=dtype)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    state = skeleton.state_dict()  # names and shapes only (meta)
    layers = config.num_hidden_layers
    groups: list[list[str]] = [[k for k in state if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([k for k in state if not k.startswith("model.layers.") and not (config.tie_word_embeddings and k == "lm_head.weight")])
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, len(groups))
    start = time.perf_counter()
    for group in progress(groups, desc=f"write llama-{name} (random weights)", unit="shard"):
        tensors = {}
        for key in group:
            shape = tuple(state[key].shape)
            tensors[key] = torch.ones(shape, dtype=dtype) if key.endswith("norm.weight") else \
                torch.randn(shape, generator=generator, dtype=dtype).mul_(0.02)
        writer.write(tensors)
        del tensors
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / SHAPE_FILE).write_text(json.dumps({"shape": name, "fields": SHAPES[name], "seed": seed}))
    writer.finish()
    log.info("wrote %s: %.1f GB in %.0f s", folder, writer.bytes_written / 1e9, time.perf_counter() - start)
    return folder


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--root", type=Path, default=Path("/tmp/prunelab-shapes"))
    parser.add_argument("--cache-dir", default=os.environ.get("PRUNELAB_CACHE", str(Path.home() / ".cache" / "prunelab")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in args.shapes:
        write_shape(name, args.root, args.cache_dir, args.seed)


if __name__ == "__main__":
    main()
