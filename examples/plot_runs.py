"""Plot the training and validation curves of several runs side by side.

Each run is a directory written by Lightning's ``CSVLogger`` (``runs/<name>/`` with ``version_<n>/`` folders: the
newest one with training metrics is used, and the script says which), a single ``version_<n>/`` folder, or a
``metrics.csv`` file::

    python examples/plot_runs.py runs/tiny runs/tiny_ddp -o curves.png

The left panel shows the training loss (smoothed with a moving average), the right one the validation loss; with
``--ppl`` perplexities are shown instead.
"""

import argparse
import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def find_metrics(run: Path, column: str = "train_loss") -> Path:
    """The ``metrics.csv`` of a run path (file, version folder, or logger folder with ``version_<n>`` children).

    Of a logger folder's versions, the newest that logged ``column`` (training metrics by default) is taken, so that
    a later ``validate``/``test`` run logged into a version of its own (for example with a checkpoint from outside the
    run folder) is not taken for the training run; if none logged it, the newest version is taken.
    :func:`choose_version` says which one and why.

    Args:
        run: The run path.
        column: The metric a version must have logged to be taken.

    Raises:
        FileNotFoundError: If there is no ``metrics.csv``.
    """
    return choose_version(run, column)[0]


def choose_version(run: Path, column: str = "train_loss") -> tuple[Path, Optional[str]]:
    """``(metrics.csv, note)`` of a run path, as :func:`find_metrics` picks it.

    ``note`` says which ``version_<n>`` of a logger folder was taken and why; it is ``None`` for a file or a version
    folder, which are taken as given.

    Args:
        run: The run path.
        column: The metric a version must have logged to be taken.

    Raises:
        FileNotFoundError: If there is no ``metrics.csv``.
    """
    if run.is_file():
        return run, None
    if (run / "metrics.csv").is_file():
        return run / "metrics.csv", None
    versions = sorted((p for p in run.glob("version_*") if (p / "metrics.csv").is_file()), key=_version_number)
    if not versions:
        raise FileNotFoundError(
            f"No metrics.csv in {str(run)!r}. Pass a CSVLogger run directory or a metrics.csv file."
        )
    newest = versions[-1]
    with_values = [p for p in versions if read_series(p / "metrics.csv", column)[1]]
    if not with_values:
        return newest / "metrics.csv", f"{run}: no version has `{column}` values; using the newest, {newest.name}"
    chosen = with_values[-1]
    note = f"{run}: using {chosen.name}, the newest version with `{column}` values"
    skipped = [p.name for p in versions[versions.index(chosen) + 1 :]]
    if skipped:
        note += f" (newer without them: {', '.join(skipped)})"
    return chosen / "metrics.csv", note


def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def read_series(path: Path, column: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the rows of a ``metrics.csv`` where ``column`` is filled in."""
    steps: list[int] = []
    values: list[float] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(column)
            if value in (None, "") or row.get("step") in (None, ""):
                continue
            steps.append(int(float(row["step"])))
            values.append(float(value))
    return steps, values


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    out: list[float] = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(
    runs: Sequence[Path],
    output: Path,
    labels: Optional[Sequence[str]] = None,
    perplexity: bool = False,
    smooth: int = 10,
    title: Optional[str] = None,
) -> Path:
    """Draw training (left) and validation (right) curves of ``runs`` into ``output``.

    Args:
        runs: Run directories or ``metrics.csv`` files.
        output: Image file to write (PNG, PDF, SVG, ...).
        labels: Legend entries, one per run; the run directory names by default.
        perplexity: Plot ``train_ppl``/``val_ppl`` instead of the losses.
        smooth: Moving-average window of the training curve (``1``: raw).
        title: Figure title.

    Returns:
        ``output``.

    Raises:
        ValueError: If a run logged neither a training nor a validation value.
    """
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"Got {len(labels)} labels for {len(runs)} runs; pass one label per run.")
    metric = "ppl" if perplexity else "loss"
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for i, run in enumerate(runs):
        path = find_metrics(Path(run), f"train_{metric}")
        label = labels[i] if labels is not None else _default_label(Path(run))
        train_steps, train_values = read_series(path, f"train_{metric}")
        val_steps, val_values = read_series(path, f"val_{metric}")
        if not train_values and not val_values:
            raise ValueError(f"{path} has no `train_{metric}` or `val_{metric}` values. Is it a GPT training run?")
        line = None
        if train_values:
            (line,) = ax_train.plot(train_steps, moving_average(train_values, max(1, smooth)), label=label)
        color = line.get_color() if line is not None else None
        if val_values:
            ax_val.plot(val_steps, val_values, marker="o", markersize=3, label=label, color=color)
    for ax, name in ((ax_train, "training"), (ax_val, "validation")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} {'perplexity' if perplexity else 'loss'}")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
        if perplexity and ax.lines:
            ax.set_yscale("log")
    ax_train.set_title(f"training{f' (moving average over {smooth})' if smooth > 1 else ''}")
    ax_val.set_title("validation")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def _default_label(run: Path) -> str:
    if run.is_file():
        run = run.parent
    if re.fullmatch(r"version_\d+", run.name):
        return f"{run.parent.name}/{run.name}"
    return run.name or str(run)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: plot the runs, say which version of a logger folder each run used, and its final ``val_loss``.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when ``None``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="Run directories or metrics.csv files.")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="Image to write.")
    parser.add_argument("--labels", nargs="+", default=None, help="Legend entries, one per run.")
    parser.add_argument("--ppl", action="store_true", help="Plot perplexity instead of loss.")
    parser.add_argument("--smooth", type=int, default=10, help="Moving-average window of the training curve.")
    parser.add_argument("--title", default=None, help="Figure title.")
    args = parser.parse_args(argv)
    column = f"train_{'ppl' if args.ppl else 'loss'}"
    chosen = [choose_version(Path(run), column) for run in args.runs]
    output = plot_runs(args.runs, args.output, args.labels, args.ppl, args.smooth, args.title)
    lines = [note for _, note in chosen if note]
    for run, (path, _) in zip(args.runs, chosen):
        steps, values = read_series(path, "val_loss")
        if values:
            lines.append(f"{run}: final val_loss {values[-1]:.4f} (ppl {math.exp(values[-1]):.2f}) at step {steps[-1]}")
    print("\n".join([*lines, f"wrote {output}"]))


if __name__ == "__main__":
    main()
