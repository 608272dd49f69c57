"""
Fast decoding: the one-token step of cached generation with fixed shapes, replayed as a CUDA graph on a GPU.
GPT.generate_stream uses it once the prompt is in the KV cache.
"""

import torch

class DecodeStep:
    """The one-token step of cached generation: ids (B, 1) at position pos -> logits (B, 1, V).

    Its inputs live in fixed buffers and its shapes never change, so on CUDA it is recorded once as a
    CUDA graph and then replayed: one launch per token instead of one per kernel, which is most of the
    cost of a small model. compile=True also fuses its kernels with torch.compile.
    """

    def __init__(self, model, caches, batch_size, compile=False):
        device = model.lm_head.weight.device
        self.model, self.caches = model, caches
        self.idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.run = torch.compile(self.forward, fullgraph=True, dynamic=False) if compile else self.forward
        self.use_graph, self.graph, self.logits = device.type == "cuda", None, None

    def forward(self):
        return self.model(self.idx, caches=self.caches, pos=self.pos)[0]

    def __call__(self, idx, pos):
        self.idx.copy_(idx)
        self.pos.fill_(pos)
        if not self.use_graph:
            return self.run()
        if self.graph is None:
            self.record()
        self.graph.replay()  # rewrites self.logits in place
        return self.logits

    def record(self):
        # warm up on a side stream first (kernel choices, compilation), as CUDA graph capture requires;
        # rerunning the step is harmless: it writes the same keys and values at the same position
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run()
