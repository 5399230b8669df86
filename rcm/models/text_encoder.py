"""The umT5-XXL text encoder of Wan2.1, through ``transformers`` (``UMT5EncoderModel`` + tokenizer).

What Wan feeds its DiT (official ``T5EncoderModel.__call__`` and the DiT's context padding): the prompt
is cleaned (html entities, whitespace), tokenized with the EOS token and padded to ``text_len = 512``
tokens, encoded with the attention mask, and the hidden states of the first ``seq_len`` tokens (the
real tokens, EOS included) are kept; the rest are **zeros**. So ``encode`` returns ``[B, 512, 4096]``
with exact zeros past each prompt's length (the DiT attends to them without a mask).

The official checkpoint ``models_t5_umt5-xxl-enc-bf16.pth`` uses Wan's own module names;
``umt5_state_dict_from_official`` / ``umt5_state_dict_to_official`` convert to and from the
``transformers`` names (a rename; the tied ``shared`` / ``encoder.embed_tokens`` embedding is one
tensor). ``load_text_encoder`` reads that file, a ``transformers`` folder or a diffusers pipeline root.

The XXL encoder is 5.7B parameters (11 GB in bf16): encode the prompts, then ``offload()`` it (or use
``with encoder.on("cuda"): ...``) to free the GPU for the DiT.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .frozen_encoder import FrozenEncoder
from .wan_text import TEXT_LEN, WAN_NEGATIVE_PROMPT
from .weights import load_state_dict_strict, read_state_dict

__all__ = [
    "WAN_NEGATIVE_PROMPT",
    "TEXT_LEN",
    "clean_prompt",
    "umt5_xxl_config",
    "umt5_state_dict_from_official",
    "umt5_state_dict_to_official",
    "UMT5TextEncoder",
    "load_text_encoder",
    "byte_tokenizer",
    "tiny_text_encoder",
]

def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (``clean='whitespace'``): fix mojibake with ``ftfy`` when it is installed,
    unescape html entities twice, collapse whitespace runs to one space, strip."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # optional: only changes broken unicode
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def umt5_xxl_config():
    """``transformers.UMT5Config`` of the umT5-XXL encoder Wan uses (official ``umt5_xxl``)."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # gelu (tanh approximation) gate, as Wan's T5FeedForward
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
    )


# ----------------------------------------------------------------------------------------------------
# Key layouts. Wan's encoder (`wan/modules/t5.py`, T5Encoder with shared_pos=False) vs transformers':
#   token_embedding.weight                    shared.weight (= encoder.embed_tokens.weight, tied)
#   blocks.{i}.norm1.weight                   encoder.block.{i}.layer.0.layer_norm.weight
#   blocks.{i}.attn.{q,k,v,o}.weight          encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
#   blocks.{i}.pos_embedding.embedding.weight encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight
#   blocks.{i}.norm2.weight                   encoder.block.{i}.layer.1.layer_norm.weight
#   blocks.{i}.ffn.gate.0.weight              encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight  (gelu branch)
#   blocks.{i}.ffn.fc1.weight                 encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight  (linear branch)
#   blocks.{i}.ffn.fc2.weight                 encoder.block.{i}.layer.1.DenseReluDense.wo.weight
#   norm.weight                               encoder.final_layer_norm.weight

_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def _official_to_hf_key(key: str) -> str:
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in _BLOCK:
        return f"encoder.block.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return key  # unknown: kept, a strict load reports it


def _hf_to_official_key(key: str) -> str:
    if key in _TIED:
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if m and m.group(2) in _BLOCK_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    return key


def umt5_state_dict_from_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` keys -> ``transformers.UMT5EncoderModel`` keys. The
    token embedding appears under both tied names (the same tensor), as ``UMT5EncoderModel.state_dict()``
    has it."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = _official_to_hf_key(k)
        if new in out:
            raise ValueError(f"two umT5 keys map to {new!r} (one of them is {k!r})")
        out[new] = v
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def umt5_state_dict_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``transformers.UMT5EncoderModel`` keys -> Wan's official keys (the tied embedding once)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = _hf_to_official_key(k)
        if new in out:
            a = out[new]
            if k in _TIED and (a is v or (a.shape == v.shape and (a.is_meta or v.is_meta or torch.equal(a, v)))):
                continue  # the tied alias
            raise ValueError(f"two umT5 keys map to {new!r} (one of them is {k!r})")
        out[new] = v
    return out


# ----------------------------------------------------------------------------------------------------
# The encoder


class UMT5TextEncoder(FrozenEncoder):
    """Tokenizer + ``UMT5EncoderModel``: ``encode(prompts) -> [B, text_len, d_model]``, zero past each
    prompt's tokens. Frozen (eval, no grad). ``offload()`` / ``on(device)`` move it off / onto a GPU."""

    def __init__(self, model, tokenizer, *, text_len: int = TEXT_LEN, offload_device: str | torch.device = "cpu"):
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        super().__init__(model, offload_device=offload_device)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def dim(self) -> int:
        return self.model.config.d_model



    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(ids, mask)``, both ``[B, text_len]``: cleaned, EOS appended, truncated and right-padded."""
        prompts = _as_prompt_list(prompts)
        out = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str], *, dtype: torch.dtype | None = None) -> Tensor:
        """``[B, text_len, d_model]`` on the encoder's device, in its dtype unless ``dtype`` is given.
        Positions at and past each prompt's length (its tokens, EOS included) are exactly zero."""
        ids, mask = self.tokenize(prompts)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        states = torch.where(mask.bool()[..., None], states, torch.zeros((), dtype=states.dtype, device=device))
        return states if dtype is None else states.to(dtype)




def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty sequence of strings, got {prompts!r}")
    return prompts


# ----------------------------------------------------------------------------------------------------
# Loading


def _find_tokenizer(*candidates: Path) -> Path | None:
    for c in candidates:
        if c.is_dir() and any((c / f).exists() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
            return c
    return None


def load_text_encoder(
    path: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_len: int = TEXT_LEN,
    config=None,
) -> UMT5TextEncoder:
    """Loads umT5 from
    * Wan's official ``models_t5_umt5-xxl-enc-bf16.pth`` (converted; ``config`` defaults to umT5-XXL;
      the tokenizer defaults to the ``google/umt5-xxl`` folder beside it, as in the Wan2.1 release),
    * a ``transformers`` folder (config.json + safetensors, e.g. diffusers' ``text_encoder/``), or
    * a diffusers pipeline root holding ``text_encoder/`` and ``tokenizer/``.
    Loading is strict (missing / unexpected / mis-shaped keys are one ``ValueError``); weights go to
    ``device`` in ``dtype`` (default: bf16 on CUDA as Wan, fp32 elsewhere)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    path = Path(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if path.is_dir():
        model_dir = path / "text_encoder" if (path / "text_encoder" / "config.json").exists() else path
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (a transformers umT5 folder or a pipeline root)")
        default_tok = _find_tokenizer(model_dir.parent / "tokenizer", model_dir)
        try:
            model, info = UMT5EncoderModel.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
        except Exception as e:  # transformers/safetensors raise various types for a bad file
            raise ValueError(
                f"could not load umT5 from {model_dir} ({type(e).__name__}: {e}); "
                "the weights may be truncated or corrupt"
            ) from e
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems or info.get("error_msgs"):
            lines = [f"umT5 checkpoint {model_dir} does not match the model:"]
            lines += [f"  {k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, v[:20]))}" for k, v in problems.items()]
            lines += [f"  {m}" for m in info.get("error_msgs") or []]
            raise ValueError("\n".join(lines))
        model = model.to(device)
    else:
        sd = read_state_dict(path)
        if "token_embedding.weight" not in sd and "blocks.0.attn.q.weight" not in sd:
            sample = ", ".join(sorted(sd)[:5]) or "no keys"
            raise ValueError(f"{path} is not Wan's umT5 encoder checkpoint (keys: {sample})")
        config = config if config is not None else umt5_xxl_config()
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        hf = umt5_state_dict_from_official(sd)
        load_state_dict_strict(model, hf, what="umT5", source=str(path), dtype=dtype, device=device,
                               rename_for_report=_hf_to_official_key)  # fmt: skip
        model.tie_weights()
        default_tok = _find_tokenizer(path.parent / "google" / "umt5-xxl", path.parent / "tokenizer")
    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else default_tok
    if tok_dir is None:
        raise FileNotFoundError(
            f"no tokenizer found next to {path}: pass tokenizer_path (a local umt5 tokenizer folder)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return UMT5TextEncoder(model, tokenizer, text_len=text_len)


# ----------------------------------------------------------------------------------------------------
# A tiny stand-in for tests and CPU demos (no download): byte-level tokenizer + small random umT5.


def byte_tokenizer():
    """A ``transformers`` fast tokenizer over bytes (any text, ids 3..258; ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, EOS appended): the umT5 conventions with a 259-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(
    d_model: int = 32, *, num_layers: int = 2, num_heads: int = 4, text_len: int = TEXT_LEN, seed: int = 0
) -> UMT5TextEncoder:
    """A random umT5 of width ``d_model`` with the byte tokenizer (fp32, CPU)."""
    from transformers import UMT5Config, UMT5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
    config = UMT5Config(
        vocab_size=259, d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model, num_layers=num_layers,
        num_heads=num_heads, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
        relative_attention_max_distance=128, is_encoder_decoder=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    return UMT5TextEncoder(model, byte_tokenizer(), text_len=text_len)
