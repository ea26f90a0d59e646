import math
from typing import Any

import pytest
import torch

from helpers.launch import load_ranks, run_script
from lightning_diloco.collectives import ALGORITHMS, CommStats, average_, plan_buckets
from lightning_diloco.compression import COMPRESSOR_NAMES, ErrorFeedback, Int4Compressor, get_compressor

WORLD_SIZE = 2
LOSSY = [name for name in COMPRESSOR_NAMES if name != "none"]
GATHERING = ["all_gather", "reduce_scatter"]
#: every (format, algorithm) the multi-process script runs: a sum of sparse payloads is never re-encoded
PAIRS = [(name, algorithm) for name in LOSSY for algorithm in GATHERING
         if not (get_compressor(name).gather_only and algorithm == "reduce_scatter")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """Results of every scenario in ``comm_average.py``, run once on two gloo processes, per rank."""
    out = tmp_path_factory.mktemp("comm")
    run_script("comm_average.py", str(out), str(WORLD_SIZE))
    return load_ranks(out, WORLD_SIZE)


def decoded(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What the receivers decode from one tensor, computed here without any communication."""
    compressor = get_compressor(name)
    flat = tensor.reshape(-1)
    return compressor.decode(compressor.encode(flat), flat.numel()).view_as(tensor)


def bound(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return get_compressor(name).error_bound(tensor.reshape(-1)).view_as(tensor)


def exact_mean(ranks: list[dict[str, Any]], scenario: str) -> list[torch.Tensor]:
    per_rank = [r[scenario]["inputs"] for r in ranks]
    return [sum(tensors) / len(ranks) for tensors in zip(*per_rank)]


def test_all_ranks_end_bit_identical(ranks):
    for scenario, result in ranks[0].items():
        for other in ranks[1:]:
            key = "total" if "total" in result else "outputs"
            for mine, theirs in zip(result[key], other[scenario][key]):
                assert torch.equal(mine, theirs), scenario


def mean_magnitude(ranks: list[dict[str, Any]], scenario: str) -> list[torch.Tensor]:
    per_rank = [r[scenario]["inputs"] for r in ranks]
    return [sum(t.abs() for t in tensors) / len(ranks) for tensors in zip(*per_rank)]


def test_uncompressed_average_is_exact(ranks):
    """Equal to the fp32 mean up to 1e-6 of the inputs' magnitude (the backend may sum in another order)."""
    assert ranks[0]["none"]["stats"]["algorithm"] == "all_reduce"
    outputs = ranks[0]["none"]["outputs"]
    for output, expected, magnitude in zip(outputs, exact_mean(ranks, "none"), mean_magnitude(ranks, "none")):
        assert torch.all((output - expected).abs() <= 1e-6 * magnitude)


@pytest.mark.parametrize(("name", "algorithm"), PAIRS)
def test_compressed_average_within_bound(ranks, name, algorithm):
    scenario = f"{name}_{algorithm}"
    assert ranks[0][scenario]["stats"]["algorithm"] == algorithm
    inputs = [r[scenario]["inputs"] for r in ranks]
    outputs = ranks[0][scenario]["outputs"]
    for index, output in enumerate(outputs):
        contributions = [rank_inputs[index] for rank_inputs in inputs]
        reference_sum = sum(decoded(name, x) for x in contributions)  # each rank's values, decoded, summed in fp32
        first_bound = sum(bound(name, x) for x in contributions)
        exact = sum(contributions) / WORLD_SIZE
        if algorithm == "all_gather":
            torch.testing.assert_close(output, reference_sum / WORLD_SIZE, rtol=1e-6, atol=0)
            total_bound = first_bound / WORLD_SIZE
        else:  # the reduced chunks are re-encoded once more
            second_bound = bound(name, reference_sum)
            assert torch.all((output * WORLD_SIZE - reference_sum).abs() <= second_bound)
            total_bound = (first_bound + second_bound) / WORLD_SIZE
        assert torch.all((output - exact).abs() <= total_bound * (1 + 1e-5)), f"tensor {index}"
    assert any(not torch.equal(o, e) for o, e in zip(outputs, exact_mean(ranks, scenario))), "nothing was compressed"


@pytest.mark.parametrize("scenario", ["none"] + [f"{name}_{algorithm}" for name, algorithm in PAIRS])
def test_bucketing_gives_the_one_bucket_result(ranks, scenario):
    for result in ranks:
        single, several = result[scenario], result[f"{scenario}_buckets"]
        assert single["stats"]["num_buckets"] == 1
        assert several["stats"]["num_buckets"] >= 3
        assert several["stats"]["num_collectives"] == several["stats"]["num_buckets"] * single["stats"][
            "num_collectives"]
        if scenario == "none":  # all_reduce: the backend's summation order may depend on the bucket layout
            for one, many, magnitude in zip(single["outputs"], several["outputs"], mean_magnitude(ranks, scenario)):
                assert torch.all((one - many).abs() <= 1e-6 * magnitude)
        else:  # decoded payloads are summed in rank order, whatever the buckets
            for one, many in zip(single["outputs"], several["outputs"]):
                assert torch.equal(one, many)
        extra_bytes = several["stats"]["bytes_sent"] - single["stats"]["bytes_sent"]
        if single["stats"]["algorithm"] == "all_gather":  # block-aligned tensors: payload sizes add up exactly
            assert extra_bytes == 0
        elif single["stats"]["algorithm"] == "all_reduce":  # the ring volume is rounded down per bucket
            assert abs(extra_bytes) < several["stats"]["num_buckets"]
        else:  # reduce_scatter pads each bucket to k chunks
            assert extra_bytes >= 0


def aligned_numel(inputs: list[torch.Tensor], block_size: int) -> int:
    return sum(math.ceil(t.numel() / block_size) * block_size for t in inputs)


@pytest.mark.parametrize("scenario", ["none"] + [f"{name}_{algorithm}" for name, algorithm in PAIRS])
def test_bytes_sent_follow_the_formula(ranks, scenario):
    k = WORLD_SIZE
    for result in ranks:
        case = result[scenario]
        compressor = get_compressor(case["compressor"])
        n = aligned_numel(case["inputs"], compressor.block_size)
        stats = case["stats"]
        if stats["algorithm"] == "all_reduce":  # ring all-reduce volume of the fp32 bucket
            expected, collectives = 2 * (k - 1) * 4 * n // k, 1
        elif stats["algorithm"] == "all_gather":  # own payload to each of k - 1 peers
            expected, collectives = (k - 1) * compressor.payload_nbytes(n), 1
        else:  # all-to-all of k - 1 chunk payloads, then all-gather of the reduced chunk
            chunk = math.ceil(n / (k * compressor.block_size)) * compressor.block_size
            expected, collectives = 2 * (k - 1) * compressor.payload_nbytes(chunk), 2
        assert stats["bytes_sent"] == expected
        assert stats["num_collectives"] == collectives
        assert stats["numel"] == sum(t.numel() for t in case["inputs"])
        assert stats["seconds"] > 0


def test_fewer_bits_send_fewer_bytes(ranks):
    sent = {name: ranks[0][f"{name}_all_gather"]["stats"]["bytes_sent"] for name in LOSSY}
    sent["none"] = ranks[0]["none"]["stats"]["bytes_sent"]
    assert sent["sparse"] < sent["int2"] < sent["int4"] == sent["e3m0"] < sent["int8"] < sent["bf16"] < sent["fp16"] < sent["none"]


@pytest.mark.parametrize("algorithm", GATHERING)
def test_int8_saturated_codes_do_not_overflow(ranks, algorithm):
    result = ranks[0][f"int8_saturated_{algorithm}"]
    for output, value in zip(result["outputs"], (5.0, -3.0)):
        assert torch.all((output - value).abs() <= abs(value) / 127), output


def test_zero_weight_rank_is_left_out(ranks):
    rank0_inputs = ranks[0]["none_weighted"]["inputs"]
    assert all(torch.isnan(t).all() for t in ranks[1]["none_weighted"]["inputs"])
    for result in ranks:
        for output, expected in zip(result["none_weighted"]["outputs"], rank0_inputs):
            assert torch.equal(output, expected)
        for output, x in zip(result["int8_weighted"]["outputs"], ranks[0]["int8_weighted"]["inputs"]):
            torch.testing.assert_close(output, decoded("int8", x), rtol=1e-6, atol=0)


def test_error_feedback_keeps_the_running_average(ranks):
    syncs = 8
    compressor = Int4Compressor()
    results = [r["int4_error_feedback"] for r in ranks]
    residuals = [r["feedback"]["residuals"] for r in results]
    assert sorted(residuals[0]) == list(range(len(results[0]["inputs"])))
    for index, total in enumerate(results[0]["total"]):
        inputs = [r["inputs"][index] for r in results]
        # sum over syncs of the averages = (syncs * sum of inputs - sum of the last residuals) / k
        expected = (syncs * sum(inputs) - sum(res[index].view_as(total) for res in residuals)) / WORLD_SIZE
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        # the drift from the exact running sum stays within about one round trip, however many syncs
        drift = (total - syncs * sum(inputs) / WORLD_SIZE).abs()
        one_round_trip = sum(compressor.error_bound(x.reshape(-1)).view_as(x) for x in inputs) / WORLD_SIZE
        assert torch.all(drift <= 1.1 * one_round_trip)


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_single_process_compresses_without_communicating(name):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=generator), torch.randn(700, generator=generator).double()]
    originals = [t.clone() for t in tensors]
    stats = average_(tensors, name)
    assert (stats.algorithm, stats.world_size, stats.bytes_sent, stats.num_collectives) == ("local", 1, 0, 0)
    for tensor, original in zip(tensors, originals):
        assert tensor.dtype == original.dtype
        torch.testing.assert_close(tensor, decoded(name, original.float()).to(original.dtype), rtol=0, atol=0)
    if name != "none":
        assert not torch.equal(tensors[0], originals[0])


def test_single_process_weight_divisor_and_error_feedback():
    x = torch.randn(300)
    out = [x.clone()]
    average_(out, "none", weight=3.0, divisor=2.0)
    torch.testing.assert_close(out[0], x * 1.5)

    feedback = ErrorFeedback()
    out = [x.clone()]
    average_(out, "e3m0", error_feedback=feedback)
    torch.testing.assert_close(feedback.residual(0), x - out[0], rtol=0, atol=0)

    out = [torch.full((4,), float("nan"))]
    average_(out, "int8", weight=0.0, error_feedback=feedback)
    assert torch.equal(out[0], torch.zeros(4))
    torch.testing.assert_close(feedback.residual(0), x - decoded("e3m0", x), rtol=0, atol=0)  # untouched


def test_invalid_arguments_raise():
    tensors = [torch.randn(4)]
    with pytest.raises(ValueError, match="Unknown compressor 'fp8'.*none, bf16, fp16, int8, int4, int2, e3m0, sparse"):
        average_(tensors, "fp8")
    with pytest.raises(ValueError, match="Unknown algorithm 'ring'.*" + ", ".join(ALGORITHMS)):
        average_(tensors, algorithm="ring")
    with pytest.raises(ValueError, match="all_reduce"):
        average_(tensors, "int8", algorithm="all_reduce")
    with pytest.raises(ValueError, match="divisor"):
        average_(tensors, divisor=0.0)
    with pytest.raises(ValueError, match="floating point"):
        average_([torch.arange(3)])
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        average_(tensors, bucket_cap_mb=0)
    assert average_([]).bytes_sent == 0


def test_plan_buckets_aligns_and_caps():
    numels = [37, 528, 4099, 1, 300, 300]
    cap_mb = 1024 * 4 / 2**20  # 1024 fp32 elements
    buckets = plan_buckets(numels, alignment=256, bucket_cap_mb=cap_mb)
    segments = [segment for bucket in buckets for segment in bucket.segments]
    assert [segment.index for segment in segments] == list(range(len(numels)))
    assert [segment.numel for segment in segments] == numels
    for bucket in buckets:
        assert all(segment.offset % 256 == 0 for segment in bucket.segments)
        ends = [segment.offset + math.ceil(segment.numel / 256) * 256 for segment in bucket.segments]
        assert bucket.numel == ends[-1]
        assert bucket.numel <= 1024 or len(bucket.segments) == 1  # only a lone oversized tensor exceeds the cap
    assert [len(bucket.segments) for bucket in buckets] == [2, 1, 2, 1]


def test_comm_stats_add():
    first = CommStats("all_reduce", "none", 2, numel=10, num_buckets=1, num_collectives=1, bytes_sent=40, seconds=1.0)
    second = CommStats("all_gather", "none", 2, numel=5, num_buckets=2, num_collectives=2, bytes_sent=8, seconds=0.5)
    total = first + second
    assert total.to_dict() == {
        "algorithm": "all_reduce+all_gather",
        "compressor": "none",
        "world_size": 2,
        "numel": 15,
        "num_buckets": 3,
        "num_collectives": 3,
        "bytes_sent": 48,
        "seconds": 1.5,
        "total_seconds": 0.0,
    }
    first += second
    assert first == total
