"""The package ships py.typed, so users' type checkers read its annotations: code written as the
README shows must type-check, with the types the docstrings state (numpy by default, torch with
return_torch=True). mypy checks a user's script here; the script itself never runs."""

import os
import textwrap
from pathlib import Path

import pytest

# mypy is in the [test] extra (CI has it); the GPU image has none
mypy_api = pytest.importorskip("mypy.api")

REPO = Path(__file__).resolve().parents[1]

USER_SCRIPT = '''
from typing import Any

from typing_extensions import assert_type  # (typing's own from Python 3.11 on; the package supports 3.10)

import numpy as np
import torch

import samhq_fast
from samhq_fast.transforms import load_image

model = samhq_fast.load("sam_hq_vit_b.pth", device="cuda", dtype="bf16")
assert_type(model, samhq_fast.SamHQ)
assert_type(samhq_fast.sam_model_registry["vit_b"](checkpoint="sam_hq_vit_b.pth"), samhq_fast.SamHQ)
predictor = samhq_fast.SamHQPredictor(model)
predictor.set_image(load_image("photo.jpg"))

masks, scores, low_res = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
assert_type(masks, np.ndarray)
assert_type(scores, np.ndarray)
masks_t, scores_t, low_res_t = predictor.predict(box=np.array([10, 20, 300, 400]), return_torch=True)
assert_type(masks_t, torch.Tensor)
assert_type(low_res_t, torch.Tensor)
either = predictor.predict(box=np.array([10, 20, 300, 400]), return_torch=bool(len("x")))
assert_type(either, tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor, torch.Tensor])
assert_type(predictor.predict_torch(None, None, torch.zeros(1, 4))[0], torch.Tensor)
assert_type(predictor.get_image_embedding(), torch.Tensor)

predictor.set_images([load_image("a.jpg"), load_image("b.jpg")])
per_image = predictor.predict_batch([{"box": np.zeros((2, 4))}, None])
assert_type(per_image, list[tuple[np.ndarray, np.ndarray, np.ndarray] | None])
per_image_t = predictor.predict_batch([{"box": np.zeros((2, 4))}, None], return_torch=True)
assert_type(per_image_t, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None])
assert_type(predictor.predict_batch_torch([{"boxes": torch.zeros(2, 4)}, None]), list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None])

records = samhq_fast.SamHQAutomaticMaskGenerator(model).generate(load_image("photo.jpg"))
assert_type(records, list[dict[str, Any]])
assert_type(predictor.transform.apply_coords(np.zeros((1, 2)), (480, 640)), np.ndarray)
'''


def test_readme_style_user_code_type_checks(tmp_path, monkeypatch):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    # The package as it is in this checkout (mypy cannot follow an editable install's import hook);
    # follow-imports=silent: only the user's script is reported, not the package's internals.
    monkeypatch.setenv("MYPYPATH", str(REPO))
    stdout, stderr, status = mypy_api.run([
        str(script), "--follow-imports=silent", "--no-error-summary", "--config-file", os.devnull,
        "--cache-dir", str(tmp_path / "mypy_cache"),
    ])
    assert status == 0, f"mypy found problems in a user's script:\n{stdout}{stderr}"
