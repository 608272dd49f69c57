# The laptop recipe: a small character-level model that reaches val loss 1.88 in under two minutes on
# a 2-core CPU. It is nanoGPT's baby recipe (4 x 4 x 128, block 64) tuned for time to that loss:
# a 4x higher peak learning rate with a shorter warmup, batch 16, 1000 steps, and one evaluation at
# the end instead of nine (docs chapter 4.2 has the measurements).
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
eval_interval = 1000  # evaluate once, at the end: each evaluation costs as much as ~140 steps
eval_iters = 200
eval_at_start = False
log_interval = 10
always_save_checkpoint = False

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 16
dropout = 0.0

learning_rate = 4e-3
max_iters = 1000
lr_decay_iters = 1000
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 50

device = "cpu"
compile = False
