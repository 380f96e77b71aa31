"""What a finished Lab run gives its visitor: the results table and the download (records, code, bank).

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
from imse.runs.lab import LabState, method_name, primary_label

__all__ = ["export_run", "summary_rows"]


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
        zf.writestr("records.json", json.dumps({"config": state.config, "summary": state.summary, "records": records}))
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
    """The results table: one row per method, per-domain accuracy (%), the mean, the gain over Source (points),
    the collapse readouts (mean expert-alignment std in the last blocks, share of the most-predicted class) and
    the values each method adapts, with their ratio to IMSE's when IMSE ran (ViDA trains every ViT weight)."""
    if not state.summary:
        return ["method"], []
    first = next(iter(state.summary.values()))
    headers = ["method"] + [f"{d['name']}-{d['severity']}" for d in first["domains"]] + ["mean"]
    source = next((label for label in state.summary if method_name(label) == "source"), None)
    imse = next((label for label in state.summary if method_name(label) == "imse"), None)
    headers += (["vs Source (pts)"] if source else []) + ["expert std", "top-class share (%)", "trainable values"]
    headers += ["× IMSE's"] if imse else []
    rows = []
    for label, entry in state.summary.items():
        row = [label] + [round(100 * d["accuracy"], 1) for d in entry["domains"]]
        row.append(round(100 * entry["mean_accuracy"], 2))
        if source:
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
