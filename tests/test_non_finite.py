"""A hidden state or logits row that overflows inside a stage fails that step with OUT_OF_RANGE
naming the stage and its layers, instead of passing NaN on or answering token 0."""

from __future__ import annotations

import pytest
import torch

from client.client import ClientError
from stage_service.packed import PackedFloat
from tests.conftest import in_process_mesh, make_tiny_model

PROMPT = [7, 3, 99, 12, 45]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("non-finite"), "gqa")  # 4 layers


def overflow(stage, layer: int) -> None:
    """Scales one layer's MLP output so that the residual stream overflows float32 (a CPU
    stage's C layers hold it packed: the same values in another order)."""
    w = stage.loaded.model.weights.layers[layer].w_down
    with torch.no_grad():
        (w.data if isinstance(w, PackedFloat) else w).fill_(1e38)


@pytest.mark.parametrize("which", [0, 1])
def test_an_overflow_fails_the_step_naming_the_stage_and_its_layers(model_dir, which):
    with in_process_mesh(model_dir, 2) as mesh:
        assert len(mesh.client.generate(token_ids=PROMPT, max_new_tokens=4).token_ids) == 4
        overflow(mesh.stages[which], 0)
        with pytest.raises(ClientError) as err:
            mesh.client.generate(token_ids=PROMPT, max_new_tokens=4)
        layers = "layers 0-1" if which == 0 else "layers 2-3"
        assert err.value.code == "OUT_OF_RANGE", err.value
        assert f"stage {which} ({mesh.addresses[which]})" in err.value.message
        assert layers in err.value.message and "NaN or Inf" in err.value.message
        # sampled rows are checked too
        with pytest.raises(ClientError) as err:
            mesh.client.generate(token_ids=PROMPT, max_new_tokens=4, temperature=0.7, seed=1)
        assert err.value.code == "OUT_OF_RANGE"
