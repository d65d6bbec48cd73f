"""Another version of the shipped model, made in a second: for tests and walkthroughs.

:func:`make_variant` copies the shipped model folder, moves the network's
position output by a fixed offset (an ``Add`` of a constant after the
``position_m`` tensor, so every answer moves by about that much before the
physical likelihood refines it), updates the card so it stays consistent
(ONNX digest, recorded answer to the known input), and can register the
result under an alias. No torch, no training: only the ``onnx`` package.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from heimdall.config import Settings
from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME, ModelCard, ModelIdentity, sha256_file
from heimdall.registry import register_model, shipped_model_dir

POSITION_OUTPUT = "position_m"


def make_variant(
    out_dir: Path,
    *,
    shift_m: tuple[float, float] = (20_000.0, -10_000.0),
    source_dir: Path | None = None,
    fail_at_run: bool = False,
) -> Path:
    """Write a model folder (model.onnx + card) whose network answers ``shift_m`` away.

    ``shift_m`` is (east, north) in metres, added to the network's position
    output. With ``fail_at_run`` the model loads but raises on every run (its
    position goes through an out-of-range ``Gather``); its card keeps the
    answer recorded before it was broken, so it registers, and only a smoke
    check (a reload) finds it out. Returns ``out_dir``.
    """
    import onnx
    from onnx import helper, numpy_helper

    source_dir = source_dir or shipped_model_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILENAME, CARD_FILENAME):
        shutil.copyfile(source_dir / name, out_dir / name)
    onnx_path = out_dir / MODEL_FILENAME
    model = onnx.load(str(onnx_path))
    graph = model.graph
    raw = f"{POSITION_OUTPUT}_unshifted"
    for node in graph.node:
        node.output[:] = [raw if o == POSITION_OUTPUT else o for o in node.output]
    shift = np.asarray([shift_m], dtype=np.float32)
    graph.initializer.append(numpy_helper.from_array(shift, name="variant_shift_m"))
    graph.node.append(helper.make_node("Add", [raw, "variant_shift_m"], [POSITION_OUTPUT]))
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))

    from heimdall.smoke import reference_answer

    card = ModelCard.load(out_dir / CARD_FILENAME)
    card = replace(card, onnx_sha256=sha256_file(onnx_path), reference={})
    card = replace(card, reference=reference_answer(onnx_path, card))
    if fail_at_run:
        _break_at_run(onnx_path)
        card = replace(card, onnx_sha256=sha256_file(onnx_path))
    (out_dir / CARD_FILENAME).write_text(card.dumps())
    return out_dir


def _break_at_run(onnx_path: Path) -> None:
    """Route the position output through a Gather of a column that does not exist."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    before = f"{POSITION_OUTPUT}_before_gather"
    for node in graph.node:
        node.output[:] = [before if o == POSITION_OUTPUT else o for o in node.output]
    graph.initializer.append(
        numpy_helper.from_array(np.asarray([0, 7], dtype=np.int64), name="variant_bad_columns")
    )
    graph.node.append(
        helper.make_node("Gather", [before, "variant_bad_columns"], [POSITION_OUTPUT], axis=1)
    )
    onnx.save(model, str(onnx_path))


def register_variant(
    settings: Settings,
    out_dir: Path,
    alias: str,
    *,
    shift_m: tuple[float, float] = (20_000.0, -10_000.0),
    fail_at_run: bool = False,
) -> ModelIdentity:
    """:func:`make_variant` into ``out_dir``, register it, point ``alias`` at it."""
    make_variant(out_dir, shift_m=shift_m, fail_at_run=fail_at_run)
    identity, _ = register_model(settings, out_dir, alias=alias)
    return identity
