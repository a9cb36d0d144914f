"""The built-in offline toy model: a tiny OPT trained on the synthetic corpus, built on first use.

``toy_model_path()`` returns a local Hugging Face folder (config.json, model.safetensors, tokenizer files,
TOY.md / TOY.json with the training facts) that loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``
like any OPT checkpoint. It is trained for a fixed number of seeded steps on ``synthetic_text("train")``
(about 25 s on two CPU cores), so every developer and CI job gets the same real, trained weights with no
download: pruning and quantization behave on it as on a real (if small) language model.

The tokenizer is word-level over the synthetic vocabulary, with OPT's conventions: ids 0-3 are
``<s> <pad> </s> <unk>``, every encoding starts with ``</s>`` as BOS, and any other text still
tokenizes (unknown words become ``<unk>``), so a local .txt can be evaluated on the toy model too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import layerwalk
from synthetic import synthetic_text, synthetic_vocabulary

TOY_NAME = "toy"
TOY_VERSION = "toy-opt-v1"  # the cache folder's name; a cached toy of another recipe() is rebuilt anyway
TOY_SEED = 0
# The recipe. Hidden 64 rather than 128: in the same ~25 s a 128-wide model stays so under-trained that
# zeroing half of each layer's weights by magnitude costs it ~1-2% perplexity (nothing to compress);
# at 64 every weight is worked harder and 50% magnitude pruning costs ~12%, SparseGPT ~2%, as on real LMs.
LAYERS, HIDDEN, HEADS, FFN = 2, 64, 4, 256
SEQLEN = 128  # training window = max_position_embeddings
TOY_STEPS, BATCH, LR, WARMUP = 1000, 8, 3e-3, 100
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0..3
PUNCTUATION = tuple(".,?!;:'\"()-")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TOY.json")
STALE_TMP_SECONDS = 3600  # temp folders older than this are leftovers of killed builds


def toy_model_path(cache_dir: str | None = None) -> str:
    """A local folder with the toy OPT model and tokenizer; built (~25 s) and cached on first use.

    The folder is ``<cache_dir>/toy-opt-v1``, cache_dir defaulting to $MIQ_CACHE_DIR, else
    ~/.cache/mutual_info_quantization. It is built in a temporary folder beside it and renamed into
    place, so a folder found there is complete, whatever happened to other (concurrent, killed) builds.
    A folder built by another recipe or from another corpus (see ``recipe()``) is rebuilt.
    """
    root = Path(cache_dir or os.environ.get("MIQ_CACHE_DIR") or "~/.cache/mutual_info_quantization")
    final = root.expanduser() / TOY_VERSION
    if _is_current(final):
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{TOY_VERSION}.tmp-*"):
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - old.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(old)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TOY_VERSION}.tmp-", dir=final.parent))
    try:
        build_toy(str(tmp / "toy"))
        if final.exists() and not _is_current(final):
            with contextlib.suppress(FileNotFoundError):  # gone already: another build is replacing it
                os.replace(final, tmp / "outdated")
        try:
            os.replace(tmp / "toy", final)
        except OSError:
            if not _is_current(final):  # else a concurrent build got there first: use its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def recipe(steps: int | None = None, seed: int = TOY_SEED) -> dict:
    """Everything the toy's weights depend on (besides the library versions); saved in TOY.json."""
    return {
        "version": TOY_VERSION, "layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "ffn_dim": FFN,
        "seqlen": SEQLEN, "steps": TOY_STEPS if steps is None else steps, "batch": BATCH, "lr": LR,
        "warmup": WARMUP, "seed": seed,
        "corpus_sha256": hashlib.sha256(synthetic_text("train").encode()).hexdigest()[:16],
    }


def _is_current(folder: Path) -> bool:
    try:
        saved = json.loads((folder / "TOY.json").read_text())
    except (OSError, ValueError):
        return False
    same = isinstance(saved, dict) and all(saved.get(k) == v for k, v in recipe().items())
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


def toy_config(vocab_size: int):
    """A tiny but complete OPT: pre-LayerNorm, ReLU FFN, learned positions, tied embeddings, no dropout."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_dim=FFN, max_position_embeddings=SEQLEN, word_embed_proj_dim=HIDDEN, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True,
    )


def window_perplexity(model, ids: torch.LongTensor) -> float:
    """Held-out perplexity of the toy at its training context, batched (the walker module's definition)."""
    return layerwalk.full_forward_perplexity(model, ids, SEQLEN, torch.device("cpu"), batch=32)


def build_toy(out_dir: str, steps: int | None = None, seed: int = TOY_SEED) -> dict:
    """Train the toy OPT and save it into out_dir (model, tokenizer, TOY.json, TOY.md); return the facts.

    Deterministic for a given (steps, seed) on a given machine and torch build: seeded initialization,
    seeded window order, no dropout.
    """
    from transformers import OPTForCausalLM

    steps = TOY_STEPS if steps is None else steps
    build_start = time.perf_counter()
    tokenizer = build_tokenizer()
    train, test = _corpus_ids()
    torch.manual_seed(seed)
    model = OPTForCausalLM(toy_config(len(tokenizer)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, steps))
    order = torch.Generator().manual_seed(seed)
    losses = []
    train_start = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(train) - SEQLEN, (BATCH,), generator=order)
        x = torch.stack([train[s : s + SEQLEN] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_seconds = time.perf_counter() - train_start
    model.eval()
    facts = {
        **recipe(steps, seed),
        "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train), "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        # mean of the last 10 steps: one batch is too noisy to report
        "final_train_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
        "heldout_tokens": test.shape[1], "heldout_ppl": round(window_perplexity(model, test), 3),
        "torch": torch.__version__,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    facts["build_seconds"] = round(time.perf_counter() - build_start, 1)
    (out / "TOY.json").write_text(json.dumps(facts, indent=1) + "\n")
    (out / "TOY.md").write_text(_CARD.format(**facts))
    return facts


_CARD = """# {version}

The built-in toy model of mutual_info_quantization (toy.py): an OPTForCausalLM with {layers} layers,
hidden {hidden}, {heads} heads, ffn {ffn_dim}, context {seqlen}, {parameters:,} parameters (embeddings tied
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


def _lr_factor(step: int, steps: int) -> float:
    # Linear warmup, then cosine decay to 10% of the peak.
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
