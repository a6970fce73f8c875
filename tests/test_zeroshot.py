"""Zero-shot accuracy through lm-eval on a tiny model: offline end to end, equal to lm-eval called directly, and the errors."""

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import random_text, tiny_model, tiny_tokenizer, write_config
from transformers import AutoTokenizer
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.config import ZEROSHOT_TASKS, ZeroShotConfig
from statprune_cli.zeroshot import TASK_DIR, evaluate_zeroshot, local_task_config

lm_eval = pytest.importorskip("lm_eval")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "zeroshot"
N = 6  # examples per task in the synthetic files


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Arrow caches of the per-test task files out of ~/.cache, no data folder from the environment, and one thread:
    lm-eval makes hundreds of forward calls on matrices too small for a second thread to pay off."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.delenv("STATPRUNE_ZEROSHOT_DATA", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ai2(i: int, stem: str) -> dict:
    return {"id": str(i), "question": {"stem": stem, "choices": [{"text": random_text(3, 50 * i + j), "label": label}
                                                               for j, label in enumerate("ABCD")]},
            "answerKey": "ABCD"[i % 4]}


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """Every task's files in the layout of ../shared/data/zeroshot, the text drawn from the tiny vocabulary."""
    d = tmp_path / "zeroshot"
    t = random_text
    _jsonl(d / "boolq/val.superglue_format.derived.jsonl",
           [{"question": t(5, i), "passage": t(20, 100 + i), "label": i % 2 == 0, "idx": i} for i in range(N)])
    _jsonl(d / "rte/val.jsonl", [{"premise": t(12, i), "hypothesis": t(6, 200 + i),
                                  "label": ("entailment", "not_entailment")[i % 2], "idx": i} for i in range(N)])
    _jsonl(d / "hellaswag/hellaswag_val.from_klosax_txt.jsonl",
           [{"ctx_with_activity_label": t(10, i), "label": i % 4, "endings": [t(4, 300 + 4 * i + j) for j in range(4)]}
            for i in range(N)])
    _jsonl(d / "winogrande/dev.jsonl", [{"qID": str(i), "sentence": f"{t(6, i)} _ {t(4, 400 + i)}", "option1": t(1, 500 + i),
                                         "option2": t(1, 600 + i), "answer": str(1 + i % 2)} for i in range(N)])
    _jsonl(d / "arc_easy/ARC-Easy-Test.reconstructed.jsonl", [_ai2(i, t(8, 700 + i)) for i in range(N)])
    _jsonl(d / "arc_challenge/ARC-Challenge-Test.jsonl", [_ai2(i, t(8, 800 + i)) for i in range(N)])
    _jsonl(d / "openbookqa/test.jsonl", [_ai2(i, t(8, 900 + i)) for i in range(N)])
    _jsonl(d / "piqa/valid.jsonl", [{"goal": t(6, i), "sol1": t(5, 1000 + i), "sol2": t(5, 1100 + i)} for i in range(N)])
    (d / "piqa/valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(N)))
    return d


def test_every_task_has_a_yaml() -> None:
    assert sorted(p.stem for p in TASK_DIR.glob("*.yaml")) == sorted(ZEROSHOT_TASKS)


def test_local_layouts_give_the_fields_the_stock_prompts_read(task_dir: Path) -> None:
    """Every task's first example has a prompt, its choices, and an integer gold index as the hub copy would give."""
    from lm_eval.api.task import ConfigurableTask

    for name in ZEROSHOT_TASKS:
        task = ConfigurableTask(config=local_task_config(name, task_dir)[0])
        docs = list(task.eval_docs)
        assert len(docs) == N
        for i, doc in enumerate(docs):
            choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
            if name == "winogrande":  # partial scoring: the choices are contexts, the target the shared continuation
                assert task.doc_to_text(doc) == i % 2 and target == doc["sentence"].split("_")[1].strip()
                continue
            assert type(target) is int and 0 <= target < len(choices), (name, target)
            assert isinstance(task.doc_to_text(doc), str) and task.doc_to_text(doc)
        expected = {"boolq": [1, 0] * 3, "rte": [0, 1] * 3, "piqa": [0, 1] * 3}.get(name, [i % 4 for i in range(N)])
        if name != "winogrande":
            assert [task.doc_to_target(d) for d in docs] == expected, name


def test_cli_runs_every_task_offline_and_prints_the_table(tiny_model_dir: Path, task_dir: Path) -> None:
    res = run("eval-zeroshot", str(tiny_model_dir), "--data-dir", str(task_dir), "--tasks", ",".join(ZEROSHOT_TASKS),
              "--limit", "3", "--json", "-q")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [t["task"] for t in out["tasks"]] == list(ZEROSHOT_TASKS)
    assert all(t["n"] == 3 and 0 <= t["acc"] <= 1 and t["acc_stderr"] >= 0 for t in out["tasks"])
    acc_only = {t["task"] for t in out["tasks"] if t["acc_norm"] is None}
    assert acc_only == {"boolq", "rte", "winogrande"}  # lm-eval's stock metrics for these are acc alone
    assert out["mean_acc"] == pytest.approx(sum(t["acc"] for t in out["tasks"]) / 8)
    assert out["source"] == str(task_dir) and out["limit"] == 3 and out["skipped"] == {}
    assert {t["task"] for t in out["tasks"] if t["caveat"]} == {"boolq", "hellaswag", "arc_easy"}
    assert not (tiny_model_dir / "report.json").exists()  # not a prune output: nothing written into it

    table = run("eval-zeroshot", str(tiny_model_dir), "--data-dir", str(task_dir), "--tasks", "piqa,rte", "--limit", "2")
    assert table.exit_code == 0, table.output
    for text in ("zero-shot accuracy", "piqa", "rte", "mean (2 tasks)", "the first 2 examples of each task"):
        assert text in table.stderr


def test_prune_runs_zeroshot_on_the_pruned_model_and_records_it(tmp_path: Path, tiny_model_dir: Path, task_dir: Path,
                                                                text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       eval={"datasets": [], "zeroshot": {"tasks": ["piqa", "arc_easy"], "data_dir": str(task_dir), "limit": 2}})
    res = run("prune", str(cfg), "-q", "--json")
    assert res.exit_code == 0, res.output
    z = json.loads(res.stdout)["zeroshot"]
    assert [(t["task"], t["n"]) for t in z["tasks"]] == [("piqa", 2), ("arc_easy", 2)]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["zeroshot"] == z and "zeroshot" in report["timings"]
    assert AutoTokenizer.from_pretrained(out).pad_token is None  # lm-eval's pad token stays out of the saved tokenizer

    # The same numbers from the saved folder; eval-zeroshot records its own run in the folder's report.
    again = run("eval-zeroshot", str(out), "--data-dir", str(task_dir), "--tasks", "piqa,arc_easy", "--limit", "2", "-q", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["tasks"] == z["tasks"]
    assert json.loads((out / "report.json").read_text())["zeroshot"]["tasks"] == z["tasks"]


def test_equals_lm_eval_called_directly_on_the_saved_folder(tmp_path: Path, tiny_model_dir: Path, task_dir: Path) -> None:
    """lm-eval's own loader and model wrapper, on stock task files that include lm-eval's YAML and read the same local files."""
    import lm_eval.tasks

    stock = Path(lm_eval.tasks.__file__).parent
    yamls = tmp_path / "direct-tasks"
    yamls.mkdir()
    (yamls / "winogrande.yaml").write_text(
        f"include: {stock / 'winogrande/default.yaml'}\ntask: winogrande\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{validation: {task_dir / 'winogrande/dev.jsonl'}}}}}\ntraining_split: null\n")
    (yamls / "arc_easy.yaml").write_text(
        f"include: {stock / 'arc/arc_easy.yaml'}\ntask: arc_easy\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{test: {task_dir / 'arc_easy/ARC-Easy-Test.reconstructed.jsonl'}}}}}\n"
        "training_split: null\nvalidation_split: null\nprocess_docs: !function statprune_cli.zeroshot_tasks.layouts.arc\n")
    direct = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(tiny_model_dir), "dtype": "float32", "device": "cpu"},
        tasks=["winogrande", "arc_easy"], num_fewshot=0, limit=N, log_samples=False,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(yamls), include_defaults=False))
    res = run("eval-zeroshot", str(tiny_model_dir), "--data-dir", str(task_dir), "--tasks", "winogrande,arc_easy",
              "--limit", str(N), "-q", "--json")
    assert res.exit_code == 0, res.output
    ours = {t["task"]: t for t in json.loads(res.stdout)["tasks"]}
    for task in ("winogrande", "arc_easy"):
        theirs = direct["results"][task]
        assert ours[task]["n"] == direct["n-samples"][task]["effective"] == N
        assert ours[task]["acc"] == theirs["acc,none"] and ours[task]["acc_stderr"] == theirs["acc_stderr,none"]
        assert ours[task]["acc_norm"] == theirs.get("acc_norm,none")
    assert 0 < ours["arc_easy"]["acc_norm"] < 1 or 0 < ours["arc_easy"]["acc"] < 1  # the scores are not all ties


def test_tasks_without_files_are_skipped_and_named(tiny_model_dir: Path, task_dir: Path) -> None:
    (task_dir / "piqa/valid-labels.lst").unlink()
    res = run("eval-zeroshot", str(tiny_model_dir), "--data-dir", str(task_dir), "--tasks", "piqa,rte", "--limit", "2", "-q", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [t["task"] for t in out["tasks"]] == ["rte"]
    assert out["skipped"] == {"piqa": f"no file piqa/valid-labels.lst in {task_dir}"}
    none = run("eval-zeroshot", str(tiny_model_dir), "--data-dir", str(task_dir), "--tasks", "piqa", "-q")
    assert none.exit_code == 2
    assert none.stderr == f"statprune: error: eval.zeroshot.data_dir: none of the tasks piqa has its files in {task_dir}\n"


@pytest.mark.parametrize("args, env, message", [
    (["--tasks", "boolq,mmlu"], {}, "--tasks: unknown task 'mmlu'; expected one of: boolq, rte,"),
    (["--data-dir", "/no/such/dir"], {}, "--data-dir: expected a folder of zero-shot task files"),
    ([], {"STATPRUNE_ZEROSHOT_DATA": "/no/such/dir"}, "STATPRUNE_ZEROSHOT_DATA: expected a folder of zero-shot task files"),
    (["--limit", "0"], {}, "eval.zeroshot.limit: expected an integer >= 1, got 0"),
])
def test_bad_input_is_one_line_naming_the_flag_or_key(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                               env: dict[str, str], message: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = run("eval-zeroshot", str(tiny_model_dir), *args, "-q")
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"statprune: error: {message}"), res.stderr


@pytest.mark.parametrize("zeroshot, message", [
    ({"tasks": ["mmlu"]}, "eval.zeroshot.tasks: unknown task 'mmlu'"),
    ({"tasks": ["boolq"], "data_dir": "/no/such/dir"}, "eval.zeroshot.data_dir: expected a folder of zero-shot task files"),
])
def test_bad_config_keys_stop_prune_before_loading(tmp_path: Path, tiny_model_dir: Path, text_files: dict[str, Path],
                                                   zeroshot: dict, message: str) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out", eval={"zeroshot": zeroshot})
    res = run("prune", str(cfg), "-q")
    assert res.exit_code == 2 and res.stderr.startswith(f"statprune: error: {message}"), res.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_task_folder_stops_nothing_without_tasks(tmp_path: Path, tiny_model_dir: Path,
                                                          text_files: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       eval={"zeroshot": {"tasks": [], "data_dir": "/no/such/dir"}})
    res = run("prune", str(cfg), "-q")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "out" / "report.json").exists()


def test_without_lm_eval_the_error_says_what_to_install(tiny_model_dir: Path, task_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: find_spec gives None
    res = run("eval-zeroshot", str(tiny_model_dir), "--data-dir", str(task_dir), "-q")
    assert res.exit_code == 2
    assert res.stderr == ("statprune: error: eval.zeroshot: needs lm-evaluation-harness, which is not installed; "
                          "pip install 'statprune[eval]'\n")


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/zeroshot")
def test_the_shared_files_load_through_every_task_yaml() -> None:
    """The layouts of the real files map onto the stock prompts (two examples per task, on the random tiny model)."""
    result = evaluate_zeroshot(tiny_model("llama"), tiny_tokenizer(),
                               ZeroShotConfig(tasks=list(ZEROSHOT_TASKS), data_dir=str(SHARED), limit=2))
    assert [t.task for t in result.tasks] == list(ZEROSHOT_TASKS) and all(t.n == 2 for t in result.tasks)
    assert result.mean == pytest.approx(sum(t.acc for t in result.tasks) / 8)


def test_sweep_zeroshot_column_equals_prune(tmp_path: Path, tiny_model_dir: Path, task_dir: Path,
                                            text_files: dict[str, Path]) -> None:
    zeroshot = {"tasks": ["piqa", "arc_easy"], "data_dir": str(task_dir), "limit": 2}
    cfg = write_config(tmp_path / "run.yaml", tiny_model_dir, text_files, tmp_path / "out",
                       eval={"zeroshot": zeroshot})
    res = run("sweep", str(cfg), "--methods", "wanda,magnitude", "--sparsities", "0.5", "--zeroshot", "-o",
              str(tmp_path / "sw"), "-q", "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    cells = {c["method"]: c for c in result["cells"]}
    assert 0 <= result["dense_zeroshot_mean_acc"] <= 1 and 0 <= cells["magnitude"]["zeroshot_mean_acc"] <= 1
    pruned = run("prune", str(cfg), "-q", "--json")
    assert pruned.exit_code == 0, pruned.output
    assert cells["wanda"]["zeroshot_mean_acc"] == json.loads(pruned.stdout)["zeroshot"]["mean_acc"]
    assert ", acc " in (tmp_path / "sw" / "sweep.md").read_text()
    no_tasks = write_config(tmp_path / "none.yaml", tiny_model_dir, text_files, tmp_path / "out2")
    res = run("sweep", str(no_tasks), "--zeroshot", "-o", str(tmp_path / "sw2"), "-q")
    assert res.exit_code == 2 and "eval.zeroshot.tasks: --zeroshot needs the tasks" in res.stderr


def test_without_a_data_folder_the_stock_hub_tasks_are_asked_for(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub mode (no network here): lm-eval gets the stock task names with its default task index, the hub left as it is."""
    import datasets.config
    import lm_eval.tasks

    seen = {}

    class FakeTaskManager:
        def __init__(self, include_defaults: bool = True) -> None:
            seen["defaults"] = include_defaults

    def fake_simple_evaluate(**kw):
        seen.update(tasks=kw["tasks"], offline=datasets.config.HF_HUB_OFFLINE)
        return {"results": {t: {"acc,none": 0.5, "acc_stderr,none": 0.1} for t in kw["tasks"]},
                "n-samples": {t: {"effective": 4} for t in kw["tasks"]}}

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)
    model, tok = tiny_model("llama"), AutoTokenizer.from_pretrained(tiny_model_dir)
    out = evaluate_zeroshot(model, tok, ZeroShotConfig(tasks=["rte", "boolq"], limit=4))
    assert seen == {"defaults": True, "tasks": ["rte", "boolq"], "offline": False}
    assert out.source == "hub" and [t.task for t in out.tasks] == ["rte", "boolq"] and out.tasks[0].n == 4
