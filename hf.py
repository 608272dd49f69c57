"""
Hugging Face conversion: GPT-2 weights in (a hub name or a save_pretrained folder) and out. Our module
names are GPT-2's, so a state dict converts key by key, with the four Conv1D matrices transposed.
"""

from configurator import UsageError, first_line
from model import GPT, GPTConfig, LAYER_NORM_EPS

# Hugging Face's GPT-2 stores these weights as Conv1D, i.e. transposed relative to nn.Linear.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def refuse_gpt2_variants(hc, name_or_path):
    """A UsageError naming the first Hugging Face GPT-2 setting whose maths this model does not have:
    loading such weights would run without error and compute something else."""
    implemented = {  # field: (is the value one we compute?, what we compute)
        "activation_function": (hc.activation_function in ("gelu_new", "gelu_pytorch_tanh"), "'gelu_new' (tanh GELU)"),
        "n_inner": (hc.n_inner in (None, 4 * hc.n_embd), f"None (an MLP 4 x n_embd = {4 * hc.n_embd} wide)"),
        "scale_attn_weights": (hc.scale_attn_weights, "True (scores divided by sqrt(head size))"),
        "scale_attn_by_inverse_layer_idx": (not hc.scale_attn_by_inverse_layer_idx, "False"),
        "reorder_and_upcast_attn": (not hc.reorder_and_upcast_attn, "False"),
        "layer_norm_epsilon": (hc.layer_norm_epsilon == LAYER_NORM_EPS, f"{LAYER_NORM_EPS}"),
        "add_cross_attention": (not hc.add_cross_attention, "False (a decoder only)"),
        "tie_word_embeddings": (hc.tie_word_embeddings, "True (the head is the token embedding)"),
    }
    for field, (ok, ours) in implemented.items():
        if not ok:
            raise UsageError(f"{name_or_path} is a GPT-2 variant this model does not implement: {field} is "
                             f"{getattr(hc, field)!r}, GlassGPT computes {ours}; use a standard GPT-2 checkpoint")


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


def gpt2_from_hf(name_or_path, overrides=None):
    """A GPT holding Hugging Face GPT-2 weights; overrides may set dropout and attention. A hub name with
    no network, or a wrong name, is one clear error."""
    overrides = overrides or {}
    assert set(overrides) <= {"dropout", "attention"}, overrides
    from transformers import GPT2Config, GPT2LMHeadModel
    try:
        refuse_gpt2_variants(GPT2Config.from_pretrained(name_or_path), name_or_path)
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
    except OSError as e:
        raise UsageError(f"could not load '{name_or_path}': the Hugging Face hub is unreachable or the "
                         f"name is wrong ({first_line(e, 100)}); a local directory made by "
                         "save_pretrained works offline") from e
    hc = hf.config
    model = GPT(GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                          n_head=hc.n_head, n_embd=hc.n_embd, bias=True, **overrides))
    model.load_state_dict(hf_to_ours(hf.state_dict()))
    return model
