import math

import pytest
import torch

from lightning_diloco.compression import (
    COMPRESSOR_NAMES,
    Compressor,
    E3M0Compressor,
    ErrorFeedback,
    FP16Compressor,
    Int4Compressor,
    Int8Compressor,
    get_compressor,
)

LOSSY = [name for name in COMPRESSOR_NAMES if name != "none"]
DISTRIBUTIONS = ["normal", "uniform", "student_t", "lognormal_signed"]
SCALES = [1e-7, 1e-2, 1.0, 1e5]
LENGTHS = [1, 255, 4 * 256 + 17, 5000]


def draw(distribution: str, scale: float, numel: int, seed: int, outliers: bool = True) -> torch.Tensor:
    """Random non-zero values, by default with a few outliers a thousand times larger than the rest."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        x = torch.randn(numel, generator=generator)
    elif distribution == "uniform":
        x = torch.rand(numel, generator=generator) * 2 - 1
    elif distribution == "student_t":  # heavy tails: ratio of a normal to the root of a chi-square with 2 dof
        chi2 = -2 * torch.log(torch.rand(numel, generator=generator).clamp_min(1e-12))
        x = torch.randn(numel, generator=generator) / torch.sqrt(chi2 / 2)
    else:  # magnitudes spread over many octaves
        sign = torch.randint(0, 2, (numel,), generator=generator) * 2 - 1
        x = sign * torch.exp(torch.randn(numel, generator=generator) * 3)
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    if outliers:
        x[torch.randint(0, numel, (max(1, numel // 400),), generator=generator)] *= 1000
    return (x * scale).float()


def round_trip(compressor: Compressor, x: torch.Tensor) -> torch.Tensor:
    return compressor.decode(compressor.encode(x), x.numel())


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_round_trip_error_within_bound(name, distribution):
    compressor = get_compressor(name)
    for seed, (scale, numel) in enumerate((s, n) for s in SCALES for n in LENGTHS):
        x = draw(distribution, scale, numel, seed)
        error = (round_trip(compressor, x) - x).abs()
        bound = compressor.error_bound(x)
        assert bound.shape == x.shape
        worst = int(torch.argmax(error - bound))
        assert error[worst] <= bound[worst], (
            f"{name} {distribution} scale={scale} numel={numel}: |x - x_hat| = {error[worst]} > {bound[worst]} "
            f"at x = {x[worst]}"
        )
        if name == "none":
            assert torch.equal(error, torch.zeros_like(x))
        elif numel >= 1000:  # the bound is tight: some element comes close to it
            assert (error / bound).max() > 0.25, f"{name}: bound far from the observed error"


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_payload_bytes_match_accounting(name):
    compressor = get_compressor(name)
    for numel in (1, 2, 7, 255, 256, 1000, 4096, 3 * 1024 + 1):
        payload = compressor.encode(torch.randn(numel) + 3)
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == compressor.payload_nbytes(numel)
    for blocks in (1, 3, 8):
        numel = blocks * compressor.block_size * 2
        assert compressor.payload_nbytes(numel) * 8 == pytest.approx(compressor.bits_per_element * numel)


def test_bits_per_element_per_format():
    expected = {
        "none": 32,
        "bf16": 16,
        "fp16": 16 + 32 / 1024,
        "int8": 8 + 32 / 256,
        "int4": 4 + 32 / 256,
        "int2": 2 + 32 / 256,
        "e3m0": 4 + 32 / 256,
        "sparse": (32 + 64 * (12 + 2)) / 4096,  # a scale, and 64 kept entries of 12-bit position + 2-bit level
    }
    assert {name: get_compressor(name).bits_per_element for name in COMPRESSOR_NAMES} == expected
    assert Int8Compressor(block_size=1024).bits_per_element == 8 + 32 / 1024


@pytest.mark.parametrize("name", LOSSY)
def test_blocks_are_independent(name):
    """Encoding block-aligned pieces separately equals encoding them together (bucketing relies on it)."""
    compressor = get_compressor(name)
    first = draw("normal", 1.0, 3 * compressor.block_size, seed=1)
    second = draw("student_t", 1e-3, 517, seed=2)
    together = round_trip(compressor, torch.cat([first, second]))
    apart = torch.cat([round_trip(compressor, first), round_trip(compressor, second)])
    assert torch.equal(together, apart)


@pytest.mark.parametrize("compressor", [Int8Compressor(), Int4Compressor(), E3M0Compressor()])
def test_rounds_to_the_nearest_grid_point(compressor):
    """Per block, the decoded value is the grid point closest to the input."""
    x = draw("lognormal_signed", 1.0, 2 * compressor.block_size, seed=3)
    decoded = round_trip(compressor, x)
    for block, block_decoded in zip(x.view(2, -1), decoded.view(2, -1)):
        absmax = block.abs().max()
        if isinstance(compressor, E3M0Compressor):
            magnitudes = torch.tensor([0.0] + [2.0**-k for k in range(6, -1, -1)]) * absmax
        else:
            magnitudes = torch.arange(compressor.max_code + 1) * (absmax / compressor.max_code)
        grid = torch.cat([-magnitudes, magnitudes])
        nearest = (block[:, None] - grid[None, :]).abs().min(dim=1).values
        assert torch.all((block - block_decoded).abs() <= nearest + absmax * 2**-20)
        assert torch.all((block_decoded[:, None] - grid[None, :]).abs().min(dim=1).values <= absmax * 2**-20)


def test_e3m0_keeps_signs_and_zero():
    compressor = E3M0Compressor(block_size=8)
    x = torch.tensor([0.0, 1.0, -1.0, 0.75, -0.7, 2.0**-7, 0.99 * 2.0**-7, -3.0 * 2.0**-7])
    assert round_trip(compressor, x).tolist() == [0.0, 1.0, -1.0, 1.0, -0.5, 2.0**-6, 0.0, -(2.0**-5)]


def test_fp16_scales_instead_of_overflowing():
    compressor = FP16Compressor(block_size=4)
    x = torch.tensor([1e6, -7e4, 3e38, 1.0, 65504.0 * 3, 0.5, 1e-3, 7.0, 1e-30, -2e-40, 3e-31, 1e-32])
    decoded = round_trip(compressor, x)
    assert torch.isfinite(decoded).all()
    assert torch.all((decoded - x).abs() <= compressor.error_bound(x))
    # The closed form in the docstring: the scale keeps float16's precision relative to the block absmax.
    absmax = x.abs().view(-1, 4).amax(dim=1).repeat_interleave(4)
    assert torch.all((decoded - x).abs() <= torch.maximum(x.abs() * 2.0**-11, absmax * 2.0**-39))
    # Values far below float16's range survive because the scale lifts them.
    assert decoded[8] == pytest.approx(1e-30, rel=2**-11, abs=0)
    assert decoded[11] == pytest.approx(1e-32, rel=2**-11, abs=0)


def test_all_zero_blocks_decode_to_zero():
    for name in COMPRESSOR_NAMES:
        compressor = get_compressor(name)
        assert torch.equal(round_trip(compressor, torch.zeros(300)), torch.zeros(300))


def test_unknown_compressor_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown compressor 'int3'") as info:
        get_compressor("int3")
    for name in COMPRESSOR_NAMES:
        assert name in str(info.value)


def test_invalid_inputs_are_rejected():
    compressor = Int8Compressor()
    payload = compressor.encode(torch.randn(100))
    with pytest.raises(ValueError, match="payload"):
        compressor.decode(payload, 101)
    with pytest.raises(ValueError, match="1-D"):
        compressor.encode(torch.randn(4, 4))
    with pytest.raises(ValueError, match="floating point"):
        compressor.encode(torch.arange(4))
    with pytest.raises(ValueError, match="block_size"):
        Int4Compressor(block_size=7)
    assert get_compressor(compressor) is compressor


def run_syncs(compressor: Compressor, inputs: list[torch.Tensor], feedback: ErrorFeedback | None) -> torch.Tensor:
    """Sum of what receivers decode over the syncs; checks each residual against the round-trip bound."""
    total = torch.zeros_like(inputs[0])
    for x in inputs:
        flat = x.clone()
        if feedback is not None:
            feedback.compensate_(0, flat)
        decoded = compressor.decode(compressor.encode(flat), flat.numel())
        if feedback is not None:
            feedback.update_(0, flat, decoded)
            assert torch.all(feedback.residual(0).abs() <= compressor.error_bound(flat))
        total += decoded
    return total


@pytest.mark.parametrize("name", LOSSY)
def test_error_feedback_keeps_the_running_sum(name):
    compressor = get_compressor(name)
    syncs = 40
    constant = [draw("normal", 1e-2, 1000, seed=5, outliers=False)] * syncs
    changing = [draw("student_t", 1e-2, 1000, seed=100 + t) for t in range(syncs)]
    for inputs in (constant, changing):
        feedback = ErrorFeedback()
        total = run_syncs(compressor, inputs, feedback)
        target = torch.stack(inputs).sum(dim=0)
        # sum(decoded) = sum(inputs) - last residual, exactly up to fp32 rounding of the sums (syncs terms of at most
        # the largest running value each; sparse residuals grow to many inputs before they are sent)
        largest = float(target.abs().max() + feedback.residual(0).abs().max())
        atol = 1e-6 + syncs * torch.finfo(torch.float32).eps * largest
        torch.testing.assert_close(total, target - feedback.residual(0), rtol=1e-5, atol=atol)
    # Without feedback a constant input's rounding error piles up linearly.
    drift_without = (run_syncs(compressor, constant, None) - torch.stack(constant).sum(dim=0)).abs().max()
    feedback = ErrorFeedback()
    drift_with = (run_syncs(compressor, constant, feedback) - torch.stack(constant).sum(dim=0)).abs().max()
    assert drift_with * 5 < drift_without


def test_error_feedback_state_dict_round_trip():
    compressor = E3M0Compressor()
    inputs = [draw("normal", 1.0, 700, seed=t) for t in range(6)]
    feedback = ErrorFeedback()
    run_syncs(compressor, inputs[:3], feedback)
    state = feedback.state_dict()
    saved = state["residuals"][0].clone()

    restored = ErrorFeedback()
    restored.load_state_dict(state)
    assert torch.equal(restored.residual(0), saved)
    assert torch.equal(run_syncs(compressor, inputs[3:], feedback), run_syncs(compressor, inputs[3:], restored))
    assert torch.equal(state["residuals"][0], saved), "state_dict must hold copies"
    assert not torch.equal(feedback.residual(0), saved)

    with pytest.raises(ValueError, match="700 elements"):
        restored.compensate_(0, torch.zeros(5))
    restored.reset()
    assert restored.residual(0) is None
    assert math.isclose(float(restored.compensate_(0, torch.ones(5)).sum()), 5.0)


# ------------------------------------------------------------------------------------------------------------------
# sparse (SparseLoCo): top-k per block, 2-bit values, 12-bit positions
# ------------------------------------------------------------------------------------------------------------------


def test_sparse_keeps_the_largest_entries_of_every_block_on_four_levels():
    from lightning_diloco.compression import SparseCompressor

    codec = SparseCompressor(block_size=16, k=4)
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 1.0, 0.05, 0.4, 0.0, -0.2, 0.1, 0.0, 2.5, 0.0, 0.3,
                      7.0, -1.0, 0.5])  # a full block of 16, then a block of 3 (padded to 16)
    payload = codec.encode(x)
    assert payload.numel() == 2 * (4 + 6 + 1) == codec.payload_nbytes(19)
    y = codec.decode(payload, 19)
    # block 1 keeps -5, 3, 2.5 and 1 on the levels {-1, -1/3, 1/3, 1} * 5; block 2 keeps all 3, levels of 7
    s1, s2 = 5.0, 7.0
    want = torch.zeros(19)
    want[[1, 3, 6, 13]] = torch.tensor([-1.0, 1 / 3, 1 / 3, 1 / 3]) * s1  # 3/5 rounds to 1/3, 2.5/5 and 1/5 too
    want[[16, 17, 18]] = torch.tensor([1.0, -1 / 3, 1 / 3]) * s2
    torch.testing.assert_close(y, want)
    assert ((x - y).abs() <= codec.error_bound(x)).all()


def test_sparse_is_141_times_smaller_than_fp32_and_never_reduce_scattered():
    from lightning_diloco.collectives import _resolve_algorithm
    from lightning_diloco.compression import SparseCompressor

    codec = get_compressor("sparse")
    n = 4096 * 10
    assert codec.payload_nbytes(n) == 10 * (4 + 96 + 16)
    assert 4 * n / codec.payload_nbytes(n) == pytest.approx(141.24, abs=0.01)
    assert _resolve_algorithm("auto", codec, 8, None, torch.device("cpu")) == "all_gather"
    with pytest.raises(ValueError, match="re-encode sums of 'sparse'"):
        _resolve_algorithm("reduce_scatter", codec, 8, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="at most 4096|in \\[2, 4096\\]"):
        SparseCompressor(block_size=8192)


def test_sparse_with_error_feedback_sends_everything_in_the_end():
    """What one outer step drops, the next ones send: the sum of decoded payloads over many steps of the same input
    approaches the sum of inputs (the residual stays bounded by one round trip's error)."""
    codec = get_compressor("sparse")
    feedback = ErrorFeedback()
    x = torch.randn(4096 * 2, generator=torch.Generator().manual_seed(0))
    sent = torch.zeros_like(x)
    steps = 200
    for _ in range(steps):
        flat = feedback.compensate_(0, x.clone())
        decoded = codec.decode(codec.encode(flat), flat.numel())
        feedback.update_(0, flat, decoded)
        sent += decoded
    residual = feedback.residual(0)
    torch.testing.assert_close(sent + residual, x * steps, rtol=0, atol=1e-3)
    assert residual.abs().max() < x.abs().max() * 64  # bounded: it does not grow with the number of steps
