# The baseline of docs chapter 4's experiments: nanoGPT's classic CPU recipe (AdamW at 1e-3,
# batch 12), cut to 300 steps so that each experiment takes about half a minute on a 2-core CPU.
# Change one setting with a flag, e.g. --learning_rate=3e-3 --out_dir=out-exp/lr3e-3.
out_dir = "out-exp/base"
dataset = "shakespeare_char"
eval_interval = 100
eval_iters = 50
log_interval = 10
always_save_checkpoint = False

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
dropout = 0.0

learning_rate = 1e-3
max_iters = 300
lr_decay_iters = 300
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
compile = False
