"""Mean ± std over seeds of a sweep's results.csv, grouped by key_change, as a Markdown table.

    python tools/summarize_sweep.py results/ba_vs_vq/results.csv
    python tools/summarize_sweep.py results/ba_vs_vq/results.csv --order file   # groups as they appear in the csv

Usage and perplexity are over the test split's latents, "train usage" and "train perplexity" over the training
split's (the final model; more latents than codes at large K). The dimension columns (99 % effective dimension and
participation ratio of the latents e, the decoder's inputs z_q and the code vectors; the water-filling dimension and
distortion at log2 K bits against the quantizer's distortion) are over the test split. s/step is read from each run's
metrics.jsonl (<folder of results.csv>/<experiment>); the last column, commit, lists the commits the group's runs
trained at (results.csv's commit and dirty columns; "—" for runs from before they were recorded; no column when no
run has one). A cell over fewer runs than its row's seeds says how many, e.g. "79.6 (1 seed)".

With --separation METRIC a second table says which rows differ in METRIC beyond their seed spread: ">" where every
seed of the row is above every seed of the column's row, "<" where every one is below, "≈" where their seeds overlap,
"?" where either row has fewer than two seeds with the metric (one seed shows, it does not conclude).

    python tools/summarize_sweep.py results/leaderboard/results.csv --separation psnr

--where COLUMN=VALUE keeps only the runs whose results.csv column has that value, e.g. one codebook size of a sweep
that has two (`--where codebook_size=512`).
"""
import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Optional

COLUMNS = [("psnr", "hard-code PSNR (dB)", 1, ".2f"), ("psnr_per_image", "per-image PSNR (dB)", 1, ".2f"),
           ("ssim", "SSIM", 1, ".3f"), ("lpips", "LPIPS", 1, ".4f"), ("rfid", "rFID", 1, ".1f"),
           ("soft_psnr", "soft PSNR (dB, diagnostic)", 1, ".2f"),
           ("usage_rate", "usage (%)", 100, ".1f"), ("perplexity", "perplexity", 1, ".1f"),
           ("dead_codes", "dead codes", 1, ".0f"), ("train_usage", "train usage (%)", 100, ".1f"),
           ("train_perplexity", "train perplexity", 1, ".1f"), ("max_p", "mean max p", 1, ".3f"),
           ("mutual_info", "I (nats)", 1, ".2f"),
           ("latent_dim99", "dim99 e", 1, ".1f"), ("latent_pr", "PR e", 1, ".2f"),
           ("zq_dim99", "dim99 z_q", 1, ".1f"), ("zq_pr", "PR z_q", 1, ".2f"),
           ("codebook_dim99", "dim99 codes", 1, ".1f"), ("codebook_pr", "PR codes", 1, ".2f"),
           ("wf_dim", "d_WF", 1, ".1f"), ("wf_distortion", "WF distortion", 1, ".4f"),
           ("quant_distortion", "quant. distortion", 1, ".4f")]
STEP_TIME_HEADER, STEP_TIME_SPEC = "s/step", ".3f"
COMMIT_HEADER = "commit"
ORDERS = ("psnr", "file")


def fmt(values, scale, spec, of: Optional[int] = None):
    """Mean ± std of values (one value alone; "—" for none). When `of` (the group's runs) exceeds the number of
    values, the cell says over how many seeds it is, e.g. "79.6 (1 seed)", so a metric that only some seeds have
    does not pass for the group's."""
    values = [scale * v for v in values]
    if not values:
        return "—"
    cell = format(values[0], spec) if len(values) == 1 else \
        f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"
    if of is not None and len(values) < of:
        cell += f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
    return cell


def epoch_records(metrics_path: Path) -> list[dict]:
    """The per-epoch records of a metrics.jsonl, in file order. Parsed here rather than with runs.read_jsonl so
    the tool does not import torch; like it, a line cut short by a killed run is skipped."""
    if not metrics_path.exists():
        return []
    records = []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        # train/* records carry "epoch" too; only the end-of-epoch record has epoch_time
        if isinstance(record, dict) and "epoch_time" in record:
            records.append(record)
    return records


def seconds_per_step(run_dir: Path) -> Optional[float]:
    """Median over epochs of epoch_time / steps in that epoch; None without epoch records. The median, not the
    mean, so that a few epochs slowed by a shared machine or a pause do not set the run's speed."""
    rates, previous_step = [], 0
    for record in epoch_records(run_dir / "metrics.jsonl"):
        steps = record["step"] - previous_step
        previous_step = record["step"]
        if steps > 0:  # guards the division; a resumed run's metrics.jsonl has no repeated steps
            rates.append(record["epoch_time"] / steps)
    return statistics.median(rates) if rates else None


def step_time_cell(rows: list[dict], sweep_dir: Path) -> str:
    times = [seconds_per_step(sweep_dir / r["experiment"]) for r in rows if r.get("experiment")]
    return fmt([t for t in times if t is not None], 1, STEP_TIME_SPEC)


def commit_cell(rows: list[dict]) -> str:
    """The distinct commits of the rows, short, '+dirty' where tracked files differed from the commit."""
    labels = []
    for r in rows:
        commit = r.get("commit") or ""
        if commit:
            label = (commit[:7] if commit != "unknown" else commit) + ("+dirty" if r.get("dirty") == "True" else "")
            labels.append(label)
    return ", ".join(dict.fromkeys(labels)) or "—"


def ordered_groups(rows: list[dict], order: str) -> list[tuple[str, list[dict]]]:
    """Rows grouped by key_change: best mean PSNR first, or (order="file") in order of first appearance."""
    groups: dict[str, list[dict]] = {}  # dicts keep insertion order, which is the file order
    for r in rows:
        groups.setdefault(r["key_change"], []).append(r)
    if order == "file":
        return list(groups.items())
    return sorted(groups.items(), key=lambda kv: -statistics.mean(float(r["psnr"]) for r in kv[1]))


def read_rows(path: str, where: Optional[dict] = None) -> list[dict]:
    """The finished runs (a psnr) of a results.csv, only those whose columns equal `where`'s values (as text, e.g.
    {"codebook_size": "512"}); an error naming the columns when a `where` key is not one of them."""
    with open(path) as fh:
        reader = csv.DictReader(fh)
        unknown = set(where or {}) - set(reader.fieldnames or [])
        if unknown:
            raise SystemExit(f"--where: no column {', '.join(sorted(unknown))} in {path}")
        return [r for r in reader if r.get("psnr") and all(r[k] == v for k, v in (where or {}).items())]


def summarize(path: str, order: str = "psnr", where: Optional[dict] = None) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    rows = read_rows(path, where)
    sweep_dir = Path(path).parent
    columns = [c for c in COLUMNS if any(r.get(c[0]) not in (None, "") for r in rows)]  # none: a column of dashes
    with_commit = any(r.get("commit") for r in rows)  # results.csv from before commits were recorded: no column
    headers = [c[1] for c in columns] + [STEP_TIME_HEADER] + [COMMIT_HEADER] * with_commit
    lines = ["| method | seeds | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    for name, rs in ordered_groups(rows, order):
        cells = [fmt([float(r[k]) for r in rs if r.get(k) not in (None, "")], scale, spec, of=len(rs))
                 for k, _, scale, spec in columns]
        cells += [step_time_cell(rs, sweep_dir)] + [commit_cell(rs)] * with_commit
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def separation(path: str, metric: str = "psnr", order: str = "psnr", where: Optional[dict] = None) -> str:
    """Which groups differ in `metric` on every seed pair, as a Markdown matrix in the table's row order. Cell
    (i, j) compares every seed of row i with every seed of row j: min_i > max_j is ">", max_i < min_j is "<",
    otherwise "≈"; "?" when either row has under two seeds with the metric; "·" on the diagonal."""
    rows = read_rows(path, where)
    if rows and metric not in rows[0]:
        raise SystemExit(f"--separation: no column {metric} in {path}")
    groups = ordered_groups(rows, order)
    values = [[float(r[metric]) for r in rs if r.get(metric) not in (None, "")] for _, rs in groups]

    def sign(a: list[float], b: list[float]) -> str:
        if len(a) < 2 or len(b) < 2:
            return "?"
        return ">" if min(a) > max(b) else "<" if max(a) < min(b) else "≈"

    n = len(groups)
    lines = [f"| {metric} | method | " + " | ".join(str(j + 1) for j in range(n)) + " |", "|---" * (n + 2) + "|"]
    for i, (name, _) in enumerate(groups):
        cells = ["·" if i == j else sign(values[i], values[j]) for j in range(n)]
        lines.append(f"| {i + 1} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a sweep's results.csv")
    parser.add_argument("--order", choices=ORDERS, default="psnr",
                        help="group order: best mean PSNR first (default) or first appearance in the csv")
    parser.add_argument("--separation", metavar="METRIC",
                        help="also print which rows differ in METRIC (a results.csv column, e.g. psnr, lpips) on "
                             "every seed pair")
    parser.add_argument("--where", metavar="COLUMN=VALUE", action="append", default=[],
                        help="only the runs whose results.csv COLUMN is VALUE, e.g. codebook_size=512 (repeatable)")
    args = parser.parse_args(argv)
    if any("=" not in w for w in args.where):
        parser.error("--where takes COLUMN=VALUE")
    where = dict(w.split("=", 1) for w in args.where)
    print(summarize(args.path, args.order, where), end="")
    if args.separation:
        print("\n" + separation(args.path, args.separation, args.order, where), end="")


if __name__ == "__main__":
    main()
