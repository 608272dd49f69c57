"""
The GPT model in one file. Read it top to bottom: LayerNorm -> KV cache -> attention -> MLP ->
Block -> GPTConfig -> GPT (init, forward, surgery, from_pretrained, optimizers, generate) ->
sampling.
Shapes use B = batch, T = sequence length, C = n_embd, nh = n_head, hs = head size (C // nh),
V = vocab size. What only makes it fast or connects it elsewhere lives in machinery/: optimizers.py
(Muon), decoding.py (CUDA-graph decoding), hf.py (Hugging Face weights), speed.py (FLOPs and MFU).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from machinery.decoding import DecodeStep


LAYER_NORM_EPS = 1e-5  # GPT-2's


class LayerNorm(nn.Module):
    """Each token's vector scaled to mean 0 and variance 1, then by a learned gain plus an optional
    bias: nn.LayerNorm(ndim, bias=bias) computes the same; here its parameters are on the page."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class KVCache:
    """Keys and values of one layer at every position of the context: each (B, nh, block_size, hs).

    The buffers have their full size from the start (made on first use, in the dtype of the keys).
    Writing positions p fills those columns; attention then reads all block_size columns, and the
    causal mask row of each query hides the ones not written yet. So every one-token step has the
    same shapes, which lets the GPU reuse its kernels or replay the step as one CUDA graph
    (machinery/decoding.py: DecodeStep).
    """

    def __init__(self, block_size):
        self.block_size = block_size
        self.k = self.v = None

    def write(self, k, v, pos):
        """Store k, v (B, nh, T, hs) at positions pos (T,); return all keys and values, each
        (B, nh, block_size, hs)."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_zeros(B, nh, self.block_size, hs)
            self.v = v.new_zeros(B, nh, self.block_size, hs)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


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

    def forward(self, x, cache=None, pos=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask = None  # without a cache, the queries and keys are the same T positions: plain causal
        if cache is not None:
            k, v = cache.write(k, v, pos)  # (B, nh, block_size, hs)
            mask = self.causal_mask[pos]  # (T, block_size): the query at position p sees keys 0..p
        y = self._sdpa(q, k, v, mask) if self.attention == "sdpa" else self._explicit(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _sdpa(self, q, k, v, mask):
        """PyTorch's fused attention: the same maths as _explicit, in one kernel (flash on CUDA)."""
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _explicit(self, q, k, v, mask):
        """The textbook path the docs teach: softmax(q @ k^T / sqrt(hs), causal) @ v."""
        T, S = q.size(2), k.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
        if mask is None:
            mask = self.causal_mask[:T, :S]  # (T, S)
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)  # (the lens reads the weights here, with a forward hook)
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

    def forward(self, x, cache=None, pos=None):
        x = x + self.attn(self.ln_1(x), cache, pos)
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

    def forward(self, idx, targets=None, caches=None, pos=None):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T), logits are (B, T, V) and loss is the mean cross-entropy (targets of
        -1 are ignored). Without targets only the last position is scored: logits (B, 1, V).
        caches: one KVCache per layer, for generation, with pos (T,) the positions of idx's tokens.
        """
        B, T = idx.size()
        block_size = self.config.block_size
        assert T <= block_size, f"cannot run {T} tokens at once, block_size is {block_size}"
        if pos is None:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None, pos)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
            return logits, loss
        logits = self.lm_head(x[:, -1:, :])  # (B, 1, V): only the next token is needed
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
        """GPT-2's weights from Hugging Face (a hub name or a local save_pretrained folder). Our
        module names are GPT-2's, so its state dict loads key by key (machinery/hf.py transposes
        four matrices)."""
        from machinery.hf import gpt2_weights
        sizes, state = gpt2_weights(name_or_path, LAYER_NORM_EPS)
        model = cls(GPTConfig(**sizes, **(override_args or {})))  # (dropout, attention)
        model.load_state_dict(state)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             optimizer="adamw", muon_dtype=torch.bfloat16):
        """AdamW with weight decay on matrices (>= 2-D) only; biases and LayerNorm gains are not
        decayed. With optimizer='muon', the hidden 2-D matrices of the blocks use Muon
        (orthogonalising in muon_dtype) and everything else (embeddings, head, gains, biases) stays
        on AdamW."""
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
        fused = device_type in ("cuda", "cpu")  # one kernel for the whole update
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
        if optimizer != "muon":
            return [adamw]
        from machinery.optimizers import Muon  # training code: sampling never loads it
        muon = Muon([{"params": muon, "name": "muon"}], lr=learning_rate, weight_decay=weight_decay,
                    ns_dtype=muon_dtype)
        return [adamw, muon]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True,
                 generator=None, compile=False):
        """idx (B, T) -> (B, T + max_new_tokens): the prompt followed by the sampled tokens."""
        new = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, kv_cache,
                                   generator, compile)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        kv_cache=True, generator=None, compile=False):
        """Sample max_new_tokens tokens after idx (B, T), yielding each new (B, 1) as it is made.

        temperature 0 picks the most likely token (greedy); top_k keeps the k most likely, top_p
        the smallest set whose probability reaches p. Without the cache, each step runs the model
        on the last block_size tokens. With it, the prompt's window is run once (prefill) and each
        step then feeds only the new token (`DecodeStep`; compile=True also runs that step through
        torch.compile). Learned positions stop at block_size, so when the cache is full the last
        block_size // 2 tokens are run again from position 0 and steps continue.
        """
        block_size = self.config.block_size
        caches, step, pos = None, None, 0
        for _ in range(max_new_tokens):
            if not kv_cache:
                logits, _ = self(idx[:, -block_size:])
            elif caches is None or pos == block_size:
                pos = min(idx.size(1), block_size) if caches is None else block_size // 2
                caches = caches or [KVCache(block_size) for _ in range(self.config.n_layer)]
                positions = torch.arange(pos, device=idx.device)  # (pos,): the window restarts at 0
                logits, _ = self(idx[:, -pos:], caches=caches, pos=positions)
                step = step or DecodeStep(self, caches, idx.size(0), compile)  # decoding.py
            else:
                logits = step(idx[:, -1:], pos)  # the newest token, at position pos
                pos += 1
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def sampling_probs(logits, temperature, top_k=None, top_p=None):
    """logits (B, V) -> the probabilities (B, V) that sample_next draws from: temperature, top-k,
    softmax, top-p."""
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()  # greedy: all on the top
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        probs = top_p_filter(probs, top_p)
    return probs


def top_p_filter(probs, top_p):
    """Keep the smallest set of most likely tokens whose total probability is >= top_p;
    renormalise."""
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)  # (B, V)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability mass ranked above each
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)
