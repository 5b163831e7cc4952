"""Real offline text: token counts, calibration determinism and disjointness, clear errors."""

from __future__ import annotations

import hashlib

import pytest
import torch

from prunelab.data import sources
from prunelab.data.calibration import CalibrationError, get_calibration, sample_windows
from prunelab.data.tokens import eval_stream


def test_wikitext2_join_matches_the_published_checksum(data_root):
    source = sources.wikitext2_test(data_root)
    joined = "\n\n".join(source.documents)
    assert len(source.documents) == 4358 and len(joined) == 1_294_336
    assert hashlib.sha256(joined.encode()).hexdigest() == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_wikitext2_stream_has_304986_smollm2_tokens(data_root, default_tokenizer):
    stream = eval_stream(sources.wikitext2_test(data_root), default_tokenizer, 2048)
    assert stream.numel == 304_986
    assert stream.numel // 2048 == 148


def test_c4_eval_stream_is_truncated_to_256_windows(data_root, default_tokenizer):
    stream = eval_stream(sources.c4_eval(data_root), default_tokenizer, 128)
    assert stream.numel == 256 * 128


def test_c4_calibration_and_evaluation_documents_are_disjoint(data_root):
    evaluation = sources.c4_eval(data_root).documents
    calibration = sources.c4_calibration(data_root).documents
    assert len(evaluation) == 1100 and len(calibration) == 900
    assert not set(evaluation) & set(calibration)


def _calib(tokenizer, data_root, cache, **overrides):
    cfg = {"source": "c4", "nsamples": 8, "seqlen": 256, "seed": 0, **overrides}
    return get_calibration(tokenizer, cfg, data_root, cache)


def test_same_seed_same_windows_different_seed_different(data_root, default_tokenizer, tmp_path):
    first, record = _calib(default_tokenizer, data_root, tmp_path / "a")
    again, _ = _calib(default_tokenizer, data_root, tmp_path / "b")  # separate cache: sampled anew
    other, _ = _calib(default_tokenizer, data_root, tmp_path / "c", seed=1)
    assert first.shape == (8, 256) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert record["nsamples"] == 8 and record["seqlen"] == 256


def test_calibration_windows_are_real_slices_of_calibration_documents(data_root, default_tokenizer, tmp_path):
    windows, _ = _calib(default_tokenizer, data_root, tmp_path, nsamples=4)
    docs = [default_tokenizer(d).input_ids for d in sources.c4_calibration(data_root).documents]
    for window in windows.tolist():
        assert any(
            len(doc) > 256 and any(doc[i : i + 256] == window for i in range(len(doc) - 256)) for doc in docs
        ), "every window must be a contiguous slice of a calibration document longer than seqlen"


def test_calibration_cache_is_keyed_by_settings(data_root, default_tokenizer, tmp_path):
    _calib(default_tokenizer, data_root, tmp_path)
    _calib(default_tokenizer, data_root, tmp_path, seed=3)
    _calib(default_tokenizer, data_root, tmp_path)  # hit
    assert len(list((tmp_path / "calib").glob("*.pt"))) == 2


def test_no_document_long_enough_is_a_clear_error(default_tokenizer):
    tiny = sources.TextSource("c4-calib", ["short text"] * 3, "test", "three short documents")
    with pytest.raises(CalibrationError, match="lower calib.seqlen"):
        sample_windows(tiny, default_tokenizer, nsamples=1, seqlen=64, seed=0)


def test_missing_data_and_no_hub_names_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sources.DataUnavailableError, match="PRUNELAB_DATA"):
        sources.wikitext2_test(tmp_path)
    with pytest.raises(sources.DataUnavailableError, match="PRUNELAB_DATA"):
        sources.check_available("c4", None)
