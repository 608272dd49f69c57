# The GPU recipe: a 10.7M-parameter character-level Shakespeare model (its one measured run, on an H200,
# ended at a val loss of 1.4437 on the whole val split: README, Speed). nanoGPT's recipe runs 5000 steps, but its model overfits after about 1750 of them at that
# learning rate; here the cosine decays to min_lr by step 2000 instead, so the last steps anneal rather
# than overfit, and the run takes well under half the time.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250  # it overfits quickly, so evaluate often; best_model.pt keeps the best
eval_iters = 20  # batches for the train-loss estimate; val is scored exactly, on the whole split
log_interval = 50
always_save_checkpoint = False  # keep only checkpoints that improve val loss

gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small models can take a larger step
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99  # a little higher, since there are few tokens per iteration
warmup_iters = 100
