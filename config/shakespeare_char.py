# The GPU recipe: a 10.7M-parameter character-level Shakespeare model (about 1.47 val loss).
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250  # it overfits quickly, so evaluate often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep only checkpoints that improve val loss

gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small models can take a larger step
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # a little higher, since there are few tokens per iteration
warmup_iters = 100

