"""Every supported model family through the same walker and compression code.

Tiny random-weight models of each family are built from configs (no hub): the layer-by-layer perplexity
must equal the model's own forward pass, SparseGPT on a Llama-family linear must equal the independent OBS
loop, and --true-sequential must change exactly the inputs of the later sub-groups. The built-in toy-llama
(trained, slow-marked) runs the whole pipeline.
"""

import copy
import json
import math

import pytest
import torch
from conftest import obs_loop
from family_helpers import FAMILIES, SEQLEN, VOCAB, tiny_model

import opt_mi
from miq.model import layerwalk, layouts
from miq.run import compress
from miq.run.config import RunConfig

CPU = torch.device("cpu")


def _tokens(n_windows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (1, SEQLEN * n_windows), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_dense_walker_equals_full_forward(model_type, attn):
    model = tiny_model(model_type, attn)
    tokens = _tokens(6)
    full = layerwalk.full_forward_perplexity(model, tokens, SEQLEN, CPU)
    for batch in (1, 4):  # the captured kwargs (batch one) must broadcast over a batch of windows
        walked = layerwalk.perplexity(model, tokens, SEQLEN, CPU, batch=batch)
        assert abs(walked - full) / full < 1e-4, (batch, walked, full)


def test_layers_get_their_own_kwargs():
    """Qwen2's sliding-window layer is passed another mask than layer 0: replaying layer 0's for every layer
    (what a walker capturing layer 0 only does) gives another perplexity."""
    model = tiny_model("qwen2")
    windows = layerwalk.eval_windows(_tokens(4), SEQLEN)
    inps, layer_kwargs = layerwalk.capture_inputs(model, windows, CPU)
    assert layer_kwargs[0]["attention_mask"] is None and layer_kwargs[1]["attention_mask"] is not None

    def ppl(kwargs):
        return float(torch.exp(layerwalk.window_losses(model, layerwalk.walk(model, inps, kwargs, CPU), windows,
                                                       CPU).mean()))

    full = layerwalk.full_forward_perplexity(model, layerwalk.eval_windows(_tokens(4), SEQLEN).reshape(1, -1),
                                             SEQLEN, CPU)
    assert ppl(layer_kwargs) == pytest.approx(full, rel=1e-5)
    assert abs(ppl([layer_kwargs[0]] * 2) - full) / full > 1e-3


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layout_names_every_linear_and_module(model_type):
    model = tiny_model(model_type)
    layout = layouts.of(model)
    for i, layer in enumerate(layout.decoder_layers(model)):
        assert set(layerwalk.find_linears(layer)) == set(layout.linear_names)
        assert layout.layer_prefix(i) + "self_attn.q_proj.weight" in model.state_dict()
    assert len(layout.embedding_modules(model)) == 2  # OPT: tokens + positions (no project_in at this width)
    assert layout.head_modules(model)[-1] is model.lm_head
    assert layout.default_plot_layer(model) in dict(model.named_modules())


def test_unsupported_model_type_is_named_with_the_supported_ones():
    with pytest.raises(layouts.UnsupportedModel, match=r"'gpt2'.*not OPT.*opt, llama, mistral, qwen2, qwen3"):
        layouts.for_type("gpt2")


def test_unsupported_model_is_one_line_and_exit_2(tmp_path, capsys):
    d = tmp_path / "neox"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt_neox"}')
    out = tmp_path / "r.json"
    assert opt_mi.main([str(d), "synthetic", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpt_neox" in err[0] and "supported: opt, llama, mistral, qwen2, qwen3" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# compression on a Llama-family model


def _config(**kw) -> RunConfig:
    return RunConfig(model="tiny", dataset="synthetic", seqlen=SEQLEN, analysis_dir="", **kw)


def _compress_recording(model, calib: torch.Tensor, cfg: RunConfig, monkeypatch) -> dict[str, tuple]:
    """Run compress_sparsegpt; return {linear name: (weights before, Hessian)} as each linear was compressed."""
    seen = {}
    real = compress.compress_linear

    def recording(name, g, *rest):
        seen[name] = (g.layer.weight.data.clone(), g.H.clone())
        return real(name, g, *rest)

    with monkeypatch.context() as m:
        m.setattr(compress, "compress_linear", recording)
        compress.compress_sparsegpt(model, calib, cfg, CPU)
    return seen


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.5, wbits=4)], ids=["50%", "50%+4bit"])
def test_sparsegpt_on_llama_equals_obs_loop(kw, monkeypatch):
    model = tiny_model("llama")
    calib = layerwalk.eval_windows(_tokens(8, seed=1), SEQLEN)
    seen = _compress_recording(model, calib, _config(**kw), monkeypatch)
    modules = dict(model.named_modules())
    assert len(seen) == 14  # 7 linears x 2 layers
    for name, (W0, H) in seen.items():
        ref = obs_loop(W0, H, sparsity=kw["sparsity"], bits=kw.get("wbits"))
        W = modules[name].weight.data
        assert torch.equal(W == 0, ref == 0), name
        assert (W.double() - ref).abs().max().item() <= 1e-4, name
    # the Hessian of layer 0's q_proj is 2/n sum x x^T of the normed token embeddings (n windows)
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(calib)).reshape(-1, 32).double()
    H = seen["model.layers.0.self_attn.q_proj"][1]
    assert torch.allclose(H.double(), 2 / len(calib) * x.T @ x, rtol=1e-4, atol=1e-4)


def _hessian_by_hand(model, calib: torch.Tensor, name: str) -> torch.Tensor:
    """2/n sum x x^T of the inputs of layer 0's linear ``name``, from a plain forward pass of the layer."""
    inps, layer_kwargs = layerwalk.capture_inputs(model, calib, CPU)
    xs = []
    layer = layouts.of(model).decoder_layers(model)[0]
    hook = layer.get_submodule(name).register_forward_hook(lambda m, inp, out: xs.append(inp[0].reshape(-1,
                                                                                                      inp[0].shape[-1])))
    with torch.no_grad():
        layerwalk.run_layer(layer, inps, layer_kwargs[0])
    hook.remove()
    x = torch.cat(xs).double()
    return 2 / len(calib) * x.T @ x


@pytest.mark.parametrize("model_type", ["opt", "llama", "qwen3"])
def test_true_sequential_feeds_later_subgroups_the_compressed_outputs(model_type, monkeypatch):
    """Sub-group k of layer 0 accumulates its Hessian from the layer with sub-groups < k already compressed
    (computed here by hand from a copy holding those compressed weights); the first sub-group sees the same
    inputs as without the flag, and the later ones do not."""
    model = tiny_model(model_type)
    calib = layerwalk.eval_windows(_tokens(8, seed=2), SEQLEN)
    default, seq_model = copy.deepcopy(model), copy.deepcopy(model)
    plain = _compress_recording(default, calib, _config(sparsity=0.5), monkeypatch)
    seq = _compress_recording(seq_model, calib, _config(sparsity=0.5, true_sequential=True), monkeypatch)
    layout = layouts.of(model)
    prefix = layout.layer_prefix(0)
    assert set(plain) == set(seq)
    first = layout.sequential[0]
    for n in first:
        assert torch.equal(seq[prefix + n][1], plain[prefix + n][1])
    hand = copy.deepcopy(model)
    compressed = dict(seq_model.named_modules())
    for k, group in enumerate(layout.sequential):
        for n in group:
            H = seq[prefix + n][1].double()
            assert torch.allclose(H, _hessian_by_hand(hand, calib, n), rtol=1e-4, atol=1e-3), n
            if k > 0:
                assert not torch.allclose(H, plain[prefix + n][1].double(), rtol=1e-3, atol=1e-3), n
        for n in group:  # from here on the hand copy holds this sub-group compressed
            hand.get_submodule(prefix + n).weight.data.copy_(compressed[prefix + n].weight.data)


# ----------------------------------------------------------------------------------------------------------
# the built-in toy-llama end to end

FAST = ["--nsamples", "16", "--seqlen", "64", "--analysis-dir", ""]


@pytest.fixture
def run(tmp_path, small_eval):
    """run(model, *flags, name=...): opt_mi.py in this process, evaluated on the session's small_eval (a tenth
    of the synthetic test text; the comparisons below hold on it); its JSON."""
    def run(model, *extra, name="r") -> dict:
        out = tmp_path / f"{name}.json"
        assert opt_mi.main([model, "synthetic", *FAST, "--eval", small_eval, "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())
    return run


def ppl(result: dict) -> float:
    """The run's one perplexity (it was evaluated on one set)."""
    (value,) = result["ppl"].values()
    return value


@pytest.mark.slow
def test_toy_llama_sparsegpt_beats_magnitude(toy_llama_path, run):
    dense = run(toy_llama_path, name="dense")
    sgpt = run(toy_llama_path, "--sparsity", "0.5", name="sgpt")
    mag = run(toy_llama_path, "--sparsity", "0.5", "--gmp", name="mag")
    d, s, m = (ppl(r) for r in (dense, sgpt, mag))
    assert d < s < m
    assert abs(sgpt["sparsity"] - 0.5) < 0.005 and abs(mag["sparsity"] - 0.5) < 0.005
    names = [r["name"] for r in sgpt["layers"]]
    assert len(names) == 14 and "model.layers.1.mlp.gate_proj" in names
    ts = run(toy_llama_path, "--sparsity", "0.5", "--true-sequential", name="ts")
    assert math.isfinite(ppl(ts)) and ts["ppl"] != sgpt["ppl"]
    assert [r["name"] for r in ts["layers"]] == names  # Llama's module order is its sub-groups' order


@pytest.mark.slow
def test_toy_llama_mi_path_seeded_saved_and_reloaded(toy_llama_path, run, tmp_path):
    flags = ["--sparsity", "0.5", "--wbits", "3.5", "--groups", "4"]
    a = run(toy_llama_path, *flags, "--save", str(tmp_path / "m"), name="a")
    b = run(toy_llama_path, *flags, name="b")
    assert a["method"] == "sparsegpt+mi-B" and math.isfinite(ppl(a))
    assert a["ppl"] == b["ppl"] and [r["labels"] for r in a["layers"]] == [r["labels"] for r in b["layers"]]
    for layer in a["layers"]:  # the budget is on kept weights: rows keep different counts under a 50% mask
        assert len(layer["group_sizes"]) == 4
        kept = layer["channels"] * layer["in_features"] - layer["pruned"]
        assert layer["code_bits"] <= 3.5 * kept + 1e-9 and layer["charged_code_bits"] == layer["code_bits"]
    again = run(str(tmp_path / "m"), name="again")
    assert ppl(again) == pytest.approx(ppl(a), rel=1e-6)


@pytest.mark.slow
def test_toy_llama_figures_show_the_middle_up_proj(toy_llama_path, tmp_path):
    out, an = tmp_path / "r.json", tmp_path / "an"
    assert opt_mi.main(["toy-llama", "synthetic", "--nsamples", "8", "--seqlen", "32", "--wbits", "4", "--groups",
                        "4", "--mi-samples", "256", "--analysis-dir", str(an), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["config"]["eval"] is None and list(r["ppl"]) == ["synthetic"]  # the toys' default eval set
    assert {p.rsplit("/", 1)[-1] for p in r["figures"]} == {"mi_matrix.png", "grouping_result.png"}
    assert r["config"]["model_path"] == toy_llama_path


def test_a_checkpoint_with_per_layer_rotary_frequencies_loads_whole(toy_llama_path, tmp_path):
    """Older Llama checkpoints store rotary_emb.inv_freq per layer: computed, not weights (transformers ignores
    them), so the model still loads whole; any other tensor the architecture lacks is refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from miq.errors import ModelError
    from miq.model import loading

    for extra, refused in [("model.layers.0.self_attn.rotary_emb.inv_freq", False), ("model.layers.9.mlp.w", True)]:
        d = tmp_path / extra
        shutil.copytree(toy_llama_path, d)
        w = load_file(str(d / "model.safetensors"))
        w[extra] = torch.ones(8)
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
        src, _ = loading.open_source(str(d))
        if refused:
            with pytest.raises(ModelError, match=f"tensor {extra} in model.safetensors belongs to no part"):
                loading.check_weights(src, loading.skeleton(src))
        else:
            loading.check_weights(src, loading.skeleton(src))
