"""Export the deployable (dense, masked) model to ONNX or a ``torch.export`` program.

An ACT / SACT model in its dense masked form (:class:`~sact.stage.AdaptiveStage`:
``x + mask * F(x)``, masks from ``torch.where`` / comparisons / sums in
:func:`sact.act.halting_step`) is made only of convolutions and elementwise ops with no
Python branch on tensor values, so it traces into a static graph. The exported graph
computes every unit at every position and masks the result: the output equals the eager
model, but the FLOPs saving of SACT exists only on paper in exported form. The sparse
engine (gather / scatter over data-dependent index sets, in-place row updates) is eager
PyTorch and is not exportable; see ``docs/export.md``.

The exported function is :class:`ExportableModel`:
``images [B, C, H, W] float32 -> (logits [B, K], ponder_cost [B], ponder_map [B, H, W])``
where ``ponder_map`` is :func:`sact.viz.summed_map` of the stages' ponder maps (each
nearest-resized to ``H, W`` and summed). The batch dimension is dynamic; ``H, W`` are
fixed to the example input's.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..io.files import atomic_write_bytes
from ..data.images import DEFAULT_MAX_PIXELS
from ..viz import summed_map

__all__ = [
    "FORMATS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_IMAGE_SIZE",
    "max_opset",
    "check_opset",
    "ExportableModel",
    "export_model",
    "export_checkpoint",
    "ExportedFile",
    "SUFFIX_FORMATS",
    "export_program",
    "export_metadata",
    "load_exported",
    "default_image_size",
    "metadata_path",
]

FORMATS = ("onnx", "torch-export")
INPUT_NAMES = ("images",)
OUTPUT_NAMES = ("logits", "ponder_cost", "ponder_map")
DEFAULT_OPSET = 18  # supported by every onnxruntime >= 1.14; the exporter's own default may move
#: Lowest ONNX opset written: the dynamo exporter translates to opset 18 and converts upwards only.
MIN_OPSET = 18
#: Largest input side of an export: ``MAX_IMAGE_SIZE ** 2`` is at most the pixel cap images are read with.
MAX_IMAGE_SIZE = math.isqrt(DEFAULT_MAX_PIXELS)  # 6324
EXPORT_FORMAT = "sact-export"
EXPORT_VERSION = 1
_TRACE_BATCH = 2  # torch.export specialises a dimension of size 1, so trace with 2


class ExportableModel(nn.Module):
    """Wraps an sact model so that it returns a plain tuple of tensors.

    Args:
        model: a model built by :func:`sact.create_model` (any mode).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the dense masked model.

        Args:
            images: ``[B, C, H, W]`` preprocessed images.

        Returns:
            ``(logits [B, K], ponder_cost [B], ponder_map [B, H, W])``; ``ponder_map`` is
            the sum over stages of the per-position ponder cost, nearest-upsampled to
            ``H, W`` (:func:`sact.viz.summed_map`).
        """
        out = self.model(images)
        size = (images.shape[-2], images.shape[-1])
        return out.logits, out.ponder_cost, summed_map(out.stages, size)


def max_opset() -> int:
    """Highest ONNX opset the installed ``onnx`` package defines."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    """``opset`` if it is an int in ``[MIN_OPSET, max_opset()]``.

    Raises:
        ValueError: any other value (the exporter would write another opset than asked).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"ONNX opset must be an int from {MIN_OPSET} to {max_opset()} (the range this exporter "
                         f"writes with the installed onnx), got {opset!r}")
    return opset


def _check_image_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int from 1 to {MAX_IMAGE_SIZE} (a {MAX_IMAGE_SIZE}^2 image is at "
                         f"the pixel cap), got {size!r}")
    return size


def default_image_size(model: nn.Module) -> int:
    """Input side for an export when none is given.

    The side the checkpoint was trained at (:func:`sact.checkpoint.trained_input_size`:
    ``meta["input_size"]``, written by ``sact train`` and the demo, or what older
    checkpoints say), else 32 for the CIFAR models and 224 for the ImageNet ones.
    """
    from ..io.checkpoint import trained_input_size

    size = trained_input_size(getattr(model, "checkpoint_meta", None))
    if size is not None:
        return max(size[1:])
    from ..models import CifarResNet

    return 32 if isinstance(model, CifarResNet) else 224


def _example(model: nn.Module, example_input: Tensor | None, image_size: int | None) -> Tensor:
    param = next(model.parameters())
    if example_input is None:
        size = _check_image_size(default_image_size(model) if image_size is None else image_size)  # before allocating
        return torch.randn(_TRACE_BATCH, model.in_chans, size, size, dtype=param.dtype, device=param.device)
    if not isinstance(example_input, Tensor) or example_input.dim() != 4:
        shape = tuple(example_input.shape) if isinstance(example_input, Tensor) else type(example_input).__name__
        raise ValueError(f"example_input must be a [B, C, H, W] tensor, got {shape}")
    if image_size is not None and tuple(example_input.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"image_size={image_size} contradicts example_input of shape {tuple(example_input.shape)}")
    x = example_input.detach()[:1].to(device=param.device)
    return x.expand(_TRACE_BATCH, *x.shape[1:]).contiguous()


def export_metadata(model: nn.Module, example: Tensor, fmt: str, *, opset: int | None = None) -> dict[str, Any]:
    """The JSON document stored with an export (ONNX ``metadata_props`` / ``.pt2.json``).

    Args:
        model: the exported model (``sact_config`` and optional ``checkpoint_meta``).
        example: ``[B, C, H, W]`` example input (its ``C, H, W`` are fixed in the export).
        fmt: ``"onnx"`` or ``"torch-export"``.
        opset: ONNX opset, for ``fmt="onnx"``.

    Returns:
        ``{"format", "version", "export_format", "model", "mode", "input_size" [C, H, W],
        "inputs", "outputs", "preprocess", "classes", "tau", "torch_version", "sact_version"}``
        (``preprocess`` / ``classes`` / ``tau`` are ``None`` unless the checkpoint has them).
    """
    from .._version import __version__

    meta = getattr(model, "checkpoint_meta", None) or {}
    _, c, h, w = example.shape
    doc = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "export_format": fmt,
        "model": getattr(model, "sact_config", None),
        "mode": getattr(model, "mode", None),
        "input_size": [int(c), int(h), int(w)],
        "inputs": [{"name": INPUT_NAMES[0], "shape": ["batch", int(c), int(h), int(w)], "dtype": str(example.dtype)}],
        "outputs": [
            {"name": "logits", "shape": ["batch", "num_classes"]},
            {"name": "ponder_cost", "shape": ["batch"]},
            {"name": "ponder_map", "shape": ["batch", int(h), int(w)],
             "description": "sum over stages of the ponder cost map, nearest-upsampled to the input size"},
        ],
        "preprocess": meta.get("preprocess"),
        "classes": meta.get("classes"),
        "tau": meta.get("tau"),
        "torch_version": torch.__version__,
        "sact_version": __version__,
    }
    if fmt == "onnx":
        doc["opset"] = opset
    return json.loads(json.dumps(doc, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def metadata_path(path: str | Path) -> Path:
    """``FILE.pt2`` -> ``FILE.pt2.json`` (not ``FILE.json``, which may be a checkpoint's sidecar)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def export_program(
    model: nn.Module, *, example_input: Tensor | None = None, image_size: int | None = None
) -> torch.export.ExportedProgram:
    """Trace :class:`ExportableModel` of ``model`` with ``torch.export`` (dynamic batch).

    Args:
        model: any sact model; traced in eval mode, its training flag is restored.
        example_input: ``[B, C, H, W]`` fixing ``C, H, W``; default random of side
            ``image_size`` (default :func:`default_image_size`).
        image_size: input side when ``example_input`` is None.

    Returns:
        The program: ``images [batch, C, H, W] -> (logits, ponder_cost, ponder_map)``.
    """
    example = _example(model, example_input, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(
                ExportableModel(model),
                (example,),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            )
    finally:
        model.train(was_training)


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    format: str = "onnx",
    example_input: Tensor | None = None,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (dense masked form, any mode) with a dynamic batch dimension.

    Args:
        model: a model from :func:`sact.create_model` / :func:`sact.load_checkpoint`. It is
            exported in eval mode (BN running statistics); its training flag is restored.
        path: output file (``.onnx`` or ``.pt2`` by convention; written atomically).
        format: ``"onnx"`` (dynamo-based ``torch.onnx.export``) or ``"torch-export"``
            (``torch.export.export`` + ``torch.export.save``; metadata also goes to
            ``path + ".json"`` and into the archive as ``extra_files["sact.json"]``).
        example_input: ``[B, C, H, W]`` tensor fixing ``C, H, W`` (only its first image is
            used); default random of side ``image_size``.
        image_size: input side when ``example_input`` is None (default
            :func:`default_image_size`; at most :data:`MAX_IMAGE_SIZE`).
        opset: ONNX opset version (``format="onnx"`` only), from :data:`MIN_OPSET` to
            :func:`max_opset`; the file is written only if it has exactly this opset.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: unknown ``format``, an opset out of range, bad ``image_size`` /
            ``example_input``, or a model without ``sact_config``.
        RuntimeError: the exporter produced another opset than asked (nothing written).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "onnx":
        check_opset(opset)
    if getattr(model, "sact_config", None) is None:
        raise ValueError("model has no sact_config; build it with sact.create_model(...) or sact.load_checkpoint(...)")
    path = Path(path)
    example = _example(model, example_input, image_size)
    program = export_program(model, example_input=example)
    doc = export_metadata(model, example, format, opset=opset if format == "onnx" else None)
    if format == "onnx":
        _write_onnx(program, example, path, doc, opset)
    else:
        buf = io.BytesIO()
        torch.export.save(program, buf, extra_files={"sact.json": json.dumps(doc)})  # a pickle: see load_exported
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_bytes(metadata_path(path), json.dumps(doc, indent=2).encode())
    return path


def _write_onnx(program: torch.export.ExportedProgram, example: Tensor, path: Path, doc: dict, opset: int) -> None:
    # The ONNX exporter reuses the program traced above (no second trace); it decomposes
    # it to core ATen ops, translates to ONNX and runs the onnxscript optimiser.
    onnx_program = torch.onnx.export(
        program,
        (example,),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    proto = onnx_program.model_proto
    written = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:  # the exporter falls back to its own opset when a conversion fails
        raise RuntimeError(f"the ONNX exporter produced opset {sorted(written)} instead of {opset}; nothing written")
    _name_batch_dim(proto)
    proto.doc_string = "sact dense masked model: images -> (logits, ponder_cost, ponder_map)"
    flat = {"sact": json.dumps(doc)}
    for key in ("model", "mode", "input_size", "preprocess", "classes"):
        if doc.get(key) is not None:
            flat[f"sact.{key}"] = doc[key] if isinstance(doc[key], str) else json.dumps(doc[key])
    for key, value in flat.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()  # raises for models over protobuf's 2 GiB: none of ours
    atomic_write_bytes(path, data)


def _name_batch_dim(proto) -> None:
    """Rename the exporter's batch symbol (``s0``, ``s34``, ...) to ``batch`` everywhere."""
    symbol = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def load_exported(
    path: str | Path, *, trusted: bool = False
) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], dict[str, Any]]:
    """Load an export for inference (format from the file content).

    A ``.pt2`` archive (``torch.export``) holds pickled Python objects: loading one can
    run arbitrary code, exactly like ``pickle.load``. It is loaded only with
    ``trusted=True``, for files you made yourself or got from someone you trust; an
    ONNX file is a protobuf graph run by onnxruntime and needs no such flag. See
    ``docs/trust.md``.

    Args:
        path: a ``.onnx`` file (run with onnxruntime on CPU) or a ``.pt2`` archive.
        trusted: allow a ``.pt2`` archive (pickled code) to be loaded.

    Returns:
        ``(run, metadata)``: ``run(images [B, C, H, W]) -> (logits, ponder_cost, ponder_map)``
        as CPU tensors, and the metadata document written by :func:`export_model`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a ``.pt2`` archive without ``trusted=True`` (nothing of it is read).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"export not found: {path}")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # .pt2 archives are zip files; ONNX is protobuf
    if is_zip:
        if not trusted:
            raise ValueError(
                f"{path} is a torch.export archive (.pt2): loading it unpickles Python objects and can run arbitrary "
                "code. Pass trusted=True only for a file you made or trust; use the ONNX export to share a model"
            )
        extra = {"sact.json": ""}
        program = torch.export.load(path, extra_files=extra)
        module = program.module()
        doc = json.loads(extra["sact.json"]) if extra["sact.json"] else {}

        def run_pt2(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            with torch.no_grad():
                return tuple(t.cpu() for t in module(images))

        return run_pt2, doc
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    doc = json.loads(props["sact"]) if "sact" in props else {}
    input_name = session.get_inputs()[0].name

    def run_onnx(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outs = session.run(None, {input_name: images.detach().cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)

    return run_onnx, doc


#: ``--out`` suffix -> export format
SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "torch-export"}


@dataclass
class ExportedFile:
    """What :func:`export_checkpoint` wrote: ``path``, ``fmt``, its metadata ``doc`` and, when
    verified, ``differences``: batch size -> output name -> largest absolute difference."""

    path: Path
    fmt: str
    doc: dict
    differences: dict[int, dict[str, float]]


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, fmt: str | None = None, image_size: int | None = None,
                      opset: int | None = None, overwrite: bool = False, verify: bool = False) -> ExportedFile:
    """``sact export``: the checkpoint's dense masked model as ONNX or a torch.export program
    (:func:`export_model`); ``fmt`` from the ``out`` suffix when None. With ``verify``, the file is
    reloaded and compared with the eager model on random batches of 1 and 3.

    Raises:
        InputError: an unknown format, an image size or opset out of range, ``out`` in the way.
        RunFailure: the export differs from the eager model by more than 1e-3.
    """
    from ..errors import InputError, RunFailure
    from ..io.files import check_output_file, prepare_outputs
    from ..models.loading import load_checkpoint

    fmt = fmt or SUFFIX_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot infer the format from --out {str(out)!r}; pass --format onnx|torch-export")
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise InputError(f"--image-size must be from 1 to {MAX_IMAGE_SIZE} (a {MAX_IMAGE_SIZE}^2 image is at the "
                         f"pixel cap), got {image_size}")
    if fmt != "onnx" and opset is not None:
        raise InputError(f"--opset is for ONNX exports; --format {fmt} has none")
    opset = check_opset(DEFAULT_OPSET if opset is None else opset)  # ValueError: exit 2
    out = Path(out)
    with prepare_outputs(None, files=[out], overwrite=overwrite, what="--out"):  # before any work
        if fmt == "torch-export":
            check_output_file(metadata_path(out), overwrite=overwrite, what="--out metadata")
        model = load_checkpoint(checkpoint)
        out = export_model(model, out, format=fmt, image_size=image_size, opset=opset)
    run_exported, doc = load_exported(out, trusted=True)  # the file this call just wrote
    differences: dict[int, dict[str, float]] = {}
    if verify:
        c, h, w = doc["input_size"]
        wrapper = ExportableModel(model).eval()
        for batch in (1, 3):
            x = torch.randn(batch, c, h, w)
            with torch.no_grad():
                ref = wrapper(x)
            got = run_exported(x)
            differences[batch] = {name: (r - g).abs().max().item()
                                  for name, r, g in zip(("logits", "ponder_cost", "ponder_map"), ref, got)}
        worst = max(v for d in differences.values() for v in d.values())
        if worst > 1e-3:
            raise RunFailure(f"the export differs from the eager model by {worst:.3g}")
    return ExportedFile(out, fmt, doc, differences)
