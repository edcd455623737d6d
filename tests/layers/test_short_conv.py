"""ShortConvMixer: a depthwise causal convolution written out by hand, its state, its arguments.

(decode == prefill, padding, packing and gradients are checked for it by tests/layers/test_contract.py.)
"""

from __future__ import annotations

import pytest
import torch

from linmix.layers import MIXERS
from linmix.layers.short_conv import ShortConvMixer
from tests.layers.utils import causal_conv, perturbed
from tests.ops.utils import rel_err


@pytest.mark.parametrize("conv_size,bias,activation", [(4, False, None), (3, True, "silu"), (1, False, None)])
def test_matches_written_out_convolution(conv_size, bias, activation):
    mixer = perturbed(ShortConvMixer(hidden_size=24, conv_size=conv_size, bias=bias, activation=activation))
    x = torch.randn(3, 17, 24, dtype=torch.float64)
    y, state = mixer(x, use_cache=True)
    assert rel_err(y, causal_conv(x, mixer.conv, activation == "silu")) < 1e-12
    assert torch.equal(state["conv"], x[:, x.shape[1] - (conv_size - 1):])  # the last W-1 inputs


def test_registered_and_state_size():
    assert MIXERS["short_conv"] is ShortConvMixer
    mixer = ShortConvMixer(hidden_size=64, conv_size=4)
    assert mixer.state_bytes(16) == mixer.state_bytes(4096) == 3 * 64 * 4
    assert mixer.state_bytes(16, batch_size=5) == 5 * 3 * 64 * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="conv_size"):
        ShortConvMixer(hidden_size=8, conv_size=0)
    with pytest.raises(ValueError, match="activation"):
        ShortConvMixer(hidden_size=8, activation="gelu")
    mixer = ShortConvMixer(hidden_size=8)
    with pytest.raises(ValueError, match="conv"):
        mixer(torch.randn(2, 3, 8), state={"conv": torch.zeros(2, 2, 8)})
