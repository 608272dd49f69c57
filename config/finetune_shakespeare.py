# Fine-tune OpenAI's GPT-2 (124M) on tiny Shakespeare in GPT-2's BPE: nanoGPT's finetune recipe.
# Needs the weights: the hub once, or a local save_pretrained copy via --init_from=<directory>.
out_dir = "out-shakespeare-gpt2"
init_from = "gpt2"  # or gpt2-medium / gpt2-large / gpt2-xl, memory permitting
dataset = "shakespeare"
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # keep only checkpoints that improve val loss

# 1 sequence x 32 accumulation steps x 1024 tokens = 32,768 tokens per iteration
batch_size = 1
gradient_accumulation_steps = 32
block_size = 1024
max_iters = 20

# a small constant learning rate: nudge the pretrained weights, do not retrain them
learning_rate = 3e-5
decay_lr = False
