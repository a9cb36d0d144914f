"""Where a decoder-only language model keeps its parts: one small description per supported model family.

The layer walker (``layerwalk.py``) and compression (``compress.py``) are the same code for every family;
what differs between an OPT and a Llama-family checkpoint is only naming: where the decoder layers are, which
modules run before layer 0 and after the last layer, and what the linear layers of a decoder layer are
called. A ``Layout`` holds exactly that, chosen by ``config.model_type``. Everything a family passes its
layers (attention masks, rotary position embeddings, ...) is captured from the model's own forward pass, so
a layout never describes it.

Llama, Mistral, Qwen2 and Qwen3 share one layout in transformers 5: pre-RMSNorm layers with
``self_attn.{q,k,v,o}_proj`` (grouped-query attention changes only the k/v widths; Qwen3's q_norm/k_norm
hold no linears) and a gated MLP ``mlp.{gate,up,down}_proj``, rotary embeddings computed once by
``model.rotary_emb`` before layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedModel(ValueError):
    """The model's ``model_type`` has no layout here; ``str(e)`` is one line naming it and the supported ones."""


@dataclass(frozen=True)
class Layout:
    """Module paths (dotted, from the *ForCausalLM root) and linear names of one model family."""

    family: str  # "opt" or "llama": the family's name in messages and docs
    layers: str  # the decoder layers' ModuleList
    embeddings: tuple[str, ...]  # run before layer 0; a path whose module is None (e.g. OPT's project_in) is skipped
    head: tuple[str, ...]  # applied in order to the last layer's outputs; the last one gives the logits
    sequential: tuple[tuple[str, ...], ...]  # a layer's linears, in the sub-groups --true-sequential takes in turn
    plot_linear: str  # the linear of the middle layer that the figures show by default

    def layer_prefix(self, index: int) -> str:
        """State-dict prefix of decoder layer ``index``, e.g. "model.layers.3."."""
        return f"{self.layers}.{index}."

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for group in self.sequential for n in group)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        return _present(model, self.embeddings)

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return _present(model, self.head)

    def default_plot_layer(self, model: nn.Module) -> str:
        return self.layer_prefix(len(self.decoder_layers(model)) // 2) + self.plot_linear


def _present(model: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    """The modules at ``paths``, skipping those set to None. A missing attribute raises: the layout no longer
    matches the installed transformers, which must not pass silently."""
    found = []
    for path in paths:
        module = model
        for part in path.split("."):
            module = getattr(module, part)
            if module is None:
                break
        if module is not None:
            found.append(module)
    return found


OPT = Layout(
    family="opt",
    layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                ("fc1",), ("fc2",)),
    plot_linear="fc1",
)

LLAMA = Layout(
    family="llama",
    layers="model.layers",
    embeddings=("model.embed_tokens", "model.rotary_emb"),
    head=("model.norm", "lm_head"),
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    plot_linear="mlp.up_proj",
)

# config.model_type -> layout
LAYOUTS: dict[str, Layout] = {"opt": OPT, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}
SUPPORTED_TYPES = tuple(LAYOUTS)


def for_type(model_type: str) -> Layout:
    """The layout of a ``config.model_type``; UnsupportedModel (one line) for any other."""
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise UnsupportedModel(f"model_type '{model_type}' is not OPT or a supported Llama-family decoder "
                               f"(supported: {', '.join(SUPPORTED_TYPES)})") from None


def of(model: nn.Module) -> Layout:
    """The layout of a loaded model."""
    return for_type(model.config.model_type)
