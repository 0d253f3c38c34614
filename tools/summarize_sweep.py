"""Mean ± std over seeds of a sweep's results.csv, grouped by key_change, as a Markdown table.

    python tools/summarize_sweep.py results/ba_vs_vq/results.csv
"""
import csv
import statistics
import sys

COLUMNS = [("psnr", "hard-code PSNR (dB)", 1, ".2f"), ("psnr_per_image", "per-image PSNR (dB)", 1, ".2f"),
           ("ssim", "SSIM", 1, ".3f"),
           ("soft_psnr", "soft PSNR (dB, diagnostic)", 1, ".2f"),
           ("usage_rate", "usage (%)", 100, ".1f"), ("perplexity", "perplexity", 1, ".1f"),
           ("dead_codes", "dead codes", 1, ".0f"), ("max_p", "mean max p", 1, ".3f"),
           ("mutual_info", "I (nats)", 1, ".2f")]


def fmt(values, scale, spec):
    values = [scale * v for v in values]
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def summarize(path: str) -> str:
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("psnr")]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["key_change"], []).append(r)
    lines = ["| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, rs in sorted(groups.items(), key=lambda kv: -statistics.mean(float(r["psnr"]) for r in kv[1])):
        cells = [fmt([float(r[k]) for r in rs if r.get(k) not in (None, "")], scale, spec)
                 for k, _, scale, spec in COLUMNS]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summarize(sys.argv[1]), end="")
