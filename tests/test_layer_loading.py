"""--load layers against --load whole: the same numbers and the same saved bytes, with at most two decoder
layers' weights in host memory at any time.

The toys (OPT, Llama) and a 12-layer random Llama saved here as sharded safetensors (an index and several
shard files, some holding a few layers, the embeddings one of their own) go through opt_mi.py twice, once
per --load; every perplexity, record and saved file must be equal bit for bit. Residency is counted on the
model itself: after every read of the loader and before every decoder layer's forward, the decoder layers
holding any parameter or buffer off the meta device.
"""

import json
import shutil
import weakref

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import opt_mi
from miq.checkpoint import stream
from miq.model import layouts, loading, onload, toy

FAST = ["--nsamples", "8", "--seqlen", "32", "--analysis-dir", ""]
LAYERS = 12


@pytest.fixture(scope="session")
def sharded(tmp_path_factory) -> str:
    """A 12-layer Llama (hidden 32, grouped-query attention, untied head) with random weights, saved as
    sharded safetensors with the toys' tokenizer."""
    folder = tmp_path_factory.mktemp("sharded") / "llama12"
    tokenizer = toy.build_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
                                      pad_token_id=1, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run(model: str, tmp_path, load: str, *flags: str) -> tuple[dict, object]:
    out = tmp_path / f"{load}.json"
    save = tmp_path / f"saved-{load}"
    assert opt_mi.main([model, "synthetic", *FAST, "--json", str(out), "--save", str(save), "--load", load,
                        *flags]) == 0
    return json.loads(out.read_text()), save


def _without_timing(layers: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timing"} for r in layers]


def _same_folders(a, b) -> None:
    """Every file byte for byte; the packed manifest's copy of the run's flags differs by --load, --save and
    --json only, so it is compared without them (and the marker, which hashes it, is left out)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "miq_save.json":
            continue
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name == "quantization.json" and b'"run"' in x:
            x, y = json.loads(x), json.loads(y)
            for flag in ("load", "save", "json"):
                x["run"].pop(flag), y["run"].pop(flag)
        assert x == y, name


def _same_runs(model: str, tmp_path, *flags: str) -> dict:
    lazy, lazy_dir = _run(model, tmp_path, "layers", *flags)
    whole, whole_dir = _run(model, tmp_path, "whole", *flags)
    assert lazy["config"]["load"] == "layers" and whole["config"]["load"] == "whole"
    for key in ("ppl", "sparsity", "zero_fraction", "bits"):
        assert lazy[key] == whole[key], key
    assert _without_timing(lazy["layers"]) == _without_timing(whole["layers"])
    _same_folders(lazy_dir, whole_dir)
    return lazy


@pytest.mark.slow
@pytest.mark.parametrize(("model", "flags"), [
    ("toy", ["--sparsity", "0.5", "--wbits", "4"]),
    ("toy-llama", ["--sparsity", "0.5", "--wbits", "3.5", "--groups", "4", "--mi-samples", "256"]),
    ("toy", ["--gmp", "--sparsity", "0.5", "--wbits", "4", "--save-format", "compressed-tensors"]),
    ("toy-llama", ["--wbits", "4", "--save-format", "dense"]),
    ("toy-llama", ["--sparsity", "0.5", "--wbits", "4", "--dtype", "bfloat16"]),
], ids=["opt-sparsegpt-packed", "llama-mi-packed", "opt-gmp-ct", "llama-rtn-dense", "llama-bf16"])
def test_toys_identical_to_whole_loading(model, flags, tmp_path):
    r = _same_runs(model, tmp_path, *flags)
    assert r["layers"] and all(v is not None for v in r["ppl"].values())


class Residency:
    """Records, on the model loaded layer by layer, how many decoder layers hold weights: after every read
    of its loader and on entry to every decoder layer's forward."""

    def __init__(self, monkeypatch):
        self.counts: list[int] = []
        self.reads: dict[int, int] = {}  # decoder layer -> times read (from the checkpoint or the Store)
        self.models: list = []
        real_lazy, real_load = loading.load_lazily, onload.Onloader.load

        def load_lazily(*args, **kwargs):
            model = real_lazy(*args, **kwargs)
            self.models.append(model)
            for layer in layouts.of(model).decoder_layers(model):
                layer.register_forward_pre_hook(lambda m, a: self.counts.append(self.resident()))
            return model

        def load(o, names, layer=None):
            real_load(o, names, layer)
            if layer is not None:
                self.reads[layer] = self.reads.get(layer, 0) + 1
            self.counts.append(self.resident())

        monkeypatch.setattr(loading, "load_lazily", load_lazily)
        monkeypatch.setattr(onload.Onloader, "load", load)

    def resident(self) -> int:
        model = self.models[-1]
        return sum(any(t.device.type != "meta" for t in [*m.parameters(), *m.buffers()])
                   for m in layouts.of(model).decoder_layers(model))


@pytest.mark.slow
def test_twelve_sharded_layers_identical_and_at_most_two_resident(sharded, tmp_path, monkeypatch, small_eval):
    assert len(onload.checkpoint_files(sharded)) and len(set(onload.checkpoint_files(sharded).values())) > 3
    seen = Residency(monkeypatch)
    flags = ["--sparsity", "0.5", "--wbits", "4", "--eval", small_eval]
    r = _same_runs(sharded, tmp_path, *flags)
    assert len(r["layers"]) == 7 * LAYERS
    # compression read each layer from the shards, evaluation from the compressed layers' files
    assert seen.reads == dict.fromkeys(range(LAYERS), 2)
    assert max(seen.counts) <= 2 and max(seen.counts) >= 1 and len(seen.counts) > 4 * LAYERS
    assert seen.resident() == 0  # all released at the end


def test_a_dense_run_reads_each_layer_once(sharded, tmp_path, monkeypatch, small_eval):
    seen = Residency(monkeypatch)
    lazy, _ = _run(sharded, tmp_path, "layers", "--eval", small_eval)
    whole, _ = _run(sharded, tmp_path, "whole", "--eval", small_eval)
    assert lazy["ppl"] == whole["ppl"]
    assert seen.reads == dict.fromkeys(range(LAYERS), 1) and max(seen.counts) == 1


def test_pickled_weights_load_whole(toy_path, tmp_path):
    """A .bin checkpoint has no per-tensor reads: --load layers falls back to from_pretrained."""
    folder = tmp_path / "bin"
    shutil.copytree(toy_path, folder)
    (folder / "model.safetensors").unlink()
    torch.save(load_file(f"{toy_path}/model.safetensors"), folder / "pytorch_model.bin")
    src, _ = loading.open_source(str(folder))
    model = loading.load_model(src, "auto", torch.device("cpu"), "layers")
    assert onload.of(model) is None and all(p.device.type == "cpu" for p in model.parameters())


def test_a_damaged_layer_is_named_when_read(toy_path, tmp_path, capsys):
    """--load layers reads a layer's weights when the walk reaches it; a NaN there is the same one line as
    the whole model's check gives, and nothing is written."""
    folder = tmp_path / "nan"
    shutil.copytree(toy_path, folder)
    w = load_file(str(folder / "model.safetensors"))
    name = "model.decoder.layers.1.fc1.weight"
    w[name][0, 0] = float("nan")
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "r.json"
    assert opt_mi.main([str(folder), "synthetic", *FAST, "--sparsity", "0.5", "--eval", "synthetic", "--json",
                        str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"tensor {name} holds 1 NaN or inf value(s)" in err[0]
    assert not out.exists()


def test_store_files_are_removed(sharded, tmp_path, monkeypatch, small_eval):
    """The compressed layers' temporary files go when the run ends."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    folders = set()
    real_put = onload.Store.put

    def put(store, index, tensors):
        real_put(store, index, tensors)
        folders.add(store._dir.name)
        assert len(list(tmp_path.glob("miq-layers-*/*.safetensors"))) == len(store.layers)

    monkeypatch.setattr(onload.Store, "put", put)
    _run(sharded, tmp_path, "layers", "--sparsity", "0.5", "--eval", small_eval)
    assert len(folders) == 1 and next(iter(folders)).startswith(str(tmp_path))
    assert not list(tmp_path.glob("miq-layers-*"))


def test_only_compressed_layers_are_kept_and_a_full_tmpdir_is_one_line(sharded, tmp_path, monkeypatch, small_eval,
                                                                       capsys):
    """Layers the selection leaves alone are not written to the Store (read from the checkpoint again at
    evaluation, with the same result); a Store that cannot be written is one line and exit 2."""
    kept = []
    real_put = onload.Store.put
    monkeypatch.setattr(onload.Store, "put", lambda store, i, t: kept.append(i) or real_put(store, i, t))
    lazy, _ = _run(sharded, tmp_path, "layers", "--sparsity", "0.5", "--maxlayer", "2", "--eval", small_eval)
    whole, _ = _run(sharded, tmp_path, "whole", "--sparsity", "0.5", "--maxlayer", "2", "--eval", small_eval)
    assert kept == [0, 1] and lazy["ppl"] == whole["ppl"]

    def full(store, i, t):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onload, "save_file", lambda *a, **k: full(None, 0, None))
    capsys.readouterr()
    out = tmp_path / "full.json"
    code = opt_mi.main([str(sharded), "synthetic", "--nsamples", "4", "--seqlen", "32", "--analysis-dir", "",
                        "--eval", small_eval, "--sparsity", "0.5", "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left" in err[0] and "--load whole" in err[0]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["packed", "compressed-tensors"])
def test_saving_holds_one_tensor_and_never_the_model(sharded, tmp_path, monkeypatch, small_eval, fmt):
    """--save of a model loaded layer by layer: the model is never read back whole, each compressed linear
    goes to a temporary file as compression produces it (one linear per file), and the writers take one
    tensor at a time (the previous one is gone when the next is asked for); the files equal --load whole's."""
    alive: list[weakref.ref] = []
    puts: list[int] = []
    real_save, real_put = stream.save, stream.Spill.put

    def save(path, specs, get, metadata=None):
        def one(name):
            assert all(r() is None for r in alive), f"{name}: an earlier tensor is still held"
            t = get(name)
            alive.append(weakref.ref(t))
            return t

        real_save(path, specs, one, metadata)

    def put(spill, tensors):
        puts.append(len(tensors))
        real_put(spill, tensors)

    monkeypatch.setattr(stream, "save", save)
    monkeypatch.setattr(stream.Spill, "put", put)
    monkeypatch.setattr(onload.Onloader, "materialize", lambda o: pytest.fail("the model was read back whole"))
    flags = ["--sparsity", "0.5", "--wbits", "4", "--eval", small_eval, "--save-format", fmt]
    lazy, lazy_dir = _run(sharded, tmp_path, "layers", *flags)
    linears = 7 * LAYERS
    # one file per compressed linear (compressed-tensors: its grid as compression made it, then its export)
    assert len(puts) == linears * (1 if fmt == "packed" else 2) and min(puts) > 0
    assert len(alive) > linears
    monkeypatch.undo()
    whole, whole_dir = _run(sharded, tmp_path, "whole", *flags)
    assert lazy["ppl"] == whole["ppl"]
    _same_folders(lazy_dir, whole_dir)
