"""The built-in offline toy models: a tiny OPT (``toy``) and a tiny Llama (``toy-llama``) trained on the
synthetic corpus, built on first use.

``toy_model_path(name=...)`` returns a local Hugging Face folder (config.json, model.safetensors, tokenizer
files, TOY.md / TOY.json with the training facts) that loads with ``AutoModelForCausalLM`` /
``AutoTokenizer`` like any checkpoint of its family. Each is trained for a fixed number of seeded steps on
``synthetic_text("train")`` (about 25 s on two CPU cores), so every developer and CI job gets the same real,
trained weights with no download: pruning and quantization behave on them as on a real (if small) language
model. ``toy-llama`` has the layout of today's Llama-family decoders (RMSNorm, rotary positions,
grouped-query attention with fewer key/value heads than heads, a gated SiLU MLP), so every code path of
that family runs offline too.

The tokenizer, shared by both, is word-level over the synthetic vocabulary, with OPT's conventions: ids 0-3
are ``<s> <pad> </s> <unk>``, every encoding starts with ``</s>`` as BOS, and any other text still
tokenizes (unknown words become ``<unk>``), so a local .txt can be evaluated on the toys too.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from miq.model import layerwalk
from miq.model.toy_specs import OPT_TOY, TOY_SEED, TOYS, ToySpec, cache_root
from miq.synthetic import synthetic_text, synthetic_vocabulary

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0..3
PUNCTUATION = tuple(".,?!;:'\"()-")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TOY.json")
STALE_TMP_SECONDS = 3600  # temp folders older than this are leftovers of killed builds


TRAIN_THREADS = 2  # the toys are trained on this many threads, whatever the machine has (see build_toy)


def toy_model_path(cache_dir: str | None = None, name: str = OPT_TOY.name) -> str:
    """A local folder with the toy model ``name`` and its tokenizer; built (~25 s) and cached on first use.

    The folder is ``<cache_dir>/<version>`` (e.g. toy-opt-v1), cache_dir defaulting to $MIQ_CACHE_DIR, else
    ~/.cache/mutual_info_quantization. It is built in a temporary folder beside it and renamed into
    place, so a folder found there is complete, whatever happened to other (concurrent, killed) builds; one
    process builds at a time, and those that waited for it use its folder. A folder built by another recipe
    or from another corpus (see ``ToySpec.recipe``) is rebuilt.
    """
    spec = TOYS[name]
    final = cache_root(cache_dir) / spec.version
    if _is_current(final, spec):
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _one_build_at_a_time(final.parent):
        if _is_current(final, spec):  # built by the process we waited for
            return str(final)
        _build_into(final, spec, name)
    return str(final)


@contextlib.contextmanager
def _one_build_at_a_time(folder: Path):
    """An exclusive lock on the cache folder while a toy is built there: processes that start together on a
    fresh machine (the test suite's workers, a sweep's jobs) wait for one build and use it, instead of each
    training the same toy on the same cores. The lock goes with the process, so a killed build holds no one."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build_into(final: Path, spec: ToySpec, name: str) -> None:
    """Trains the toy in a temporary folder beside ``final`` and renames it into place (an outdated folder
    there moved aside first); temporary folders that killed builds left are removed once stale."""
    for old in final.parent.glob(f".{spec.version}.tmp-*"):
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - old.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(old)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.version}.tmp-", dir=final.parent))
    try:
        build_toy(str(tmp / "toy"), name=name)
        if final.exists() and not _is_current(final, spec):
            with contextlib.suppress(FileNotFoundError):  # gone already: another build is replacing it
                os.replace(final, tmp / "outdated")
        try:
            os.replace(tmp / "toy", final)
        except OSError:
            if not _is_current(final, spec):  # else a concurrent build got there first: use its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_current(folder: Path, spec: ToySpec) -> bool:
    try:
        saved = json.loads((folder / "TOY.json").read_text())
    except (OSError, ValueError):
        return False
    same = isinstance(saved, dict) and all(saved.get(k) == v for k, v in spec.recipe().items())
    return same and all((folder / name).is_file() for name in MODEL_FILES)


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast over the synthetic vocabulary, with OPT's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ("\n",) + PUNCTUATION + tuple(synthetic_vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # the corpus is lowercase; spares user text needless <unk>s
    # Words, single punctuation marks and newlines (so the model sees document breaks); spaces vanish.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces, tidies spaces before punctuation
    bos = vocab["</s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=int(1e30),  # as OPT: windows are the caller's business, not the tokenizer's
    )


def opt_config(spec: ToySpec, vocab_size: int):
    """A tiny but complete OPT: pre-LayerNorm, ReLU FFN, learned positions, tied embeddings, no dropout."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, ffn_dim=spec.ffn, max_position_embeddings=spec.seqlen,
        word_embed_proj_dim=spec.hidden, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        tie_word_embeddings=True,
    )


def llama_config(spec: ToySpec, vocab_size: int):
    """A tiny but complete Llama: RMSNorm, rotary positions, grouped-query attention, gated SiLU MLP, tied
    embeddings (as Llama-3.2-1B and Qwen2.5-0.5B), no dropout."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, intermediate_size=spec.ffn,
        max_position_embeddings=spec.seqlen, hidden_act="silu", rms_norm_eps=1e-6, attention_dropout=0.0,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True,
    )


# model_type -> (config factory, model class name in transformers, how the card describes it)
_CONFIGS = {
    "opt": (opt_config, "OPTForCausalLM", "an OPTForCausalLM"),
    "llama": (llama_config, "LlamaForCausalLM", "a LlamaForCausalLM"),
}


def window_perplexity(model, ids: torch.LongTensor) -> float:
    """Held-out perplexity of a toy at its training context, batched (the walker module's definition)."""
    seqlen = model.config.max_position_embeddings  # a toy's training window
    return layerwalk.full_forward_perplexity(model, ids, seqlen, torch.device("cpu"), batch=32)


def build_toy(out_dir: str, steps: int | None = None, seed: int = TOY_SEED, name: str = OPT_TOY.name) -> dict:
    """Train the toy ``name`` and save it into out_dir (model, tokenizer, TOY.json, TOY.md); return the facts.

    Deterministic for a given (name, steps, seed) on a given CPU kind and torch build, whatever the machine's
    core count: seeded initialization, seeded window order, no dropout, and TRAIN_THREADS threads (a float sum
    splits differently over another number of threads, and 1000 steps of training carry the difference).
    """
    import transformers

    spec = TOYS[name]
    make_config, class_name, description = _CONFIGS[spec.model_type]
    steps = spec.steps if steps is None else steps
    build_start = time.perf_counter()
    tokenizer = build_tokenizer()
    train, test = _corpus_ids()
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(make_config(spec, len(tokenizer)))
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        train_seconds, losses = _train(model, spec, steps, seed, train)
        model.eval()
        heldout_ppl = round(window_perplexity(model, test), 3)
    finally:
        torch.set_num_threads(threads)
    facts = {
        **spec.recipe(steps, seed),
        "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train), "train_seconds": round(train_seconds, 1),
        "torch_threads": TRAIN_THREADS,
        # mean of the last 10 steps: one batch is too noisy to report
        "final_train_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "heldout_tokens": test.shape[1], "heldout_ppl": heldout_ppl,
        "torch": torch.__version__,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    facts["build_seconds"] = round(time.perf_counter() - build_start, 1)
    (out / "TOY.json").write_text(json.dumps(facts, indent=1) + "\n")
    kv = f" ({spec.kv_heads} key/value heads)" if spec.kv_heads is not None else ""
    (out / "TOY.md").write_text(_CARD.format(**facts, description=description, kv=kv))
    return facts


def _train(model, spec: ToySpec, steps: int, seed: int, train: torch.LongTensor) -> tuple[float, list[float]]:
    """AdamW on seeded random windows of the train stream; returns (seconds, loss per step)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, steps, spec.warmup))
    order = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(train) - spec.seqlen, (spec.batch,), generator=order)
        x = torch.stack([train[s : s + spec.seqlen] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return time.perf_counter() - start, losses


_CARD = """# {version}

The built-in toy model of mutual_info_quantization (toy.py): {description} with {layers} layers,
hidden {hidden}, {heads} heads{kv}, ffn {ffn_dim}, context {seqlen}, {parameters:,} parameters (embeddings tied
with lm_head), and a word-level tokenizer of {vocab_size} tokens.

Trained from scratch on synthetic.synthetic_text('train') ({train_tokens:,} tokens): {steps} AdamW steps
of {batch} x {seqlen} tokens, peak lr {lr}, seed {seed}: {train_seconds} s of training on {torch_threads}
CPU threads ({build_seconds} s for the whole build); final train loss {final_train_loss}.

Held-out perplexity on synthetic_text('test') ({heldout_tokens:,} tokens, non-overlapping {seqlen}-token
windows, remainder dropped): {heldout_ppl}.
"""


@functools.cache
def _corpus_ids() -> tuple[torch.LongTensor, torch.LongTensor]:
    """The synthetic train stream [N] and test stream [1, T] in toy tokens (read-only; cached per process)."""
    tokenizer = build_tokenizer()
    train = tokenizer(synthetic_text("train"), return_tensors="pt").input_ids[0]
    return train, tokenizer(synthetic_text("test"), return_tensors="pt").input_ids


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    # Linear warmup, then cosine decay to 10% of the peak.
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
