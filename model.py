"""
The GPT model in one file. Read it top to bottom: LayerNorm -> attention -> MLP -> Block ->
GPTConfig -> GPT. Shapes use B = batch, T = sequence length, C = n_embd, nh = n_head,
hs = head size (C // nh), V = vocab size.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be switched off (PyTorch's nn.LayerNorm always has one)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of the tokens seen so far, for one layer: each (B, nh, block_size, hs).

    Generation fills it once with the prompt (prefill), then appends one position per new token,
    so each step attends to the past without recomputing it. The buffers are made on first use,
    in the dtype the keys come in (bf16 under autocast, for example).
    """

    def __init__(self, block_size):
        self.block_size = block_size
        self.k = self.v = None
        self.length = 0

    def append(self, k, v):
        """Store k, v (B, nh, T, hs) after the cached positions; return all keys and values so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_zeros(B, nh, self.block_size, hs)
            self.v = v.new_zeros(B, nh, self.block_size, hs)
        start, end = self.length, self.length + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # one matmul makes the query, key and value of every head at once
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attention = config.attention
        # the causal mask for the explicit path: position t may look at positions <= t
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
        if self.attention == "sdpa":
            y = self._sdpa(q, k, v, past)
        else:
            y = self._explicit(q, k, v, past)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _sdpa(self, q, k, v, past):
        """PyTorch's fused attention: the same maths as _explicit, in one kernel (flash on CUDA)."""
        dropout_p = self.dropout if self.training else 0.0
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        # with a cache, query rows sit at positions past .. past+T-1 of the key columns
        T = q.size(2)
        mask = self.causal_mask[past:past + T, :past + T]  # (T, past + T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _explicit(self, q, k, v, past):
        """The textbook path the docs teach: softmax(q @ k^T / sqrt(hs), causal) @ v."""
        T, S = q.size(2), k.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
        mask = self.causal_mask[past:past + T, :S]  # (T, S)
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # the tanh form GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.gelu(x)
        x = self.c_proj(x)  # (B, T, C)
        return self.dropout(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: each sub-layer adds its output to the residual stream."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 rounded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    attention: str = "sdpa"  # 'sdpa' (fused kernel) or 'explicit' (the maths written out)


# Peak dense matmul throughput (FLOP/s) of known GPUs, from their vendors' data sheets, used for MFU.
PUBLISHED_PEAK_FLOPS = {
    ("A100", torch.bfloat16): 312e12, ("A100", torch.float16): 312e12, ("A100", torch.float32): 19.5e12,
    ("H100", torch.bfloat16): 989e12, ("H100", torch.float16): 989e12, ("H100", torch.float32): 67e12,
    ("H200", torch.bfloat16): 989e12, ("H200", torch.float16): 989e12, ("H200", torch.float32): 67e12,
    ("V100", torch.float16): 125e12, ("V100", torch.float32): 15.7e12,
    ("T4", torch.float16): 65e12, ("T4", torch.float32): 8.1e12,
    ("L4", torch.bfloat16): 121e12, ("L4", torch.float16): 121e12, ("L4", torch.float32): 30e12,
    ("4090", torch.bfloat16): 165e12, ("4090", torch.float16): 165e12, ("4090", torch.float32): 82.6e12,
}


def published_peak_flops(device_name, dtype):
    """The data-sheet peak for a known GPU name (e.g. 'NVIDIA H100 80GB HBM3'), else None."""
    for (gpu, peak_dtype), flops in PUBLISHED_PEAK_FLOPS.items():
        if gpu in device_name and peak_dtype == dtype:
            return flops
    return None


def measure_matmul_flops(device, dtype, n=1024, repeats=8):
    """Time square matmuls on this device: a measured peak for MFU when no data sheet applies."""
    import time
    rng = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=rng)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=rng)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        assert config.attention in ("sdpa", "explicit"), config.attention
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output layer reuses the token embedding matrix (one tensor, V x C)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # residual projections add into the stream once per layer, twice per block: scale them
        # down so the stream's variance does not grow with depth (GPT-2 paper)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default, and the token
        embeddings are counted once because they are shared with lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, caches=None):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T), logits are (B, T, V) and loss is the mean cross-entropy (targets of
        -1 are ignored). Without targets only the last position is scored: logits (B, 1, V).
        caches: one KVCache per layer, for generation; positions then continue after the cache.
        """
        B, T = idx.size()
        past = caches[0].length if caches else 0
        assert past + T <= self.config.block_size, (
            f"cannot run a sequence of {past + T} tokens, block_size is {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        logits = self.lm_head(x[:, [-1], :])  # (B, 1, V): only the next token is needed
        return logits, None

    def crop_block_size(self, block_size):
        """Shorten the context window, e.g. to fine-tune GPT-2 (1024) with a smaller block_size."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            block.attn.causal_mask = block.attn.causal_mask[:block_size, :block_size]

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """Load GPT-2 weights from Hugging Face (a hub name or a local save_pretrained directory)."""
        override_args = override_args or {}
        assert set(override_args) <= {"dropout", "attention"}, override_args
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        hc = hf.config
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, bias=True, **override_args)
        model = cls(config)
        model.load_state_dict(hf_to_ours(hf.state_dict()))
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw"):
        """AdamW with weight decay on matrices (>= 2-D) only; biases and LayerNorm gains are not
        decayed. With optimizer='muon', the hidden 2-D matrices of the blocks use torch.optim.Muon
        and everything else (embeddings, head, gains, biases) stays on AdamW."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in params.items() if p.dim() >= 2]
        no_decay = [p for n, p in params.items() if p.dim() < 2]
        muon = []
        if optimizer == "muon":
            hidden = {n for n, p in params.items() if p.dim() == 2 and ".h." in f".{n}"}
            muon = [params[n] for n in sorted(hidden)]
            decay = [p for n, p in params.items() if p.dim() >= 2 and n not in hidden]
        # every parameter lands in exactly one group
        assert len(decay) + len(no_decay) + len(muon) == len(params)
        groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
        if optimizer != "muon":
            return [adamw]
        return [adamw, torch.optim.Muon([{"params": muon, "name": "muon"}], lr=learning_rate,
                                        weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")]

    def flops_per_token(self):
        """Forward + backward FLOPs per token: 6 per parameter plus attention (PaLM appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: the share of the device's peak FLOP/s that training uses."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True,
                 generator=None):
        """idx (B, T) -> (B, T + max_new_tokens): the prompt followed by the sampled tokens."""
        new = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, kv_cache, generator)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        kv_cache=True, generator=None):
        """Sample max_new_tokens tokens after idx (B, T), yielding each new (B, 1) as it is made.

        temperature 0 picks the most likely token (greedy); top_k keeps the k most likely, top_p
        the smallest set whose probability reaches p. Without the cache, each step runs the model
        on the last block_size tokens. With it, the prompt's window is run once (prefill) and each
        step then feeds only the new token. Learned positions stop at block_size, so when the cache
        is full the last block_size // 2 tokens are run again from position 0 and steps continue.
        """
        block_size = self.config.block_size
        caches = None
        for _ in range(max_new_tokens):
            if not kv_cache:
                logits, _ = self(idx[:, -block_size:])
            elif caches is None or caches[0].length == block_size:
                keep = min(idx.size(1), block_size) if caches is None else block_size // 2
                caches = [KVCache(block_size) for _ in range(self.config.n_layer)]
                logits, _ = self(idx[:, -keep:], caches=caches)
            else:
                logits, _ = self(idx[:, -1:], caches=caches)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def top_p_filter(probs, top_p):
    """Keep the smallest set of most likely tokens whose total probability is >= top_p; renormalise."""
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)  # (B, V)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability mass ranked above each
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


# Hugging Face's GPT-2 stores these weights as Conv1D, i.e. transposed relative to nn.Linear.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_ours(hf_state):
    """A GPT2LMHeadModel state dict -> ours: same names, Conv1D weights transposed."""
    ours = {}
    for key, value in hf_state.items():
        if key.endswith((".attn.masked_bias", ".attn.bias")):
            continue  # causal-mask buffers in old transformers versions, not weights
        ours[key] = value.t() if key.endswith(HF_TRANSPOSED) else value
    return ours


def ours_to_hf(state):
    """Our state dict -> GPT2LMHeadModel's: the inverse of hf_to_ours."""
    return {key: (value.t() if key.endswith(HF_TRANSPOSED) else value).contiguous()
            for key, value in state.items()}
