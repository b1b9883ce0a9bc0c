"""Prompt decoding for many prompts at a steady shape: prompt encoder + HQ decoder under
torch.compile, prompt batches padded to a few bucket sizes and point lists to a few lengths.

Padding is exact, not approximate: padded point slots are masked out of every attention whose keys
are prompt tokens, so the real prompts' outputs are those of the eager decoder. Sparse slots per
prompt (the order of prompt tokens does not matter to the decoder, which has no token positions):
  K point slots      label 1 / 0 / -1 as in SAM, or PAD_LABEL for an empty slot
  1 "no box" slot    SAM's padding point (not_a_point_embed): real when points are given without a box
  2 box-corner slots real when the prompt has a box
On CUDA the compiled function runs as CUDA graphs (mode="reduce-overhead", one per bucket shape);
on the CPU it is compiled without graphs.
"""

import torch

from .modeling import SamHQ
from .modeling.mask_decoder import select_masks

PAD_LABEL = -2  # an empty point slot: no token at all
PROMPT_BUCKETS = (1, 4, 16, 64, 256)  # prompts per decoder call; more are split into chunks of the last
POINT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n (n <= the largest bucket)."""
    return next(b for b in buckets if b >= n)


def embed_padded_prompts(model: SamHQ, coords, labels, boxes, has_box, masks, has_mask):
    """Fixed-shape prompt embedding.

    coords [P, K, 2] / labels [P, K] (PAD_LABEL in empty slots), boxes [P, 4] with has_box [P],
    masks [P, 1, 4G, 4G] with has_mask [P], all in the resized input frame
    -> sparse [P, K + 3, C], sparse_mask [P, K + 3] bool, dense [P, C, G, G] (model dtype).
    """
    enc = model.prompt_encoder
    dtype = enc.no_mask_embed.weight.dtype
    num = coords.shape[0]
    point_real = labels != PAD_LABEL  # [P, K]
    no_box_real = point_real.any(dim=1) & ~has_box  # SAM pads points with one not-a-point without a box
    no_box = enc.not_a_point_embed.weight.float().expand(num, 1, -1)
    sparse = torch.cat([enc.embed_points(coords, labels), no_box, enc.embed_boxes(boxes)], dim=1).to(dtype)
    sparse_mask = torch.cat([point_real, no_box_real[:, None], has_box[:, None].expand(-1, 2)], dim=1)
    g = enc.image_embedding_size
    no_mask = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(num, -1, *g)
    dense = torch.where(has_mask[:, None, None, None], enc.mask_downscaling(masks.to(dtype)), no_mask)
    return sparse, sparse_mask, dense


def decode_padded(model: SamHQ, image_embeddings, image_pe, hq_features, coords, labels, boxes, has_box, masks, has_mask):
    """-> all five mask logits [P, 5, 4G, 4G] and four IoU scores [P, 4] (selection happens outside,
    so one compiled graph serves every multimask / hq_token_only combination)."""
    sparse, sparse_mask, dense = embed_padded_prompts(model, coords, labels, boxes, has_box, masks, has_mask)
    return model.mask_decoder.predict_masks(image_embeddings, image_pe, sparse, dense, hq_features, sparse_mask)


def decode_eager(prompt_encoder, mask_decoder, image_embeddings, hq_features, point_coords, point_labels, boxes,
                 mask_input, multimask_output: bool, hq_token_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference decode (the eager backend's): unpadded prompts through the model's own prompt
    encoder and HQ decoder. Same prompt arguments as `PromptDecoder.__call__`."""
    points = None if point_coords is None else (point_coords, point_labels)
    sparse, dense = prompt_encoder(points, boxes, mask_input)
    return mask_decoder(image_embeddings, prompt_encoder.get_dense_pe(), sparse, dense, hq_features, multimask_output, hq_token_only)


class PromptDecoder:
    """Decodes any number of prompts against one image's cached features with few compiled shapes.

    compile=False runs the same padded function eagerly (the reference for the compiled one).
    cuda_graphs: replay the compiled function as CUDA graphs (mode="reduce-overhead"); None (the
    default) means yes on a CUDA model, no elsewhere; True needs compile=True and a CUDA model.
    """

    def __init__(self, model: SamHQ, compile: bool = True, backend: str = "inductor", cuda_graphs: bool | None = None):
        self.model = model
        on_cuda = model.device.type == "cuda"
        if cuda_graphs and not (compile and on_cuda):
            why = "compile=False" if not compile else f"the model is on {model.device}, not a CUDA device"
            raise ValueError(f"cuda_graphs=True needs a compiled decoder on a CUDA model, but {why}")
        fn = lambda *args: decode_padded(model, *args)  # noqa: E731  (compile a closure, not the module)
        if compile:
            mode = "reduce-overhead" if (on_cuda if cuda_graphs is None else cuda_graphs) else None
            fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode, backend=backend)
        self._decode = fn

    @torch.inference_mode()
    def __call__(
        self,
        image_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        hq_token_only: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same inputs as `SamHQPredictor.predict_torch` (input frame, prompt axis N) plus the image's
        embeddings [1, 256, G, G] and HQ features [1, 32, 4G, 4G] -> (logits [N, 1, 4G, 4G], scores [N, 1])."""
        model = self.model
        device = model.device
        num = next(t.shape[0] for t in (point_coords, boxes, mask_input, torch.empty(1)) if t is not None)
        k = 0 if point_coords is None else point_coords.shape[1]
        k_pad = bucket(max(k, 1), POINT_BUCKETS)
        low_res = 4 * model.config.embedding_size
        image_pe = model.prompt_encoder.get_dense_pe()
        outputs = []
        for start in range(0, num, PROMPT_BUCKETS[-1]):
            n = min(num - start, PROMPT_BUCKETS[-1])
            p = bucket(n, PROMPT_BUCKETS)
            rows = slice(start, start + n)
            coords = torch.zeros(p, k_pad, 2, device=device)
            labels = torch.full((p, k_pad), PAD_LABEL, dtype=torch.int64, device=device)
            box = torch.zeros(p, 4, device=device)
            has_box = torch.zeros(p, dtype=torch.bool, device=device)
            masks = torch.zeros(p, 1, low_res, low_res, device=device, dtype=model.dtype)
            has_mask = torch.zeros(p, dtype=torch.bool, device=device)
            if point_coords is not None:
                coords[:n, :k] = point_coords[rows]
                labels[:n, :k] = point_labels[rows]
            if boxes is not None:
                box[:n] = boxes[rows]
                has_box[:n] = True
            if mask_input is not None:
                masks[:n] = mask_input[rows]
                has_mask[:n] = True
            all_masks, iou = self._decode(image_embeddings, image_pe, hq_features, coords, labels, box, has_box, masks, has_mask)
            # Slicing copies out of the CUDA graph's static output buffers before the next replay.
            logits, score = select_masks(all_masks[:n], iou[:n], multimask_output, hq_token_only)
            outputs.append((logits.clone(), score.clone()))
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
