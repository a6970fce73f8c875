import io

from rich.console import Console
from typer.testing import CliRunner

from statprune_cli.cli import app
from statprune_cli.report import print_report
from statprune_cli.ui import UI


def test_plain_mode_logs_only_the_outer_task(capsys) -> None:
    ui = UI(interactive=False)
    with ui.progress("layers", 20) as outer:
        for _ in range(20):
            with ui.progress("batches", 50) as inner:
                for _ in range(50):
                    inner()
            outer()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and all("layers:" in line for line in lines)
    assert lines[-1].endswith("layers: 20/20")


def test_nested_bars_share_one_display_on_a_terminal(capsys) -> None:
    ui = UI(interactive=True)
    with ui.progress("layers", 2) as outer:
        for _ in range(2):
            with ui.progress("batches", 3) as inner:  # a second live display would raise here
                for _ in range(3):
                    inner()
            outer()
    assert ui._bar is None


def test_quiet_prints_nothing(capsys) -> None:
    ui = UI(quiet=True, interactive=False)
    ui.log("hello")
    with ui.progress("x", 3) as advance:
        advance()
    assert capsys.readouterr().err == ""


BRACKETS = "wrote [/tmp/run] with statprune[eval] and [bold]"  # a closing tag, a tag, a style name: all text here


def test_log_lines_on_a_terminal_print_brackets_as_text(capsys) -> None:
    """Rich markup would drop "[eval]" and raise on "[/tmp/run]" (a closing tag without an opening one)."""
    UI(interactive=True).log(BRACKETS)
    assert BRACKETS in capsys.readouterr().err


def test_terminal_report_prints_notes_and_paths_as_text() -> None:
    console = Console(file=io.StringIO(), width=400)
    print_report({"method": "wanda", "pattern_label": "50% unstructured (per row)", "layers": [],
                  "sparsity": {"pruned_linears": {"sparsity": 0.5, "parameters": 8},
                               "all_parameters": {"sparsity": 0.4, "parameters": 10}},
                  "mode": BRACKETS, "calibration": {"description": BRACKETS}, "timings": {"prune": 1.0},
                  "memory": {"peak_rss_mib": 1.0, "cuda_max_allocated_mib": None},
                  "perplexity": [{"dataset": "text:[/data]", "perplexity": 12.0, "seqlen": 8, "windows": 1, "tokens": 8,
                                  "max_tokens": None, "dtype": "float32", "bos": False}],
                  "notes": [BRACKETS], "output_dir": "out/[/run]"}, console)
    text = console.file.getvalue()
    assert text.count(BRACKETS) == 3 and "text:[/data] perplexity" in text and "output: out/[/run]" in text


def test_help_shows_the_extras_in_brackets() -> None:
    assert "statprune[eval]" in CliRunner().invoke(app, ["eval-zeroshot", "--help"], terminal_width=200).output
    assert "statprune[eval]" in CliRunner().invoke(app, ["sweep", "--help"], terminal_width=200).output


def test_every_command_speaks_only_on_rank_0_and_not_when_quiet(monkeypatch) -> None:
    """Output.ui() is what each command logs through: rank 0 of a torchrun job speaks unless --quiet; others never do."""
    import statprune_cli.ui
    from statprune_cli.cli import Output

    monkeypatch.setattr(statprune_cli.ui, "silence_libraries", lambda: None)  # a quiet UI silences them process-wide
    monkeypatch.delenv("RANK", raising=False)
    assert not Output().ui().quiet and Output(quiet=True).ui().quiet
    monkeypatch.setenv("RANK", "1")
    assert Output().ui().quiet
    monkeypatch.setenv("RANK", "0")
    assert not Output().ui().quiet
