"""A toy GPT shaped like Megatron-DeepSpeed's GPTModelPipe, on DeepSpeed's PipelineModule.

The layer list, hence the parameter names, follows GPTModelPipe:

    0        a function attaching position ids to the token ids
    1        TiedLayerSpec "embed": EmbeddingPipe (word_embeddings, position_embeddings)
    2..L+1   ParallelTransformerLayerPipe, one per layer
    L+2      the final LayerNorm ("{L+2}.weight", "{L+2}.bias")
    L+3      TiedLayerSpec "embed" again: the LM head, logits against the tied word embeddings
    L+4      a function casting the logits to fp32 for the loss

With `llama` (Megatron-DeepSpeed's Llama recipe) the embedding has no position embeddings (rotary
positions, applied to queries and keys as Megatron-DeepSpeed's apply_rotary_pos_emb does), norms are
RMSNorm (weight only), linear layers have no biases, and the output layer is separate: layer 1 is a
plain LayerSpec ("1.word_embeddings.weight") and L+3 an LMHeadPipe ("{L+3}.lm_head.weight").

Tensor parallelism is real (see tensor_parallel.py), and weights start from the same global tensors
in every layout. Unlike Megatron, the logits of the vocabulary padding rows are cut off before the
loss: then the loss does not depend on the tensor-parallel degree, and the padding, which
ds_to_universal drops and DeepSpeed restores as zeros, stays zero and plays no part.
"""

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from ucpflow.demo.megatron.config import GPTConfig
from ucpflow.demo.megatron.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TensorParallel,
                                                   VocabParallelEmbedding, copy_to_tensor_parallel_region,
                                                   full_normal, gather_last_dim)


class EmbeddingPipe(nn.Module):

    def __init__(self, config: GPTConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.vocab = config.vocab
        self.tp = tp
        self.word_embeddings = VocabParallelEmbedding(config.vocab, config.padded_vocab, config.hidden,
                                                      config.vocab_rows(tp.rank), tp, seed, "word_embeddings")
        if not config.llama:
            self.position_embeddings = nn.Embedding(config.seq, config.hidden)
            with torch.no_grad():
                self.position_embeddings.weight.copy_(full_normal((config.seq, config.hidden), seed,
                                                                  "position_embeddings"))

    @property
    def word_embeddings_weight(self):
        return self.word_embeddings.weight

    def forward(self, inputs):
        tokens, position_ids = inputs
        embedded = self.word_embeddings(tokens)
        return embedded if not hasattr(self, "position_embeddings") else embedded + self.position_embeddings(position_ids)

    def lm_logits(self, hidden):
        """The LM head on the last stage: logits over the real (unpadded) vocabulary, gathered from all ranks."""
        local_logits = F.linear(copy_to_tensor_parallel_region(hidden, self.tp), self.word_embeddings.weight)
        return gather_last_dim(local_logits, self.tp)[..., :self.vocab]


class LMHeadPipe(nn.Module):
    """Megatron-DeepSpeed's untied output layer: a column-parallel linear over the padded vocabulary, no bias."""

    def __init__(self, config: GPTConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.vocab = config.vocab
        self.tp = tp
        self.lm_head = VocabParallelEmbedding(config.vocab, config.padded_vocab, config.hidden,
                                              config.vocab_rows(tp.rank), tp, seed, "lm_head")

    def forward(self, hidden):
        local_logits = F.linear(copy_to_tensor_parallel_region(hidden, self.tp), self.lm_head.weight)
        return gather_last_dim(local_logits, self.tp)[..., :self.vocab]


class RMSNorm(nn.Module):
    """Megatron-DeepSpeed's RMSNorm: x / rms(x) in fp32, times the weight."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def norm(config: GPTConfig):
    return RMSNorm(config.hidden, config.norm_eps) if config.llama else nn.LayerNorm(config.hidden, config.norm_eps)


def apply_rotary(t, theta: float):
    """Megatron-DeepSpeed's rotary embedding of [batch, heads, seq, head_dim]: frequencies
    1 / theta^(2i / head_dim), emb = [freqs; freqs], t * cos + rotate_half(t) * sin."""
    dim, length = t.shape[-1], t.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    first, second = t.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return t * emb.cos().to(t.dtype) + rotated * emb.sin().to(t.dtype)


class ParallelAttention(nn.Module):

    def __init__(self, config: GPTConfig, tp: TensorParallel, seed: int, prefix: str):
        super().__init__()
        self.config = config
        self.local_kv_heads = len(config.kv_head_range(tp.rank))
        bias = not config.llama
        self.query_key_value = ColumnParallelLinear(config.hidden, sum(config.qkv_sub_param_sizes()),
                                                    config.qkv_rows(tp.rank), tp, seed, prefix + ".query_key_value",
                                                    bias)
        self.dense = RowParallelLinear(config.heads * config.head_dim, config.hidden,
                                       config.attention_output_columns(tp.rank), tp, seed, prefix + ".dense", bias)

    def forward(self, x):
        batch, length, _ = x.shape
        kv_heads, group, head_dim = self.local_kv_heads, self.config.group_size, self.config.head_dim
        qkv = self.query_key_value(x)
        if self.config.qkv_layout == "interleaved":
            grouped = qkv.view(batch, length, kv_heads, group + 2, head_dim)
            q = grouped[:, :, :, :group].reshape(batch, length, kv_heads * group, head_dim)
            k, v = grouped[:, :, :, group], grouped[:, :, :, group + 1]
        else:
            q, k, v = qkv.split([kv_heads * group * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q = q.view(batch, length, kv_heads * group, head_dim)
            k, v = k.view(batch, length, kv_heads, head_dim), v.view(batch, length, kv_heads, head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.config.llama:
            q, k = apply_rotary(q, self.config.rope_theta), apply_rotary(k, self.config.rope_theta)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(context.transpose(1, 2).reshape(batch, length, kv_heads * group * head_dim))


class ParallelMLP(nn.Module):

    def __init__(self, config: GPTConfig, tp: TensorParallel, seed: int, prefix: str):
        super().__init__()
        self.swiglu = config.swiglu
        rows = config.ffn_size * (2 if config.swiglu else 1)
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden, rows, config.mlp_rows(tp.rank), tp, seed,
                                                  prefix + ".dense_h_to_4h", not config.llama)
        self.dense_4h_to_h = RowParallelLinear(config.ffn_size, config.hidden, config.mlp_output_columns(tp.rank),
                                               tp, seed, prefix + ".dense_4h_to_h", not config.llama)
        # Each rank trains its own copy on its own partial output, so the copies drift apart: the
        # converter has to average them (PARAMETER_TO_AVERAGE_PATTERNS).
        self.partial_output_scale = nn.Parameter(torch.ones(1)) if config.partial_output_scale else None

    def forward(self, x):
        intermediate = self.dense_h_to_4h(x)
        if self.swiglu:
            gate, up = intermediate.chunk(2, dim=-1)
            intermediate = F.silu(gate) * up
        else:
            intermediate = F.gelu(intermediate, approximate="tanh")
        return self.dense_4h_to_h(intermediate, self.partial_output_scale)


class ParallelTransformerLayerPipe(nn.Module):

    def __init__(self, config: GPTConfig, tp: TensorParallel, seed: int, layer_number: int):
        super().__init__()
        prefix = f"layers.{layer_number}"
        self.input_layernorm = norm(config)
        self.self_attention = ParallelAttention(config, tp, seed, prefix + ".self_attention")
        self.post_attention_layernorm = norm(config)
        self.mlp = ParallelMLP(config, tp, seed, prefix + ".mlp")

    def forward(self, hidden):
        hidden = hidden + self.self_attention(self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def attach_position_ids(tokens):
    return tokens, torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)


def logits_to_fp32(logits):
    return logits.float()


def cross_entropy(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class GPTModelPipe(PipelineModule):

    def __init__(self, config: GPTConfig, topology, seed: int):
        if topology.get_dim("model") != config.tp:
            raise ValueError(f"topology with {topology.get_dim('model')} tensor-parallel ranks for tp {config.tp}")
        tp = TensorParallel.from_topology(topology)
        if config.llama:
            embedding = LayerSpec(EmbeddingPipe, config, tp, seed)
            head = LayerSpec(LMHeadPipe, config, tp, seed)
        else:
            embedding = TiedLayerSpec("embed", EmbeddingPipe, config, tp, seed, tied_weight_attr="word_embeddings_weight")
            head = TiedLayerSpec("embed", EmbeddingPipe, config, tp, seed, forward_fn=EmbeddingPipe.lm_logits,
                                 tied_weight_attr="word_embeddings_weight")
        specs = [
            attach_position_ids,
            embedding,
            *(LayerSpec(ParallelTransformerLayerPipe, config, tp, seed, layer_number)
              for layer_number in range(config.layers)),
            LayerSpec(RMSNorm, config.hidden, config.norm_eps) if config.llama else LayerSpec(nn.LayerNorm,
                                                                                              config.hidden),
            head,
            logits_to_fp32,
        ]
        super().__init__(layers=specs, loss_fn=cross_entropy, topology=topology, partition_method="type:transformer")
        self.config = config
