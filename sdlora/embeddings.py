"""New tokens: trained with the LoRA (pivotal tuning, `--train-embedding`) and carried inside it.

A new token gets one or more vectors in each text encoder's input embedding. They are kept apart from the
vocabulary's rows (`TokenEmbedding`, a small fp32 parameter beside the frozen embedding), so they train while
every old row stays untouched, and taking them away is putting the original embedding module and tokenizer
back: nothing is resized or copied. A token of N vectors is written once in captions and prompts and stands for
`TOKEN TOKEN_1 ... TOKEN_{N-1}`, diffusers' convention for multi-vector embeddings (its pipelines expand
prompts the same way).

In files: `bundle_emb.TOKEN.<encoder>` tensors of shape (N, width) inside the LoRA (the layout A1111 and
ComfyUI read; encoder keys clip_l for SD 1.x, clip_h for SD 2.x, clip_l and clip_g for SDXL), and for a
standalone textual inversion `emb_params` (SD 1.x/2.x) or `clip_l` + `clip_g` (SDXL).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, FormatError

BUNDLE = "bundle_emb."
ENCODER_KEYS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
MAX_VECTORS = 16
_SPEC = re.compile(r"(?P<token>[^\s:,]+)(?::(?P<n>\d+))?")


def parse_spec(spec: str) -> tuple[str, int]:
    """`TOKEN` or `TOKEN:N` (N vectors) as --train-embedding takes it."""
    m = _SPEC.fullmatch(spec.strip())
    n = int(m["n"] or 1) if m else 0
    if not m or not 1 <= n <= MAX_VECTORS:
        raise ConfigError(f"--train-embedding {spec!r}: write TOKEN or TOKEN:N with N from 1 to {MAX_VECTORS} "
                          "vectors, and no spaces or commas in TOKEN (for example <rim> or <rim>:2)")
    return m["token"], n


def token_strings(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand(text: str, vectors: dict[str, int]) -> str:
    """Each multi-vector token written once becomes all its token strings, as diffusers' pipelines do it."""
    for token, n in vectors.items():
        if n > 1:
            text = re.sub(re.escape(token) + r"(?!_\d)", lambda _, t=token, k=n: " ".join(token_strings(t, k)), text)
    return text


def tokenizer_vectors(tokenizer) -> dict[str, int]:
    """The multi-vector tokens a tokenizer was given (TOKEN with TOKEN_1 ...), by their vector counts."""
    added = tokenizer.get_added_vocab()
    out = {}
    for token in added:
        n = 1
        while f"{token}_{n}" in added:
            n += 1
        if n > 1:
            out[token] = n
    return out


class TokenEmbedding(torch.nn.Module):
    """A text encoder's token embedding with rows for new token ids (from `first` on) held apart."""

    def __init__(self, original: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.original = original
        self.first = original.num_embeddings
        self.embedding_dim = original.embedding_dim
        self.num_embeddings = self.first + vectors.shape[0]
        self.vectors = torch.nn.Parameter(vectors.detach().to(original.weight.device, torch.float32).clone(),
                                          requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        out = self.original(torch.where(new, 0, ids))
        rows = self.vectors.to(out.dtype)[(ids - self.first).clamp(0, self.vectors.shape[0] - 1)]
        return torch.where(new.unsqueeze(-1), rows, out)


def original_embedding(te) -> torch.nn.Embedding:
    emb = te.get_input_embeddings()
    return emb.original if isinstance(emb, TokenEmbedding) else emb


def existing(tokenizer, token: str) -> bool:
    """Whether `token` already means something to the tokenizer: one piece of its vocabulary, or an added token."""
    pieces = tokenizer.tokenize(token)
    return token in tokenizer.get_added_vocab() or (len(pieces) == 1 and pieces[0] in tokenizer.get_vocab())


@dataclass
class Installed:
    """New tokens on one base: the tokenizers and embeddings they were added to, to take them away again."""

    tokens: dict[str, int] = field(default_factory=dict)  # token -> vectors, in order
    tokenizers: list = field(default_factory=list)  # the originals
    embeddings: list[TokenEmbedding] = field(default_factory=list)

    def slices(self) -> dict[str, slice]:
        out, at = {}, 0
        for token, n in self.tokens.items():
            out[token] = slice(at, at + n)
            at += n
        return out

    def vectors(self) -> dict[str, list[torch.Tensor]]:
        """Each token's vectors, one (N, width) tensor per text encoder."""
        return {t: [e.vectors.detach()[s] for e in self.embeddings] for t, s in self.slices().items()}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [e.vectors for e in self.embeddings]


def install(base, vectors: dict[str, list[torch.Tensor]], source: str | dict[str, str] = "") -> Installed:
    """Add tokens to every tokenizer and text encoder of `base` (which must hold none yet): token -> one (N, width)
    tensor per text encoder; `source` names where they come from (per token, or one for all) in errors. The
    tokenizers are replaced by extended copies; `remove` puts the originals back. Nothing changes on an error."""
    inst = Installed(tokens={t: v[0].shape[0] for t, v in vectors.items()}, tokenizers=list(base.tokenizers))
    sources = source if isinstance(source, dict) else dict.fromkeys(vectors, source)
    where = {t: f"{src}: " if src else "" for t, src in sources.items()}
    strings = [s for t, n in inst.tokens.items() for s in token_strings(t, n)]
    ready = []  # everything checked and built before the base is touched
    for i, (tok, te) in enumerate(zip(base.tokenizers, base.text_encoders, strict=True)):
        for token in vectors:
            if existing(tok, token):
                raise FormatError(f"{where[token]}token {token!r} is already in the base's vocabulary, so a new embedding "
                                  f"cannot take its place; name it differently (for example <{token.strip('<>')}>)")
        new = copy.deepcopy(tok)
        new.add_tokens(strings)
        emb = original_embedding(te)
        ids = new.convert_tokens_to_ids(strings)
        if ids != list(range(emb.num_embeddings, emb.num_embeddings + len(strings))):
            raise FormatError(f"{where[next(iter(vectors))]}the tokenizer gives new tokens the ids {ids[:3]}..., not the ones after the "
                              f"text encoder's {emb.num_embeddings} rows; this base's tokenizer and text encoder "
                              "do not match")
        rows = torch.cat([v[i].reshape(-1, emb.embedding_dim) for v in vectors.values()])
        ready.append((new, TokenEmbedding(emb, rows)))
    for i, (te, (new, wrapped)) in enumerate(zip(base.text_encoders, ready, strict=True)):
        te.set_input_embeddings(wrapped)
        base.tokenizers[i] = new
        inst.embeddings.append(wrapped)
    return inst


def remove(base, inst: Installed) -> None:
    """Exactly the base as it was before `install`: its own tokenizers and embedding modules."""
    for i, (te, wrapped) in enumerate(zip(base.text_encoders, inst.embeddings, strict=True)):
        te.set_input_embeddings(wrapped.original)
        base.tokenizers[i] = inst.tokenizers[i]


def initial_vectors(base, n: int, init: str = "") -> list[torch.Tensor]:
    """Starting vectors per text encoder: the mean embedding of `init`'s tokens, else of the whole vocabulary."""
    out = []
    for tok, te in zip(base.tokenizers, base.text_encoders, strict=True):
        weight = original_embedding(te).weight.detach().float()
        if init:
            ids = tok(init, add_special_tokens=False).input_ids
            if not ids:
                raise ConfigError(f"--embedding-init {init!r} gives no token; pass a word such as 'style'")
            start = weight[ids].mean(0)
        else:
            start = weight.mean(0)
        out.append(start.expand(n, -1).clone())
    return out


# ---------------------------------------------------------------- files


def bundle_tensors(vectors: dict[str, list[torch.Tensor]], family: str) -> dict[str, torch.Tensor]:
    keys = ENCODER_KEYS[family]
    return {f"{BUNDLE}{token}.{key}": v.detach().float().cpu().contiguous()
            for token, per_te in vectors.items() for key, v in zip(keys, per_te, strict=True)}


def textual_inversion_tensors(vectors: list[torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A standalone embedding file's tensors, as A1111, ComfyUI and diffusers' load_textual_inversion read them."""
    if family == "sdxl":
        return {k: v.detach().float().cpu().contiguous() for k, v in zip(ENCODER_KEYS[family], vectors, strict=True)}
    return {"emb_params": vectors[0].detach().float().cpu().contiguous()}


def split_bundles(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """The file's LoRA tensors, and its bundled embeddings as token -> {encoder key: tensor}."""
    rest, bundles = {}, {}
    for key, t in tensors.items():
        if not key.startswith(BUNDLE):
            rest[key] = t
            continue
        token, _, which = key[len(BUNDLE):].rpartition(".")
        if which == "*" and token.endswith(".string_to_param"):  # A1111's older naming, one text encoder
            token, which = token.removesuffix(".string_to_param"), "string_to_param"
        if not token or not which:
            raise FormatError(f"{path}: bundled embedding key {key!r} is not bundle_emb.TOKEN.ENCODER")
        bundles.setdefault(token, {})[which] = t
    return rest, bundles


def bundle_raw(bundles: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Bundles back into a file's keys, as they were read (for tools that rewrite a LoRA and keep its tokens)."""
    return {f"{BUNDLE}{token}.{'string_to_param.*' if which == 'string_to_param' else which}": t
            for token, parts in bundles.items() for which, t in parts.items()}


def bundle_vectors(path: Path, bundles: dict[str, dict[str, torch.Tensor]], base) -> dict[str, list[torch.Tensor]]:
    """A file's bundles checked against a base: one (N, width) tensor per text encoder for each token, or one clear
    error naming the file and token (missing encoder, wrong width, counts that differ, non-finite values)."""
    widths = [original_embedding(te).embedding_dim for te in base.text_encoders]
    out = {}
    for token, parts in bundles.items():
        if len(widths) == 1:
            if len(parts) != 1:
                raise FormatError(f"{path}: bundled token {token!r} has {sorted(parts)}; a base with one text "
                                  "encoder takes one tensor per token")
            chosen = list(parts.values())
        else:
            missing = [k for k in ENCODER_KEYS["sdxl"] if k not in parts]
            if missing:
                raise FormatError(f"{path}: bundled token {token!r} has no {missing[0]} tensor; SDXL needs clip_l "
                                  "and clip_g (one for each text encoder)")
            chosen = [parts[k] for k in ENCODER_KEYS["sdxl"]]
        per_te = []
        for t, width in zip(chosen, widths, strict=True):
            t = t.reshape(1, -1) if t.ndim == 1 else t
            if t.ndim != 2 or t.shape[1] != width:
                raise FormatError(f"{path}: bundled token {token!r} has vectors of shape {tuple(t.shape)}; this base's "
                                  f"text encoder takes width {width} (the LoRA was made for another base)")
            if not torch.isfinite(t).all():
                raise FormatError(f"{path}: bundled token {token!r} holds NaN or Inf values; the file is broken")
            per_te.append(t.float())
        if len({t.shape[0] for t in per_te}) != 1:
            raise FormatError(f"{path}: bundled token {token!r} has a different number of vectors per text encoder")
        out[token] = per_te
    return out
