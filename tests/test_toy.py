"""Tests for the built-in toy model: loading, tokenizer conventions, quality, determinism, caching."""

import dataclasses
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from datautils import get_eval_tokens
from miq.model import toy
from miq.model.toy_specs import LLAMA_TOY
from miq.synthetic import synthetic_text

# Measured here (torch 2.13 CPU): the held-out perplexity on synthetic_text("test") is 73.3 (toy) and 69.4
# (toy-llama). The bound leaves ~20% for other CPUs / torch builds and is still far below the vocabulary
# (1,876 tokens), a unigram model of the corpus (313) and an interpolated bigram model (~150).
HELDOUT_PPL_MAX = 90.0
# Measured: zeroing the smaller half of each decoder linear layer's weights raises it by ~12%.
MAGNITUDE_50_MIN_RATIO = 1.05


@pytest.fixture(scope="session")
def toy_dir() -> str:
    return toy.toy_model_path()  # the real cached toy: built once (~25 s), then reused


@pytest.fixture(scope="session")
def loaded(toy_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(toy_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(toy_dir)


def test_folder_and_config(toy_dir):
    folder = Path(toy_dir)
    assert folder.name == toy.OPT_TOY.version
    for name in (*toy.MODEL_FILES, "TOY.md"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "opt" and config["architectures"] == ["OPTForCausalLM"]
    assert config["do_layer_norm_before"] and config["dropout"] == 0.0
    assert config["max_position_embeddings"] == toy.OPT_TOY.seqlen
    facts = json.loads((folder / "TOY.json").read_text())
    assert {k: facts[k] for k in toy.OPT_TOY.recipe()} == toy.OPT_TOY.recipe()
    assert facts["vocab_size"] == config["vocab_size"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["ffn_dim"]) == (
        toy.OPT_TOY.layers, toy.OPT_TOY.hidden, toy.OPT_TOY.ffn)


def test_tokenizer_follows_opt(loaded):
    model, tok = loaded
    assert type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("</s>", "</s>", "<pad>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) == (1, 2, 3) == (
        model.config.pad_token_id, model.config.bos_token_id, 3)
    ids = tok("the chil, was thutitous.").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.unk_token_id not in ids
    # Arbitrary text still tokenizes: case folds, unknown words become <unk>.
    assert tok("The Quokka 42!").input_ids == [2, tok.convert_tokens_to_ids("the"), 3, 3,
                                                tok.convert_tokens_to_ids("!")]
    assert len(tok) == model.config.vocab_size


def test_heldout_perplexity(loaded, toy_dir):
    model, tok = loaded
    ids = get_eval_tokens("synthetic", toy.OPT_TOY.seqlen, tok)
    assert ids.shape[1] > 20_000 and not (ids == tok.unk_token_id).any()
    ppl = toy.window_perplexity(model, ids)
    recorded = json.loads((Path(toy_dir) / "TOY.json").read_text())["heldout_ppl"]
    assert ppl == pytest.approx(recorded, rel=1e-3)  # the saved weights are the trained ones
    assert ppl < HELDOUT_PPL_MAX, ppl
    with torch.no_grad():
        loss = model(ids[:, :128], labels=ids[:, :128]).loss
    assert math.isfinite(loss) and loss < math.log(len(tok)) - 1


def test_pruning_half_the_weights_hurts(loaded):
    """Trained weights, not noise: zeroing the smaller half of each linear layer costs perplexity."""
    model, tok = loaded
    ids = get_eval_tokens("synthetic", toy.OPT_TOY.seqlen, tok)[:, : 64 * toy.OPT_TOY.seqlen]
    dense = toy.window_perplexity(model, ids)
    pruned = type(model)(model.config)
    pruned.load_state_dict(model.state_dict())
    pruned.eval()
    with torch.no_grad():
        for layer in pruned.model.decoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.out_proj, layer.fc1, layer.fc2):
                w = lin.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    assert toy.window_perplexity(pruned, ids) > MAGNITUDE_50_MIN_RATIO * dense


@pytest.mark.slow  # three toy builds each (30 s CPU and more): end to end
@pytest.mark.parametrize("name,layer", [("toy", "model.decoder.layers.0.fc1.weight"),
                                        ("toy-llama", "model.layers.0.mlp.up_proj.weight")])
def test_build_is_deterministic(tmp_path, name, layer):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    facts_a = toy.build_toy(str(a), steps=8, seed=1, name=name)  # few steps: determinism, not quality, is tested
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 3)  # the machine's thread count does not matter
    try:
        facts_b = toy.build_toy(str(b), steps=8, seed=1, name=name)
        assert torch.get_num_threads() == (1 if threads > 1 else 3)  # given back as it was
    finally:
        torch.set_num_threads(threads)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert facts_a["heldout_ppl"] == facts_b["heldout_ppl"]
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    toy.build_toy(str(tmp_path / "c"), steps=2, seed=2, name=name)
    wc = load_file(tmp_path / "c" / "model.safetensors")
    assert not torch.equal(wa[layer], wc[layer])


def test_opt_toy_recipe_is_unchanged():
    """The OPT toy's recipe keys and values are those its cached folders were built with: a change would
    rebuild every cached toy and change every recorded toy result."""
    assert {k: v for k, v in toy.OPT_TOY.recipe().items() if k != "corpus_sha256"} == {
        "version": "toy-opt-v1", "layers": 2, "hidden": 64, "heads": 4, "ffn_dim": 256, "seqlen": 128,
        "steps": 1000, "batch": 8, "lr": 3e-3, "warmup": 100, "seed": 0}


def test_toy_llama_layout_and_quality(toy_llama_path, toy_dir):
    """The Llama toy: grouped-query attention, gated SiLU MLP, RMSNorm, tied embeddings; trained (held-out
    perplexity far below the unigram model's 313) with the OPT toy's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(toy_llama_path)
    assert folder.name == LLAMA_TOY.version
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"] and config["hidden_act"] == "silu"
    assert config["tie_word_embeddings"] and config["max_position_embeddings"] == LLAMA_TOY.seqlen
    facts = json.loads((folder / "TOY.json").read_text())
    assert {k: facts[k] for k in LLAMA_TOY.recipe()} == LLAMA_TOY.recipe()
    assert (folder / "tokenizer.json").read_text() == (Path(toy_dir) / "tokenizer.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(toy_llama_path).eval()
    ids = get_eval_tokens("synthetic", LLAMA_TOY.seqlen, AutoTokenizer.from_pretrained(toy_llama_path))
    ppl = toy.window_perplexity(model, ids[:, : 64 * LLAMA_TOY.seqlen])
    assert ppl < HELDOUT_PPL_MAX, ppl


@pytest.mark.slow  # two toy builds
def test_cache_is_atomic_reused_and_rebuilt_when_outdated(tmp_path, monkeypatch):
    # the machinery, not the quality, is under test here
    monkeypatch.setitem(toy.TOYS, "toy", dataclasses.replace(toy.OPT_TOY, steps=1))
    stale = tmp_path / f".{toy.OPT_TOY.version}.tmp-killed"  # what a killed build leaves
    stale.mkdir()
    half = tmp_path / toy.OPT_TOY.version  # a folder that is not a complete toy (not written by us)
    half.mkdir()
    (half / "config.json").write_text("{}")
    path = toy.toy_model_path(str(tmp_path))
    assert path == str(half) and all((half / f).is_file() for f in toy.MODEL_FILES)
    assert {p.name for p in tmp_path.iterdir()} == {toy.OPT_TOY.version, stale.name}  # our temp dir is gone
    built = (half / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a current cached toy")

    with monkeypatch.context() as m:
        m.setattr(toy, "build_toy", no_rebuild)
        assert toy.toy_model_path(str(tmp_path)) == path
        m.setenv("MIQ_CACHE_DIR", str(tmp_path))
        assert toy.toy_model_path() == path
    # Another recipe (here: steps) makes the cached folder outdated: it is rebuilt in place.
    monkeypatch.setitem(toy.TOYS, "toy", dataclasses.replace(toy.OPT_TOY, steps=2))
    assert toy.toy_model_path(str(tmp_path)) == path
    assert json.loads((half / "TOY.json").read_text())["steps"] == 2
    assert (half / "model.safetensors").stat().st_mtime_ns != built
    assert {p.name for p in tmp_path.iterdir()} == {toy.OPT_TOY.version, stale.name}


def test_processes_starting_together_build_the_toy_once(tmp_path, monkeypatch):
    """Two callers on an empty cache (the suite's workers, a sweep's jobs on a fresh machine): one trains the
    toy, the other waits for it and gets the same folder."""
    monkeypatch.setitem(toy.TOYS, "toy", dataclasses.replace(toy.OPT_TOY, steps=1))
    builds, real_build = [], toy.build_toy

    def slow_build(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough that the other caller arrives during the build
        return real_build(*args, **kwargs)

    monkeypatch.setattr(toy, "build_toy", slow_build)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: toy.toy_model_path(str(tmp_path)), range(2)))
    assert len(builds) == 1 and paths[0] == paths[1]
    assert all((Path(paths[0]) / f).is_file() for f in toy.MODEL_FILES)


def test_corpus_is_the_training_text():
    # The toy is trained on the same text the 'synthetic' dataset calibrates on.
    tok = toy.build_tokenizer()
    assert not (tok(synthetic_text("train"), return_tensors="pt").input_ids == tok.unk_token_id).any()
