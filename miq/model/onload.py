"""Layer-by-layer loading (``--load layers``): a model whose weights stay on the meta device until the layer
walker needs them, so that host memory holds a few decoder layers instead of the whole checkpoint.

Why: compression and evaluation touch one decoder layer at a time (``layerwalk.walk``), but
``from_pretrained`` reads every weight first (Llama-3-70B in bf16: 140 GB of host memory before layer 0 is
compressed). llm-compressor's sequential onloading and GPTQModel load layer by layer for the same reason.

How: ``Onloader`` is attached to a model built from its config with every parameter on the meta device
(buffers are computed by the constructors as usual: rotary frequencies are not weights). It knows which
safetensors file holds each tensor; ``layer`` and ``modules`` read a decoder layer's (or the embeddings' and
head's) tensors when the walker reaches them (``safe_open``, one ``get_tensor`` per name) and put them back
on meta after. A tensor is swapped in and out of its ``Parameter`` object (``torch.utils.swap_tensors``), so
weights tied across modules (lm_head and the embeddings) stay one object. A decoder layer the walk changed
(compressed) is written, before it is released, to a temporary safetensors file of its own (``Store``, under
$TMPDIR): evaluation and the writers read the compressed layer from there, so its dense fake-quantized
weights never pile up in memory. Reading is exact (the bytes ``from_pretrained`` reads, cast to the same
dtype with ``Tensor.to``), so every result equals that of ``--load whole`` bit for bit.

For a model loaded whole there is no ``Onloader``, and ``layer`` and ``modules`` do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from miq.errors import ModelError
from miq.finite import nonfinite
from miq.model import layouts

ATTR = "_miq_onloader"  # the model's attribute holding its Onloader


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()


def trim() -> None:
    """Give freed heap memory back to the system: glibc keeps what a released layer's work freed mapped (it
    counts as resident, about a layer's worth per layer otherwise), where ``malloc_trim`` returns it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory() -> None:
    """Have glibc give large freed blocks back at once. It serves allocations below its mmap threshold from
    its heap and raises that threshold (up to 32 MB) whenever a larger block is freed, so that a layer's
    temporaries (Hessians, their factors, activations) end up in a heap whose freed space stays resident
    until ``trim``: measured, a constant of about a hundred MB above what the run holds, and more at the
    peaks. A fixed threshold of 1 MB (``mallopt`` turns the adjustment off) maps every tensor of 1 MB or more
    on its own and unmaps it when freed."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def of(model: nn.Module) -> Onloader | None:
    """The model's Onloader, or None for a model loaded whole."""
    return model.__dict__.get(ATTR)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get every parameter on the meta device and keep their buffers where the
    constructor computed them (a parameter already on meta, e.g. a tie to one, is registered as it is, so
    the tie stays one object)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def check_tensor_finite(t: torch.Tensor, model: str, name: str) -> None:
    """ModelError when the floating tensor ``name`` of MODEL ``model`` holds a NaN or inf (a damaged checkpoint:
    it would give a NaN perplexity, or a failed Cholesky, long after loading). Counted in chunks: isfinite over
    a whole embedding takes about twice its size more."""
    bad = nonfinite(t) if t.is_floating_point() else 0
    if bad:
        raise ModelError(f"MODEL {model}: tensor {name} holds {bad} NaN or inf value(s) of {t.numel()}; the "
                         "weights are damaged")


def checkpoint_files(folder: str) -> dict[str, str]:
    """{stored tensor name: file} of a safetensors checkpoint: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` maps (``{}`` when the folder has neither)."""

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return dict(json.load(f)["weight_map"])
    return {}


def _why(e: BaseException) -> str:
    """An I/O error in a few words (safetensors' own error type has no ``strerror``)."""
    lines = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


class Store:
    """The compressed decoder layers, one safetensors file each in a temporary folder (removed by ``close``,
    or when the Store is collected or the process ends)."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory | None = None
        self.layers: set[int] = set()

    def _path(self, index: int) -> str:
        return os.path.join(self._dir.name, f"layer-{index:05d}.safetensors")

    def put(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        if self._dir is None:
            # cleaning up never fails the run: a tmp cleaner may have removed the folder first
            self._dir = tempfile.TemporaryDirectory(prefix="miq-layers-", ignore_cleanup_errors=True)
        try:
            save_file(tensors, self._path(index))
        except (OSError, SafetensorError) as e:  # a full or unwritable $TMPDIR (safetensors' writer raises its
            # own error type for the OS's): one line, as every user-facing error
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise ModelError(f"--load layers: could not keep compressed layer {index} in {self._dir.name} "
                             f"({_why(e)}); each compressed layer takes about {need >> 20} MB there: "
                             "free space under $TMPDIR, point TMPDIR elsewhere, or use --load whole") from None
        self.layers.add(index)

    def get(self, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        try:
            if self._dir is None:
                raise FileNotFoundError(f"layer {index}: the temporary folder was closed")
            with safe_open(self._path(index), "pt") as f:
                return {n: f.get_tensor(n) for n in names}
        except (OSError, SafetensorError) as e:  # the temporary folder removed under the run (a tmp cleaner)
            raise ModelError(f"--load layers: compressed layer {index} could not be read back from the run's "
                             f"temporary folder ({_why(e)}); "
                             "something removed the run's temporary files; run again, with --load whole or "
                             "TMPDIR pointing where nothing cleans") from None

    def close(self) -> None:
        """Remove the files; ``layers`` stays, so that a later read fails instead of finding the original
        weights in the checkpoint."""
        if self._dir is not None:
            self._dir.cleanup()
        self._dir = None


class Onloader:
    """Reads a meta model's tensors from its safetensors checkpoint (``folder``, ``files``: {stored name: file})
    when asked and releases them after; ``name``: MODEL as the user gave it (for messages)."""

    def __init__(self, model: nn.Module, folder: str, files: dict[str, str], name: str):
        self.folder, self.name = folder, name
        self.tensors: dict[str, torch.Tensor] = {}  # one entry per tensor object (the first name of a tie)
        self.canonical: dict[str, str] = {}  # every state-dict name -> its tensor's entry in self.tensors
        first: dict[int, str] = {}
        for n, t in model.state_dict(keep_vars=True).items():
            self.canonical[n] = first.setdefault(id(t), n)
            if self.canonical[n] == n:
                self.tensors[n] = t
        self.sources: dict[str, tuple[str, str]] = {}  # entry -> (file, stored name)
        for stored, file in files.items():
            # checkpoints may leave out the "model." prefix, or store a tied tensor under either name
            key = stored if stored in self.canonical else f"model.{stored}"
            if key in self.canonical:
                self.sources.setdefault(self.canonical[key], (file, stored))
        missing = [n for n, t in self.tensors.items() if n not in self.sources and t.device.type == "meta"]
        if missing:
            raise ModelError(f"MODEL {name}: tensor {missing[0]} is missing from the weights ({len(missing)} of "
                             "the model's tensors are)")
        layout = layouts.of(model)
        self.layer_names = [[n for n in self.sources if n.startswith(layout.layer_prefix(i))]
                            for i in range(len(layout.decoder_layers(model)))]
        self.module_names = {id(m): p for p, m in model.named_modules()}
        self.store = Store()
        self.zeros: dict[str, int] = {}  # stored layers' weights: exact zeros per weight tensor
        self.checked: set[str] = set()  # entries read once from the checkpoint and found finite
        for n in self.sources:  # a persistent buffer the constructor computed: read from the checkpoint too
            self._release(n)
        model.__dict__[ATTR] = self

    # -- reading and releasing

    def _swap(self, name: str, value: torch.Tensor) -> None:
        t = self.tensors[name]
        new = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
        torch.utils.swap_tensors(t, new)

    def _release(self, name: str) -> None:
        if self.tensors[name].device.type != "meta":
            self._swap(name, torch.empty_like(self.tensors[name], device="meta"))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named entries from the checkpoint, in the model's dtypes, one file opened at a time; a tensor
        holding NaN or inf is refused as ``loading.check_finite`` refuses it for a model loaded whole."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.sources[n][0], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(os.path.join(self.folder, file), "pt") as f:
                for n in group:
                    out[n] = self._checked(n, f.get_tensor(self.sources[n][1]).to(self.tensors[n].dtype))
        return out

    def _checked(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in self.checked:
            check_tensor_finite(t, self.name, name)
            self.checked.add(name)
        return t

    def load(self, names: list[str], layer: int | None = None) -> None:
        """Swap the named entries in (decoder layer ``layer`` from the Store when it was compressed)."""
        todo = [n for n in names if self.tensors[n].device.type == "meta"]
        if not todo:
            return
        values = self.store.get(layer, todo) if layer in self.store.layers else self.read(todo)
        for n in todo:
            self._swap(n, values[n])

    def release(self, names: list[str]) -> None:
        for n in names:
            self._release(n)

    def names_under(self, modules: list[nn.Module]) -> list[str]:
        """The entries with a source inside ``modules`` (a tie counts where its first name is)."""
        prefixes = [self.module_names[id(m)] + "." for m in modules]
        return sorted({self.canonical[n] for n in self.canonical if n.startswith(tuple(prefixes))} & set(self.sources))

    def keep(self, index: int) -> None:
        """Write decoder layer ``index`` (resident, on the CPU) to the Store, counting each weight's zeros."""
        tensors = {n: self.tensors[n].detach().contiguous() for n in self.layer_names[index]}
        self.zeros.update({n: int((t == 0).sum()) for n, t in tensors.items() if n.endswith(".weight")})
        self.store.put(index, tensors)

    # -- what the writers need

    def layer_of(self, name: str) -> int | None:
        for i, names in enumerate(self.layer_names):
            if name in names:
                return i
        return None

    def values(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named entries' current values on the CPU: resident ones as they are, a compressed layer's from
        the Store, the rest from the checkpoint."""
        out, by_layer, rest = {}, {}, []
        for n in names:
            t = self.tensors[n]
            if t.device.type != "meta":
                out[n] = t.detach().cpu()
            elif (i := self.layer_of(n)) in self.store.layers:
                by_layer.setdefault(i, []).append(n)
            else:
                rest.append(n)
        for i, group in by_layer.items():
            out.update(self.store.get(i, group))
        out.update(self.read(rest))
        return out

    def dense(self, skip: set[str]) -> tuple[dict[str, tuple], Callable[[str], torch.Tensor], dict[str, str]]:
        """As ``packed.dense_tensors`` for a model loaded whole: ({name: (dtype, shape)} of every state-dict
        tensor not in ``skip``, each tied tensor once under its first name; get(name), which reads that one
        tensor; {alias: first name})."""
        tied = {n: c for n, c in self.canonical.items() if n not in skip and c != n and c not in skip}
        names = [n for n in self.canonical if n not in skip and n not in tied]

        def get(n: str) -> torch.Tensor:
            return (self.values([n])[n] if n in self.sources else self.tensors[n].detach().cpu()).contiguous()

        return {n: (self.tensors[n].dtype, tuple(self.tensors[n].shape)) for n in names}, get, tied

    def materialize(self) -> None:
        """Every tensor resident (the writers that need the whole model: compressed-tensors, dense)."""
        for i, names in enumerate(self.layer_names):
            self.load(names, layer=i)
        self.load([n for n in self.sources if self.layer_of(n) is None])


@dataclass
class Held:
    """What ``layer``'s block says of the layer it held: whether it changed it (then it is kept)."""

    keep: bool


@contextlib.contextmanager
def layer(model: nn.Module, index: int, keep: bool = False) -> Iterator[Held]:
    """Decoder layer ``index`` resident for the block, released after. ``keep`` (or the block setting the
    yielded ``Held.keep``): the block changed its weights (compression), so the layer goes to the Store
    first, where later reads find it; a layer nothing changed is read from the checkpoint again."""
    held = Held(keep)
    o = of(model)
    if o is None:
        yield held
        return
    names = o.layer_names[index]
    o.load(names, layer=index)
    try:
        yield held
        if held.keep:
            o.keep(index)
    finally:
        o.release(names)
        trim()


@contextlib.contextmanager
def modules(model: nn.Module, mods: list[nn.Module]) -> Iterator[None]:
    """The tensors of ``mods`` (embeddings, final norm, head) resident for the block, released after."""
    o = of(model)
    if o is None:
        yield
        return
    names = o.names_under(mods)
    trim()  # what the run freed before (tokenized text, its strings) given back before the largest read
    o.load(names)
    try:
        yield
    finally:
        o.release(names)
        trim()


@contextlib.contextmanager
def streamed(model: nn.Module, dev: torch.device) -> Iterator[nn.Module]:
    """The model as one ``nn.Module`` on ``dev`` for the block, for what calls its forward itself (the
    harness's tasks). Loaded whole: moved to ``dev`` and back to the CPU after. Loaded layer by layer: its
    embeddings and head resident for the block, and each decoder layer read (from the compressed layers'
    files) when its forward starts and released when it ends, so that the block holds one decoder layer."""
    o = of(model)
    if o is None:
        model.to(dev)
        try:
            yield model
        finally:
            if dev.type != "cpu":
                model.cpu()
        return
    layout = layouts.of(model)
    ends = layout.embedding_modules(model) + layout.head_modules(model)

    def pre(index: int):
        def hook(layer: nn.Module, args) -> None:
            o.load(o.layer_names[index], layer=index)
            layer.to(dev)
        return hook

    def post(index: int):
        def hook(layer: nn.Module, args, out) -> None:
            o.release(o.layer_names[index])
        return hook

    hooks = []
    with modules(model, ends):
        for m in ends:
            m.to(dev)
        try:
            for i, layer in enumerate(layout.decoder_layers(model)):
                hooks += [layer.register_forward_pre_hook(pre(i)), layer.register_forward_hook(post(i))]
            yield model
        finally:
            for h in hooks:
                h.remove()
            for m in ends if dev.type != "cpu" else []:
                m.cpu()


def zeros(model: nn.Module, weight: str) -> int:
    """Exact zeros of the weight tensor named ``weight``, resident or in the Store."""
    t = model.get_parameter(weight)
    if t.device.type != "meta":
        return int((t.data == 0).sum())
    return of(model).zeros[of(model).canonical[weight]]


def close(model: nn.Module) -> None:
    """Remove the model's Store (its temporary files); the model stays usable for reads from the checkpoint."""
    o = of(model)
    if o is not None:
        o.store.close()
