"""The Lab's "your images": an upload checked and prepared for the chosen backbone, said back before anything runs.

Gradio hands over the upload as files in its own cache (a ``.zip`` or several images); everything else happens in
``imse.data.uploads``, inside the visitor's session folder (``serving.upload_dir``), which goes when the session
ends or after ``IMSE_EXPORT_MAX_AGE``. The same upload for the same backbone is prepared once: checking it on
upload and pressing Start share the work.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from imse.app import serving
from imse.data.builders import UPLOAD
from imse.data.upload_files import UploadRefused
from imse.data.uploads import UNLABELLED, PreparedUpload, prepare_upload

__all__ = ["check_upload", "choose_images", "prepared_data", "upload_paths"]
PREVIEW = 8  # images shown "as the model will see them"
PREVIEW_SIDE = 112  # a 32-px image drawn at this side (nearest neighbour: its pixels, not a blur)


def upload_paths(upload: Any) -> list[str]:
    """The uploaded files' paths as Gradio gives them (a path, a list of paths, or file dicts from the API)."""
    if upload in (None, "", []):
        return []
    items = upload if isinstance(upload, (list, tuple)) else [upload]
    paths = []
    for item in items:
        path = item.get("path") if isinstance(item, dict) else getattr(item, "name", item)
        if not isinstance(path, str):
            raise gr.Error("the upload must be files (a .zip, or images)")
        paths.append(path)
    return paths


def _prepare(upload: Any, backbone: str, upload_labels: str, session: str, progress=None) -> PreparedUpload:
    """The upload prepared in the session's folder (or found there), or a readable ``gr.Error``."""
    from imse.data.models import model_view

    paths = upload_paths(upload)
    if not paths:
        raise gr.Error("choose your images first: a .zip, or image files")
    serving.prune_uploads(serving.limit("IMSE_EXPORT_MAX_AGE"))
    try:
        view = model_view(backbone)
        return prepare_upload(paths, view, serving.upload_dir(session), labelled=upload_labels != "none",
                              progress=_reading(progress))  # fmt: skip
    except (UploadRefused, ValueError) as error:
        raise gr.Error(str(error)) from None


def _reading(progress):
    if progress is None:
        return None
    return lambda done, total: progress((done, total), desc="Reading your images", unit="images")


def prepared_data(upload: Any, backbone: str, upload_labels: str, session: str, progress=None) -> str:
    """The ``data`` of a Lab run on the upload: ``upload:<its prepared folder>``."""
    return UPLOAD + str(_prepare(upload, backbone, upload_labels, session, progress).folder)


def _preview(upload: PreparedUpload) -> list[tuple[Image.Image, str]]:
    """A few images as the model will see them (its input size, padded or cropped as it is fed), spread over the
    domains, each captioned with its domain and label."""
    per_domain = max(1, PREVIEW // len(upload.domains))
    shown = []
    for domain in upload.domains:
        source = upload.source(domain)
        count = min(per_domain, len(source))
        images, labels = source.load(range(count))
        for image, label in zip(images, labels.tolist()):
            picture = Image.fromarray(image.permute(1, 2, 0).numpy())
            if picture.width < PREVIEW_SIDE:
                picture = picture.resize((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.NEAREST)
            name = "no label" if label == UNLABELLED else upload.view_labels[label]
            shown.append((picture, f"{domain} · {name}"))
    return shown[:PREVIEW]


def choose_images(images: str):
    """The Images choice: the upload's box (the file, how it streams, what it holds) shown for "upload"; "own"
    hides and empties it (a run streams an upload exactly when one is there, in the page as in the API)."""
    if images == "upload":
        return gr.update(visible=True), gr.skip()
    return gr.update(visible=False), None


def check_upload(
    upload: Any,
    backbone: Any,
    upload_labels: Any,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's way of asking for a progress bar)
):
    """Said back before anything runs: what the upload holds (or why it is refused) and a few of its images as the
    model will see them. A refusal is shown, not raised: the visitor reads it where the summary goes."""
    if not upload_paths(upload):
        return "Choose a .zip or image files.", []
    session = getattr(request, "session_hash", None) or "local"
    try:
        prepared = _prepare(upload, str(backbone or "builtin"), str(upload_labels or "folders"), session, progress)
    except gr.Error as error:
        return f"**Refused:** {error.message}", []
    labels = "" if prepared.labelled else " No labels: the Lab reports agreement with Source instead of accuracy."
    return f"**Found:** {prepared.summary()}.{labels}", _preview(prepared)
