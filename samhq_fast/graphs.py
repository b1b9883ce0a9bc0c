"""Hand-made CUDA graphs (torch.cuda.CUDAGraph) for fixed-shape GPU work: the fused image encoder
per batch size, and the prompt decoder per bucket shape (PromptDecoder(cuda_graphs="manual"), the
alternative to torch.compile's mode="reduce-overhead" graph trees).

A graph replays the kernels it recorded on the buffers it recorded them with, so every input is
copied into that graph's static buffers before each replay (a replay never reads stale inputs), and
its outputs are overwritten by the next replay: callers copy them out first.
"""

from collections.abc import Callable, Hashable

import torch

from .modeling import SamHQ


def weights_state(model: torch.nn.Module) -> tuple:
    """(device, dtype, address) of the model's first weight. Moving or casting a model (.to, .half)
    replaces every weight tensor, so this changes: graphs captured before replay the old weights'
    addresses (freed memory), and anything computed from them is stale."""
    weight = next(model.parameters())
    return weight.device, weight.dtype, weight.data_ptr()


class GraphCache:
    """Replays fn(*args) from one CUDA graph per shape key, captured on the key's first call.

    args are CUDA tensors (or None, passed through as a constant); every graph of one cache shares
    one memory pool (graphs replay one at a time, and outputs are copied out between replays).
    The first call per key runs fn `warmup` times on a side stream before the capture, so lazy
    work (Triton compiles and autotuning, torch.compile, cuBLAS workspaces) happens outside it.
    """

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs = {}  # key -> (graph, static args, static outputs)
        self.pool = None

    def __call__(self, key: Hashable, *args):
        # Streams, pools and captures belong to the current device: make it the inputs' (cuda:1 too).
        with torch.cuda.device(next(arg.device for arg in args if arg is not None)):
            if key not in self.graphs:
                self.graphs[key] = self._capture(args)
            graph, static_args, outputs = self.graphs[key]
            for buffer, arg in zip(static_args, args):
                if buffer is not None:
                    buffer.copy_(arg)
            graph.replay()
        return outputs

    def _capture(self, args) -> tuple:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_args = [None if arg is None else arg.clone() for arg in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.fn(*static_args)
        return graph, static_args, outputs

    def clear(self) -> None:
        """Drop every graph and its memory pool."""
        self.graphs.clear()
        self.pool = None


class GraphedEncoder:
    """`model.encode_image` replayed from a CUDA graph per input shape (batch size, dtype).

    At small batch the encoder is launch-bound (vit_h: ~32 blocks x ~10 kernels): one graph replay
    replaces the launches. Call it like encode_image: images [B, 3, S, S] normalized and padded
    (model.preprocess) on the model's CUDA device -> (embeddings [B, 256, G, G], early ViT features
    [B, G, G, C], HQ features [B, 32, 4G, 4G]), fresh tensors (copied out of the graph's buffers).
    """

    def __init__(self, model: SamHQ):
        if model.device.type != "cuda":
            raise ValueError(f"GraphedEncoder needs a model on a CUDA device, got {model.device}")
        self.model = model
        self._graphs = GraphCache(model.encode_image)
        self._weights = weights_state(model)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.model.config.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}] (preprocessed), got {list(images.shape)}")
        if images.device != self.model.device:
            raise ValueError(f"images are on {images.device}, the model on {self.model.device}")
        if weights_state(self.model) != self._weights:  # moved or cast since the capture: capture again
            self._graphs, self._weights = GraphCache(self.model.encode_image), weights_state(self.model)
        outputs = self._graphs((tuple(images.shape), images.dtype), images)
        return tuple(t.clone() for t in outputs)
