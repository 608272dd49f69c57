# GPT-2 (124M) from scratch on OpenWebText: nanoGPT's recipe, for a node of 8 GPUs (README: "GPT-2
# (124M) from scratch"). Prepare the data first: python data.py --hf Skylion007/openwebtext --name openwebtext
# then: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
out_dir = "out-gpt2"
dataset = "openwebtext"
eval_interval = 1000
eval_iters = 200
log_interval = 10
keep_last_n = 2  # also keep ckpt_<iter>.pt of the last two evals, to go back past a bad stretch of training

# 12 sequences x 1024 tokens x 40 micro-batches = 491,520 tokens (~0.5M) per optimizer step;
# torchrun's processes share the 40 micro-batches (5 each on 8 GPUs), so the step is the same size
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # none for pretraining: on this much text, train and val loss stay together
bias = True

# 600,000 steps x 491,520 tokens = 295B tokens, about 33 passes over OpenWebText's 9B
learning_rate = 6e-4
max_iters = 600000
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
