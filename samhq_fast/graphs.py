"""Hand-made CUDA graphs (torch.cuda.CUDAGraph) for fixed-shape GPU work: the fused image encoder
per batch size, and the prompt decoder per bucket shape (PromptDecoder's default on CUDA; the
alternative is torch.compile's mode="reduce-overhead" graph trees).

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


def write_versions(tensors: list[torch.Tensor]) -> tuple | None:
    """The tensors' version counters, which every in-place write bumps (model.load_state_dict keeps
    each weight's address and writes into it): compare two readings to tell whether anything computed
    from them is stale. None when one is an inference tensor, which tracks no version and cannot be
    written in place outside inference mode."""
    return None if any(t.is_inference() for t in tensors) else tuple(t._version for t in tensors)


def copy_into(buffers: list, sources) -> None:
    """buffer.copy_(source) for every buffer that is not None, as one multi-tensor copy per dtype
    (a launch each, not one per tensor: the prompt decoder's graphs take a dozen small inputs)."""
    groups: dict[torch.dtype, tuple[list, list]] = {}  # dtype -> (buffers, sources)
    for buffer, source in zip(buffers, sources):
        if buffer is not None:
            group = groups.setdefault(buffer.dtype, ([], []))
            group[0].append(buffer)
            group[1].append(source)
    for group_buffers, group_sources in groups.values():
        torch._foreach_copy_(group_buffers, group_sources)


class GraphCache:
    """Replays fn(*args) from one CUDA graph per shape key, captured on the key's first call.

    args are CUDA tensors (or None, passed through as a constant). Graphs replay one at a time, each
    right after its inputs are copied in, and their outputs are copied out between replays, so every
    graph of one cache shares one memory pool, and graphs whose arguments at one position have the
    same shape, dtype and strides read them from one static buffer (the prompt decoder's graphs of
    every prompt and point bucket share one copy of the image features, not one each).
    The first call per key runs fn `warmup` times on a side stream before the capture, so lazy
    work (Triton compiles and autotuning, torch.compile, cuBLAS workspaces) happens outside it.
    """

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs = {}  # key -> (graph, static args, static outputs)
        self.input_buffers: dict[tuple, torch.Tensor] = {}  # (position, shape, dtype, strides) -> the static buffer graphs read there
        self.pool = None

    def __call__(self, key: Hashable, *args):
        # Streams, pools and captures belong to the current device: make it the inputs' (cuda:1 too).
        with torch.cuda.device(next(arg.device for arg in args if arg is not None)):
            if key not in self.graphs:
                self.graphs[key] = self._capture(args)
            graph, static_args, outputs = self.graphs[key]
            copy_into(static_args, args)
            graph.replay()
        return outputs

    def _capture(self, args) -> tuple:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_args = [None if arg is None else self._input_buffer(i, arg) for i, arg in enumerate(args)]
        # A shared buffer holds an earlier call's values (another graph's inputs): the warm-up runs
        # must see this call's (an image index valid for more images would read out of bounds).
        copy_into(static_args, args)
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

    def _input_buffer(self, position: int, arg: torch.Tensor) -> torch.Tensor:
        """The static buffer that graphs read argument `position` from, shared by the graphs that take
        it with this layout; it holds what the last call copied in (every call copies its arguments
        in before the replay, and a capture before its warm-up runs)."""
        key = (position, tuple(arg.shape), arg.dtype, arg.stride())
        if key not in self.input_buffers:
            self.input_buffers[key] = arg.clone()  # clone keeps the strides of a dense tensor
        return self.input_buffers[key]

    def clear(self) -> None:
        """Drop every graph, its input buffers and the memory pool."""
        self.graphs.clear()
        self.input_buffers.clear()
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
