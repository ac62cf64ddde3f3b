"""LoRA adapters on the attention projections of open_clip towers, through peft.

How q, k and v attach. open_clip's `ResidualAttentionBlock.attn` is an `nn.MultiheadAttention`, which
holds q, k and v as ONE fused `in_proj_weight` [3D, D] and never calls `out_proj.forward`. peft 0.21's
own `lora.MultiheadAttention` adapts that fused matrix with a single A shared by q, k and v, always
adapts out_proj as well, and re-merges the weights on every forward, so `lora_dropout` has no effect.
None of that lets q, k and v be chosen separately. Instead, as the reference CLIP-LoRA and
AdvCLIP-LoRA code does, each targeted block's attention is swapped for `SplitQKVAttention`: q_proj,
k_proj, v_proj and out_proj `nn.Linear`s initialised by splitting the fused weights, feeding
`F.scaled_dot_product_attention` with open_clip's attn_mask (the text tower is causal) in the block's
own batch layout. It computes the same function, so peft's ordinary `lora.Linear` attaches to exactly
the projections asked for, dropout included. `LoraCLIP.merge` folds the adapters in and swaps the fused
`nn.MultiheadAttention` back, so the merged model is a plain open_clip model with open_clip's keys.
A ResNet image tower (the embedded lorekit-tiny) has one attention layer, its attention pool, which
keeps separate q/k/v/c projections but bypasses their modules the same way: `SplitAttentionPool2d`
computes it through them, and its q, k, v and o (c_proj) adapters attach there.

Adapters are added in place: φθ0, the frozen reference, is the same model under `LoraCLIP.disabled()`,
not a second copy. Defaults follow AdvCLIP-LoRA: rank 2, alpha 1, dropout 0.25 on q, k, v of all
blocks of both towers.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import peft
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from .config import ConfigError, check_choice

TARGETS = ("q", "k", "v", "o")
"""q, k, v: the attention input projections; o: its output projection (CLIP-LoRA's names)."""
TOWERS = ("image", "text", "both")
_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_POOL_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "c_proj"}
_ADAPTER = "default"


class SplitQKVAttention(nn.Module):
    """open_clip's `nn.MultiheadAttention` call with q, k, v as separate Linears; same outputs.

    Supports what open_clip passes: (query, key, value, need_weights=False, attn_mask) with an additive
    or boolean mask of shape [L, S] or [B·heads, L, S], and either batch layout.
    """

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitQKVAttention:
        w = mha.in_proj_weight
        split = cls(mha.embed_dim, mha.num_heads, mha.batch_first).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for proj, weight, bias in zip((split.q_proj, split.k_proj, split.v_proj),
                                          w.chunk(3), mha.in_proj_bias.chunk(3)):
                proj.weight.copy_(weight)
                proj.bias.copy_(bias)
            split.out_proj.load_state_dict(mha.out_proj.state_dict())
        return split

    def to_mha(self) -> nn.MultiheadAttention:
        """The fused module open_clip builds, holding the current weights."""
        w = self.q_proj.weight
        d = w.shape[1]
        mha = nn.MultiheadAttention(d, self.num_heads, batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([p.weight for p in projs]))
            mha.in_proj_bias.copy_(torch.cat([p.bias for p in projs]))
            mha.out_proj.load_state_dict(self.out_proj.state_dict())
        return mha

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("SplitQKVAttention returns no attention weights (it runs scaled_dot_product_attention)")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n_q, d = query.shape
        n_kv = key.shape[1]
        q = self.q_proj(query).view(b, n_q, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(key).view(b, n_kv, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(value).view(b, n_kv, self.num_heads, -1).transpose(1, 2)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MultiheadAttention's True means "masked"; SDPA's means "kept"
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(b, self.num_heads, n_q, n_kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n_q, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


class SplitAttentionPool2d(AttentionPool2d):
    """open_clip's ResNet attention pool, computed through its q/k/v/c projection modules; same outputs.

    The original passes the projections' weights to F.multi_head_attention_forward, so an adapter wrapping
    the modules would never run. Only the pooled (mean) token's query is needed: the pool returns that row.
    Instances are switched to this class in place and back (`__class__`), keeping parameters and keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # NCHW -> N(HW)C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        b, n, d = x.shape
        q = self.q_proj(x[:, :1]).view(b, 1, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)
        return self.c_proj(out)


@dataclass(frozen=True)
class LoraSettings:
    """What `add_lora` was asked for; validated on construction, worth saving next to the weights."""

    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    targets: tuple[str, ...] = ("q", "k", "v")
    towers: str = "both"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank={self.rank!r}: must be an integer >= 1 (e.g. 2 or 8)")
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r}: must be > 0 (the update is scaled by alpha/rank)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r}: must lie in [0, 1)")
        if isinstance(self.targets, str) or not self.targets:
            raise ConfigError(f"targets={self.targets!r}: must be a non-empty sequence of {', '.join(TARGETS)} "
                              "(e.g. ('q', 'v'))")
        for target in self.targets:
            if target not in TARGETS:
                raise ConfigError(f"targets={self.targets!r}: {target!r} is not one of {', '.join(TARGETS)}")
        check_choice("towers", self.towers, TOWERS)


def _is_plain(mha: nn.MultiheadAttention) -> bool:
    """The kind open_clip builds, which SplitQKVAttention reproduces exactly."""
    return (mha._qkv_same_embed_dim and mha.in_proj_bias is not None and mha.bias_k is None
            and not mha.add_zero_attn and mha.dropout == 0)


def _attention_blocks(model: nn.Module, towers: str) -> dict[str, nn.Module]:
    """Attention modules that get adapters, by name: transformer blocks (ViT and text towers) and a ResNet
    tower's attention pool. The image tower is `model.visual`, the text tower the rest."""
    found: dict[str, dict[str, nn.Module]] = {"image": {}, "text": {}}
    for name, module in model.named_modules():
        if isinstance(module, (ResidualAttentionBlock, AttentionPool2d)):
            found["image" if name.startswith("visual.") else "text"][name] = module
    blocks: dict[str, nn.Module] = {}
    for tower in ("image", "text") if towers == "both" else (towers,):
        if not found[tower]:
            raise ConfigError(f"towers={towers!r}: {type(model).__name__} has no open_clip attention block in its "
                              f"{tower} tower (valid: open_clip ViT, ResNet and text transformer towers, not timm, "
                              "ConvNeXt or Hugging Face ones)")
        blocks.update(found[tower])
    for name, block in blocks.items():
        if isinstance(block, AttentionPool2d):
            if type(block) is not AttentionPool2d:
                raise ConfigError(f"towers={towers!r}: {name} is already adapted")
        elif not isinstance(block.attn, nn.MultiheadAttention) or not _is_plain(block.attn):
            raise ConfigError(f"towers={towers!r}: {name}.attn is a {type(block.attn).__name__} of a kind LoRA "
                              "cannot attach to here (expected open_clip's nn.MultiheadAttention; already adapted?)")
    return blocks


class LoraCLIP:
    """An open_clip model carrying LoRA adapters (added in place); only adapter weights are trainable.

    Use `model` as before (encode_image, encode_text, `model.visual` in an ImageEncoder): it now runs
    with the adapters. Under `disabled()` it computes the original model's outputs.
    """

    def __init__(self, model: nn.Module, settings: LoraSettings) -> None:
        blocks = _attention_blocks(model, settings.towers)  # validates before anything is changed
        self.model = model
        self.settings = settings
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        names = []
        for name, block in blocks.items():
            if isinstance(block, AttentionPool2d):
                block.__class__ = SplitAttentionPool2d
                names += [f"{name}.{_POOL_PROJ[t]}" for t in settings.targets]
            else:
                block.attn = SplitQKVAttention.from_mha(block.attn)
                names += [f"{name}.attn.{_PROJ[t]}" for t in settings.targets]
        # One anchored regex: peft matches a list of names by suffix, so with towers='text' the name
        # 'transformer.resblocks.0.attn.out_proj' would also wrap the image tower's (never called)
        # 'visual.transformer.resblocks.0.attn.out_proj' of its untouched MultiheadAttention.
        config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                 target_modules="|".join(map(re.escape, names)), bias="none")
        self._peft: peft.PeftModel | None = peft.get_peft_model(model, config, adapter_name=_ADAPTER)
        model.train(model.training)  # new modules (peft's dropout included) start in train mode, even in an eval model

    @property
    def peft_model(self) -> peft.PeftModel:
        """peft's wrapper around `model` (its switches and state-dict helpers work on it)."""
        if self._peft is None:
            raise RuntimeError("the adapters were merged into the model; this LoraCLIP is spent")
        return self._peft

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """The frozen reference φθ0: the same model with its adapters switched off (and not trainable)."""
        with self.peft_model.disable_adapter():
            yield self.model

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights only (sharing storage with the parameters, as state_dict() does)."""
        return peft.get_peft_model_state_dict(self.peft_model, adapter_name=_ADAPTER)

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights from `adapter_state_dict()` of a model adapted with the same settings."""
        expected = self.adapter_state_dict()
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        wrong = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
        # peft's own loader is lenient (strict=False): it would skip a missing or misnamed adapter silently.
        if missing or unexpected or wrong:
            raise ConfigError(f"adapter state: {len(missing)} missing, {len(unexpected)} unexpected and {len(wrong)} "
                              f"wrongly shaped tensors (e.g. {sorted(missing | unexpected)[:1] + wrong[:1]}); "
                              f"it must come from a model adapted with {self.settings}")
        peft.set_peft_model_state_dict(self.peft_model, state, adapter_name=_ADAPTER)

    def merge(self) -> nn.Module:
        """Fold the adapters into the weights; returns the model in open_clip's own layout.

        Its state_dict() has exactly open_clip's keys (fused in_proj_weight), so it saves and loads with
        `open_clip.create_model(name, pretrained=path)`; requires_grad is as before `add_lora`.
        """
        model = self.peft_model.merge_and_unload()
        self._peft = None
        for module in model.modules():
            if isinstance(module, ResidualAttentionBlock) and isinstance(module.attn, SplitQKVAttention):
                module.attn = module.attn.to_mha()
            elif isinstance(module, SplitAttentionPool2d):
                module.__class__ = AttentionPool2d
        model.train(model.training)  # the rebuilt MultiheadAttentions start in train mode
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad[name])
        return model


def add_lora(model: nn.Module, *, rank: int = 2, alpha: float = 1.0, dropout: float = 0.25,
             targets: Sequence[str] = ("q", "k", "v"), towers: str = "both") -> LoraCLIP:
    """Add LoRA (through peft) to the attention projections of an open_clip CLIP model, in place.

    Update of a targeted projection W: ΔW = (alpha/rank)·B·A, B starting at zero so the adapted model
    starts equal to the original; `dropout` acts on the adapter's input in train mode. targets: any of
    'q', 'k', 'v' (attention input projections) and 'o' (output projection); towers: 'image'
    (`model.visual`), 'text' or 'both'. Bad values raise ConfigError before the model is touched.
    """
    settings = LoraSettings(rank=rank, alpha=alpha, dropout=dropout,
                            targets=targets if isinstance(targets, str) else tuple(targets), towers=towers)
    return LoraCLIP(model, settings)


class AdaptersOff(nn.Module):
    """φθ0 as a module: the adapted encoder run with its adapters switched off (no second copy).

    The encoder is held outside the module tree, so `.eval()`/`.to()` on the reference leave the trained
    encoder's mode alone and its state dict is not saved twice.
    """

    def __init__(self, encoder: nn.Module, adapters: LoraCLIP) -> None:
        super().__init__()
        object.__setattr__(self, "encoder", encoder)
        object.__setattr__(self, "adapters", adapters)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.adapters.disabled():
            return self.encoder(images)


def merged_copy(model: nn.Module, settings: dict, adapter_state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain open_clip model: a copy of `model` with saved adapter weights folded in (a LoRA run's result)."""
    import copy

    adapters = add_lora(copy.deepcopy(model), **settings)
    adapters.load_adapter_state_dict(adapter_state)
    return adapters.merge()
