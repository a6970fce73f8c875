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
