"""
Hugging Face conversion: GPT-2 weights in (a hub name or a save_pretrained folder; model.py:
GPT.from_pretrained builds the model) and out (export.py). Our module names are GPT-2's, so a state dict
converts key by key, with the four Conv1D matrices transposed.
"""

from machinery.cli import UsageError, first_line

# Hugging Face's GPT-2 stores these weights as Conv1D, i.e. transposed relative to nn.Linear.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def refuse_gpt2_variants(hc, name_or_path, layer_norm_eps):
    """A UsageError naming the first Hugging Face GPT-2 setting whose maths this model does not have:
    loading such weights would run without error and compute something else."""
    implemented = {  # field: (is the value one we compute?, what we compute)
        "activation_function": (hc.activation_function in ("gelu_new", "gelu_pytorch_tanh"), "'gelu_new' (tanh GELU)"),
        "n_inner": (hc.n_inner in (None, 4 * hc.n_embd), f"None (an MLP 4 x n_embd = {4 * hc.n_embd} wide)"),
        "scale_attn_weights": (hc.scale_attn_weights, "True (scores divided by sqrt(head size))"),
        "scale_attn_by_inverse_layer_idx": (not hc.scale_attn_by_inverse_layer_idx, "False"),
        "reorder_and_upcast_attn": (not hc.reorder_and_upcast_attn, "False"),
        "layer_norm_epsilon": (hc.layer_norm_epsilon == layer_norm_eps, f"{layer_norm_eps}"),
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


def gpt2_weights(name_or_path, layer_norm_eps):
    """(sizes, state dict) of Hugging Face GPT-2 weights, for model.py: GPT.from_pretrained. A hub name with no
    network, or a wrong name, is one clear error; so is a GPT-2 variant whose maths differs from ours. With no
    network (hub_reachable), a hub name is read from the local cache only: no storm of retries first."""
    import os
    from transformers import GPT2Config, GPT2LMHeadModel
    offline = not os.path.isdir(name_or_path) and not hub_reachable()
    try:
        config = GPT2Config.from_pretrained(name_or_path, local_files_only=offline)
        refuse_gpt2_variants(config, name_or_path, layer_norm_eps)
        hf = GPT2LMHeadModel.from_pretrained(name_or_path, local_files_only=offline)
    except OSError as e:
        if offline:
            raise UsageError(f"could not load '{name_or_path}': the Hugging Face hub is unreachable and its weights "
                             "are not in this machine's cache; download them once with a network (run this "
                             "command online), or give a local directory made by save_pretrained: "
                             "--init_from=path/to/folder") from e
        raise UsageError(f"could not load '{name_or_path}': the Hugging Face hub is unreachable or the "
                         f"name is wrong ({first_line(e, 100)}); a local directory made by "
                         "save_pretrained works offline") from e
    hc = hf.config
    sizes = dict(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer, n_head=hc.n_head,
                 n_embd=hc.n_embd, bias=True)
    return sizes, hf_to_ours(hf.state_dict())


def fit_pretrained(model, init_from, model_args, vocab_size, dataset):
    """GPT-2 weights to start training from, fitted to this run: the dataset must use GPT-2's vocabulary,
    block_size may shorten the context (cropped) but not lengthen it; model_args take the model's sizes."""
    block_size = model_args["block_size"]
    if model.config.vocab_size != vocab_size:
        raise UsageError(f"{init_from} has a vocabulary of {model.config.vocab_size}, the dataset "
                         f"'{dataset}' one of {vocab_size}; use a GPT-2 BPE dataset such as shakespeare")
    if block_size > model.config.block_size:
        raise UsageError(f"{init_from} was trained with {model.config.block_size} positions, fewer than "
                         f"block_size={block_size}; use --block_size={model.config.block_size} or less")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    for key in ("n_layer", "n_head", "n_embd", "bias"):
        model_args[key] = getattr(model.config, key)
    return model


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (False at once when
    HF_HUB_OFFLINE is set). Behind a proxy a direct connection proves nothing: then it is taken as reachable."""
    import os
    import socket
    from urllib.parse import urlsplit
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except (OSError, ValueError):
        return False
