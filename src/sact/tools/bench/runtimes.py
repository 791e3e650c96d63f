"""The sparse engine against the runtimes a deployer uses: ONNX Runtime and OpenVINO running the plain network.

For one group of rows (a model, an image side, a batch size), :func:`compare_group` times,
each in its **own worker process** (``multiprocessing`` spawn, started once for the group
and kept for all rounds):

* ``torch``: the vanilla network (the SACT model's backbone weights), PyTorch eager,
  channels-last (the faster layout in most rows of the in-process table);
* ``sparse <halting>``: the engine (``sact.to_sparse``) at each halting level of the group,
  each on its own row's input;
* ``onnxruntime`` / ``openvino``: the same vanilla network exported to ONNX by
  :func:`sact.export.export_model` (float32), ONNX Runtime with ``intra_op`` threads = the
  bench's threads, ``inter_op`` 1, ``ORT_ENABLE_ALL``, sequential execution; OpenVINO with the
  ``LATENCY`` hint, ``INFERENCE_NUM_THREADS`` = the bench's threads, ``f32`` precision.

Two runtimes' thread pools in one process spin and steal each other's cores, hence one
process each. The rounds are interleaved (one request to every worker per round, the order
rotating); a worker answers a round with the median of ``k`` calls, ``k`` fixed per worker
after its warm-up so that a round lasts about :data:`ROUND_SECONDS` (:data:`MIN_CALLS` to
:data:`MAX_CALLS`). The plain contenders run on the group's first row's input (a dense
network's time does not depend on it); their logits must equal PyTorch's to
:data:`OUTPUT_RTOL` relative to the largest ``|logit|``.

Reported per sparse row: its time over the best plain contender's (per round), the
efficiency ``E = (1 - t/t_best) / (1 - F)`` (:func:`~sact.tools.bench.bench.efficiency`) and the
GFLOP/s of the FLOPs each contender executes (:func:`gflops_per_second`).
:func:`openvino_units` groups OpenVINO's per-layer counters (``PERF_COUNT``) per residual
unit, from the torch module paths the exporter writes into the ONNX nodes.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import RunFailure

__all__ = ["RUNTIMES", "INSTALL_HINT", "OUTPUT_RTOL", "resolve_runtimes", "runtime_versions", "Contender",
           "Worker", "gflops_per_second", "max_rel_diff", "export_plain", "time_workers", "onnx_units", "openvino_units",
           "temporary_folder",
           "ROUND_SECONDS", "MIN_CALLS", "MAX_CALLS", "WARMUP_SECONDS", "WARMUP_MAX_SECONDS", "STABLE"]

RUNTIMES = ("onnxruntime", "openvino")
INSTALL_HINT = "pip install -e '.[bench]'"
#: Largest ``max |runtime - torch| / max |torch|`` of the plain network's logits that counts as equal.
OUTPUT_RTOL = 1e-4
#: Untimed interleaved rounds go on until the workers have run this long, at least ``warmup``
#: rounds, and every worker's last two rounds are within :data:`STABLE` of each other and of its fastest (at most
#: :data:`WARMUP_MAX_SECONDS`): a fresh engine worker runs slower for tens of seconds while its heap
#: grows (measured: ResNet-50 batch 8, seven workers, the engine's rounds 1.8-2x slower for about
#: 30 s, with the kernel busy on page faults, then steadily at its in-process speed), which a fixed
#: count of warm-up calls misses.
WARMUP_SECONDS = 20.0
WARMUP_MAX_SECONDS = 180.0
STABLE = 1.1

#: A worker's round lasts about this long: ``k = ROUND_SECONDS / (one call)``, within [MIN_CALLS, MAX_CALLS].
ROUND_SECONDS = 0.3
MIN_CALLS, MAX_CALLS = 3, 30
#: Seconds a worker may take to build its model (export compile, native kernels) before it is given up.
START_TIMEOUT = 600.0


def resolve_runtimes(requested: Sequence[str]) -> tuple[list[str], list[str]]:
    """The runtimes to time, and one line per requested runtime that is not installed.

    Args:
        requested: ``["auto"]`` (those installed), ``["none"]``, or names from :data:`RUNTIMES`.

    Returns:
        ``(runtimes, skipped)``: installed runtimes in :data:`RUNTIMES` order, and a line per
        missing one saying how to install it.

    Raises:
        ValueError: an unknown name, or ``auto`` / ``none`` combined with other names.
    """
    req = list(dict.fromkeys(requested))
    unknown = [r for r in req if r not in ("auto", "none", *RUNTIMES)]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; choose from auto, none, {', '.join(RUNTIMES)}")
    if len(req) > 1 and ("auto" in req or "none" in req):
        raise ValueError(f"'auto' and 'none' stand alone, got {req}")
    if req == ["none"] or not req:
        return [], []
    wanted = RUNTIMES if req == ["auto"] else tuple(r for r in RUNTIMES if r in req)
    found = [r for r in wanted if importlib.util.find_spec(r) is not None]
    skipped = [f"{r} is not installed: its column is skipped (install it with {INSTALL_HINT})"
               for r in wanted if r not in found]
    return found, skipped


def runtime_versions(runtimes: Sequence[str]) -> dict[str, str]:
    """``{runtime: version}`` (imports each)."""
    return {r: str(importlib.import_module(r).__version__) for r in runtimes}


def gflops_per_second(flops_per_image: float, batch: int, seconds: float) -> float:
    """GFLOP/s of a call that executes ``flops_per_image`` FLOPs on each of ``batch`` images in ``seconds``."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return flops_per_image * batch / seconds / 1e9


def max_rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """``max |a - ref| / max |ref|`` (float64); ``inf`` for different shapes or non-finite values."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return math.inf
    d = float(np.abs(a - ref).max()) / max(float(np.abs(ref).max()), 1e-30)
    return d if math.isfinite(d) else math.inf


def export_plain(model: nn.Module, folder: Path, example: Tensor) -> Path:
    """The vanilla network exported to ONNX (float32, dynamic batch) by the project's own export."""
    from ..export import export_model

    path = Path(folder) / f"{model.sact_config['name']}_plain_{example.shape[-1]}.onnx"
    export_model(model, path, example_input=example[:1])
    return path


# ---------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------


@dataclass
class Contender:
    """What one worker process runs.

    Attributes:
        name: its column (``torch``, ``sparse none``, ``onnxruntime``, ...).
        kind: ``"torch"`` (eager, channels-last), ``"sparse"`` (``sact.to_sparse``),
            ``"onnxruntime"`` or ``"openvino"``.
        x: ``[B, C, H, W]`` its input.
        model: ``{"name", "kwargs"}`` and the safetensors bytes of the state dict (torch kinds).
        path: the ONNX file (runtime kinds).
    """

    name: str
    kind: str
    x: np.ndarray
    model: tuple[dict, bytes] | None = None
    path: str | None = None

    @classmethod
    def from_module(cls, name: str, kind: str, module: nn.Module, x: Tensor) -> "Contender":
        """A torch contender: the module is rebuilt in the worker from its registry config and weights."""
        from safetensors.torch import save

        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        return cls(name, kind, x.numpy(), model=(dict(module.sact_config), save(state)))


def _build(c: Contender, threads: int):
    """``call() -> logits`` for one contender, inside its worker."""
    x = c.x
    if c.kind in ("torch", "sparse"):
        from safetensors.torch import load

        from ...models import create_model
        from ...sparse.model import to_sparse

        torch.set_num_threads(threads)
        config, weights = c.model
        model = create_model(config["name"], **config["kwargs"]).eval()
        model.load_state_dict(load(weights))
        xt = torch.from_numpy(x)
        if c.kind == "torch":
            model = model.to(memory_format=torch.channels_last)
            return lambda: model(xt.contiguous(memory_format=torch.channels_last)).logits.numpy()
        sparse = to_sparse(model)
        return lambda: sparse(xt).logits.numpy()
    if c.kind == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(c.path, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)[0]
    if c.kind == "openvino":
        request = _openvino_compiled(c.path, threads).create_infer_request()
        return lambda: request.infer({0: x})[0].copy()
    raise ValueError(f"unknown contender kind {c.kind!r}")


def _openvino_compiled(path: str, threads: int, *, perf_count: bool = False):
    import openvino as ov

    return ov.Core().compile_model(path, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                 "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": perf_count})


def _openvino_layers(c: Contender, threads: int, reps: int) -> list[dict]:
    """OpenVINO's per-layer counters: ``[{"layer", "type", "exec", "ms"}]``, median over ``reps`` calls."""
    request = _openvino_compiled(c.path, threads, perf_count=True).create_infer_request()
    request.infer({0: c.x})  # warm-up
    times: dict[str, list[float]] = {}
    info: dict[str, tuple[str, str]] = {}
    for _ in range(reps):
        request.infer({0: c.x})
        for p in request.profiling_info:
            if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_EXECUTED"):
                times.setdefault(p.node_name, []).append(p.real_time.total_seconds() * 1e3)
                info[p.node_name] = (p.node_type, p.exec_type)
    return [{"layer": k, "type": info[k][0], "exec": info[k][1], "ms": statistics.median(v)} for k, v in times.items()]


def _median_call(call, k: int) -> float:
    samples = []
    for _ in range(k):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _worker(conn, c: Contender, threads: int, warmup: int) -> None:
    """Builds the contender, sends ``("ready", pid, logits, k)``, then answers requests:
    ``("time",)`` -> ``("ok", median seconds of k calls)``, ``("layers", reps)`` -> ``("ok", [...])``,
    ``("stop",)`` ends. Any error -> ``("error", message)``."""
    try:
        call = _build(c, threads)
        with torch.no_grad():
            logits = call()
            t = min(_median_call(call, 1) for _ in range(max(warmup, 1)))
            k = max(MIN_CALLS, min(MAX_CALLS, round(ROUND_SECONDS / max(t, 1e-9))))
            conn.send(("ready", os.getpid(), logits, k))
            while True:
                msg = conn.recv()
                if msg[0] == "time":
                    conn.send(("ok", _median_call(call, k)))
                elif msg[0] == "layers":
                    conn.send(("ok", _openvino_layers(c, threads, msg[1])))
                else:
                    break
    except BaseException as e:  # reported to the bench process, which fails with it
        try:
            conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        except (OSError, ValueError):
            pass
    finally:
        conn.close()


@dataclass
class Worker:
    """A started worker process and what it reported when ready."""

    contender: Contender
    process: Any
    conn: Any
    pid: int = 0
    logits: np.ndarray | None = None
    calls: int = 0
    seconds: list[float] = field(default_factory=list)
    layers: list[dict] | None = None
    warmup_rounds: int = 0

    def ask(self, *msg) -> Any:
        self.conn.send(msg)
        return self._answer()

    def _answer(self, timeout: float | None = None) -> Any:
        if not mp.connection.wait([self.conn, self.process.sentinel], timeout):
            raise RunFailure(f"benchmark worker {self.contender.name!r} did not answer within {timeout:.0f} s")
        try:
            reply = self.conn.recv()
        except EOFError:
            raise RunFailure(f"benchmark worker {self.contender.name!r} died (exit code {self.process.exitcode})")
        if reply[0] == "error":
            raise RunFailure(f"benchmark worker {self.contender.name!r} failed: {reply[1]}")
        return reply[1:] if len(reply) > 2 else reply[1]


def _start(contenders: Sequence[Contender], threads: int, warmup: int) -> list[Worker]:
    ctx = mp.get_context("spawn")
    workers = []
    try:
        for c in contenders:  # started together: they build while the others build
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, c, threads, warmup), daemon=True)
            proc.start()
            child.close()
            workers.append(Worker(c, proc, parent))
        for w in workers:
            w.pid, w.logits, w.calls = w._answer(START_TIMEOUT)
    except BaseException:
        _stop(workers)
        raise
    return workers


def _stop(workers: Sequence[Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(("stop",))
        except (OSError, ValueError):
            pass
    for w in workers:
        w.process.join(timeout=30)
        if w.process.is_alive():  # a worker this run started, stuck: end it
            w.process.terminate()
            w.process.join(timeout=10)
        w.conn.close()


def time_workers(contenders: Sequence[Contender], *, threads: int, rounds: int, warmup: int,
                 layers: dict[str, int] | None = None, progress=None) -> list[Worker]:
    """Start one worker per contender, time them in interleaved rounds, stop them.

    Args:
        contenders: what to time.
        threads: each worker's thread count (torch intra-op / the runtime's own).
        rounds: timed rounds; each asks every worker for one median of its ``k`` calls, the
            order rotating by one per round.
        warmup: untimed calls in each worker before ``k`` is chosen, then at least as many untimed
            interleaved rounds, continued until :data:`WARMUP_SECONDS` have passed since the start and
            every worker's round time is stable (:data:`STABLE`; at most :data:`WARMUP_MAX_SECONDS`).
        layers: ``{contender name: reps}``: also collect OpenVINO's per-layer counters of
            these (after the rounds; in ``Worker.layers``).
        progress: called once per round (a progress bar's ``update``).

    Returns:
        The stopped workers, with their pid, first logits, ``k`` and ``seconds`` per round.

    Raises:
        RunFailure: a worker failed or died.
    """
    start = time.perf_counter()
    workers = _start(contenders, threads, warmup)
    try:
        warm: list[list[float]] = [[] for _ in workers]
        while True:  # untimed, interleaved
            for w, seen in zip(workers, warm):
                seen.append(w.ask("time"))
            elapsed = time.perf_counter() - start
            # no longer speeding up, and as fast as it has been
            stable = all(len(seen) >= 2 and seen[-2] <= STABLE * seen[-1] and seen[-1] <= STABLE * min(seen)
                         for seen in warm)
            if (len(warm[0]) >= warmup and elapsed >= WARMUP_SECONDS and stable) or elapsed >= WARMUP_MAX_SECONDS:
                break
        for w, seen in zip(workers, warm):
            w.warmup_rounds = len(seen)
        for r in range(rounds):
            s = r % len(workers)
            for w in workers[s:] + workers[:s]:
                w.seconds.append(w.ask("time"))
            if progress is not None:
                progress()
        for w in workers:
            if layers and w.contender.name in layers:
                w.layers = w.ask("layers", layers[w.contender.name])
    finally:
        _stop(workers)
    return workers


# ---------------------------------------------------------------------------------------
# OpenVINO's layers per residual unit
# ---------------------------------------------------------------------------------------


def onnx_units(path: str | Path, stage_names: Sequence[str]) -> dict[str, str]:
    """``{ONNX node name: "stage.unit" | "stem/head"}`` from the module paths the exporter records.

    The dynamo exporter writes each node's torch module path into its metadata
    (``pkg.torch.onnx.name_scopes``: ``['', 'model', 'model.layer1', 'model.layer1.0', ...]``);
    the first scope ``model.<stage name>.<n>`` names stage ``i + 1`` (``stage_names[i]``), unit ``n``.
    """
    import ast

    import onnx

    index = {name: i + 1 for i, name in enumerate(stage_names)}
    pattern = re.compile(r"model\.(.+)\.(\d+)$")
    out = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        unit = "stem/head"
        for prop in node.metadata_props:
            if prop.key != "pkg.torch.onnx.name_scopes":
                continue
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                scopes = []
            for s in scopes:
                m = pattern.match(str(s))
                if m and m.group(1) in index:
                    unit = f"{index[m.group(1)]}.{m.group(2)}"
                    break
        out[node.name] = unit
    return out


def openvino_units(layers: Sequence[dict], node_units: dict[str, str]) -> dict[str, dict]:
    """Sum OpenVINO's layer times per unit: ``{"stage.unit" | "stem/head" | "other": {"ms", "exec"}}``.

    A layer is attributed by its name: an ONNX node's name, or one that ends with ``_`` + a
    node's name (the reorders OpenVINO inserts before a node); else ``other``. ``exec`` lists
    the kernels (OpenVINO's ``exec_type``) of the unit's convolutions.
    """
    out: dict[str, dict] = {}
    for layer in layers:
        parts = layer["layer"].split("_")
        unit = next((node_units["_".join(parts[i:])] for i in range(len(parts)) if "_".join(parts[i:]) in node_units),
                    "other")
        slot = out.setdefault(unit, {"ms": 0.0, "exec": []})
        slot["ms"] += layer["ms"]
        if layer["type"] == "Convolution" and layer["exec"] not in slot["exec"]:
            slot["exec"].append(layer["exec"])
    return out


def temporary_folder() -> tempfile.TemporaryDirectory:
    """The folder of a run's exports (created here, removed with everything in it when closed)."""
    return tempfile.TemporaryDirectory(prefix="sact_bench_")
