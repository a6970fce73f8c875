"""``statprune export``: a pruned folder rewritten as a dense Hugging Face folder or as a compressed bitmask one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from statprune_cli.bitmask import export_bitmask, export_dense
from statprune_cli.errors import InputError
from statprune_cli.lock import one_writer, recover_if_idle
from statprune_cli.ui import UI


def run_export(pruned_dir: Path, format: str, output: Path | None, overwrite: bool, ui: UI) -> dict[str, Any]:
    """Write ``pruned_dir`` in ``format`` (default output: PRUNED_DIR-FORMAT beside it); returns both sizes."""
    if format not in ("dense", "bitmask"):
        raise InputError(f"--format: expected dense or bitmask, got {format!r}")
    recover_if_idle(pruned_dir, ui.log)  # an interrupted --overwrite swap is finished first
    if not pruned_dir.is_dir():
        raise InputError(f"PRUNED_DIR: {pruned_dir} is not a folder")
    output = output or pruned_dir.resolve().with_name(f"{pruned_dir.resolve().name}-{format}")
    with one_writer(output, ui.log):  # a second export to the same folder stops at once
        sizes = (export_dense if format == "dense" else export_bitmask)(pruned_dir, output, overwrite=overwrite)
    return {"format": format, "output": str(output), **sizes}
