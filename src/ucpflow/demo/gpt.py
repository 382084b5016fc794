"""A small GPT-2-style causal language model whose DeepSpeed checkpoints exercise the converters.

The parameter layout follows GPT-2 (token and position embeddings, pre-LayerNorm blocks with a fused
qkv projection, a final LayerNorm and an LM head tied to the token embedding), with nn.Linear weights
in the usual (out_features, in_features) orientation. Initialisation depends only on the seed.
"""

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ucpflow.errors import UcpflowError


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    vocab: int = 500
    seq_len: int = 32

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "vocab", "seq_len"):
            if getattr(self, name) < 1:
                raise UcpflowError(f"GPT option {name} must be a positive integer, not {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise UcpflowError(f"GPT hidden size {self.hidden} is not divisible by the number of heads {self.heads}.")


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x):
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).split(hidden, dim=2)
        q, k, v = (t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, hidden))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden, 4 * config.hidden)
        self.proj = nn.Linear(4 * config.hidden, config.hidden)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.hidden)
        self.wpe = nn.Embedding(config.seq_len, config.hidden)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden)
        # The head owns the shared weight as a module of its own so that ZeRO-3 gathers it in the
        # head's forward; a bare F.linear on wte.weight would meet an already re-partitioned tensor.
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self._initialize(seed)

    @torch.no_grad()
    def _initialize(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        # GPT-2 scales the residual output projections by the depth.
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for name, parameter in self.named_parameters():
            if name.endswith(".bias"):
                parameter.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                parameter.fill_(1.0)
            else:
                std = residual_std if name.endswith("proj.weight") else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)

    def forward(self, tokens, targets=None):
        """The logits for (batch, length) token ids, or with targets their mean next-token cross entropy."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def freeze_parameters(model: nn.Module, patterns) -> list[str]:
    """Stop training every parameter whose name matches one of the shell-style patterns; returns their names."""
    frozen = []
    for pattern in patterns:
        matches = [name for name, _ in model.named_parameters() if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            names = ", ".join(name for name, _ in model.named_parameters())
            raise UcpflowError(f"Freeze pattern {pattern!r} matches no parameter of the model ({names}).")
        frozen.extend(matches)
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return sorted(set(frozen))


def synthetic_batch(step: int, batch_size: int, config: GPTConfig, seed: int = 0) -> torch.Tensor:
    """The (batch_size, seq_len + 1) token ids of a training step, a function of (seed, step) alone.

    Each sequence counts up modulo the vocabulary from a random start with a random stride of 1 to 4,
    so the model has something learnable and the loss visibly falls.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(config.vocab, (batch_size, 1), generator=generator)
    strides = torch.randint(1, 5, (batch_size, 1), generator=generator)
    offsets = torch.arange(config.seq_len + 1).unsqueeze(0)
    return (starts + strides * offsets) % config.vocab
