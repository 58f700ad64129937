"""One prepared check of gram-jax on an accelerator (issue 15): prints ONE JSON object.

    python benchmarks/accelerator.py            # the full check (< 8 min on one H200)
    python benchmarks/accelerator.py --small    # the same code at toy sizes on CPU (CI)
    bash benchmarks/accelerator.sh              # on the device machine (carried wheels + $OUT)

Sections, each run in its own Python process with its own time limit, so a crash, an
out-of-memory abort or a hang in one is recorded in the JSON (``status``: ``ok``, ``error``,
``timeout``, ``skipped``) and the others still run; a section's results so far are kept when
it is stopped (every section saves its results after each measurement):

- ``environment``: device kind and memory, jax / jaxlib / flax / optax / torch versions;
- ``tests``: the core tests under pytest on the device (volume, losses, metrics, distributed
  on the device count there is, models, the train step), passed / failed counts from JUnit XML;
- ``volume``: :func:`gram_jax.pairwise_volume` and the GRAM loss forward + backward against
  the bare k - 1 GEMMs (the floor; for the loss the 3 (k - 1) GEMMs of forward and backward),
  the dense (B, B, k, k) Gram + ``jnp.linalg.det`` formulation and anchored InfoNCE, at
  matmul precision HIGHEST and DEFAULT (TF32 for float32 on NVIDIA GPUs; gram-jax's own
  products are HIGHEST in both, see gram_jax/volume.py), with ratios and compile times;
- ``torch``: the authors' PyTorch formulation (benchmarks/volume_bench.py) on the same device,
  same sizes (skipped with the reason when torch is not importable);
- ``train``: the train step of configs/synthetic.py and of a base-size config
  (configs/synthetic.py:scale=pod on one device: base encoders, bf16, the largest batch among a few
  that fits): steps/s, examples/s, XLA FLOPs per step, MFU against the chip's datasheet peak
  and against a measured bf16 matmul, compile time;
- ``memory``: the largest global batch whose GRAM loss + gradient fits in one device's memory,
  for the dense Gram + det formulation, the unchunked and the chunked (``chunk_size``) loss.

``--small`` keeps every code path but uses toy sizes, a one-test pytest selection and a small
memory bound instead of the device's memory. The JSON goes to stdout (progress to stderr) and
to ``$OUT/accelerator.json`` when ``OUT`` is set (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
for _p in (str(BENCH), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

TAU = 0.07
SMOOTHING = 0.1

# Dense (sparsity-free) tensor-core peaks, FLOP/s, per JAX device_kind. Source: the NVIDIA H200
# Tensor Core GPU datasheet (and the H100 one: same SXM rates), whose figures are quoted with
# sparsity, here halved; benchmarks/README.md, "Chip peak", says the same.
PEAKS = {
    "NVIDIA H200": {"bfloat16": 989.5e12, "tf32": 494.7e12, "float32": 66.9e12},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.5e12, "tf32": 494.7e12, "float32": 66.9e12},
}
PEAK_SOURCE = "NVIDIA H200 Tensor Core GPU datasheet, dense (half the 'with sparsity' figures)"

# The core tests (issue 15): the multi-device ones need 8 devices, and the two training-loop
# tests generate a TFDS dataset (minutes): the single-device step tests stay.
CORE_TESTS = [
    "tests/test_volume.py",
    "tests/test_losses.py",
    "tests/test_metrics.py",
    "tests/test_distributed.py",
    "tests/test_models.py",
    "tests/test_training.py",
]
CORE_DESELECT = (
    "not 8_devices and not tpu_pod_base and not checkpoint_falls_back and not non_finite_loss_stops"
)
SMALL_TESTS = ["tests/test_volume.py::test_safe_sqrt_value_and_derivative"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full check and ``--small``."""

    batches: tuple[int, ...]
    ks: tuple[int, ...]
    precisions: tuple[str, ...]  # "highest", "default"
    dim: int
    repeats: int
    slow_repeats: int
    slow_single_s: float  # a slow function whose first call took longer is timed once
    tests: tuple[str, ...]
    tests_k: str | None
    train_default_overrides: tuple[str, ...]
    base_config: str
    base_overrides: tuple[str, ...]
    base_batches: tuple[int, ...]
    train_steps: int
    matmul_n: int
    memory_k: int
    memory_chunk: int
    memory_candidates: dict[str, tuple[int, ...]]
    memory_run_max: int  # larger batches are judged by the compiled memory only
    memory_bound: int | None  # bytes; None: the device's bytes_limit
    timeouts: dict[str, float]  # seconds per section
    total_s: float


FULL = Sizes(
    batches=(16384, 4096),  # the acceptance case (16384, 4) first
    ks=(4, 3),
    precisions=("highest", "default"),
    dim=512,
    repeats=10,
    slow_repeats=3,
    slow_single_s=2.0,
    tests=tuple(CORE_TESTS),
    tests_k=CORE_DESELECT,
    train_default_overrides=(),
    base_config="configs/synthetic.py:scale=pod",
    base_overrides=("mesh.fsdp=1", "mesh.params='replicated'", "loss.impl='gspmd'"),
    base_batches=(512, 384, 256, 128),
    train_steps=10,
    matmul_n=8192,
    memory_k=4,
    memory_chunk=4096,
    memory_candidates={
        "dense_det": (8192, 16384, 24576, 32768),
        "unchunked": (16384, 32768, 49152, 65536, 98304),
        "chunked": (131072, 524288, 1048576, 2097152, 4194304),
    },
    memory_run_max=131072,
    memory_bound=None,
    timeouts={
        "environment": 20,
        "tests": 120,
        "volume": 75,
        "torch": 50,
        "train": 140,
        "memory": 50,
    },
    total_s=455,
)

# --small: one transformer block per tower (compile time is what costs on CPU).
_ONE_BLOCK = tuple(f"model.modalities.{m}.overrides.depth=1" for m in ("text", "image", "audio"))
_SECTION_NAMES = ("environment", "tests", "volume", "torch", "train", "memory")

SMALL = Sizes(
    batches=(64,),
    ks=(3,),
    precisions=("highest",),
    dim=16,
    repeats=2,
    slow_repeats=1,
    slow_single_s=2.0,
    tests=tuple(SMALL_TESTS),
    tests_k=None,
    train_default_overrides=("train.batch_size=8", *_ONE_BLOCK),
    base_config="configs/synthetic.py",
    base_overrides=("model.dtype='bfloat16'", *_ONE_BLOCK),
    base_batches=(8,),
    train_steps=2,
    matmul_n=256,
    memory_k=3,
    memory_chunk=16,
    memory_candidates={"dense_det": (32, 64), "unchunked": (32, 64), "chunked": (32, 64)},
    memory_run_max=64,
    memory_bound=2**20,
    # Generous: CI's 2 cores may be shared; on a quiet machine the whole run takes ~1 min.
    timeouts={name: 240 for name in _SECTION_NAMES},
    total_s=1200,
)


def log(msg: str) -> None:
    print(f"[accelerator] {msg}", file=sys.stderr, flush=True)


class Budget:
    """A section's deadline: measurements that would start after ``stop_at`` are skipped."""

    def __init__(self, seconds: float, reserve: float = 0.15):
        self.t0 = time.perf_counter()
        self.seconds = seconds
        self.stop_at = self.t0 + seconds * (1 - reserve)

    def left(self) -> float:
        return self.stop_at - time.perf_counter()

    def ok(self) -> bool:
        return self.left() > 0


def _out_of_memory(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "OutOfMemory", "OOM"))


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:400]}"


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_memory_limit() -> int | None:
    """Bytes JAX may allocate on device 0 (its allocator's limit), None on CPU."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def section_environment(sizes: Sizes, budget: Budget, out: dict, save: Callable) -> None:
    import jax

    dev = jax.devices()[0]
    out.update(
        {
            "platform": dev.platform,
            "backend": jax.default_backend(),
            "device_kind": dev.device_kind,
            "device_count": jax.device_count(),
            # JAX falls back to the CPU, with a warning only, when its CUDA plugin fails.
            "accelerator_found": dev.platform != "cpu",
            "memory_bytes_limit": device_memory_limit(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "versions": {
                n: _version(n)
                for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy")
                + ("grain", "tensorflow-datasets", "ml-collections", "torch")
            },
            "jax_plugins": sorted(
                d.metadata["Name"]
                for d in importlib.metadata.distributions()
                if d.metadata["Name"] and d.metadata["Name"].startswith("jax-cuda")
            ),
            "peak_flops": PEAKS.get(dev.device_kind),
            "peak_source": PEAK_SOURCE if dev.device_kind in PEAKS else None,
        }
    )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {_error(e)}"


# ---------------------------------------------------------------------------------------------
# tests: pytest on the device
# ---------------------------------------------------------------------------------------------


def parse_junit(path: pathlib.Path) -> dict:
    """passed / failed / errors / skipped counts and the failing test ids of a JUnit XML."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
        elif "error" in kinds:
            counts["errors"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
            continue
        else:
            counts["passed"] += 1
            continue
        bad = next(child for child in case if child.tag in ("failure", "error"))
        failing.append({"test": name, "message": (bad.get("message") or "")[:300]})
    counts["failing"] = failing[:40]
    return counts


_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED)\b")
_TEST_ID = re.compile(r"(tests/\S+::\S+)")


def parse_verbose(text: str) -> dict:
    """Counts from ``pytest -v`` lines (when no JUnit XML was written: pytest was killed);
    a test named twice (its line and the short summary) counts once, by its first outcome."""
    key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    seen: dict[str, str] = {}
    for line in text.splitlines():
        outcome, test = _OUTCOME.search(line), _TEST_ID.search(line)
        if outcome and test:
            seen.setdefault(test.group(1), key[outcome.group(1)])
    counts: dict = {name: sum(v == name for v in seen.values()) for name in key.values()}
    counts["failing"] = [
        {"test": t, "message": ""} for t, v in seen.items() if v in ("failed", "errors")
    ]
    return counts


def section_tests(sizes: Sizes, budget: Budget, out: dict, save: Callable) -> None:
    env = dict(os.environ)
    # conftest defaults JAX_PLATFORMS to cpu: name the device's platform so tests run on it.
    env["JAX_PLATFORMS"] = os.environ.get("ACCEL_PLATFORM", "cpu")
    # Several pytest workers share one GPU: allocate on demand instead of 75 % each.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        xml = pathlib.Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-v", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *sizes.tests]  # fmt: skip
        if sizes.tests_k:
            cmd += ["-k", sizes.tests_k]
        workers = min(4, max(1, (os.cpu_count() or 1) // 4))
        try:
            import xdist  # noqa: F401

            cmd += ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else ["-n", "0"]
        except ImportError:
            pass
        out["command"] = " ".join(cmd[1:])
        out["jax_platforms"] = env["JAX_PLATFORMS"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            text, _ = proc.communicate(timeout=max(10.0, budget.left()))
        except subprocess.TimeoutExpired:
            # Ctrl-C: pytest stops, reports what ran and still writes its JUnit XML.
            out["timeout"] = True
            proc.send_signal(signal.SIGINT)
            try:
                text, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                text, _ = proc.communicate()
        out["returncode"] = proc.returncode
        out["tail"] = text[-1500:]
        out["seconds"] = time.perf_counter() - t0
        if xml.exists():
            out.update(parse_junit(xml))
        else:
            out.update(parse_verbose(text))
            out["partial"] = True
            if not out.get("timeout"):
                raise RuntimeError(f"pytest wrote no JUnit report (rc {proc.returncode})")


# ---------------------------------------------------------------------------------------------
# volume and loss (JAX)
# ---------------------------------------------------------------------------------------------


def unit_inputs(k: int, b: int, d: int, seed: int):
    """k arrays (b, d) of unit rows, random normal, made on the device."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(seed), (k, b, d), jnp.float32)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return tuple(x[i] for i in range(k))


def loss_floor_products(anchor, *others_and_cots, precision=None):
    """The 3 (k - 1) GEMMs any loss over all anchor-candidate dot products needs: forward
    ``a @ o_m.T`` and, for (B, B) cotangents ``g_m`` (one per modality, as in the real
    backward pass; equal ones would be merged by XLA), backward ``g_m @ o_m`` and
    ``g_m.T @ a``."""
    import jax.numpy as jnp

    m = len(others_and_cots) // 2
    others, cots = others_and_cots[:m], others_and_cots[m:]
    fwd = [jnp.matmul(anchor, o.T, precision=precision) for o in others]
    d_anchor = sum(jnp.matmul(g, o, precision=precision) for g, o in zip(cots, others, strict=True))
    d_others = [jnp.matmul(g.T, anchor, precision=precision) for g in cots]
    return fwd, d_anchor, d_others


def volume_functions(k: int, precision_name: str) -> dict[str, Callable]:
    """The jitted functions of one (k, precision): gram-jax's public API against baselines."""
    import jax
    import volume_bench as vb

    from gram_jax import gram_contrastive_loss, infonce_loss, pairwise_volume

    prec = jax.lax.Precision.HIGHEST if precision_name == "highest" else None
    argnums = tuple(range(k))

    def ours_loss(anchor, *others):
        return gram_contrastive_loss(anchor, list(others), TAU, label_smoothing=SMOOTHING)[0]

    def anchored_infonce(anchor, *others):
        return infonce_loss(anchor, list(others), TAU, pairs="anchored")[0]

    return {
        "ours_volume": jax.jit(pairwise_volume),
        "floor": jax.jit(functools.partial(vb.floor_products, precision=prec)),
        "dense_volume": jax.jit(functools.partial(vb.dense_volume, precision=prec)),
        "ours_loss": jax.jit(jax.value_and_grad(ours_loss, argnums=argnums)),
        "loss_floor": jax.jit(functools.partial(loss_floor_products, precision=prec)),
        "infonce_loss": jax.jit(jax.value_and_grad(anchored_infonce, argnums=argnums)),
        "dense_loss": jax.jit(
            jax.value_and_grad(functools.partial(vb.dense_loss, precision=prec), argnums=argnums)
        ),
    }


PRECISION_INVARIANT = ("ours_volume", "ours_loss", "infonce_loss")  # gram-jax: HIGHEST always
SLOW = ("dense_volume", "dense_loss")


def _time_slow(fn, args, sizes: Sizes, budget: Budget, sync: Callable | None = None) -> list:
    """One call, then more only if the first was quick and time is left (the first is then a
    warm-up, not counted; a slow first call is the measurement)."""
    from _timing import timed

    kw = {} if sync is None else {"sync": sync}
    first = timed(fn, args, **kw)
    if first >= sizes.slow_single_s:
        return [first]
    times = []
    while len(times) < sizes.slow_repeats and budget.ok():
        times.append(timed(fn, args, **kw))
    return times or [first]


def _fill_times(entry: dict, times: dict[str, list[float]]) -> None:
    """Medians, repeat counts and the ratios of one (B, k, precision) from its times."""
    from _timing import paired_ratio, ratio

    med = {n: statistics.median(t) for n, t in times.items()}
    entry["median_s"] = med
    entry["repeats"] = {n: len(t) for n, t in times.items()}
    entry["ratios"] = {
        "ours_over_floor": paired_ratio(times, "ours_volume", "floor"),
        "dense_over_ours": ratio(med.get("dense_volume"), med.get("ours_volume")),
        "loss_over_loss_floor": paired_ratio(times, "ours_loss", "loss_floor"),
        "loss_over_infonce": paired_ratio(times, "ours_loss", "infonce_loss"),
        "dense_loss_over_loss": ratio(med.get("dense_loss"), med.get("ours_loss")),
    }


def volume_case(
    b: int, k: int, sizes: Sizes, budget: Budget, limit: int | None, result: dict, save: Callable
) -> None:
    """Every function of one (B, k) at each precision, into ``result`` (saved as it fills)."""
    import jax
    import jax.numpy as jnp
    from _timing import compile_timed, interleaved, memory_bytes

    xs = unit_inputs(k, b, sizes.dim, seed=b * 10 + k)
    cots = tuple(
        jax.random.normal(jax.random.key(m), (b, b), jnp.float32) / b for m in range(k - 1)
    )
    result.update({"D": sizes.dim, "by_precision": {}})
    compiled: dict[str, object] = {}
    for prec in sizes.precisions:
        if not budget.ok():
            result["by_precision"][prec] = {"skipped": "section time budget"}
            continue
        fns = volume_functions(k, prec)

        def args_of(name):
            return (*xs, *cots) if name == "loss_floor" else xs

        comp, memory, compile_s, skipped, errors = {}, {}, {}, {}, {}
        for name, fn in fns.items():
            args = args_of(name)
            if name in PRECISION_INVARIANT and name in compiled:
                comp[name] = compiled[name]
                continue
            try:
                comp[name], compile_s[name] = compile_timed(fn, args)
            except Exception as e:  # noqa: BLE001 - recorded, the other functions still run
                (skipped if _out_of_memory(e) else errors)[name] = _error(e)
                continue
            memory[name] = memory_bytes(comp[name])
            if name in PRECISION_INVARIANT:
                compiled[name] = comp[name]
            total = (memory[name] or {}).get("total", 0)
            if name in SLOW and limit is not None and total > 0.9 * limit:
                skipped[name] = f"needs {total / 2**30:.1f} GiB > 0.9 x {limit / 2**30:.1f} GiB"
                del comp[name]

        entry = result["by_precision"][prec] = {
            "compile_s": compile_s, "memory_bytes": memory, "skipped": skipped, "errors": errors
        }  # fmt: skip

        fast = {n: (comp[n], args_of(n)) for n in comp if n not in SLOW}
        times = interleaved(fast, sizes.repeats)
        _fill_times(entry, times)
        save()
        for name in SLOW:
            if name in comp:
                if not budget.ok():
                    skipped[name] = "section time budget"
                    continue
                try:
                    times[name] = _time_slow(comp[name], args_of(name), sizes, budget)
                except Exception as e:  # noqa: BLE001
                    (skipped if _out_of_memory(e) else errors)[name] = _error(e)
                _fill_times(entry, times)
                save()


def section_volume(sizes: Sizes, budget: Budget, out: dict, save: Callable) -> None:
    import jax

    out["settings"] = {
        "dtype": "float32",
        "temperature": TAU,
        "label_smoothing": SMOOTHING,
        "repeats": sizes.repeats,
        "gram_jax_precision": "HIGHEST (fixed by gram_jax.volume)",
        "default_precision": "DEFAULT: XLA's choice for float32 (TF32 on NVIDIA tensor cores)",
        "timing": "median of interleaved synchronised single calls after a warm-up call",
    }
    out["device_kind"] = jax.devices()[0].device_kind
    limit = device_memory_limit()
    out["cases"] = []
    for b in sizes.batches:
        for k in sizes.ks:
            if not budget.ok():
                out["cases"].append({"B": b, "k": k, "skipped": "section time budget"})
                continue
            t0 = time.perf_counter()
            case: dict = {"B": b, "k": k}
            out["cases"].append(case)
            try:
                volume_case(b, k, sizes, budget, limit, case, save)
            except Exception as e:  # noqa: BLE001 - one case failing keeps the others
                case["error"] = _error(e)
            case["seconds"] = time.perf_counter() - t0
            save()
            log(f"volume B={b} k={k}: {case['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------
# torch: the authors' formulation on the same device
# ---------------------------------------------------------------------------------------------


def section_torch(sizes: Sizes, budget: Budget, out: dict, save: Callable) -> None:
    import volume_bench as vb

    fns = vb.torch_functions()
    if fns is None:
        out["skipped"] = "torch is not importable"
        return
    torch, t_volume, t_loss = fns
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out.update(
        {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "precision": {"highest": "allow_tf32=False", "default": "allow_tf32=True (TF32)"},
            "cases": [],
        }
    )

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    for b in sizes.batches:
        for k in sizes.ks:
            case: dict = {"B": b, "k": k, "median_s": {}, "repeats": {}, "errors": {}}
            out["cases"].append(case)
            g = torch.Generator(device=device).manual_seed(b * 10 + k)
            xs = torch.randn(k, b, sizes.dim, generator=g, device=device)
            xs = tuple(xs / xs.norm(dim=-1, keepdim=True))
            for prec in sizes.precisions:
                torch.backends.cuda.matmul.allow_tf32 = prec == "default"
                for name, fn in (("torch_volume", t_volume), ("torch_loss", t_loss)):
                    key = f"{name}/{prec}"
                    if not budget.ok():
                        case["errors"][key] = "section time budget"
                        continue
                    try:
                        times = _time_slow(fn, xs, sizes, budget, sync)
                        case["median_s"][key] = statistics.median(times)
                        case["repeats"][key] = len(times)
                    except Exception as e:  # noqa: BLE001 - torch OOM etc.: recorded
                        case["errors"][key] = _error(e)
                    if cuda:
                        torch.cuda.empty_cache()
                    save()
            del xs
            log(f"torch B={b} k={k}")


# ---------------------------------------------------------------------------------------------
# train step
# ---------------------------------------------------------------------------------------------


def _trainer(config_path: str, overrides: list[str]):
    """config -> (config, trainer, state, batch): the trainer's public construction path."""
    from train_bench import _random_batch

    from gram_jax.training import sharding, step, tasks
    from gram_jax.training.config import load_config

    config = load_config(str(ROOT / config_path), overrides)
    mesh = sharding.make_mesh(config)
    trainer = step.make_trainer(config, mesh, tasks.make_task(config, mesh))
    state = trainer.init()
    batch = _random_batch(config, trainer.batch_sharding)
    return config, trainer, state, batch


def train_bench_one(
    config_path: str, overrides: list[str], sizes: Sizes, limit: int | None, peak: float | None
) -> dict:
    """Compile the step, check it fits, time ``train_steps`` steps; FLOPs from XLA."""
    import jax
    from _timing import compile_timed, cost_flops, memory_bytes, timed

    t0 = time.perf_counter()
    config, trainer, state, batch = _trainer(config_path, overrides)
    res: dict = {
        "config": config_path,
        "overrides": list(overrides),
        "global_batch": int(config.train.batch_size),
        "dtype": str(config.model.dtype),
        "devices": jax.device_count(),
        "build_s": time.perf_counter() - t0,
    }
    compiled, res["compile"] = compile_timed(trainer.step, (state, batch))
    res["memory_bytes"] = memory_bytes(compiled)
    total = (res["memory_bytes"] or {}).get("total", 0)
    if limit is not None and total > limit:
        res["fits"] = False
        res["reason"] = f"needs {total / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB"
        return res
    holder = {"state": state}

    def one():
        holder["state"], m = compiled(holder["state"], batch)
        return m["loss"]

    res["first_step_s"] = timed(one, ())
    times = [timed(one, ()) for _ in range(sizes.train_steps)]
    step_s = statistics.median(times)
    flops = cost_flops(compiled)
    res.update(
        {
            "fits": True,
            "step_s": step_s,
            "steps_per_s": 1.0 / step_s,
            "examples_per_s": res["global_batch"] / step_s,
            "xla_flops_per_step": flops,
            "achieved_flops_per_s": None if flops is None else flops / step_s,
            "mfu": None if flops is None or peak is None else flops / step_s / peak,
            "loss_last": float(jax.device_get(one())),
        }
    )
    return res


def measured_matmul_flops(n: int) -> dict:
    """bf16 (n, n) x (n, n) products on the device: the practical ceiling of matrix work."""
    import jax
    import jax.numpy as jnp
    from _timing import compile_timed, median_time

    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
    compiled, _ = compile_timed(jax.jit(jnp.matmul), (a, b))
    jax.block_until_ready(compiled(a, b))
    s = median_time(lambda: compiled(a, b), 10)
    return {"n": n, "dtype": "bfloat16", "seconds": s, "flops_per_s": 2 * n**3 / s}


def section_train(sizes: Sizes, budget: Budget, out: dict, save: Callable) -> None:
    import jax

    kind = jax.devices()[0].device_kind
    peaks = PEAKS.get(kind)
    out["peak"] = {
        "device_kind": kind,
        "flops_per_s": peaks,
        "source": PEAK_SOURCE if peaks else f"no datasheet peak known for {kind!r}",
    }
    out["matmul"] = measured_matmul_flops(sizes.matmul_n)
    save()
    limit = device_memory_limit()

    def mfus(res: dict) -> None:
        rate = res.get("achieved_flops_per_s")
        if rate is None:
            return
        res["mfu_vs_measured_bf16_matmul"] = rate / out["matmul"]["flops_per_s"]

    # default config: float32 encoders, whose DEFAULT-precision matmuls run as TF32 on GPUs.
    try:
        res = train_bench_one(
            "configs/synthetic.py", list(sizes.train_default_overrides), sizes, None,
            peaks and peaks["tf32"],
        )  # fmt: skip
        res["mfu_peak"] = "tf32"
        mfus(res)
        out["default"] = res
    except Exception as e:  # noqa: BLE001
        out["default"] = {"error": _error(e), "traceback": traceback.format_exc()[-2000:]}
    save()
    log("train: default config done")

    tried = []
    for b in sizes.base_batches:  # largest first: the first that fits wins
        if not budget.ok():
            tried.append({"global_batch": b, "skipped": "section time budget"})
            break
        overrides = [*sizes.base_overrides, f"train.batch_size={b}"]
        oom = False
        try:
            peak = peaks and peaks["bfloat16"]
            res = train_bench_one(sizes.base_config, overrides, sizes, limit, peak)
        except Exception as e:  # noqa: BLE001
            res = {"global_batch": b, "fits": False, "error": _error(e)}
            oom = _out_of_memory(e)
            if not oom:
                res["traceback"] = traceback.format_exc()[-2000:]
        tried.append(res)
        out["base_tried"] = [
            {k: r.get(k) for k in ("global_batch", "fits", "reason", "error")} for r in tried
        ]
        save()
        log(f"train: base batch {b}: fits={res.get('fits')}")
        if res.get("fits"):
            res["mfu_peak"] = "bfloat16"
            mfus(res)
            out["base"] = res
            break
        if "error" in res and not oom:
            break  # not a memory problem: a smaller batch would fail the same way
    out.setdefault("base", {"error": "no batch size tried fits", "tried": tried})


# ---------------------------------------------------------------------------------------------
# memory: the largest batch whose loss + gradient fits
# ---------------------------------------------------------------------------------------------


def memory_loss_fn(impl: str, k: int, chunk: int):
    """jit(value_and_grad) of the GRAM loss w.r.t. its k inputs for one implementation."""
    import jax
    import volume_bench as vb

    from gram_jax import gram_contrastive_loss

    if impl == "dense_det":
        loss = vb.dense_loss
    else:
        chunk_size = chunk if impl == "chunked" else None

        def loss(anchor, *others):
            return gram_contrastive_loss(
                anchor, list(others), TAU, label_smoothing=SMOOTHING, chunk_size=chunk_size
            )[0]

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(k))))


def largest_fitting_batch(
    impl: str, sizes: Sizes, limit: int, budget: Budget, save: Callable, rows: list
) -> dict:
    """Climb the candidates while the compiled memory fits ``limit``, then run the largest
    predicted fit once (catching RESOURCE_EXHAUSTED), stepping down if it does not run."""
    import jax
    import jax.numpy as jnp
    from _timing import compile_timed, memory_bytes, timed

    k, d = sizes.memory_k, sizes.dim
    fn = memory_loss_fn(impl, k, sizes.memory_chunk)
    fits: list[tuple[int, object]] = []
    first_fail = None
    for b in sizes.memory_candidates[impl]:
        if not budget.ok():
            rows.append({"B": b, "skipped": "section time budget"})
            break
        spec = [jax.ShapeDtypeStruct((b, d), jnp.float32)] * k
        row: dict = {"B": b}
        try:
            compiled, row["compile"] = compile_timed(fn, spec)
            mem = memory_bytes(compiled)
            row["memory_bytes"] = mem
            row["fits_predicted"] = mem is None or mem["total"] <= limit
        except Exception as e:  # noqa: BLE001 - XLA may refuse at compile time
            if not _out_of_memory(e):
                raise
            row["fits_predicted"], row["error"] = False, _error(e)
        rows.append(row)
        save()
        if not row["fits_predicted"]:
            first_fail = b
            break
        fits.append((b, compiled))
    confirmed = None
    while fits and budget.ok():
        b, compiled = fits[-1]
        if b > sizes.memory_run_max:
            break
        row = next(r for r in rows if r.get("B") == b)
        try:
            xs = unit_inputs(k, b, d, seed=b)
            row["run_s"] = timed(compiled, xs)
            row["ran"] = True
            confirmed = b
            del xs
            break
        except Exception as e:  # noqa: BLE001
            if not _out_of_memory(e):
                raise
            row["ran"], row["error"] = False, _error(e)
            first_fail = b
            fits.pop()
    predicted = fits[-1][0] if fits else None
    return {
        "largest_predicted": predicted,
        "largest_confirmed_by_run": confirmed,
        "first_failing": first_fail,
        "searched_up_to": sizes.memory_candidates[impl][-1],
        "bounded": first_fail is None,
    }


def section_memory(sizes: Sizes, budget: Budget, out: dict, save: Callable) -> None:
    limit = sizes.memory_bound or device_memory_limit()
    if limit is None:
        raise RuntimeError("no device memory limit known and no bound given")
    out.update(
        {
            "limit_bytes": limit,
            "limit_source": "--small bound" if sizes.memory_bound else "device bytes_limit",
            "k": sizes.memory_k,
            "D": sizes.dim,
            "chunk_size": sizes.memory_chunk,
            "fits": "compiled memory_analysis() arguments + outputs + temporaries <= limit",
            "impls": {},
        }
    )
    for impl in sizes.memory_candidates:
        rows: list = []
        out["impls"][impl] = {"rows": rows}
        try:
            out["impls"][impl].update(largest_fitting_batch(impl, sizes, limit, budget, save, rows))
        except Exception as e:  # noqa: BLE001
            out["impls"][impl]["error"] = _error(e)
        save()
        log(f"memory {impl}: {out['impls'][impl].get('largest_predicted')}")


SECTIONS: dict[str, Callable] = {
    "environment": section_environment,
    "tests": section_tests,
    "volume": section_volume,
    "torch": section_torch,
    "train": section_train,
    "memory": section_memory,
}
# The memory search and the base batch may use nearly the whole device (JAX's default pool
# is 75 % of it).
# The torch section imports gram_jax (through volume_bench): JAX must not take the GPU's memory.
SECTION_ENV = {
    "memory": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"},
    "train": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"},
    "torch": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def run_child(name: str, small: bool, result_path: str, seconds: float) -> None:
    """Body of a section's own process: run it, saving ``out`` after every measurement."""
    sizes = SMALL if small else FULL
    out: dict = {}
    path = pathlib.Path(result_path)

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=str))
        tmp.replace(path)

    budget = Budget(seconds)
    try:
        SECTIONS[name](sizes, budget, out, save)
        out["_status"] = "skipped" if set(out) == {"skipped"} else "ok"
    except Exception as e:  # noqa: BLE001 - reported in the JSON, exit code 1
        out["_status"] = "error"
        out["_error"] = _error(e)
        out["_traceback"] = traceback.format_exc()[-3000:]
    save()
    sys.exit(0 if out["_status"] != "error" else 1)


def run_section(name: str, small: bool, seconds: float, platform_name: str | None) -> dict:
    """Run one section in a subprocess with a hard timeout; never raises."""
    env = dict(os.environ, **SECTION_ENV.get(name, {}))
    if platform_name:
        env["ACCEL_PLATFORM"] = platform_name
    if small:
        env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", name]
        cmd += ["--result", str(path), "--seconds", str(seconds)] + (["--small"] * small)
        t0 = time.perf_counter()
        status, detail = None, {}
        try:
            proc = subprocess.run(
                cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 15
            )
            if proc.returncode not in (0, 1):
                status = "error"
                detail["error"] = f"section process exited with {proc.returncode}"
            detail["stderr_tail"] = proc.stderr[-1500:]
        except subprocess.TimeoutExpired as e:
            status = "timeout"
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
            detail["stderr_tail"] = (err or "")[-1500:]
        result = json.loads(path.read_text()) if path.exists() else {}
    status = status or result.pop("_status", "error")
    result.pop("_status", None)
    for key in ("_error", "_traceback"):
        if key in result:
            detail[key.lstrip("_")] = result.pop(key)
    if status == "ok":
        detail.pop("stderr_tail", None)
    return {"status": status, "seconds": time.perf_counter() - t0, "result": result, **detail}


def _ratio(x: float | None, y: float | None) -> float | None:
    # The driver does not import _timing (nor JAX): it must not touch the device.
    return None if x is None or not y else x / y


def summary(sections: dict) -> dict:
    """The acceptance numbers of issue 15, read off the sections (None where not measured)."""
    vol = sections.get("volume", {}).get("result", {})
    tor = sections.get("torch", {}).get("result", {})
    table, accept = [], {}
    for case in vol.get("cases", []):
        for prec, r in case.get("by_precision", {}).items():
            if "median_s" not in r:
                continue
            med = r["median_s"]
            tcase = next(
                (c for c in tor.get("cases", []) if (c["B"], c["k"]) == (case["B"], case["k"])),
                {},
            )
            tmed = tcase.get("median_s", {})
            tv, tl = tmed.get(f"torch_volume/{prec}"), tmed.get(f"torch_loss/{prec}")
            row = {
                "B": case["B"],
                "k": case["k"],
                "precision": prec,
                **{f"{n}_ms": None if n not in med else 1e3 * med[n] for n in med},
                "torch_volume_ms": None if tv is None else 1e3 * tv,
                "torch_loss_ms": None if tl is None else 1e3 * tl,
                **r["ratios"],
                "torch_over_ours": _ratio(tv, med.get("ours_volume")),
                "torch_loss_over_loss": _ratio(tl, med.get("ours_loss")),
            }
            table.append(row)
            if (case["B"], case["k"], prec) == (16384, 4, "highest"):
                accept["ours_over_floor_B16384_k4"] = {
                    "value": row["ours_over_floor"], "target": "<= 1.3"
                }  # fmt: skip
                accept["torch_over_ours_B16384_k4"] = {
                    "value": row["torch_over_ours"], "target": ">= 10"
                }  # fmt: skip
    base = sections.get("train", {}).get("result", {}).get("base", {})
    accept["base_train_mfu"] = {"value": base.get("mfu"), "target": ">= 0.40"}
    tests = sections.get("tests", {}).get("result", {})
    accept["core_tests"] = {
        "passed": tests.get("passed"),
        "failed": tests.get("failed"),
        "errors": tests.get("errors"),
    }
    return {"volume_table": table, "acceptance": accept}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="toy sizes on CPU (CI)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for accelerator.json")
    p.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_child(args.child, args.small, args.result, args.seconds)
    sizes = SMALL if args.small else FULL
    t0 = time.perf_counter()
    sections: dict = {}
    platform_name = None
    for name in args.sections:
        left = sizes.total_s - (time.perf_counter() - t0)
        seconds = min(sizes.timeouts[name], left)
        if seconds < 10:
            sections[name] = {"status": "skipped", "reason": "total time budget", "result": {}}
            continue
        log(f"section {name} (<= {seconds:.0f} s)")
        sections[name] = run_section(name, args.small, seconds, platform_name)
        log(f"section {name}: {sections[name]['status']} in {sections[name]['seconds']:.1f} s")
        if name == "environment":
            platform_name = sections[name]["result"].get("platform")
    report = {
        "benchmark": "gram-jax accelerator check (issue 15)",
        "mode": "small" if args.small else "full",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": time.perf_counter() - t0,
        "sections": sections,
        "summary": summary(sections),
    }
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.out) / "accelerator.json").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
