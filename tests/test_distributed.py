"""Data-parallel calibration under torchrun: 2 gloo processes on CPU give what 1 process gives.

Every comparison runs both sides with ``runtime.threads: 1``: CPU kernels may round differently
with another thread count, whatever the number of processes.
"""

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.distributed import Communicator, device_for_rank, launched
from statprune_cli.errors import ConfigError
from statprune_cli.stats import ChannelStats

runner = CliRunner()


@pytest.fixture
def one_thread():
    """The in-process single runs set torch's thread count to 1; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(tmp_path: Path, model_dir: Path, files: dict[str, Path], **sections) -> Path:
    """8 windows in batches of 1: 4 batches per process, so a merge in another order would show."""
    cal = {"dataset": f"jsonl:{files['cal']}", "nsamples": 8, "seqlen": 32, "batch_size": 1}
    return write_config(tmp_path / "run.yaml", model_dir, files, tmp_path / "out", calibration=cal,
                        runtime={"device": "cpu", "threads": 1, **sections.pop("runtime", {})}, **sections)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "statprune_cli", *args, "-q"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def single(*args: str) -> None:
    res = runner.invoke(app, [*args, "-q"])
    assert res.exit_code == 0, res.output


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_statprune_on_two_processes_equals_one_bit_for_bit(tmp_path: Path, tiny_model_dir: Path,
                                                           text_files: dict[str, Path], one_thread: None) -> None:
    # the energy restoration scales every kept weight by the statistics' second moments, so any change in their sums shows
    # unstructured: the channel sums alone (the N:M sketch is summed as it comes: the next test)
    cfg = config(tmp_path, tiny_model_dir, text_files, pruning={"method": "statprune", "options": {"energy_targets": ["re:.*"]}})
    single("prune", str(cfg), "-o", str(tmp_path / "one"))
    res = torchrun("prune", str(cfg), "--json", "-o", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)  # rank 0 alone prints: one JSON document
    assert printed["world_size"] == 2 and report(tmp_path / "one")["world_size"] == 1
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert printed["perplexity"] == report(tmp_path / "one")["perplexity"]  # eval windows sharded, NLL summed in order
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# statprune at N:M: ADMM's steps amplify the sketch's rounding, a flipped weight moves the update of the rest of its
# row, and from the second layer on the inputs differ too, enough to move the channel reallocation's orders: the first
# layer's rows with no flipped weight are compared
@pytest.mark.parametrize("pruning,tol,prefix,flipped_rows_move", [
    ({"method": "sparsegpt"}, 1e-4, "model.layers.", False),
    ({"method": "statprune", "pattern": "2:4"}, 1e-3, "model.layers.0.", True)])
def test_calibration_sums_are_bit_identical_and_second_order_methods_within_float32_rounding(
        pruning: dict, tol: float, prefix: str, flipped_rows_move: bool, tmp_path: Path, tiny_model_dir: Path,
        text_files: dict[str, Path], one_thread: None) -> None:
    cfg = config(tmp_path, tiny_model_dir, text_files, pruning=pruning, eval={"datasets": []})
    single("calibrate", str(cfg), "-o", str(tmp_path / "one.safetensors"))
    res = torchrun("calibrate", str(cfg), "-o", str(tmp_path / "two.safetensors"))
    assert res.returncode == 0, res.stderr
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        if k.endswith((".gram", ".sketch")):  # float32, all-reduced: rounding only
            assert torch.allclose(one[k], two[k], rtol=0, atol=1e-6 * float(one[k].abs().max())), k
        else:  # float64 sums in global batch order
            assert torch.equal(one[k], two[k]), k

    single("prune", str(cfg), "-o", str(tmp_path / "one"))
    res = torchrun("prune", str(cfg), "-o", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    compared = [k for k in a if k.startswith(prefix) and k.endswith("proj.weight")]
    assert len(compared) >= 7
    for k in compared:
        flipped = (a[k] == 0) != (b[k] == 0)
        assert flipped.float().mean() <= 0.001, k  # the documented tolerance: masks differ only at near-ties
        same = ~flipped.any(1) if flipped_rows_move else torch.ones(flipped.shape[0], dtype=torch.bool)
        assert same.float().mean() >= 0.9, k
        assert torch.allclose(a[k][same], b[k][same], rtol=0, atol=tol * float(a[k].abs().max())), k


def test_a_killed_rank_fails_the_launch_and_the_run_resumes_on_two_processes(
        tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path], one_thread: None) -> None:
    cfg = config(tmp_path, tiny_model_dir, text_files, runtime={"streaming": True, "offload_activations": "disk"})
    single("prune", str(cfg), "-o", str(tmp_path / "one"))
    killed = torchrun("prune", str(cfg), env={"STATPRUNE_TEST_KILL_AFTER_LAYER": "1@rank1"})
    assert killed.returncode != 0
    assert "Signal 9 (SIGKILL)" in killed.stderr or "lost the other processes" in killed.stderr, killed.stderr[-2000:]
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    assert not out.exists()
    assert json.loads((partial / "progress.json").read_text())["next_layer"] == 2
    assert {p.name for p in partial.glob("inputs-*")} == {"inputs-00002-rank0.safetensors", "inputs-00002-rank1.safetensors"}

    refused = runner.invoke(app, ["prune", str(cfg), "-q"])
    assert refused.exit_code == 2
    assert "holds a partial run on 2 process(es); resume it with 2 (got 1)" in refused.stderr

    resumed = torchrun("prune", str(cfg), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["layer"] for r in json.loads(resumed.stdout)["layers"]] == [0, 1, 2]
    one, two = tensors(tmp_path / "one"), tensors(out)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert report(out)["perplexity"] == report(tmp_path / "one")["perplexity"]
    assert not partial.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(("inputs-", "activations-", "progress"))]


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one machine: the job step's command once per node, all at once; fails if any fails
while [[ $1 == --* ]]; do shift; done
pids=()
for _ in $(seq "$SLURM_NNODES"); do "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_the_slurm_script_prunes_on_two_nodes_as_one_process_does(
        tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path], one_thread: None) -> None:
    """scripts/slurm/prune.sbatch itself, on a fake two-node allocation: two torchrun agents meet by c10d rendezvous."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": "#!/usr/bin/env bash\necho 127.0.0.1\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    cfg = config(tmp_path, tiny_model_dir, text_files, pruning={"method": "statprune", "options": {"energy_targets": ["re:.*"]}})
    single("prune", str(cfg), "-o", str(tmp_path / "one"))
    slurm = {"SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "node[1-2]", "MASTER_PORT": str(free_port()), "VENV": sys.prefix,
             "HF_HOME": str(tmp_path / "hf"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "prune.sbatch"
    res = subprocess.run(["bash", str(script), str(cfg), "-q", "--json", "-o", str(tmp_path / "two")], capture_output=True,
                         text=True, env={**os.environ, **slurm}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "statprune: 2 node(s) x 1 GPU(s), rendezvous 127.0.0.1:" in res.stdout
    assert report(tmp_path / "two")["world_size"] == 2
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("sets,command,message", [
    (["calibration.nsamples=1"], "prune",
     "calibration.nsamples: expected at least one batch per process: 1 windows in batches of 1 give 1 batches for 2 processes"),
    ([], "sweep", "sweep: runs in one process"),
])
def test_what_one_process_alone_can_do_is_refused_under_a_launcher(
        tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        sets: list[str], command: str, message: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = config(tmp_path, tiny_model_dir, text_files)
    res = runner.invoke(app, [command, str(cfg), "-q", *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 2
    assert message in res.stderr
    assert not (tmp_path / "out").exists()


def test_one_process_merges_per_batch_statistics_in_batch_order() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [ChannelStats.of(torch.randn(3, 7, 5, generator=g) * 10**i, gram=True) for i in range(6)]
    expected = ChannelStats.empty(5)
    for s in batches:
        expected.add(s)
    vectors = [s.vectors_on_cpu() for s in batches]
    merged = Communicator().merge_stats([{"q": v, "k": v} for v in vectors], {"q": expected.gram})
    for name in ("q", "k"):
        for f in ("sum", "sumsq", "sumabs"):
            assert torch.equal(getattr(merged[name], f), getattr(expected, f))
        assert merged[name].count == expected.count == 6 * 21
    assert merged["q"].gram is expected.gram and merged["k"].gram is None
    assert merged["q"].sum is not merged["k"].sum  # each linear owns its statistics (they are saved per linear)


def test_sharding_is_round_robin_and_cuda_processes_take_their_local_gpu() -> None:
    items = list(range(7))
    assert [Communicator(r, 3).shard(items) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Communicator().shard(items) == items and Communicator().gather_ordered(items) == items
    assert device_for_rank(torch.device("cuda"), 3, 4) == torch.device("cuda", 3)
    assert device_for_rank(torch.device("cpu"), 3, 4) == torch.device("cpu")
    with pytest.raises(ConfigError, match="runtime.device: expected cuda or auto under a launcher"):
        device_for_rank(torch.device("cuda", 1), 0, 2)


def test_the_process_group_timeout_comes_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    seen: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: seen.update(destroyed=True))
    with launched(torch.device("cpu"), 0.5) as (comm, device):
        assert (comm.rank, comm.world_size, device.type) == (1, 2, "cpu")
    assert seen["timeout"] == timedelta(seconds=30) and seen["backend"] == "gloo" and seen["destroyed"]
