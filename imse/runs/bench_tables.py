"""``python -m imse bench``'s markdown: the per-domain table and the per-method summary.

A run on images with labels reports accuracy; a run on one's own images without labels reports what can be known
without them — each method's agreement with Source (the unadapted model), its confidence and entropy, its
most-predicted-class share — and says that there were no labels.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["format_summary", "format_table", "gains_over_source", "headline"]

NO_LABELS = "no labels: agreement with Source (%), the unadapted model, in place of accuracy"


def headline(result: dict[str, Any]) -> str:
    """The readout a table reports per domain: ``accuracy``, or without labels ``agreement`` with Source."""
    first = next(iter(result["methods"].values()))
    return "accuracy" if first.get("mean_accuracy") is not None else "agreement"


def _setting_line(result: dict[str, Any], extra: str = "") -> str:
    cfg = result["config"]
    severity = "severities 1-5-1" if cfg["scenario"] == "gradual" else f"severity {cfg['severity']}"
    line = (
        f"\n{cfg['scenario']}, {severity}, {cfg['per_domain']} images per domain, batch {cfg['batch_size']}, seeds "
        f"{cfg['seeds']}, backbone {cfg['backbone']}, data {cfg['data']}{extra}"
    )
    if "upload" in cfg:
        line += f"\nyour images: {cfg['upload']['found']}; streamed {cfg['upload_streams']}"
    if headline(result) == "agreement":
        line += f"\n{NO_LABELS}"
    return line


def format_table(result: dict[str, Any], max_columns: int = 16) -> str:
    """Markdown: rows = methods, columns = domains (accuracy %, or agreement with Source % without labels; mean
    over seeds) + mean ± std over seeds. Long streams (gradual: 135 domains) are summarised per corruption so the
    table stays readable."""
    if result["config"]["scenario"] == "recurring":
        return _format_rounds(result)
    key = headline(result)
    domains = next(iter(result["methods"].values()))["domains"]
    grouped = len(domains) > max_columns
    headers = list(dict.fromkeys(d["name"] for d in domains)) if grouped else [_domain(d) for d in domains]
    lines = [
        "| method | " + " | ".join(headers) + " | mean |",
        "|---|" + "---|" * len(headers) + "---|",
    ]
    for name, entry in result["methods"].items():
        if grouped:
            cells = [
                f"{100 * statistics.fmean(d[key] for d in entry['domains'] if d['name'] == corruption):.1f}"
                for corruption in headers
            ]
        else:
            cells = [f"{100 * d[key]:.1f}" for d in entry["domains"]]
        std = entry[f"mean_{key}_std"]
        several = len(result["per_seed"]) > 1
        mean = f"{100 * entry[f'mean_{key}']:.1f}" + (f" ± {100 * std:.1f}" if several else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    lines.append(_setting_line(result, " (columns: mean over each corruption's severities)" if grouped else ""))
    return "\n".join(lines)


def _domain(domain: dict[str, Any]) -> str:
    """A column's name: a corruption with its severity, or one's own domain by its name (severity 0)."""
    return f"{domain['name']}-{domain['severity']}" if domain["severity"] else domain["name"]


def _source_key(result: dict[str, Any]) -> str | None:
    return next((key for key in result["methods"] if key.lower() == "source"), None)


def gains_over_source(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per method, its mean accuracy minus Source's in each seed, in points (paired: same batches); none without
    labels."""
    source = _source_key(result)
    if source is None or headline(result) != "accuracy":
        return {}
    seeds = result["per_seed"]
    return {
        name: [100 * (s["methods"][name]["mean_accuracy"] - s["methods"][source]["mean_accuracy"]) for s in seeds]
        for name in result["methods"]
        if name != source
    }


def _pm(entry: dict[str, Any], key: str, several: bool, scale: float = 100.0, digits: int = 1) -> str:
    if entry.get(key) is None:
        return "–"
    mean, std = entry[key], entry.get(f"{key}_std") or 0.0
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if several else "")


def format_summary(result: dict[str, Any]) -> str:
    """Markdown, one row per method: mean accuracy and the gain over Source (points, mean ± std of the per-seed
    paired differences) — without labels, agreement with Source, mean confidence and entropy instead — then the
    collapse readouts (mean expert-alignment std of the last blocks, share of the most-predicted class), each ± std
    over seeds, and the values the method adapts."""
    several = len(result["per_seed"]) > 1
    labelled = headline(result) == "accuracy"
    unlabelled = "| agreement with Source (%) | confidence (%) | entropy "
    first = "| accuracy (%) | vs Source (points) " if labelled else unlabelled
    lines = [
        f"| method {first}| expert-alignment std | most-predicted class (%) | trainable |",
        "|---|---|---|---|---|---|" + ("" if labelled else "---|"),
    ]
    gains = gains_over_source(result)
    for name, entry in result["methods"].items():
        if labelled:
            gain = "–"
            if name in gains:
                values = gains[name]
                spread = statistics.stdev(values) if several else 0.0
                gain = _pm({"g": statistics.fmean(values), "g_std": spread}, "g", several, 1.0)
                gain = gain if gain.startswith("-") else "+" + gain
            cells = [_pm(entry, "mean_accuracy", several), gain]
        else:
            cells = [_pm(entry, "mean_agreement", several), _pm(entry, "mean_confidence", several),
                     _pm(entry, "mean_entropy", several, 1.0, 3)]  # fmt: skip
        cells += [_pm(entry, "mean_expert_std", several, 1.0, 4), _pm(entry, "mean_top_class_share", several)]
        cells.append(f"{entry['num_trainable']:,}" if "num_trainable" in entry else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if not labelled:
        lines.append(f"\n{NO_LABELS}; entropy in nats")
    lines += [_bank_line(result, name, entry["bank"]) for name, entry in result["methods"].items() if "bank" in entry]
    return "\n".join(lines)


def _bank_line(result: dict[str, Any], name: str, b: dict[str, int]) -> str:
    return (
        f"\n{name}, over {len(result['per_seed'])} seed(s): {b['detections']} detections found "
        f"{b['boundaries_detected']} of {b['boundaries']} domain boundaries; of the retrievals where a code of "
        f"the incoming corruption was stored ({b['retrievals_with_own_code_stored']}), "
        f"{b['retrieved_same_corruption']} brought that code back; the others retrieved another "
        f"corruption's code {b['retrieved_other_corruption']} times, the source's {b['retrieved_source']}."
    )


def _format_rounds(result: dict[str, Any]) -> str:
    """Recurring streams: one column per round (mean accuracy, or agreement without labels, over that round's
    domains, mean ± std over seeds)."""
    cfg, key = result["config"], headline(result)
    rounds = cfg["rounds"]
    per_round = len(next(iter(result["methods"].values()))["domains"]) // rounds
    lines = [
        "| method | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " | mean |",
        "|---|" + "---|" * (rounds + 1),
    ]
    several = len(result["per_seed"]) > 1
    for name in result["methods"]:
        cells = []
        for r in range(rounds):
            values = [
                statistics.fmean(d[key] for d in seed["methods"][name]["domains"][r * per_round : (r + 1) * per_round])
                for seed in result["per_seed"]
            ]
            std = f" ± {100 * statistics.stdev(values):.1f}" if several else ""
            cells.append(f"{100 * statistics.fmean(values):.1f}{std}")
        entry = result["methods"][name]
        std = f" ± {100 * entry[f'mean_{key}_std']:.1f}" if several else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * entry[f'mean_{key}']:.1f}{std} |")
    lines.append(
        f"\nrecurring, {rounds} rounds x {per_round} domains, severity {cfg['severity']}, {cfg['per_domain']} "
        f"images per domain, batch {cfg['batch_size']}, seeds {cfg['seeds']}, backbone {cfg['backbone']}, "
        f"data {cfg['data']}" + ("" if key == "accuracy" else f"\n{NO_LABELS}")
    )
    return "\n".join(lines)
