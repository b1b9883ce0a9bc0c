"""Hand-made CUDA graphs (torch.cuda.CUDAGraph) for fixed-shape GPU work: the fused image encoder
per batch size, and the prompt decoder per bucket shape (PromptDecoder's default on CUDA; the
alternative is torch.compile's mode="reduce-overhead" graph trees).

A graph replays the kernels it recorded on the buffers it recorded them with, so every input is
copied into that graph's static buffers before each replay (a replay never reads stale inputs;
only a tensor the caller declared unchanging, and that the buffer holds already, is not copied
again), and its outputs are overwritten by the next replay: callers copy them out first.
"""

import operator
import weakref
from collections.abc import Callable, Hashable

import torch

from .modeling import SamHQ


# Replacing a weight tensor (load_state_dict(assign=True), `module.weight = nn.Parameter(...)`, a new
# submodule) registers it on its module through torch.nn's registration hooks. Counting the
# registrations on watched modules lets `WeightsWatch` tell, per call and without walking the model,
# that nothing can have been replaced (modules built elsewhere are not counted).
# id() of every module of a watched model: ids, as the hook sees every module built anywhere, and some
# are unhashable (__eq__ without __hash__). An id outliving its module costs at most a spurious full check.
_watched_modules: set[int] = set()
_registrations = 0  # parameters, buffers and submodules registered on watched modules so far
_counting = False  # whether the hook is installed (by the first WeightsWatch)


def _count_registration(module: torch.nn.Module, name: str, value) -> None:
    global _registrations
    if id(module) in _watched_modules:
        _registrations += 1


def _count_registrations() -> None:
    global _counting
    if not _counting:
        nn_hooks = torch.nn.modules.module
        for register in (nn_hooks.register_module_parameter_registration_hook, nn_hooks.register_module_buffer_registration_hook,
                         nn_hooks.register_module_module_registration_hook):
            register(_count_registration)
        _counting = True


class WeightsWatch:
    """Tells whether a module's parameters or buffers were replaced, moved or cast since the last look:
    anything computed from them before is then stale (captured CUDA graphs replay the old tensors'
    addresses, packed weights hold copies of their values). Cheap per call: the full comparison (every
    tensor's identity, address, dtype and device; ~0.5 ms for vit_h) runs only when the module's
    first weight moved or was cast (as .to / .half do to every weight) or something was registered
    on one of its submodules (as every replacement is) since the last look. In-place writes keep all
    of that: `write_versions` tells those."""

    def __init__(self, module: torch.nn.Module):
        _count_registrations()
        self.module = module
        self._snapshot()

    def _snapshot(self) -> None:
        modules = list(self.module.modules())
        _watched_modules.update(map(id, modules))
        tensors = [t for m in modules for t in m._parameters.values() if t is not None]  # parameters first: .to casts them all
        tensors += [t for m in modules for t in m._buffers.values() if t is not None]
        self._registrations, self._first = _registrations, tensors[0]
        self._first_state = self._quick_state()
        self._state = [(id(t), t.data_ptr(), t.dtype, t.device) for t in tensors]

    def _quick_state(self) -> tuple:
        return self._first.data_ptr(), self._first.dtype, self._first.device

    def changed(self) -> bool:
        """Whether anything changed since the watch was made or last returned True."""
        if self._registrations == _registrations and self._quick_state() == self._first_state:
            return False
        state = self._state
        self._snapshot()
        return self._state != state


def write_versions(tensors: list[torch.Tensor]) -> tuple | None:
    """The tensors' version counters, which every in-place write bumps (model.load_state_dict keeps
    each weight's address and writes into it): compare two readings to tell whether anything computed
    from them is stale. None when one is an inference tensor, which tracks no version and cannot be
    written in place outside inference mode."""
    try:
        return tuple(map(operator.attrgetter("_version"), tensors))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def write_version(tensor: torch.Tensor) -> int | None:
    """One tensor's `write_versions` (None for an inference tensor), without raising: cheaper per
    call for tensors that are often inference tensors (image features made under inference mode)."""
    return None if tensor.is_inference() else tensor._version


class TensorSet:
    """A set of tensors by identity that does not keep them alive (a weakref.WeakSet compares
    tensors with ==, which is elementwise)."""

    def __init__(self, tensors=()):
        self._refs: dict[int, weakref.ref] = {}
        self.update(tensors)

    def add(self, tensor: torch.Tensor) -> None:
        key = id(tensor)

        def forget(ref: weakref.ref) -> None:  # (runs as the tensor is freed, before its id can be reused)
            if self._refs.get(key) is ref:
                del self._refs[key]

        self._refs[key] = weakref.ref(tensor, forget)

    def update(self, tensors) -> None:
        for tensor in tensors:
            self.add(tensor)

    def __contains__(self, tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor

    def __len__(self) -> int:
        return len(self._refs)


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
    kept: a `TensorSet` of tensors the caller does not write once given, other than in ways
    that bump their version counter (inference tensors: not at all), which the caller may add to
    later; e.g. per-image features given again for every prompt, constants. Such a tensor given
    again is not copied again into a buffer that still holds it.
    The first call per key runs fn `warmup` times on a side stream before the capture, so lazy
    work (Triton compiles and autotuning, torch.compile, cuBLAS workspaces) happens outside it.
    """

    def __init__(self, fn: Callable, warmup: int = 2, kept: TensorSet | None = None):
        self.fn, self.warmup = fn, warmup
        self.kept = TensorSet() if kept is None else kept
        self.graphs = {}  # key -> (graph, static args, static outputs)
        self.input_buffers: dict[tuple, torch.Tensor] = {}  # (position, shape, dtype, strides) -> the static buffer graphs read there
        self._held: dict[int, tuple] = {}  # id(buffer) -> (the kept tensor it holds a copy of, its write version)
        self.pool = None

    def __call__(self, key: Hashable, *args):
        # Streams, pools and captures belong to the current device: make it the inputs' (cuda:1 too).
        with torch.cuda.device(next(arg.device for arg in args if arg is not None)):
            if key in self.graphs:
                graph, static_args, outputs = self.graphs[key]
                self._copy_in(static_args, args)
            else:  # (the capture copies args in, and records the graph without running it)
                graph, static_args, outputs = self.graphs[key] = self._capture(args)
            graph.replay()
        return outputs

    def _copy_in(self, static_args: list, args) -> None:
        """Copies args into the static buffers, but for kept tensors that a buffer holds already."""
        buffers, sources = [], []
        for buffer, arg in zip(static_args, args):
            if buffer is None:
                continue
            held = self._held.get(id(buffer))  # (a kept tensor, its version when copied in) or None
            if held is not None and held[0] is arg and held[1] == write_version(arg):
                continue
            if arg in self.kept:
                self._held[id(buffer)] = arg, write_version(arg)  # keeps arg alive: no other tensor can take its id
            elif held is not None:
                del self._held[id(buffer)]
            buffers.append(buffer)
            sources.append(arg)
        copy_into(buffers, sources)

    def _capture(self, args) -> tuple:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_args = [None if arg is None else self._input_buffer(i, arg) for i, arg in enumerate(args)]
        # A shared buffer holds an earlier call's values (another graph's inputs): the warm-up runs
        # must see this call's (an image index valid for more images would read out of bounds).
        self._copy_in(static_args, args)
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
            self.input_buffers[key] = torch.empty_like(arg)  # empty_like keeps the strides of a dense tensor; filled by the copy in
        return self.input_buffers[key]

    def forget_kept(self) -> None:
        """Drop the references to the kept tensors the buffers hold (the next call copies them in)."""
        self._held.clear()

    def clear(self) -> None:
        """Drop every graph, its input buffers and the memory pool."""
        self.graphs.clear()
        self.input_buffers.clear()
        self.forget_kept()
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
        self._weights = WeightsWatch(model)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.model.config.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}] (preprocessed), got {list(images.shape)}")
        if images.device != self.model.device:
            raise ValueError(f"images are on {images.device}, the model on {self.model.device}")
        if self._weights.changed():  # weights replaced, moved or cast since the capture: capture again
            self._graphs = GraphCache(self.model.encode_image)
        outputs = self._graphs((tuple(images.shape), images.dtype), images)
        return tuple(t.clone() for t in outputs)
