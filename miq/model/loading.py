"""Where models come from: the Hugging Face hub (reachable or not), a local folder, or a built-in toy.

Loading is split in two so that bad input fails fast: ``open_source`` reads only the config and the
tokenizer (seconds), ``load_model`` the weights. When the hub does not answer a TCP connect within
``HUB_PROBE_TIMEOUT`` seconds, both read the local cache only (``offline_mode``), which answers in about a
second instead of huggingface_hub's ~25 s of retries; ``datautils`` uses the same probe for datasets.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import socket
import struct
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
from safetensors import safe_open

from miq.checkpoint import formats, packed
from miq.errors import ModelError, first_line
from miq.model import dequantized, layouts, onload, toy
from miq.options import TOY_NAMES

HUB_PROBE_TIMEOUT = 3.0  # seconds; a reachable hub answers a TCP connect in well under a second
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # what from_pretrained reads from a folder
MAX_HEADER = 100 << 20  # bytes; a safetensors header beyond this is not one


@functools.cache
def hub_probe() -> str | None:
    """None when the hub endpoint (or the https proxy) accepts a TCP connection, else a short reason.

    Runs once per process. The connect happens in a daemon thread so that a hanging DNS lookup, which
    socket timeouts do not cover, still cannot stall us beyond HUB_PROBE_TIMEOUT.
    """
    from huggingface_hub import constants

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"no connection to {host} ({e.strerror or type(e).__name__})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT + 0.5)
    return outcome[0] if outcome else f"no answer from {host} within {HUB_PROBE_TIMEOUT:g} s"


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Temporarily what HF_HUB_OFFLINE=1 does: datasets and huggingface_hub read the local cache only.

    Both libraries read these module constants at call time (the env vars only seed them at import).
    """
    from huggingface_hub import constants

    try:
        import datasets.config as dconfig
    except ImportError:  # model loading needs no datasets package (GPU images may lack it)
        dconfig = types.SimpleNamespace(HF_HUB_OFFLINE=False)
    saved = dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    dconfig.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconfig.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@dataclass(frozen=True)
class ModelSource:
    """A model's location and what loading its config told us. ``offline``: read the local cache only."""

    name: str  # as the user gave it
    path: str  # local folder or hub id
    positions: int  # max_position_embeddings
    offline: bool
    trust_remote_code: bool
    config: object = None  # the transformers config
    manifest: dict | None = None  # a packed folder's manifest, checked (its files hashed) on opening

    @property
    def local(self) -> bool:
        return os.path.isdir(self.path)

    def cache_only(self):
        return offline_mode() if self.offline else contextlib.nullcontext()


def resolve(name: str) -> str:
    """A local folder or hub id for MODEL (a built-in toy, 'toy' or 'toy-llama', is built and cached on first use)."""
    if name in TOY_NAMES:
        return toy.toy_model_path(name=name)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelError(f"MODEL {name}: no config.json in the folder; give a Hugging Face model folder")
        return name
    if os.path.exists(name):
        raise ModelError(f"MODEL {name}: a file, not a model folder (give a local folder, a hub id, 'toy' or "
                         "'toy-llama')")
    if name.startswith((".", "/", "~")):
        raise ModelError(f"MODEL {name}: model folder not found (give a local folder, a hub id, 'toy' or 'toy-llama')")
    return name


def open_source(name: str, trust_remote_code: bool = False):
    """(ModelSource, tokenizer) from the config and tokenizer only: cheap, so bad input fails before the weights."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bars cover layers and evaluation; keep stderr for errors
    path = resolve(name)
    # a packed folder's tensor files are hashed once, against its manifest (read_manifest, below)
    problem = formats.checksum_problem(path, packed.HASHED if _packed(path) else ()) if os.path.isdir(path) else None
    if problem:  # a folder this toolkit saved that changed since: before anything in it is read
        raise ModelError(f"MODEL {name}: {problem}")
    reason = None if os.path.isdir(path) else hub_probe()
    try:
        with offline_mode() if reason else contextlib.nullcontext():
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            raise ModelError(f"MODEL {name}: config.json cannot be read ({first_line(e)})") from None
        why = f"{reason} and not in the cache" if reason else first_line(e)
        raise ModelError(f"MODEL {name}: could not load it from the Hugging Face hub or the local cache "
                         f"({why}); offline? pass a local model folder or 'toy'") from None
    try:
        layouts.for_type(config.model_type)
    except layouts.UnsupportedModel as e:
        raise ModelError(f"MODEL {name}: {e}") from None
    manifest = packed.read_manifest(path) if _packed(path) else None  # damage fails here, before calibration
    src = ModelSource(name, path, config.max_position_embeddings, bool(reason), trust_remote_code, config, manifest)
    try:
        with src.cache_only():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # whatever a missing or broken tokenizer raises, it is this model's problem
        raise ModelError(f"MODEL {name}: could not load its tokenizer ({first_line(e)})") from None
    if not tokenizer("the text", add_special_tokens=False).input_ids:  # built from nothing (no tokenizer files)
        raise ModelError(f"MODEL {name}: its tokenizer is empty (no tokenizer files in the folder?)")
    if len(tokenizer) > config.vocab_size:
        raise ModelError(f"MODEL {name}: the tokenizer has {len(tokenizer)} tokens but the embedding only "
                         f"{config.vocab_size} (config.json vocab_size); they do not belong together")
    return src, tokenizer


def skeleton(src: ModelSource):
    """The model built from its config on the meta device: its structure and every tensor's shape, no memory
    and no weights read. What preflight checks (selection, n:m, memory, shapes) look at."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(src.config, trust_remote_code=src.trust_remote_code)
    except Exception as e:  # any inconsistency of a user's config.json (heads not dividing the width ...)
        raise ModelError(f"MODEL {src.name}: config.json describes no model that can be built "
                         f"({first_line(e)})") from None
    if not len(layouts.of(model).decoder_layers(model)):
        raise ModelError(f"MODEL {src.name}: config.json has no decoder layers (num_hidden_layers 0)")
    return model


def _expected_tensors(model) -> tuple[dict[str, list[int]], dict[str, str]]:
    """({name: shape} of the tensors a checkpoint must hold for ``model`` (the skeleton), {alias: name} of the
    tied ones (lm_head tied to the embeddings: one tensor, stored under either name))."""
    first: dict[int, str] = {}
    expected, alias = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            alias[name] = first[id(t)]
        else:
            first[id(t)] = name
            expected[name] = list(t.shape)
    return expected, alias


def check_weights(src: ModelSource, model) -> None:
    """A local folder has weights that make up exactly the model config.json describes (``model``: the
    skeleton): every tensor the architecture expects is in the checkpoint, with the shape config.json implies,
    and every tensor in the checkpoint is used (ties as transformers makes them). Headers only: cheap, before
    any work; pickled checkpoints are checked when loaded (``load_model``)."""
    if not src.local or _packed(src.path) or quantized_checkpoint(src):
        return  # a packed folder's manifest was checked on opening it; a quantized one's tensors are the
        # quantizer's (weight_packed, weight_scale ...), which from_pretrained checks against its scheme
    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(src.path, f))]
    if not present:
        raise ModelError(f"MODEL {src.name}: no weights in the folder (model.safetensors or pytorch_model.bin)")
    if not present[0].startswith("model.safetensors"):
        return
    expected, alias = _expected_tensors(model)
    buffers = {name for name, _ in model.named_buffers()}
    found: set[str] = set()
    unused: list[tuple[str, str]] = []
    index = _shard_index(src, present[0])
    for file in sorted(set(index.values())) if index else [present[0]]:
        shapes = _safetensors_shapes(src, file)
        _check_index(src, index, file, shapes)
        for stored, shape in shapes.items():
            key = stored if stored in expected or stored in alias else f"model.{stored}"  # saved without the prefix
            key = alias.get(key, key)
            if key not in expected:
                # buffers are rebuilt from the config; so are rotary frequencies, which older checkpoints stored
                # per layer (transformers ignores them)
                if key not in buffers and not key.endswith("rotary_emb.inv_freq"):
                    unused.append((stored, file))
                continue
            if shape != expected[key]:
                raise ModelError(f"MODEL {src.name}: tensor {key} is {shape} in {file}, but config.json implies "
                                 f"{expected[key]}; the config and the weights do not belong together")
            found.add(key)
    missing = [k for k in expected if k not in found]
    if missing:
        raise ModelError(f"MODEL {src.name}: tensor {missing[0]} is missing from the weights "
                         f"({len(missing)} of the model's tensors are)")
    if unused:
        raise ModelError(f"MODEL {src.name}: tensor {unused[0][0]} in {unused[0][1]} belongs to no part of the "
                         f"model config.json describes ({len(unused)} such tensors); the config and the weights "
                         "do not belong together")


def _shard_index(src: ModelSource, first: str) -> dict[str, str]:
    """{tensor: shard file} of a sharded checkpoint's index ({} for one model.safetensors)."""
    if first == "model.safetensors":
        return {}
    try:
        with open(os.path.join(src.path, first)) as f:
            index = dict(json.load(f)["weight_map"])
        if not all(isinstance(v, str) for v in index.values()):
            raise TypeError("a shard name is not a string")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"MODEL {src.name}: {first} is not a shard index ({first_line(e)})") from None
    return index


def _check_index(src: ModelSource, index: dict[str, str], file: str, shapes: dict[str, list[int]]) -> None:
    """Every tensor sits in the shard the index names for it (``shapes``: ``file``'s header): found now, not by
    a loader reading by the index halfway through a walk."""
    wrong = [n for n, f in index.items() if f == file and n not in shapes] + [n for n in shapes if index.get(n) != file]
    if index and wrong:
        raise ModelError(f"MODEL {src.name}: tensor {wrong[0]} is not where model.safetensors.index.json puts it "
                         f"({index.get(wrong[0], 'nowhere')}; {file} {'holds' if wrong[0] in shapes else 'lacks'} "
                         "it); the index and the shards do not belong together")


def _safetensors_shapes(src: ModelSource, file: str) -> dict[str, list[int]]:
    """{tensor: shape} from a safetensors file's header (8-byte length, JSON), checked against the file size."""
    path = os.path.join(src.path, file)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\xff"))
            if n > min(size - 8, MAX_HEADER):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise ModelError(f"MODEL {src.name}: {file} is not a readable safetensors file ({first_line(e)})") from None
    if 8 + n + end > size:
        raise ModelError(f"MODEL {src.name}: {file} is truncated ({size} bytes, its header needs {8 + n + end})")
    return shapes


def load_model(src: ModelSource, dtype: str, dev: torch.device, load: str = "whole"):
    """The model in eval mode, no KV cache. dtype "auto": float32 on CPU, the checkpoint's dtype elsewhere.

    ``load`` "layers": for a safetensors checkpoint (local or from the hub, one file or shards), the model
    with every weight on the meta device, read layer by layer as the walker reaches it (``onload``);
    "whole", a pickled .bin checkpoint or a packed folder: ``from_pretrained`` (or the packed loader) reads
    every weight now."""
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        torch_dtype = torch.float32 if dev.type == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    if _packed(src.path):  # a folder saved by --save-format packed: its own loader, exact weights
        model = packed.load_compressed(src.path, None if torch_dtype == "auto" else torch_dtype, src.manifest)
        model.config.use_cache = False
        return model
    folder = _safetensors_folder(src) if load == "layers" and not quantized_checkpoint(src) else None
    if folder is not None:
        return load_lazily(src, folder, torch_dtype)
    try:
        with src.cache_only():
            model, info = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype, output_loading_info=True,
                                                               trust_remote_code=src.trust_remote_code)
    except MemoryError:
        raise
    except Exception as e:  # a damaged or mismatched checkpoint, told in one line
        raise ModelError(f"MODEL {src.name}: could not load the weights ({first_line(e)})") from None
    for kind, what in (("missing_keys", "is missing from the weights"), ("unexpected_keys", "is not used by the model"),
                       ("mismatched_keys", "has the wrong shape")):
        keys = sorted(str(k) for k in info.get(kind) or ())  # a model that did not load whole never runs
        if keys:
            raise ModelError(f"MODEL {src.name}: tensor {keys[0]} {what} ({len(keys)} such tensors); the config "
                             "and the weights do not belong together")
    model.eval()
    model.config.use_cache = False
    return dequantized.make_plain(model) if quantized_checkpoint(src) else model  # no stale scales kept


def quantized_checkpoint(src: ModelSource) -> bool:
    """A checkpoint stored quantized for transformers' own quantizers (compressed-tensors, as --save-format
    compressed-tensors writes): only from_pretrained, whole, knows how to read its tensors."""
    return getattr(src.config, "quantization_config", None) is not None


def _safetensors_folder(src: ModelSource) -> str | None:
    """The local folder of the checkpoint's safetensors files (a hub model's are downloaded to the cache
    first, as ``from_pretrained`` would), or None when it has none (pickled .bin weights load whole)."""
    if src.local:
        return src.path if onload.checkpoint_files(src.path) else None
    from huggingface_hub import snapshot_download

    try:
        with src.cache_only():
            folder = snapshot_download(src.path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # unreachable, gated, not in the cache: told in one line
        raise ModelError(f"MODEL {src.name}: could not fetch the weights ({first_line(e)})") from None
    if not onload.checkpoint_files(folder):
        return None
    check_weights(dataclasses.replace(src, path=folder), skeleton(src))
    return folder


def _checkpoint_dtype(folder: str, config) -> torch.dtype:
    """What ``from_pretrained(dtype="auto")`` picks: config.json's dtype, else the first floating tensor's."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if stored is not None:
        return getattr(torch, stored) if isinstance(stored, str) else stored

    for stored_name, file in sorted(onload.checkpoint_files(folder).items()):
        with safe_open(os.path.join(folder, file), "pt") as f:
            t = f.get_slice(stored_name)
            dt = getattr(torch, packed.SAFETENSORS_DTYPES.get(t.get_dtype(), ""), None)
            if isinstance(dt, torch.dtype) and dt.is_floating_point:
                return dt
    return torch.float32


def load_lazily(src: ModelSource, folder: str, torch_dtype):
    """The model built from its config with every weight on the meta device (buffers computed as the
    constructors compute them), its Onloader attached: weights are read layer by layer by the walker."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialised on meta, which costs nothing
        no_init_weights = contextlib.nullcontext
    if torch_dtype == "auto":
        torch_dtype = _checkpoint_dtype(folder, src.config)
    try:
        with onload.params_on_meta(), no_init_weights():
            model = AutoModelForCausalLM.from_config(copy.deepcopy(src.config), dtype=torch_dtype,
                                                     trust_remote_code=src.trust_remote_code)
        model.tie_weights()  # no_init_weights skips the tying too
    except Exception as e:  # as skeleton(): a config that describes no model
        raise ModelError(f"MODEL {src.name}: config.json describes no model that can be built "
                         f"({first_line(e)})") from None
    with contextlib.suppress(OSError, ValueError):  # as from_pretrained: the folder's generation settings
        model.generation_config = GenerationConfig.from_pretrained(folder)
    onload.Onloader(model, folder, onload.checkpoint_files(folder), src.name)
    model.eval()
    model.config.use_cache = False
    return model


def release(model) -> None:
    """Remove the temporary files of a model loaded layer by layer (also removed when it is collected)."""
    onload.close(model)


def _packed(path: str) -> bool:
    """A folder saved with --save-format packed (damaged or not): read by packed.py, not from_pretrained."""
    return os.path.isdir(path) and packed.is_packed(path)


@torch.no_grad()
def check_finite(model, name: str) -> None:
    """Every floating tensor of the loaded model is finite: a NaN or inf weight gives NaN perplexity, or a
    failed Cholesky, long after loading; named here, before any work."""
    for key, t in model.state_dict().items():
        if t.device.type != "meta":  # weights read layer by layer are checked then
            onload.check_tensor_finite(t, name, key)


