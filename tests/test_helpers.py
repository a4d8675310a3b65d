"""The correctness helpers themselves can fail: a checker that never fires would make every kernel test
meaningless."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import as_layout, assert_close, bounds_checked, nan_padded

from fused_kernels._core.launch import launch


@triton.jit
def _scale_kernel(X, Y, N, stride_x, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    # EXTRA > 0 is a deliberate bug: it reads and writes EXTRA elements past the end.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs * stride_x, mask=offs < N + EXTRA)
    tl.store(Y + offs, x * 2, mask=offs < N + EXTRA)


def test_bounds_checked_passes_a_correct_kernel_and_counts_launches(device):
    x, y = torch.randn(10, device=device), torch.zeros(10, device=device)
    with bounds_checked("_scale_kernel") as launches:
        launch(_scale_kernel, (1,), x, y, 10, 1, EXTRA=0, BLOCK=16)
    assert launches == {"_scale_kernel": 1}
    assert torch.equal(y, 2 * x)
    launch(_scale_kernel, (1,), x, y, 10, 1, EXTRA=0, BLOCK=16)   # after the block: not counted
    assert launches == {"_scale_kernel": 1}


def test_bounds_checked_leaves_other_kernels_alone(device):
    x, y = torch.randn(10, device=device), torch.zeros(11, device=device)
    with bounds_checked("_other_kernel") as launches:
        launch(_scale_kernel, (1,), x, y, 10, 1, EXTRA=1, BLOCK=16)   # writes y[10]: in bounds of y
    assert launches == {}


def test_bounds_checked_catches_an_out_of_bounds_write(device):
    x, y = torch.randn(10, device=device), torch.zeros(10, device=device)
    with pytest.raises(AssertionError, match="wrote outside"), bounds_checked("_scale_kernel"):
        launch(_scale_kernel, (1,), x, y, 10, 1, EXTRA=1, BLOCK=16)


def test_bounds_checked_catches_a_write_into_the_gaps_of_a_strided_tensor(device):
    x = torch.randn(10, device=device)
    y = torch.zeros(20, device=device)[::2]  # the kernel ignores y's stride: writes land in the gaps
    with pytest.raises(AssertionError, match="wrote outside"), bounds_checked("_scale_kernel"):
        launch(_scale_kernel, (1,), x, y, 10, 1, EXTRA=0, BLOCK=16)


def test_nan_padding_exposes_an_out_of_bounds_read(device):
    x = nan_padded(torch.randn(10, device=device), pad=2)
    y = torch.zeros(11, device=device)  # room for the bad write, so only the read is at stake
    _scale_kernel[(1,)](x, y, 10, 1, EXTRA=1, BLOCK=16)
    assert y[:10].isfinite().all() and y[10].isnan()


@pytest.mark.parametrize("layout", ["transposed", "permuted", "padded", "strided"])
def test_layouts_keep_values_and_change_strides(layout):
    t = torch.randn(3, 4, 5)
    u = as_layout(t, layout)
    assert torch.equal(u, t) and not u.is_contiguous() and u.is_leaf and not u.requires_grad


def test_assert_close_two_x_rule():
    ref = torch.linspace(-2, 2, 101, dtype=torch.float64)
    torch_out = ref.half()
    torch_err = (torch_out.double() - ref).abs().max().item()
    assert_close(torch_out, ref, torch_out)  # as good as torch
    worse = (ref + torch.where(ref > 0, 1.0, 0.0) * 10 * torch_err).half()
    with pytest.raises(AssertionError, match="PyTorch"):
        assert_close(worse, ref, torch_out)
    assert_close(worse, ref, torch_out, grad=True, ulps=8)  # 3x (+ floor) allowed for gradients
    with pytest.raises(ValueError, match="needs PyTorch"):
        assert_close(torch_out, ref)


def test_assert_close_high_precision_and_nan_positions():
    ref = torch.randn(50, dtype=torch.float64)
    assert_close(ref.float(), ref)
    with pytest.raises(AssertionError, match="atol"):
        assert_close((ref * (1 + 1e-4)).float(), ref)
    nan_ref = ref.clone()
    nan_ref[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN positions"):
        assert_close(ref.float(), nan_ref)  # a NaN in the reference cannot pass silently
    with pytest.raises(AssertionError, match="NaN positions"):
        assert_close(nan_ref.float(), ref)
    inf_ref = ref.clone()
    inf_ref[0] = float("inf")
    with pytest.raises(AssertionError, match="infinities"):
        assert_close(torch.where(inf_ref.isinf(), float("-inf"), inf_ref).float(), inf_ref)
