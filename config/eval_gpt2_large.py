# OpenAI's GPT-2 (774M) scored on a prepared GPT-2 BPE dataset: one evaluation, no training, nothing saved.
# python train.py config/eval_gpt2_large.py   (offline: --init_from=<a save_pretrained directory>)
init_from = "gpt2-large"
dataset = "openwebtext"
out_dir = "out-eval-gpt2-large"
eval_only = True
eval_iters = 500  # 500 batches x 8 x 1024 = 4.1M tokens per split
batch_size = 8
block_size = 1024
