# The BPE recipe the docs teach: GPT-2's vocabulary on tiny Shakespeare, about 30M parameters.
out_dir = "out-shakespeare"
dataset = "shakespeare"
eval_interval = 500
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

batch_size = 16
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.1

learning_rate = 3e-4
max_iters = 10000
lr_decay_iters = 10000
min_lr = 3e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 100
