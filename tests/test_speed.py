"""eval-speed's CPU-side logic: which linears are 2:4, the refusal without a suitable GPU, the logits check, the
timing loop and table with a fake timer, and the whole flow on a tiny model with a stand-in for the sparse format."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import prune_report
from torch import nn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from statprune_cli import speed
from statprune_cli.cli import app
from statprune_cli.errors import InputError
from statprune_cli.ui import UI

runner = CliRunner()
SMALL = ["--batch-sizes", "1,2", "--seqlens", "16,32", "--decode-tokens", "3", "--check-windows", "2", "--warmup", "1",
         "--repeats", "3"]


class FakeTimer:
    """Runs the callable and says it took the next of ``seconds`` (cycling)."""

    def __init__(self, *seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        return self.seconds[(self.calls - 1) % len(self.seconds)]


def identity_backend(transform=lambda w: w.clone()) -> speed.Backend:
    """The sparse format's stand-in on the CPU: a copy of the weight (or ``transform`` of it)."""
    return speed.Backend("stand-in", (1, 1), transform)


def decoder_linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@pytest.fixture
def pruned(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path]):
    """prune(pattern, sparsity) -> the output folder of a wanda prune of the tiny Llama."""

    def run(pattern: str, sparsity: float = 0.5) -> Path:
        where = tmp_path / pattern.replace(":", "of")
        where.mkdir()
        prune_report(where, tiny_model_dir, text_files, pattern=pattern, sparsity=sparsity)
        return where / "out"

    return run


def test_is_two_four_reads_groups_along_the_input_dimension() -> None:
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 0, 0, 0, 5, 0, 0, 6]])
    assert speed.is_two_four(w)
    assert not speed.is_two_four(w.t().contiguous().reshape(2, 8))  # the same values, grouped across rows
    w[1, 5] = 7.0  # three nonzeros in the second group of row 1
    assert not speed.is_two_four(w)
    assert not speed.is_two_four(torch.zeros(4, 6))  # 4 does not divide the input dimension
    assert speed.is_two_four(torch.zeros(4, 8))


def test_plan_finds_every_pruned_linear_of_a_2of4_model_and_none_of_a_50pct_one(pruned) -> None:
    model = AutoModelForCausalLM.from_pretrained(pruned("2:4"), dtype=torch.bfloat16)
    targets = decoder_linears(model)
    assert len(targets) == 21
    plan = speed.conversion_plan(speed.linear_weights(model), (1, 1))
    assert set(plan.two_four) == set(plan.convert) == targets  # lm_head stays dense
    assert plan.linears == 22 and plan.left_dense == {}

    model = AutoModelForCausalLM.from_pretrained(pruned("unstructured"), dtype=torch.bfloat16)
    plan = speed.conversion_plan(speed.linear_weights(model), (1, 1))
    assert plan.two_four == [] and plan.convert == []


def test_plan_leaves_dense_the_shapes_the_kernels_cannot_take() -> None:
    w = torch.tensor([1.0, 0, 0, 1]).repeat(32, 16)  # 32 x 64, 2:4
    plan = speed.conversion_plan({"a": w, "b": w[:16]}, (32, 64))
    assert plan.convert == ["a"] and list(plan.left_dense) == ["b"]
    assert "16x64" in plan.left_dense["b"] and "32x64" in plan.left_dense["b"]


def test_backend_is_torchs_own_with_its_shape_limits() -> None:
    backend = speed.semi_structured_backend()
    expected = {"cusparselt": (16, 16), "cutlass": (32, 64)}  # bfloat16 rows x columns of torch's two backends
    assert backend.min_shape == expected[backend.name]
    assert backend.sparsify is torch.sparse.to_sparse_semi_structured


def test_refuses_without_cuda_in_one_line_before_loading(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = runner.invoke(app, ["eval-speed", str(tmp_path / "no-such-model")])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "compute capability 8.0" in lines[0] and "no CUDA device" in lines[0]
    assert res.stdout == ""


def test_refuses_a_gpu_older_than_ampere(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla T4")
    assert speed.device_problem().endswith("Tesla T4 has compute capability 7.5")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 0))
    assert speed.device_problem() is None


def test_compare_logits_accepts_rounding_and_rejects_misplaced_values() -> None:
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(1, 16, 50, generator=g) * 5 for _ in range(3)]
    rounded = [d.bfloat16().float() for d in dense]
    ok = speed.compare_logits(zip(dense, rounded), rtol=0.05)
    assert ok["ok"] and ok["windows"] == 3 and 0 < ok["rel_l2"] < 0.01 and ok["top1_agreement"] > 0.9
    shifted = [d.roll(1, dims=-1) for d in dense]
    bad = speed.compare_logits(zip(dense, shifted), rtol=0.05)
    assert not bad["ok"] and bad["rel_l2"] > 1
    assert "more than --rtol 0.05" in speed.check_failure(bad) and speed.check_failure(ok) is None
    nan = speed.compare_logits([(dense[0], torch.full_like(dense[0], float("nan")))], rtol=0.05)
    assert not nan["ok"] and nan["rel_l2"] is None
    json.dumps(nan, allow_nan=False)


def test_median_seconds_warms_up_untimed_and_times_only_the_step() -> None:
    log: list[str] = []
    seconds = iter((3.0, 1.0, 2.0))

    def timer(fn) -> float:
        log.append("[")
        fn()
        log.append("]")
        return next(seconds)

    def prepare() -> int:
        log.append("p")
        return log.count("p")

    med = speed.median_seconds(lambda n: log.append(f"s{n}"), prepare, timer, warmup=2, repeats=3)
    assert med == 2.0
    assert "".join(log) == "ps1ps2p[s3]p[s4]p[s5]"  # each step on a fresh prepare(), which is never timed


def test_speed_results_and_table_rows() -> None:
    settings = speed.SpeedSettings(batch_sizes=(1, 16), seqlens=(512,), decode_tokens=64)
    dense = speed.Timings({(1, 512): 0.010, (16, 512): 0.080}, decode=0.640)
    sparse = speed.Timings({(1, 512): 0.010, (16, 512): 0.064}, decode=0.800)
    res = speed.speed_results(dense, sparse, settings)
    big = res["prefill"][1]
    assert big["dense_tokens_per_s"] == pytest.approx(102400) and big["sparse_tokens_per_s"] == pytest.approx(128000)
    assert big["speedup"] == pytest.approx(1.25)
    assert res["decode"]["dense_ms_per_token"] == pytest.approx(10.0) and res["decode"]["speedup"] == pytest.approx(0.8)
    assert speed.table_rows(res) == [
        ("prefill, batch 1 x 512", "51,200 tok/s", "51,200 tok/s", "1.00x"),
        ("prefill, batch 16 x 512", "102,400 tok/s", "128,000 tok/s", "1.25x"),
        ("decode, batch 1, 64 tokens after 512", "10.00 ms/token", "12.50 ms/token", "0.80x"),
    ]
    no_decode = speed.speed_results(speed.Timings(dense.prefill, None), speed.Timings(sparse.prefill, None), settings)
    assert no_decode["decode"] is None and len(speed.table_rows(no_decode)) == 2


def test_context_and_option_checks() -> None:
    speed.check_context(speed.SpeedSettings(seqlens=(512, 2048), decode_tokens=64), 2048)
    with pytest.raises(InputError, match="exceed the model's context"):
        speed.check_context(speed.SpeedSettings(seqlens=(512, 4096)), 2048)
    assert speed.parse_sizes("1, 16", "--batch-sizes") == (1, 16)
    for bad in ("", "0", "1,x"):
        with pytest.raises(InputError, match="--batch-sizes"):
            speed.parse_sizes(bad, "--batch-sizes")


def strict_json(text: str) -> dict:
    def reject(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def cpu_run(monkeypatch, transform=lambda w: w.clone()) -> FakeTimer:
    """eval-speed's command as on a GPU, but on the CPU with the stand-in format and a fake timer."""
    timer = FakeTimer(0.5)
    monkeypatch.setattr(speed, "device_problem", lambda: None)
    monkeypatch.setattr(speed, "run_speed", partial(speed.run_speed, device="cpu", backend=identity_backend(transform),
                                                    timer=timer))
    return timer


def test_json_report_of_the_whole_flow(monkeypatch, pruned) -> None:
    timer = cpu_run(monkeypatch)
    res = runner.invoke(app, ["eval-speed", str(pruned("2:4")), "--json", "--quiet", *SMALL])
    assert res.exit_code == 0, res.output
    report = strict_json(res.stdout)
    assert set(report) == {"model", "device", "dtype", "backend", "torch", "linears", "allocated_mib", "check", "warmup",
                           "repeats", "prefill", "decode"}
    assert report["linears"] == {"total": 22, "two_four": 21, "converted": 21, "left_dense": {}}
    assert report["check"]["ok"] and report["check"]["rel_l2"] == 0.0 and report["check"]["windows"] == 2
    assert [(r["batch"], r["seqlen"]) for r in report["prefill"]] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    assert report["prefill"][3]["dense_tokens_per_s"] == pytest.approx(128) and report["prefill"][3]["speedup"] == 1.0
    assert report["decode"] == {"batch": 1, "prompt_tokens": 16, "tokens": 3, "dense_ms_per_token": pytest.approx(500 / 3),
                                "sparse_ms_per_token": pytest.approx(500 / 3), "speedup": 1.0}
    assert timer.calls == 2 * (4 + 1) * 3  # two formats, four prefill shapes and decode, three repeats each


def test_logits_off_tolerance_fail_after_the_report(monkeypatch, pruned) -> None:
    cpu_run(monkeypatch, transform=lambda w: w.roll(1, dims=1).contiguous())  # values in the wrong columns
    res = runner.invoke(app, ["eval-speed", str(pruned("2:4")), "--json", "--quiet", *SMALL])
    assert res.exit_code == 1
    assert strict_json(res.stdout)["check"]["ok"] is False
    assert "more than --rtol 0.05" in res.stderr


def test_a_model_with_no_2of4_linear_is_bad_input(monkeypatch, pruned) -> None:
    cpu_run(monkeypatch)
    res = runner.invoke(app, ["eval-speed", str(pruned("unstructured")), "--quiet", *SMALL])
    assert res.exit_code == 2 and "no weight is 2:4" in res.stderr


def test_table_prints(monkeypatch, pruned) -> None:
    cpu_run(monkeypatch)
    res = runner.invoke(app, ["eval-speed", str(pruned("2:4")), *SMALL], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("prefill, batch 2 x 32", "decode, batch 1, 3 tokens after 16", "converted 21 of 22 linears", ": ok"):
        assert text in res.stderr


def test_no_decode_timing_with_0_decode_tokens(pruned) -> None:
    timer = FakeTimer(0.1)
    report = speed.run_speed(pruned("2:4"), speed.SpeedSettings((1,), (16,), 0, 1, 0.05, 0, 1), UI(quiet=True), device="cpu",
                             backend=identity_backend(), timer=timer)
    assert report["decode"] is None and timer.calls == 2
