"""Shape of the toy GPT and how its tensor-parallel shards are cut; plain Python, no torch.

Every sharded parameter is described by the indices, along one dimension of the full (global)
tensor, that a tensor-parallel rank holds. The model initialises full tensors from the seed and
keeps those indices, so any (tp, pp, dp) layout starts from the very same global weights.
"""

from dataclasses import dataclass

from ucpflow.errors import UcpflowError

QKV_LAYOUTS = ("interleaved", "blocks")


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 0  # 0: as many as heads (multi-head attention); fewer: grouped-query attention
    ffn_hidden: int = 0  # 0: 4 * hidden
    vocab: int = 100
    seq: int = 16
    make_vocab_size_divisible_by: int = 8
    # "interleaved": Megatron's fused QKV rows, grouped per key/value head as [q..., k, v], so a
    # contiguous split gives each rank whole heads. "blocks": rows [Q; K; V], so each rank holds a
    # piece of each of the three sub-parameters.
    qkv_layout: str = "interleaved"
    swiglu: bool = False
    # Llama-family blocks, as Megatron-DeepSpeed's --normalization rmsnorm --use-rotary-position-embeddings
    # --untie-embeddings-and-output-weights --disable-bias-linear build them: RMSNorm (weight only), rotary
    # positions (no position embeddings), a separate output layer and no linear biases.
    llama: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    partial_output_scale: bool = False  # a per-rank scalar on each MLP's partial output (differs across TP)
    tp: int = 1

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "vocab", "seq", "make_vocab_size_divisible_by", "tp"):
            if getattr(self, name) < 1:
                raise UcpflowError(f"Option {name} must be a positive integer, not {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise UcpflowError(f"Hidden size {self.hidden} is not divisible by the {self.heads} attention heads.")
        if self.heads % self.num_kv_heads:
            raise UcpflowError(f"{self.heads} attention heads cannot be grouped over {self.num_kv_heads} "
                               "key/value heads.")
        if self.qkv_layout not in QKV_LAYOUTS:
            raise UcpflowError(f"QKV layout {self.qkv_layout!r} is not one of {', '.join(QKV_LAYOUTS)}.")
        if self.ffn_size % self.tp:
            raise UcpflowError(f"MLP size {self.ffn_size} is not divisible by the tensor-parallel degree {self.tp}.")
        if self.llama and self.head_dim % 2:
            raise UcpflowError(f"Rotary positions need an even head size, not {self.head_dim}.")
        if self.num_kv_heads < self.tp:
            raise UcpflowError(f"{self.num_kv_heads} key/value heads cannot be spread over {self.tp} "
                               "tensor-parallel ranks.")

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.num_kv_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def padded_vocab(self) -> int:
        """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return -(-self.vocab // multiple) * multiple

    @property
    def even_heads(self) -> bool:
        """Whether every tensor-parallel rank holds the same number of heads."""
        return self.num_kv_heads % self.tp == 0

    def kv_head_range(self, rank: int) -> range:
        """The key/value heads of a rank: contiguous, the first (kv_heads % tp) ranks holding one more."""
        base, extra = divmod(self.num_kv_heads, self.tp)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))

    def query_head_range(self, rank: int) -> range:
        kv = self.kv_head_range(rank)
        return range(kv.start * self.group_size, kv.stop * self.group_size)

    def qkv_sub_param_sizes(self) -> tuple:
        """Rows of Q, K and V in the fused projection."""
        return (self.heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)

    def qkv_shard_widths(self) -> list:
        """Rows of Q, K and V that each rank holds: [[q rows of rank 0, ...], [k rows...], [v rows...]]."""
        kv_widths = [len(self.kv_head_range(rank)) * self.head_dim for rank in range(self.tp)]
        return [[width * self.group_size for width in kv_widths], kv_widths, list(kv_widths)]

    def qkv_rows(self, rank: int) -> list:
        """Rows of the full fused QKV weight (and bias) that a rank holds, in its local order."""
        kv, d, g = self.kv_head_range(rank), self.head_dim, self.group_size
        if self.qkv_layout == "interleaved":
            block = (g + 2) * d
            return list(range(kv.start * block, kv.stop * block))
        q_rows, k_rows, _ = self.qkv_sub_param_sizes()
        queries = range(kv.start * g * d, kv.stop * g * d)
        keys = range(q_rows + kv.start * d, q_rows + kv.stop * d)
        values = range(q_rows + k_rows + kv.start * d, q_rows + k_rows + kv.stop * d)
        return [*queries, *keys, *values]

    def attention_output_columns(self, rank: int) -> list:
        """Columns of the full attention output projection (self_attention.dense) that a rank holds."""
        queries = self.query_head_range(rank)
        return list(range(queries.start * self.head_dim, queries.stop * self.head_dim))

    def mlp_rows(self, rank: int) -> list:
        """Rows of the full mlp.dense_h_to_4h weight (and bias) that a rank holds, in its local order."""
        width = self.ffn_size // self.tp
        own = range(rank * width, (rank + 1) * width)
        if not self.swiglu:
            return list(own)
        # SwiGLU: the full weight is [gate; up] and each rank holds [its gate rows; its up rows].
        return [*own, *(self.ffn_size + row for row in own)]

    def mlp_output_columns(self, rank: int) -> list:
        width = self.ffn_size // self.tp
        return list(range(rank * width, (rank + 1) * width))

    def vocab_rows(self, rank: int) -> range:
        """Rows of the padded word embedding that a rank holds."""
        width = self.padded_vocab // self.tp
        return range(rank * width, (rank + 1) * width)
