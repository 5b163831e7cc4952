"""Typed configs: the runner converts the composed config once, and the library reads dataclasses.

Facts checked independently of the conversion code: the schema's own dataclass defaults, the
values given on the command line, and what a spy sees arrive at the library's entry points.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from prunelab.cli import CONFIG_DIR
from prunelab.config import schema
from prunelab.config.typed import run_config, typed


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_block_of_the_run_config_is_its_schema_dataclass():
    cfg = _compose("method=wanda", "finetune=lora", "finetune.lora.r=4", "schedule=iterative", "cache_dir=/tmp/x")
    conf = run_config(cfg)
    assert isinstance(conf, schema.PrunelabConfig)
    for field in dataclasses.fields(schema.PrunelabConfig):
        value = getattr(conf, field.name)
        kind = schema._DATACLASSES.get(field.type if isinstance(field.type, str) else "")
        if kind is not None:
            assert type(value) is kind, field.name
    assert isinstance(conf.finetune.lora, schema.LoraConfig) and conf.finetune.lora.r == 4
    assert conf.method.name == "wanda" and conf.schedule.name == "iterative"
    assert isinstance(conf.eval.perplexity, schema.PerplexityConfig)


def test_a_mapping_takes_the_schemas_defaults_for_what_it_lacks():
    got = typed(schema.FinetuneConfig, {"lr": 1e-3, "lora": {"r": 2}}, "finetune")
    expected = schema.FinetuneConfig(lr=1e-3, lora=schema.LoraConfig(r=2))
    assert got == expected
    assert typed(schema.FinetuneConfig, None, "finetune") == schema.FinetuneConfig()
    same = schema.ScheduleConfig(rounds=5)
    assert typed(schema.ScheduleConfig, same, "schedule") is same  # typed objects pass through untouched
    node = OmegaConf.create({"rounds": 5})
    assert typed(schema.ScheduleConfig, node, "schedule") == same  # a DictConfig converts the same way


@pytest.mark.parametrize(
    ("cls", "value", "needle"),
    [
        (schema.FinetuneConfig, {"lrr": 1e-3}, "finetune.lrr is not a finetune setting"),
        (schema.FinetuneConfig, {"seqlen": "long"}, "finetune: Value 'long'"),
        (schema.FinetuneConfig, {"lora": {"rank": 4}}, "finetune: Key 'rank' not in 'LoraConfig'"),
        (schema.PruneEngineConfig, {"sequentail": True}, "prune.sequentail is not a prune setting"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused_in_one_line(cls, value, needle):
    key = "prune" if cls is schema.PruneEngineConfig else "finetune"
    with pytest.raises(ValueError) as err:
        typed(cls, value, key)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_runner_hands_the_library_typed_blocks(monkeypatch, tmp_path, tiny_hf_dir, data_root):
    """A fine-tuned pruning run: the trainer, the engine, calibration and the logger get dataclasses."""
    from prunelab import runner
    from prunelab.data import calibration
    from prunelab.prune import engine
    from prunelab.train import loop

    seen: dict[str, type] = {}

    def spy(module, name, position, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[key] = type(args[position] if len(args) > position else kwargs[key])
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(loop, "train", 2, "cfg")
    spy(engine, "prune_model", 5, "allocation")
    spy(calibration, "get_calibration", 1, "calib_cfg")
    cfg = _compose("model=hf", f"model.path={tiny_hf_dir}", "logger=none", "method=wanda", "finetune=masked",
                   "finetune.seqlen=32", "finetune.max_steps=2", "eval.perplexity.seqlen=32",
                   "eval.perplexity.max_windows=1", "calib.nsamples=2", "calib.seqlen=32",
                   f"data_root={data_root}", f"cache_dir={tmp_path / 'cache'}")
    payload = runner.run(cfg, tmp_path / "run")
    assert seen == {"cfg": schema.FinetuneConfig, "allocation": schema.AllocationConfig,
                    "calib_cfg": schema.CalibConfig}
    assert payload["metrics"]["finetune"]["steps"] == 2
    assert torch.isfinite(torch.tensor(payload["metrics"]["perplexity"]["wikitext2"]["ppl"]))


def test_a_block_of_the_composed_config_resolves_its_interpolations_against_that_config():
    cfg = _compose("device=cpu", "model=hf", "model.path=some-org/some-model")
    assert typed(schema.PruneEngineConfig, cfg.prune, "prune").device == "cpu"  # prune.device: ${device}
    assert typed(schema.ModelConfig, cfg.model, "model").name == "some-org/some-model"  # name: ${model.path}
