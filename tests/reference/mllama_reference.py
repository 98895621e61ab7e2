"""transformers as the numerical reference for Llama-3.2-Vision ("mllama") parity tests.

    model = load_model(hf_dir)
    proc = load_image_processor(hf_dir)             # MllamaImageProcessorPil (no torchvision needed)
    ids = fixtures_mllama.prompt_ids(tok_json, "What is this?")   # our token ids, <|image|> once per image
    ref = run_hf(model, ids, images=[img], image_processor=proc, n_decode=4)
    ref.last_logits, ref.tokens, ref.step_logits

What HF does that a runtime must match (from transformers' modeling_mllama / processing_mllama):
  * cross-attention mask: a text token attends to the tiles of the image whose <|image|> precedes it
    (up to the next non-consecutive <|image|>); tokens before the first <|image|> attend to no tile.
    For such rows HF zeroes the cross-attention layer's MLP output but NOT its attention output:
    the all-masked row becomes an all-zero additive mask, i.e. uniform attention over every vision
    token, padding tiles included.
  * text-only prompts (no images) skip the cross-attention layers entirely; so do decode steps when
    no image was given.
  * decoding after an image reuses the last prompt row of the cross-attention mask.
The decode loop here relies on DynamicCache.get_seq_length() (layer 0), so layer 0 must not be a
cross-attention layer (true of the fixtures and of the real models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

IMAGE_TOKEN_ID = 128256


def load_model(hf_dir, attn_implementation: str = "eager"):
    """MllamaForConditionalGeneration in float32, eval mode (eager attention: exact softmax, no fusion)."""
    import torch
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation=attn_implementation)
    return model.eval()


def load_image_processor(hf_dir):
    """AutoImageProcessor for the model; without torchvision this is MllamaImageProcessorPil."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(hf_dir))


def preprocess(image_processor, images: Sequence) -> dict:
    """pixel_values [1, n_images, max_tiles, 3, S, S], aspect_ratio_ids [1, n_images],
    aspect_ratio_mask [1, n_images, max_tiles] (numpy) and num_tiles [[...]] for one prompt's images."""
    out = image_processor(images=[list(images)], return_tensors="np")
    return {
        "pixel_values": np.asarray(out["pixel_values"], np.float32),
        "aspect_ratio_ids": np.asarray(out["aspect_ratio_ids"], np.int64),
        "aspect_ratio_mask": np.asarray(out["aspect_ratio_mask"], np.int64),
        "num_tiles": [list(map(int, row)) for row in out["num_tiles"]],
    }


def cross_attention_mask(token_ids: Sequence[int], num_tiles: Sequence[int], max_tiles: int,
                         image_token_id: int = IMAGE_TOKEN_ID) -> np.ndarray:
    """[1, n_tokens, n_images, max_tiles] int64, as MllamaProcessor builds it."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    ids = list(map(int, token_ids))
    sparse = get_cross_attention_token_mask(ids, image_token_id)
    return convert_sparse_cross_attention_mask_to_dense([sparse], [list(num_tiles)], max_tiles, len(ids))


@dataclass
class HfRun:
    logits: np.ndarray                  # [n_prompt, vocab]: prefill logits at every prompt position
    tokens: List[int]                   # greedy tokens, tokens[k] = argmax(step_logits[k])
    step_logits: List[np.ndarray] = field(default_factory=list)  # [0] = last prefill row, then per decode step
    cross_attention_states: Optional[np.ndarray] = None  # projected vision tokens [n_img*tiles*n_pos, hidden]
    inputs: dict = field(default_factory=dict)            # what was fed to the model (numpy)

    @property
    def last_logits(self) -> np.ndarray:
        return self.logits[-1]


def _check_images(token_ids, images, image_token_id):
    n_tok = sum(1 for t in token_ids if int(t) == image_token_id)
    n_img = len(images) if images else 0
    if n_tok != n_img:
        raise ValueError(f"the prompt has {n_tok} <|image|> tokens but {n_img} images were given")


def run_hf(model, token_ids: Sequence[int], images: Optional[Sequence] = None, image_processor=None,
           n_decode: int = 0, image_token_id: int = IMAGE_TOKEN_ID) -> HfRun:
    """Prefill `token_ids` (with `images`, PIL images, in <|image|> order) and decode n_decode greedy tokens.

    Returns the prefill logits, the greedy tokens and the logits that chose each of them."""
    import torch

    _check_images(token_ids, images, image_token_id)
    ids = torch.tensor([list(map(int, token_ids))], dtype=torch.long)
    kwargs, inputs = {}, {"input_ids": ids.numpy()}
    last_mask_row = None
    if images:
        if image_processor is None:
            raise ValueError("images need an image_processor")
        pix = preprocess(image_processor, images)
        max_tiles = pix["pixel_values"].shape[2]
        mask = cross_attention_mask(token_ids, pix["num_tiles"][0], max_tiles, image_token_id)
        inputs.update(pix, cross_attention_mask=mask)
        kwargs = dict(pixel_values=torch.from_numpy(pix["pixel_values"]),
                      aspect_ratio_ids=torch.from_numpy(pix["aspect_ratio_ids"]),
                      aspect_ratio_mask=torch.from_numpy(pix["aspect_ratio_mask"]),
                      cross_attention_mask=torch.from_numpy(mask))
        last_mask_row = torch.from_numpy(mask[:, -1:])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **kwargs)
        logits = out.logits[0].float().numpy().copy()
        states = None
        if images:
            states = vision_states(model, kwargs)
        step_logits = [logits[-1]]
        tokens = [int(np.argmax(logits[-1]))]
        pkv = out.past_key_values
        for _ in range(max(n_decode, 0) - 1):
            step = dict(cross_attention_mask=last_mask_row) if last_mask_row is not None else {}
            o = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=pkv, use_cache=True, **step)
            pkv = o.past_key_values
            row = o.logits[0, -1].float().numpy().copy()
            step_logits.append(row)
            tokens.append(int(np.argmax(row)))
    if n_decode <= 0:
        tokens, step_logits = [], []
    return HfRun(logits=logits, tokens=tokens, step_logits=step_logits, cross_attention_states=states,
                 inputs=inputs)


def vision_states(model, pixel_kwargs: dict) -> np.ndarray:
    """The projected vision tokens the cross-attention layers see: [n_images*max_tiles*n_pos, text hidden]
    (pixel_kwargs: pixel_values, aspect_ratio_ids, aspect_ratio_mask as numpy arrays or tensors)."""
    import torch

    m = model.model
    with torch.no_grad():
        v = torch.from_numpy(vision_output(model, pixel_kwargs))
        s = m.multi_modal_projector(v).reshape(-1, m.hidden_size)
    return s.float().numpy().copy()


def vision_output(model, pixel_kwargs: dict) -> np.ndarray:
    """The vision tower's output before the projector: [1, n_images, max_tiles, n_pos, vision_output_dim]."""
    import torch

    with torch.no_grad():
        v = model.model.vision_model(**{k: torch.as_tensor(pixel_kwargs[k]) for k in
                                        ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")})
    return v.last_hidden_state.float().numpy().copy()


def test_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB PIL image with structure (gradients + noise), for preprocessing and parity."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 255 / max(width + height - 2, 1)], -1)
    img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


test_image.__test__ = False  # not a pytest test
