"""What a finished Lab run gives its visitor: the results table, the download (records, code, bank) and one
sentence saying what happened.

Kept apart from the run loop (``imse.runs.lab``): these read a finished ``LabState`` and write nothing back.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from imse.core.codes import save_code
from imse.core.spectral import spectral_layers
from imse.data.builders import UPLOAD
from imse.runs.lab import LabState, method_name, primary_label

__all__ = ["NO_LABELS", "export_run", "summary_rows", "verdict"]

NO_LABELS = (
    "none: the images had no labels, so no accuracy is known; each method's agreement with Source (the unadapted "
    "model), its mean confidence and entropy, and its most-predicted-class share stand in for it"
)


def export_run(state: LabState, directory: str | Path) -> Path:
    """A zip with the run's records (JSON), the primary method's final spectral code and, when it kept one,
    its domain bank (safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not state.finished:
        raise ValueError("the run has not finished")
    records = []
    for record in state.records:
        clean = {k: v for k, v in record.items() if k != "methods"}
        clean["methods"] = {
            label: {
                "correct": r["correct"],
                "confidence": r["confidence"],
                "entropy": r["entropy"],
                "seconds": r["seconds"],
                "step": r["step"],
            }
            for label, r in record["methods"].items()
        }
        records.append(clean)
    methods = state.final_methods
    primary = primary_label(methods)
    # a directory of its own per export: runs of several users finishing in the same second never collide
    archive = Path(tempfile.mkdtemp(prefix="run-", dir=directory)) / "imse-lab-run.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        config = dict(state.config)
        if str(config.get("data", "")).startswith(UPLOAD):  # the server's folder is nobody's business
            config["data"] = "your upload"
        run = {"config": config, "summary": state.summary, "records": records}
        if not state.labelled:
            run["labels"] = NO_LABELS
        zf.writestr("records.json", json.dumps(run))
        # through the library's own writers, so that load_code / load_bank take them back
        if spectral_layers(methods[primary].model):
            buffer = save_code(
                archive.parent / "spectral_code.safetensors", methods[primary].model, {"method": primary}
            )
            zf.write(buffer, "spectral_code.safetensors")
            buffer.unlink()
        bank = getattr(methods[primary], "bank", None)
        if bank is not None and len(bank):
            buffer = archive.parent / "domain_bank.safetensors"
            methods[primary].save_bank(buffer)
            zf.write(buffer, "domain_bank.safetensors")
            buffer.unlink()
    return archive


def summary_rows(state: LabState) -> tuple[list[str], list[list[Any]]]:
    """The results table: one row per method, per-domain accuracy (%), the mean, the gain over Source (points) —
    without labels, agreement with Source (%) per domain and its mean, mean confidence and entropy instead —, the
    collapse readouts (mean expert-alignment std in the last blocks, share of the most-predicted class) and the
    values each method adapts, with their ratio to IMSE's when IMSE ran (ViDA trains every ViT weight)."""
    if not state.summary:
        return ["method"], []
    first = next(iter(state.summary.values()))
    key = "accuracy" if state.labelled else "agreement"
    headers = ["method"] + [_column(d) for d in first["domains"]]
    headers += ["mean"] if state.labelled else ["mean agreement with Source", "confidence (%)", "entropy (nats)"]
    source = next((label for label in state.summary if method_name(label) == "source"), None)
    imse = next((label for label in state.summary if method_name(label) == "imse"), None)
    gain = source and state.labelled
    headers += (["vs Source (pts)"] if gain else []) + ["expert std", "top-class share (%)", "trainable values"]
    headers += ["× IMSE's"] if imse else []
    rows = []
    for label, entry in state.summary.items():
        row = [label] + [round(100 * d[key], 1) for d in entry["domains"]]
        row.append(round(100 * entry[f"mean_{key}"], 2))
        if not state.labelled:
            row += [round(100 * entry["mean_confidence"], 1), round(entry["mean_entropy"], 3)]
        if gain:
            row.append(round(100 * (entry["mean_accuracy"] - state.summary[source]["mean_accuracy"]), 2))
        std = entry.get("mean_expert_std")
        row += [None if std is None else round(std, 4), round(100 * entry["mean_top_class_share"], 1)]
        trainable = entry.get("num_trainable")
        row.append(trainable)
        if imse:
            reference = state.summary[imse].get("num_trainable")
            row.append(round(trainable / reference, 1) if trainable is not None and reference else None)
        rows.append(row)
    return headers, rows


def _column(domain: dict[str, Any]) -> str:
    """A domain's column: a corruption with its severity, or one's own domain by its name (severity 0)."""
    return f"{domain['name']}-{domain['severity']}" if domain["severity"] else domain["name"]


def _versus(gain: float, other: str) -> str:
    """'3.1 points above Source', '1.2 points below TENT', 'level with Source' (gain in points, one decimal)."""
    if round(gain, 1) == 0:
        return f"level with {other}"
    return f"{abs(gain):.1f} points {'above' if gain > 0 else 'below'} {other}"


def _join(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _comparison(state: LabState) -> str:
    """The best method against Source (or, without Source, against the best of the rest), by the results
    table's means rounded to one decimal; methods level at the top are named together."""
    means = {label: round(100 * entry["mean_accuracy"], 1) for label, entry in state.summary.items()}
    if len(means) == 1:
        ((label, mean),) = means.items()
        return f"{label} reached {mean:.1f} %"
    source = next((label for label in means if method_name(label) == "source"), None)
    rivals = [label for label in means if label != source]
    top = max(means[label] for label in rivals)
    tied = [label for label in rivals if means[label] == top]  # in the table's order
    if source is None:
        rest = [label for label in rivals if means[label] < top]
        if not rest:
            return f"{_join(tied)} tied at {top:.1f} %"
        against, kind = max(rest, key=means.__getitem__), "methods"
    else:
        against, kind = source, "adapting methods"
    if len(rivals) == 1:
        lead = f"{tied[0]} ended"
    else:
        lead = f"{_join(tied)} {'tied for' if len(tied) > 1 else 'did'} best of {len(rivals)} {kind},"
    scores = f"{top:.1f} % each" if top == means[against] else f"{top:.1f} % vs {means[against]:.1f} %"
    return f"{lead} {_versus(top - means[against], against)} ({scores})"


def _agreements(state: LabState) -> str:
    """Without labels: that there were none, and each adapting method's agreement with Source and confidence
    (the results table's numbers, rounded to one decimal)."""
    source = state.reference
    others = [label for label in state.summary if label != source]
    entry = state.summary[source]
    parts = [
        f"{label} agreed with Source on {100 * state.summary[label]['mean_agreement']:.1f} % of its answers "
        f"(confidence {100 * state.summary[label]['mean_confidence']:.1f} %)"
        for label in others
    ]
    said = "; ".join(parts) if parts else "only Source ran"
    return (
        f"Your images have no labels, so no accuracy is known: {said}; Source's confidence "
        f"{100 * entry['mean_confidence']:.1f} %"
    )


def _bank(state: LabState) -> str:
    """What the bank did, from the first retrieving method's records (``runner.bank_summary``), or nothing."""
    banks = [(label, entry["bank"]) for label, entry in state.summary.items() if entry.get("bank")]
    if not banks:
        return ""
    label, bank = banks[0]
    owner = "the bank" if len(banks) == 1 else f"{label}'s bank"
    stored = bank["detections"]  # every detected shift stores the domain that ended
    text = f"{owner} stored {stored} domain{'' if stored == 1 else 's'}"
    if bank["boundaries"]:
        changes = bank["boundaries"]
        text += f" (it caught {bank['boundaries_detected']} of {changes} change{'' if changes == 1 else 's'})"
    if bank["retrievals_with_own_code_stored"]:
        could = bank["retrievals_with_own_code_stored"]
        text += f" and brought back the same corruption's code {bank['retrieved_same_corruption']} of {could} times"
    return "; " + text


def verdict(state: LabState) -> str:
    """One plain sentence on a finished run for its visitor: the best method against Source (or the runner-up
    without Source), in points and per cent, over how many images; what the bank did; and, when the time limit
    cut the run short, where. Accuracies are the results table's means, rounded to one decimal, and the gain is
    their difference, so that the sentence adds up as read."""
    if not state.finished or not state.summary:
        raise ValueError("the run has not finished")
    text = _comparison(state) if state.labelled else _agreements(state)
    if state.batch < state.total_batches:
        text = (
            f"Cut short by the time limit after {state.batch} of {state.total_batches} batches "
            f"({state.images:,} images): {text}"
        )
    else:
        text += f" over {state.images:,} images"
    return text + _bank(state) + "."
