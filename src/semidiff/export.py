"""``semidiff export``: a trained network as TorchScript and/or ONNX, verified, self-describing.

What is exported is the network whose softmax :meth:`Method.predict` returns (``Method.export_net``:
the student of the baselines, CPS's network A, CS of Diff-CL), wrapped so that the exported graph
maps images ``(N, C, *patch)`` to class probabilities ``(N, num_classes, *patch)`` in fp32. Methods
whose prediction is not one network's output (an ensemble, a sampler) are refused.

The batch axis is dynamic; the spatial size is the training patch (``data.patch_size``), which is
all the prediction path ever feeds the network: 2D images are resized to it, volumes go slice by
slice or through windows of that size. Everything ``semidiff predict`` needs besides the weights
(patch size, the file-to-input preprocessing, class count, inference mode, resampling) travels inside
the file: the run's full resolved config and its recorded preprocessing as the TorchScript extra file
``semidiff.json``, or as the ONNX metadata entry ``semidiff``.

Each file is checked right after it is written: the exported model and the PyTorch method are run
on the same random batch, and the export fails (and its file is removed) when the largest absolute
difference of the probabilities exceeds the tolerance (1e-4).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from semidiff.config import Config, config_from_dict
from semidiff.data.preprocessing import (
    DERIVED,
    Preprocessing,
    fill_colour_rule,
    preprocessing_from_config,
)
from semidiff.errors import SemidiffError

__all__ = [
    "EXPORT_FORMATS",
    "ExportResult",
    "ExportedModel",
    "ProbabilityNet",
    "export_checkpoint",
    "exportable_methods",
    "is_exported_file",
    "load_exported",
]

EXPORT_FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
#: TorchScript extra-file name and ONNX metadata key holding the export's description.
METADATA_KEY = "semidiff.json"
ONNX_METADATA_KEY = "semidiff"
#: Largest absolute difference of probabilities accepted between export and PyTorch.
DEFAULT_TOLERANCE = 1e-4
ONNX_OPSET = 17


class ProbabilityNet(nn.Module):
    """``softmax(net(x))`` over the class axis, in fp32: what ``Method.predict`` returns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        return torch.softmax(self.net(image).float(), dim=1)


@dataclass
class ExportResult:
    """One exported file and how closely it reproduces PyTorch."""

    format: str
    path: Path
    max_abs_diff: float


def is_exported_file(path: str | Path) -> bool:
    """Whether ``path`` names an exported model (``.pt`` TorchScript or ``.onnx``)."""
    return Path(path).suffix.lower() in (".pt", ".onnx")


def _output_paths(checkpoint: Path, formats: list[str], out: str | Path | None) -> dict[str, Path]:
    if out is None:
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        base = run_dir / "export" / checkpoint.stem
        return {f: base.with_name(base.name + SUFFIX[f]) for f in formats}
    out = Path(out)
    if len(formats) == 1:
        fmt = formats[0]
        return {fmt: out if out.suffix.lower() == SUFFIX[fmt] else out.with_name(out.name + SUFFIX[fmt])}
    stem = out.with_suffix("") if out.suffix.lower() in SUFFIX.values() else out
    return {f: stem.with_name(stem.name + SUFFIX[f]) for f in formats}


def _metadata(cfg: Config, checkpoint: Path, step: int, method: str, preprocessing: Preprocessing) -> dict[str, Any]:
    return {
        "format_version": 1,
        "method": method,
        "checkpoint": str(checkpoint),
        "step": step,
        "input": {"channels": cfg.model.in_channels, "spatial_size": list(cfg.data.patch_size),
                  "dtype": "float32", "batch": "dynamic"},
        "output": f"softmax probabilities (N, {cfg.model.num_classes}, *spatial_size)",
        "config": cfg.model_dump(mode="json"),
        # From a file on disk to the "input" above, as training made it (semidiff.data.preprocessing).
        "preprocessing": preprocessing.to_dict(),
    }


# ---- HFM (Diff-CL's CS) in an exportable form ------------------------------------------------------
# Two pieces of the HFM block cannot be exported as they run in training: mambapy's parallel scan is
# a Python autograd Function (a trace records it as a Python call TorchScript cannot save), and
# the FFT high-pass uses torch.fft.fftfreq and complex tensors (no ONNX translation). While
# exporting, both are swapped for plain tensor code that computes the same values; the export is
# then checked against the unmodified PyTorch path like every other (1e-4).
class _NoBackward:
    """Stands in for autograd's ``ctx``: an export runs the forward pass only."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        pass


def _pscan_forward_only(A: Tensor, X: Tensor) -> Tensor:
    """mambapy's parallel scan without its autograd Function wrapper (same tensor operations)."""
    from mambapy.pscan import PScan

    return PScan.forward(_NoBackward(), A, X)


@functools.lru_cache(maxsize=64)
def _low_pass_matrix(size: int, radius: float) -> Tensor:
    """The real ``(size, size)`` matrix of the 1D ideal low-pass that HFM's box mask applies per axis.

    Column ``j`` is ``real(ifft(fft(e_j) * near))`` with ``near = |fftfreq(size)| <= radius``,
    so ``M @ v`` is the low-passed ``v``. Computed in float64, once per size, before any trace.
    """
    near = (torch.fft.fftfreq(size, dtype=torch.float64).abs() <= radius + 1e-9).to(torch.complex128)
    eye = torch.eye(size, dtype=torch.complex128)
    return torch.fft.ifft(near[:, None] * torch.fft.fft(eye, dim=0), dim=0).real.float()


def _separable_high_pass(x: Tensor, radius: float) -> Tensor:
    """``semidiff.nets.hfm.high_pass`` as matrix products (exportable, equal up to rounding).

    HFM zeroes the box where every axis is low-frequency; that box is a product of one mask per
    axis, so ``real(ifftn(fftn(x) * (1 - box)))`` is ``x`` minus ``x`` low-passed along each
    spatial axis in turn, and a 1D low-pass is a fixed real matrix (:func:`_low_pass_matrix`).
    """
    high = x.float()
    low = high
    last = x.ndim - 1  # positive axis numbers: the ONNX exporter writes a -1 into Transpose's perm
    for axis in range(2, x.ndim):
        matrix = _low_pass_matrix(int(x.shape[axis]), float(radius))
        low = torch.movedim(torch.movedim(low, axis, last) @ matrix.T, last, axis)
    return (high - low).to(x.dtype)


@contextlib.contextmanager
def _exportable_hfm(net: nn.Module):
    """Run HFM blocks of ``net`` through exportable code while the block is active (no-op without).

    Also pins every Mamba to the mambapy back end (the same parameters as mamba_ssm's): the export
    runs on the CPU, where the fused CUDA scan does not exist.
    """
    hfm = sys.modules.get("semidiff.nets.hfm")  # imported already if the net holds an HFM block
    if hfm is None or not any(isinstance(m, hfm.HFMBlock) for m in net.modules()):
        yield
        return
    import mambapy.mamba as mambapy_mamba

    mixers = [m for m in net.modules() if isinstance(m, hfm.MambaMixer)]
    saved = (hfm.high_pass, mambapy_mamba.pscan, [m.backend for m in mixers])
    hfm.high_pass, mambapy_mamba.pscan = _separable_high_pass, _pscan_forward_only
    for mixer in mixers:
        mixer.backend = "mambapy"
    try:
        yield
    finally:
        hfm.high_pass, mambapy_mamba.pscan = saved[0], saved[1]
        for mixer, backend in zip(mixers, saved[2]):
            mixer.backend = backend


def _random_batch(cfg: Config, batch: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, cfg.model.in_channels, *cfg.data.patch_size), generator=gen)


def _replace_into(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)  # no half-written export is ever visible under the final name


def _export_torchscript(head: nn.Module, example: Tensor, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings():
        # The shape checks and padding arithmetic of the nets are constants for the patch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript is deprecated in favour of torch.export but still the one format that
        # `torch.jit.load` runs anywhere without Python code; the warning is not actionable here.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(head, example, check_trace=False)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(traced, str(tmp), _extra_files={METADATA_KEY: json.dumps(metadata)})
        _replace_into(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _import_onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise SemidiffError(
            f"ONNX export and ONNX prediction need the optional packages onnx and onnxruntime "
            f"({exc.name} is missing): pip install 'semidiff[export]'"
        ) from None
    import onnx

    return onnx


def _export_onnx(head: nn.Module, example: Tensor, path: Path, metadata: dict) -> None:
    onnx = _import_onnx()
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_kwargs = {"input_names": ["image"], "output_names": ["probs"], "opset_version": ONNX_OPSET}
            try:
                # The TorchScript-based exporter: fast, and a dynamic batch axis by name.
                torch.onnx.export(head, (example,), str(tmp), dynamo=False,
                                  dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}}, **export_kwargs)
            except (TypeError, RuntimeError, ValueError):
                # torch versions without it: the torch.export-based exporter.
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(head, (example,), str(tmp), dynamo=True,
                                  dynamic_shapes=({0: batch},), **export_kwargs)
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        _replace_into(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def exportable_methods() -> str:
    """The registered methods ``semidiff export`` can export, and on which options (from the registry)."""
    from semidiff.methods import METHODS

    parts = []
    for name in METHODS.names():
        when = METHODS[name].exportable_when
        if when is not None:
            parts.append(name if when == "always" else f"{name} with {when}")
    return ", ".join(parts)


def export_checkpoint(
    checkpoint: str | Path,
    formats: str | list[str] = "both",
    out: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
) -> list[ExportResult]:
    """Export the single network of a checkpoint and verify each file against PyTorch.

    Args:
        checkpoint: a ``.ckpt`` written by ``semidiff train``.
        formats: ``"torchscript"``, ``"onnx"``, ``"both"``, or a list of formats.
        out: output file (one format) or path stem (both; ``.pt``/``.onnx`` appended); default
            ``RUN/export/<checkpoint name>.pt|.onnx``.
        tolerance: largest accepted absolute difference of the probabilities.
        log: where progress lines go.

    Returns:
        One :class:`ExportResult` per file.

    Raises:
        SemidiffError: the method has no single-network output, a package is missing, or an
            export does not reproduce PyTorch within ``tolerance`` (its file is then removed).
    """
    from semidiff.engine.module import load_module

    checkpoint = Path(checkpoint)
    wanted = list(EXPORT_FORMATS) if formats == "both" else [formats] if isinstance(formats, str) else list(formats)
    for fmt in wanted:
        if fmt not in EXPORT_FORMATS:
            raise SemidiffError(f"export format {fmt!r}: choose torchscript, onnx or both")
    module = load_module(str(checkpoint))
    cfg, method = module.cfg, module.method
    net = method.export_net()
    if net is None:
        raise SemidiffError(
            f"{checkpoint}: method {cfg.method.name!r} (with these options) has no single-network "
            f"output to export: {method.export_refusal()}. Exportable: {exportable_methods()}"
        )
    if "onnx" in wanted:
        _import_onnx()  # fail before writing anything
    method.eval()
    head = ProbabilityNet(net).eval()
    metadata = _metadata(cfg, checkpoint, getattr(module, "checkpoint_step", -1), cfg.method.name,
                         module.preprocessing)
    paths = _output_paths(checkpoint, wanted, out)
    example = _random_batch(cfg, 2, seed=0)
    # A batch size other than the traced one checks that the batch axis really is dynamic.
    check = _random_batch(cfg, 3, seed=1)
    with torch.no_grad():
        reference = method.predict(check).float()

    results = []
    for fmt, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), _exportable_hfm(net):
            head(example)  # eager run first: HFM's low-pass matrices become constants, not traced ops
            (_export_torchscript if fmt == "torchscript" else _export_onnx)(head, example, path, metadata)
        try:
            got = load_exported(path).probabilities(check)
            diff = float((got - reference).abs().max())
        except Exception:
            path.unlink(missing_ok=True)
            raise
        if not diff <= tolerance:
            path.unlink(missing_ok=True)
            raise SemidiffError(
                f"{path}: the {fmt} export differs from PyTorch by {diff:.2e} (> {tolerance:g}); file removed"
            )
        log(f"{fmt}: {path}  (max |probability difference| vs PyTorch on a random batch of "
            f"{check.shape[0]}: {diff:.2e})")
        results.append(ExportResult(fmt, path, diff))
    return results


class ExportedModel:
    """An exported file loaded for prediction: its config and a ``predict`` like the method's.

    Attributes:
        path: the file.
        format: ``"torchscript"`` or ``"onnx"``.
        metadata: the description written at export time (config included).
        cfg: the run's config, with ``train.precision`` set to 32 (the export is fp32).
    """

    def __init__(self, path: Path, fmt: str, runner, metadata: dict, device: str | torch.device = "cpu"):
        self.path, self.format, self._runner, self.metadata = path, fmt, runner, metadata
        self.device = torch.device(device)
        cfg = config_from_dict(metadata["config"], f"{path} (exported config)")
        cfg.train.precision = "32"
        self.cfg = cfg
        self.spatial_size = tuple(cfg.data.patch_size)
        recorded = metadata.get("preprocessing")
        # Files exported before preprocessing was recorded: derived from their config, as training did.
        self.preprocessing = (Preprocessing.from_dict(fill_colour_rule(recorded, cfg)) if recorded is not None
                              else preprocessing_from_config(cfg, origin=DERIVED))

    def probabilities(self, image: Tensor) -> Tensor:
        """Class probabilities for images ``(N, C, *patch)`` (on the caller's device)."""
        if tuple(image.shape[2:]) != self.spatial_size:
            raise SemidiffError(
                f"{self.path}: exported for inputs of spatial size {self.spatial_size}, got {tuple(image.shape[2:])}"
            )
        if self.format == "torchscript":
            with torch.no_grad():
                return self._runner(image.float().to(self.device))
        arr = image.detach().float().cpu().numpy()
        out = self._runner.run(None, {self._runner.get_inputs()[0].name: np.ascontiguousarray(arr)})[0]
        return torch.from_numpy(out).to(image.device)

    # The same name as Method.predict, so the prediction path takes either.
    predict = probabilities


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Load a ``.pt`` (TorchScript) or ``.onnx`` file written by :func:`export_checkpoint`.

    Raises:
        SemidiffError: the file is missing, unreadable, or was not written by ``semidiff export``.
    """
    path = Path(path)
    if not path.is_file():
        raise SemidiffError(f"{path}: exported model not found")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        extra = {METADATA_KEY: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                runner = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:  # noqa: BLE001  corrupt or not TorchScript
            raise SemidiffError(f"{path}: not a readable TorchScript file ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        text = extra[METADATA_KEY]
        runner.eval()
        fmt = "torchscript"
    elif suffix == ".onnx":
        onnx = _import_onnx()
        import onnxruntime as ort

        try:
            model = onnx.load(str(path), load_external_data=False)
            runner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise SemidiffError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
        text = {p.key: p.value for p in model.metadata_props}.get(ONNX_METADATA_KEY, "")
        fmt = "onnx"
    else:
        raise SemidiffError(f"{path}: not an exported model (expected .pt or .onnx)")
    if not text:
        raise SemidiffError(f"{path}: has no semidiff description (not written by `semidiff export`)")
    try:
        metadata = json.loads(text if isinstance(text, str) else text.decode())
    except (ValueError, UnicodeDecodeError):
        raise SemidiffError(f"{path}: its semidiff description is not valid JSON") from None
    return ExportedModel(path, fmt, runner, metadata, device=device)
