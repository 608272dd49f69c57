# The laptop recipe: a small character-level model that gets below a val loss of 1.88 (on the whole val
# split) in well under a minute on a 2-core CPU, in under half the time of nanoGPT's CPU command for the
# same model (4 x 4 x 128, block 64). Muon on the blocks' matrices learns about twice as much per step as
# AdamW here, and takes a peak learning rate of 1e-2 with 5 warmup steps, so 450 steps of 16 sequences
# (0.46 million tokens) are enough; one evaluation, at the end (docs chapter 4.2 has the measurements).
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
eval_interval = 450  # evaluate once, at the end
eval_iters = 110  # 110 x 16 x 64 = 112,640 tokens: more than the val split's 111,540, so val is scored whole
eval_at_start = False
log_interval = 10
always_save_checkpoint = False

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 16
dropout = 0.0

optimizer = "muon"
learning_rate = 1e-2
max_iters = 450
lr_decay_iters = 450
min_lr = 1e-3
beta2 = 0.99
warmup_iters = 5

device = "cpu"
compile = False
