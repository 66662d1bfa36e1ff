"""Model zoo: forward+backward throughput (samples/s) and peak memory, against the public SwinLSTM.

    python benchmarks/bench_models.py [--device auto|cpu|cuda|cpu,cuda] [--models convlstm,swinlstm,...]
        [--size 64] [--batch N] [--in-len 10] [--out-len 10] [--warmup N] [--steps N] [--threads N]
        [--reference /work/ref/SwinLSTM --reference-path /work/ref/site] [--ref-config auto|mnist|mnist-small]
        [--memory-reference /work/ref/datswinlstm_memory_fork] [--memory-config auto|reference|cpu-small]
        [--memory-in-len 8] [--variants fp32,bf16,fp16,compile-bf16] [--no-compile] [--repeats 1] [--json out.json]

What one measurement is: ``--warmup`` untimed then ``--steps`` timed training steps, each
``zero_grad(set_to_none) -> forward of the whole sequence -> MSE loss -> backward`` (no optimizer
step), on random 0-1 frames (B, T_in, C, H, W) -> (B, T_out, C, H, W), model in train mode.
samples/s = batch / median step time. Each measurement runs in a fresh child process, so peak
memory is per model: CPU = peak RSS of the child (``ru_maxrss``) and its rise over the RSS just
before the first step (activations + gradients + allocator slack); CUDA = max_memory_allocated
over the timed steps. On CUDA, synchronize brackets each timed step (never inside it).

Cases, in order:
  * our models (``convlstm``, ``swinlstm``, ``datswinlstm_memory``) at the STATED config: the
    ``model`` section of --params (params.yaml), one ``name`` at a time;
  * ``swinlstm`` at the REFERENCE config and the public SwinLSTM-D (Tang et al., ICCV 2023,
    github.com/SongTang-x/SwinLSTM, ``SwinLSTM_D.py``) at the same config, same input size,
    batch, T_in and T_out. The reference is a one-step cell model; it is driven exactly as its
    ``functions.model_forward_multi_layer`` does (frames 0..T_in-2 fed, then T_out steps fed back
    from the last input / own predictions = T_in + T_out - 1 steps, as many as ours), with its
    training loss (MSE over all T_in + T_out - 1 outputs against frames 1..T_in and the targets).
    The headline is ``our SwinLSTM-D time / reference time`` per variant (target <= 1.0 on CPU).

  * ``datswinlstm_memory`` at a MEMORY config (``--memory-config``) and the public
    DATSwinLSTM-D-Memory (``models/DATSwinLSTM_D_Memory.py`` of github.com/lankerr/datswinlstm_memory,
    the maintained fork of zzcd1/datswinlstm_memory, passed by ``--memory-reference DIR``) at the
    same config, shapes and batch, both a PHASE-1 training step (the long clip through the context
    encoder, bank trainable): the reference as its ``Memory.forward(inputs, memory_x, phase=1)``
    (T_in - 1 + T_out outputs, MSE against the next frames), ours ``model(x, T_out, memory_x=long,
    phase=1)``. Headline: ``our memory model time / reference time`` and the same for peak memory.
    The original zzcd1 code cannot run here: its MotionSqueeze imports ``spatial_correlation_sampler``,
    whose only build (0.5.0) is a CUDA extension (``CUDA_HOME`` is required to even install it); the
    fork falls back to a pure-PyTorch correlation when that import fails, and makes the hard-coded
    384 x 384 / embed-128 sizes dynamic, so it runs on CPU and at smaller sizes. Its temporal
    convolutions have no padding: the inputs need T_in >= 7 (``--memory-in-len``, default 8).

Memory presets (``--memory-config``; the reference's order of ``depths_up``):
  reference    384 x 384, patch 4, embed 128, window 4, depths_down [3, 2], depths_up [2, 3],
               heads [4, 8], memory 100 x 512  (presets/reference_sevir.yaml; the CUDA default)
  cpu-small    the same at 128 x 128 with embed 32 and memory 100 x 128 (the CPU default)

Reference presets (the public Moving-MNIST defaults of ``configs.py``; the public code only
supports patch_size 2, its ConvTranspose head upsamples by exactly 2):
  mnist        patch 2, embed 128, window 4, heads [4, 8], depths_down [2, 6], depths_up [6, 2]
  mnist-small  the same with embed 32 (the CPU default: mnist costs ~6x more on CPU)
``depths_up`` is given in the reference's order (indexed by resolution level, shallow first; it
runs them deepest first); ours lists up stages in execution order (deepest first), so our equal
config uses ``depths_up`` reversed: both run the same blocks at each resolution.

Variants: CPU runs ``fp32`` (add ``bf16`` with --variants); CUDA runs ``fp32``, ``bf16`` and
``fp16`` autocast (fp16 with a GradScaler, as the reference's own train script) and
``compile-bf16`` (torch.compile of the model, bf16 autocast; the reference's cell module is
compiled, its driving loop stays Python). Speedups are vs fp32 eager of the same case.

The reference is never part of this repo: fetch it outside (e.g. /work/ref/SwinLSTM) and pass
--reference; its imports (einops, timm.models.layers) come from the environment or from
--reference-path directories, appended to sys.path. Without --reference, or when it cannot be
imported, the comparison is skipped with a printed reason. Nothing is installed by this script.
No asserts: it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OURS = ("convlstm", "swinlstm", "datswinlstm_memory")
MODEL_CHOICES = (*OURS, "reference", "memory-reference")
CUDA_VARIANTS = ("fp32", "bf16", "fp16", "compile-bf16")
ALL_VARIANTS = ("fp32", "bf16", "fp16", "compile-fp32", "compile-bf16")
REF_PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(patch_size=2, embed_dim=128, window_size=4, heads=[4, 8], depths_down=[2, 6], depths_up=[6, 2]),
    "mnist-small": dict(patch_size=2, embed_dim=32, window_size=4, heads=[4, 8], depths_down=[2, 6], depths_up=[6, 2]),
}
MEMORY_PRESETS: dict[str, dict[str, Any]] = {  # depths_up in the reference's order (shallow first)
    "reference": dict(size=384, patch_size=4, embed_dim=128, window_size=4, heads=[4, 8], depths_down=[3, 2],
                      depths_up=[2, 3], slots=100, memory_dim=512),
    "cpu-small": dict(size=128, patch_size=4, embed_dim=32, window_size=4, heads=[4, 8], depths_down=[3, 2],
                      depths_up=[2, 3], slots=100, memory_dim=128),
}  # fmt: skip
DEVICE_DEFAULTS = {  # batch, warmup, steps, reference preset, memory preset
    "cpu": dict(batch=2, warmup=1, steps=3, ref_config="mnist-small", memory_config="cpu-small"),
    "cuda": dict(batch=8, warmup=3, steps=10, ref_config="mnist", memory_config="reference"),
}
RESULT_TAG = "BENCH_RESULT "
SUMMARY_KEYS = (
    "params",
    "median_s",
    "median_cpu_s",
    "samples_per_s",
    "peak_rss_mib",
    "peak_rss_rise_mib",
    "peak_cuda_mib",
    "error",
)


# =============================================================================== child process
def _load_reference(ref_dir: str, extra_paths: list[str]) -> Any:
    """The public SwinLSTM_D module, loaded from its file (never copied into this repo)."""
    for p in extra_paths:
        if p not in sys.path:
            sys.path.append(p)  # after site-packages: a real einops / timm wins over a stand-in
    path = Path(ref_dir) / "SwinLSTM_D.py"
    spec = importlib.util.spec_from_file_location("swinlstm_reference_D", path)
    module = importlib.util.module_from_spec(spec)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its torch.meshgrid without indexing=
        spec.loader.exec_module(module)
    return module


def _load_memory_reference(ref_dir: str, extra_paths: list[str]) -> Any:
    """The public DATSwinLSTM_D_Memory module, imported from its checkout's models/ as a package of its own."""
    import types

    for p in extra_paths:
        if p not in sys.path:
            sys.path.append(p)
    package = types.ModuleType("datswinlstm_memory_reference")
    package.__path__ = [str(Path(ref_dir) / "models")]  # its relative imports: .MotionSqueeze, .dat_blocks
    sys.modules[package.__name__] = package
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"{package.__name__}.DATSwinLSTM_D_Memory")


def memory_equal_config(preset: dict[str, Any]) -> dict[str, Any]:
    """Our ``model`` section equal to a MEMORY_PRESETS entry (the reference's DAT groups, MotionSqueeze 7 x 7)."""
    return dict(
        name="datswinlstm_memory", patch_size=preset["patch_size"], embed_dim=preset["embed_dim"],
        window_size=preset["window_size"], heads=preset["heads"], depths_down=preset["depths_down"],
        depths_up=list(reversed(preset["depths_up"])), mlp_ratio=4.0, dropout=0.0, drop_path=0.1,
        skips=False, head="sigmoid", pos="relative", dat={"groups": 4, "sampling": "window", "offset_range": 1.0},
        memory={"slots": preset["slots"], "dim": preset["memory_dim"], "heads": 8, "corr_radius": 3,
                "encoders": "separate", "read": "attention", "fusion": "reference"},
    )  # fmt: skip


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import psutil
    import torch
    import torch.nn.functional as F

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    variant = spec["variant"]
    B, T_in, T_out, S, C = spec["batch"], spec["in_len"], spec["out_len"], spec["size"], spec["in_channels"]

    if spec["kind"] == "reference":
        ref = _load_reference(spec["reference"], spec["reference_path"])
        rc = spec["ref_cfg"]
        # exactly as the public train.py builds SwinLSTM-D (drop/attn_drop 0, drop_path_rate 0.1 by default)
        model = ref.SwinLSTM(
            img_size=S,
            patch_size=rc["patch_size"],
            in_chans=C,
            embed_dim=rc["embed_dim"],
            depths_downsample=rc["depths_down"],
            depths_upsample=rc["depths_up"],
            num_heads=rc["heads"],
            window_size=rc["window_size"],
        )
    elif spec["kind"] == "memory_reference":
        from argparse import Namespace

        ref = _load_memory_reference(spec["memory_reference"], spec["reference_path"])
        mc = spec["mem_cfg"]
        ref_args = Namespace(
            input_img_size=S, patch_size=mc["patch_size"], input_channels=C, embed_dim=mc["embed_dim"],
            depths_down=mc["depths_down"], depths_up=mc["depths_up"], heads_number=mc["heads"],
            window_size=mc["window_size"], out_len=T_out,
        )  # fmt: skip
        model = ref.Memory(
            ref_args, memory_channel_size=mc["memory_dim"], memory_slot_size=mc["slots"],
            short_len=T_in, long_len=T_in + T_out,
        )  # fmt: skip
    else:
        sys.path.insert(0, str(ROOT))
        from models import build
        from models.config import ModelConfig

        model = build(ModelConfig.model_validate(spec["model_cfg"]))
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    run = torch.compile(model) if variant.startswith("compile") else model

    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, T_in, C, S, S, generator=g).to(device)
    y = torch.rand(B, T_out, C, S, S, generator=g).to(device)
    phase = spec.get("phase", 2)

    if spec["kind"] == "reference":
        n_layers = len(spec["ref_cfg"]["depths_down"])
        target = torch.cat((x[:, 1:], y), dim=1)  # its training target: every step's next frame

        def forward() -> torch.Tensor:  # functions.model_forward_multi_layer, verbatim in effect
            states_down, states_up = [None] * n_layers, [None] * n_layers
            outputs = []
            last_input = x[:, -1]
            for i in range(T_in - 1):
                output, states_down, states_up = run(x[:, i], states_down, states_up)
                outputs.append(output)
            for _ in range(T_out):
                output, states_down, states_up = run(last_input, states_down, states_up)
                outputs.append(output)
                last_input = output
            return torch.stack(outputs).permute(1, 0, 2, 3, 4).contiguous()

    elif spec["kind"] == "memory_reference":
        target = torch.cat((x[:, 1:], y), dim=1)  # its outputs: every step's next frame
        long_clip = torch.cat((x, y), dim=1)

        def forward() -> torch.Tensor:
            return torch.stack(run(x, memory_x=long_clip, phase=phase), dim=1)

    else:
        target = y
        long_clip = torch.cat((x, y), dim=1)

        def forward() -> torch.Tensor:
            if phase == 1:
                return run(x, T_out, memory_x=long_clip, phase=1)
            return run(x, T_out)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant.split("-")[-1])
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    def train_step() -> None:
        for p in model.parameters():
            p.grad = None
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            out = forward()
            loss = F.mse_loss(out.float(), target)
        (scaler.scale(loss) if scaler else loss).backward()

    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    times: list[float] = []
    warm_times: list[float] = []
    cpu_times: list[float] = []  # process CPU time per timed step: steadier than wall time on a busy machine
    for i in range(spec["warmup"] + spec["steps"]):
        if cuda and i == spec["warmup"]:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step()
        if cuda:
            torch.cuda.synchronize()
        (warm_times if i < spec["warmup"] else times).append(time.perf_counter() - t0)
        if i >= spec["warmup"]:
            cpu_times.append(time.process_time() - c0)

    med = statistics.median(times)
    out: dict[str, Any] = dict(
        params=n_params,
        step_s=times,
        warmup_s=warm_times,
        median_s=med,
        samples_per_s=B / med,
        cpu_step_s=cpu_times,
        median_cpu_s=statistics.median(cpu_times),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_rss_rise_mib=max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20,
        threads=torch.get_num_threads(),
    )
    if cuda:
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


# ============================================================================= parent process
def _stated_config(params: Path) -> tuple[Any, str]:
    """The ``model`` section of params.yaml, validated; and where it came from."""
    sys.path.insert(0, str(ROOT))
    try:
        from pipeline.config import load

        return load(params).model, f"{params} via pipeline.config.load"
    except Exception as e:  # pipeline not importable yet, or the rest of params.yaml does not validate
        import yaml

        from models.config import ModelConfig

        section = (yaml.safe_load(params.read_text()) or {}).get("model", {}) if params.exists() else {}
        why = f"pipeline.config.load failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return ModelConfig.model_validate(section), f"{params} 'model' section read directly ({why})"


def _fit(size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``size``."""
    return -(-size // multiple) * multiple


def _with(cfg: Any, **update: Any) -> Any:
    """A validated copy of a (frozen) ModelConfig with some keys changed."""
    return type(cfg).model_validate({**cfg.model_dump(), **update})


def _run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s (raise --timeout or lower --size/--batch/--steps)")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()]
    return dict(error=f"child exited {p.returncode}: {tail[-1] if tail else 'no output'}")


def _mib(r: dict[str, Any], device: str) -> str:
    if "error" in r:
        return "-"
    if device == "cuda":
        return f"{r['peak_cuda_mib']:.0f}"
    return f"{r['peak_rss_rise_mib']:.0f} / {r['peak_rss_mib']:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help="auto (cpu, plus cuda when available) | cpu | cuda | cpu,cuda")
    ap.add_argument("--models", default=",".join(MODEL_CHOICES), help=f"comma list of {', '.join(MODEL_CHOICES)}")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="stated config: its model section")
    ap.add_argument("--size", type=int, default=64, help="frame side H = W in pixels (default 64)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: cpu 2, cuda 8)")
    ap.add_argument("--in-len", type=int, default=10, help="input frames T_in (default 10, Moving-MNIST)")
    ap.add_argument("--out-len", type=int, default=10, help="predicted frames T_out (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per measurement (default: cpu 1, cuda 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: cpu 3, cuda 10)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each child (0: torch default)")
    ap.add_argument("--phase", type=int, choices=(1, 2), default=2, help="datswinlstm_memory phase (default 2)")
    ap.add_argument(
        "--variants",
        default=None,
        help=f"comma list of {', '.join(ALL_VARIANTS)} (default: cpu fp32, cuda {','.join(CUDA_VARIANTS)})",
    )
    ap.add_argument("--no-compile", action="store_true", help="drop the torch.compile variants")
    ap.add_argument("--reference", default=None, help="folder of the public SwinLSTM checkout (holds SwinLSTM_D.py)")
    ap.add_argument(
        "--reference-path",
        action="append",
        default=[],
        help="extra import folder for the reference's einops/timm (repeatable; appended to sys.path)",
    )
    ap.add_argument(
        "--ref-config",
        default="auto",
        choices=("auto", *REF_PRESETS),
        help="equal-config preset (default: cpu mnist-small, cuda mnist)",
    )
    ap.add_argument(
        "--memory-reference",
        default=None,
        help="checkout of the public DATSwinLSTM-D-Memory (lankerr/datswinlstm_memory: holds models/)",
    )
    ap.add_argument(
        "--memory-config",
        default="auto",
        choices=("auto", *MEMORY_PRESETS),
        help="memory-model comparison preset (default: cpu cpu-small, cuda reference)",
    )
    ap.add_argument("--memory-in-len", type=int, default=8, help="T_in of the memory comparison (>= 7, default 8)")
    ap.add_argument("--memory-out-len", type=int, default=4, help="T_out of the memory comparison (default 4)")
    ap.add_argument("--repeats", type=int, default=1, help="run the ours/reference pair this many times, alternating")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child measurement")
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        try:
            res = _child(json.loads(args.child))
        except Exception as e:  # reported as a row, the run goes on
            res = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    import torch

    has_cuda = torch.cuda.is_available()
    if args.device == "auto":
        devices = ["cpu", "cuda"] if has_cuda else ["cpu"]
    else:
        devices = [d.strip() for d in args.device.split(",") if d.strip()]
    for d in devices:
        if d not in DEVICE_DEFAULTS:
            ap.error(f"--device: unknown device {d!r}")
        if d == "cuda" and not has_cuda:
            ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in wanted:
        if m not in MODEL_CHOICES:
            ap.error(f"--models: unknown {m!r}; choose from {', '.join(MODEL_CHOICES)}")

    stated, source = _stated_config(args.params)
    ncpu = os.cpu_count() or 1
    load1 = os.getloadavg()[0]
    print(
        f"torch {torch.__version__} | python {platform.python_version()} | {platform.machine()} | "
        f"{ncpu} CPU cores, torch threads {args.threads or torch.get_num_threads()} | "
        f"CUDA: {f'{torch.cuda.device_count()} device(s)' if has_cuda else 'not available'}"
    )
    print(f"load average (1 min) at start: {load1:.1f} on {ncpu} cores")
    if load1 > 0.75 * ncpu:
        print(
            "  WARNING: the machine is busy: multi-threaded CPU steps get oversubscribed and can stall (10x slower,"
            " varying step to step); compare within this run only, or use --threads 1 --repeats 3"
        )
    print(f"stated config: {source}")
    print(f"  {stated.model_dump(exclude={'name'})}")
    print(
        f"shapes: (B, T_in={args.in_len}, C={stated.in_channels}, {args.size}x{args.size}) -> "
        f"T_out={args.out_len}; datswinlstm_memory phase {args.phase}"
    )

    ref_reason = None
    if "reference" in wanted:
        if not args.reference:
            ref_reason = "no --reference given"
        elif not (Path(args.reference) / "SwinLSTM_D.py").is_file():
            ref_reason = f"{args.reference}/SwinLSTM_D.py not found"
        else:
            probe = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from benchmarks.bench_models import _load_reference as f; "
                    "f(sys.argv[1], sys.argv[2:])",
                    args.reference,
                    *args.reference_path,
                ],
                capture_output=True,
                text=True,
                cwd=str(ROOT),
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                },
            )
            if probe.returncode:
                last = [ln for ln in probe.stderr.strip().splitlines() if ln.strip()]
                ref_reason = (
                    f"cannot import {args.reference}/SwinLSTM_D.py: {last[-1] if last else '?'} "
                    "(it needs einops and timm.models.layers; pass --reference-path DIR holding them)"
                )
        if ref_reason:
            print(f"REFERENCE COMPARISON SKIPPED: {ref_reason}")
        else:
            commit = subprocess.run(["git", "-C", args.reference, "rev-parse", "HEAD"], capture_output=True, text=True)
            print(
                f"reference: {Path(args.reference).resolve()}/SwinLSTM_D.py"
                f"{' @ ' + commit.stdout.strip() if commit.returncode == 0 else ''}"
            )

    mem_reason = None
    if "memory-reference" in wanted:
        ref_file = Path(args.memory_reference or "") / "models" / "DATSwinLSTM_D_Memory.py"
        if not args.memory_reference:
            mem_reason = "no --memory-reference given"
        elif not ref_file.is_file():
            mem_reason = f"{ref_file} not found"
        elif args.memory_in_len < 7:
            mem_reason = f"--memory-in-len {args.memory_in_len} < 7: the reference's unpadded temporal convs need 7"
        else:
            probe = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from benchmarks.bench_models import _load_memory_reference as f; "
                    "f(sys.argv[1], sys.argv[2:])",
                    args.memory_reference,
                    *args.reference_path,
                ],
                capture_output=True,
                text=True,
                cwd=str(ROOT),
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                },
            )
            if probe.returncode:
                last = [ln for ln in probe.stderr.strip().splitlines() if ln.strip()]
                mem_reason = (
                    f"cannot import {ref_file}: {last[-1] if last else '?'} (it needs einops and "
                    "timm.models.layers, and spatial_correlation_sampler unless it is the fork with a fallback; "
                    "pass --reference-path DIR holding them)"
                )
        if mem_reason:
            print(f"MEMORY REFERENCE COMPARISON SKIPPED: {mem_reason}")
        else:
            commit = subprocess.run(
                ["git", "-C", args.memory_reference, "rev-parse", "HEAD"], capture_output=True, text=True
            )
            print(
                f"memory reference: {ref_file.resolve()}{' @ ' + commit.stdout.strip() if commit.returncode == 0 else ''}"
            )

    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for device in devices:
        dd = DEVICE_DEFAULTS[device]
        batch = args.batch or dd["batch"]
        warmup = dd["warmup"] if args.warmup is None else args.warmup
        steps = args.steps or dd["steps"]
        if args.variants:
            variants = [v.strip() for v in args.variants.split(",") if v.strip()]
            bad = [v for v in variants if v not in ALL_VARIANTS]
            if bad:
                ap.error(f"--variants: unknown {bad}; choose from {', '.join(ALL_VARIANTS)}")
        else:
            variants = list(CUDA_VARIANTS) if device == "cuda" else ["fp32"]
        if args.no_compile:
            variants = [v for v in variants if not v.startswith("compile")]
        preset = dd["ref_config"] if args.ref_config == "auto" else args.ref_config
        rc = REF_PRESETS[preset]
        equal = _with(
            stated,
            name="swinlstm",
            in_channels=stated.in_channels,
            dropout=0.0,
            drop_path=0.1,
            mlp_ratio=4.0,
            **{**rc, "depths_up": list(reversed(rc["depths_up"]))},
        )

        base = dict(
            device=device,
            batch=batch,
            in_len=args.in_len,
            out_len=args.out_len,
            size=args.size,
            in_channels=stated.in_channels,
            warmup=warmup,
            steps=steps,
            threads=args.threads,
            reference=args.reference,
            reference_path=args.reference_path,
        )
        cases: list[dict[str, Any]] = []
        for name in OURS:
            if name in wanted:
                cases.append(
                    dict(
                        base,
                        kind="ours",
                        case=name,
                        config="stated",
                        # the stated config may need larger frames than --size (patch x window x 2^stages)
                        size=_fit(args.size, _with(stated, name=name).spatial_multiple()),
                        model_cfg=_with(stated, name=name).model_dump(mode="json"),
                        phase=args.phase if name == "datswinlstm_memory" else 2,
                    )
                )
        pair: list[dict[str, Any]] = []
        if "reference" in wanted or "swinlstm" in wanted:
            pair.append(
                dict(
                    base, kind="ours", case="swinlstm", config=preset, model_cfg=equal.model_dump(mode="json"), phase=2
                )
            )
        if "reference" in wanted and not ref_reason:
            pair.append(dict(base, kind="reference", case="reference SwinLSTM-D", config=preset, ref_cfg=rc))
        for r in range(args.repeats):
            cases += [dict(c, repeat=r) for c in (pair if r % 2 == 0 else pair[::-1])]
        mem_preset = dd["memory_config"] if args.memory_config == "auto" else args.memory_config
        mc = MEMORY_PRESETS[mem_preset]
        mem_pair: list[dict[str, Any]] = []
        if "memory-reference" in wanted or "datswinlstm_memory" in wanted:
            mem_base = dict(base, size=mc["size"], in_len=args.memory_in_len, out_len=args.memory_out_len, phase=1)
            mem_pair.append(
                dict(
                    mem_base,
                    kind="ours",
                    case="datswinlstm_memory",
                    config=f"mem-{mem_preset}",
                    model_cfg=memory_equal_config(mc),
                )  # fmt: skip
            )
            if "memory-reference" in wanted and not mem_reason:
                mem_pair.append(
                    dict(
                        mem_base,
                        kind="memory_reference",
                        case="reference DATSwin-Mem",
                        config=f"mem-{mem_preset}",
                        mem_cfg=mc,
                        memory_reference=args.memory_reference,
                    )  # fmt: skip
                )
        for r in range(args.repeats):
            cases += [dict(c, repeat=r) for c in (mem_pair if r % 2 == 0 else mem_pair[::-1])]

        print(
            f"\n== {device}: batch {batch}, warmup {warmup}, timed steps {steps}, variants {', '.join(variants)}; "
            f"reference config '{preset}': {rc} (ours: depths_up {list(reversed(rc['depths_up']))})"
        )
        for case in cases:
            for variant in variants:
                spec = dict(case, variant=variant)
                label = f"{case['case']} [{case['config']}] {variant}" + (
                    f" (repeat {case['repeat'] + 1})" if args.repeats > 1 and "repeat" in case else ""
                )
                print(f"  running {label} ...", end="", flush=True)
                t0 = time.perf_counter()
                res = _run_child(spec, args.timeout)
                print(
                    f" {time.perf_counter() - t0:.0f} s" + (f"  ERROR {res['error']}" if "error" in res else ""),
                    flush=True,
                )
                results.append(dict(spec, **res))

    summary = _report(results, devices, args)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                dict(
                    argv=sys.argv[1:],
                    torch=torch.__version__,
                    cpu_cores=ncpu,
                    load_avg_start=load1,
                    stated_config=stated.model_dump(mode="json"),
                    stated_source=source,
                    reference=args.reference,
                    reference_skipped=ref_reason,
                    results=results,
                    summary=summary,
                ),
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0


def _report(results: list[dict[str, Any]], devices: list[str], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for device in devices:
        rows = [r for r in results if r["device"] == device]
        if not rows:
            continue
        mem_head = "peak MiB (cuda alloc)" if device == "cuda" else "peak MiB (rise / RSS)"
        print(
            f"\n{device.upper()} — forward+backward of the whole sequence, batch {rows[0]['batch']}, "
            f"T_in {rows[0]['in_len']} -> T_out {rows[0]['out_len']}; frame side per row in 'size'"
        )
        head = (
            f"{'model':<22}{'config':<13}{'size':>5} {'variant':<14}{'params':>10}{'ms/step':>11}{'samples/s':>11}"
            f"{'vs fp32':>9}  {mem_head}"
        )
        print(head)
        print("-" * len(head))
        # aggregate repeats: all timed steps of a (case, config, variant) pooled
        keys: list[tuple[str, str, str]] = []
        for r in rows:
            k = (r["case"], r["config"], r["variant"])
            if k not in keys:
                keys.append(k)
        agg: dict[tuple[str, str, str], dict[str, Any]] = {}
        for k in keys:
            rs = [r for r in rows if (r["case"], r["config"], r["variant"]) == k]
            ok = [r for r in rs if "error" not in r]
            if not ok:
                agg[k] = dict(error=rs[0]["error"])
                continue
            steps = [t for r in ok for t in r["step_s"]]
            med = statistics.median(steps)
            cpu = [t for r in ok for t in r["cpu_step_s"]]
            agg[k] = dict(
                ok[-1],
                median_s=med,
                samples_per_s=ok[0]["batch"] / med,
                median_cpu_s=statistics.median(cpu),
                peak_rss_mib=max(r["peak_rss_mib"] for r in ok),
                peak_rss_rise_mib=max(r["peak_rss_rise_mib"] for r in ok),
                **({"peak_cuda_mib": max(r["peak_cuda_mib"] for r in ok)} if device == "cuda" else {}),
            )
        for k in keys:
            a = agg[k]
            if "error" in a:
                print(f"{k[0]:<22}{k[1]:<13}{'':>5} {k[2]:<14}  ERROR {a['error']}")
                continue
            fp32 = agg.get((k[0], k[1], "fp32"))
            sp = f"{fp32['median_s'] / a['median_s']:.2f}x" if fp32 and "error" not in fp32 else "-"
            print(
                f"{k[0]:<22}{k[1]:<13}{a['size']:>5} {k[2]:<14}{a['params']:>10,}{a['median_s'] * 1e3:>11.0f}"
                f"{a['samples_per_s']:>11.2f}{sp:>9}  {_mib(a, device)}"
            )
        dev_sum: dict[str, Any] = {
            "rows": {" | ".join(k): {kk: v for kk, v in agg[k].items() if kk in SUMMARY_KEYS} for k in keys},
            "ratio_ours_over_reference": {},
        }
        variants = list(dict.fromkeys(k[2] for k in keys))
        for v in variants:
            ours = [a for k, a in agg.items() if k[0] == "swinlstm" and k[1] in REF_PRESETS and k[2] == v]
            ref = [a for k, a in agg.items() if k[0].startswith("reference") and k[2] == v]
            if ours and ref and "error" not in ours[0] and "error" not in ref[0]:
                ratio = ours[0]["median_s"] / ref[0]["median_s"]
                dev_sum["ratio_ours_over_reference"][v] = ratio
                cpu_ratio = ours[0]["median_cpu_s"] / ref[0]["median_cpu_s"]
                dev_sum.setdefault("ratio_ours_over_reference_cpu_time", {})[v] = cpu_ratio
                target = " (target <= 1.0)" if device == "cpu" and v == "fp32" else ""
                verdict = ("MET" if ratio <= 1.0 else "NOT MET") if target else ""
                print(
                    f"{device.upper()} {v}: our SwinLSTM-D time / reference time = {ratio:.2f}{target} {verdict}"
                    f"   [ours {ours[0]['median_s'] * 1e3:.0f} ms, reference {ref[0]['median_s'] * 1e3:.0f} ms"
                    f" per step; params ours {ours[0]['params']:,}, reference {ref[0]['params']:,}]"
                )
                if device == "cpu":
                    print(
                        f"    same ratio by process CPU time per step: {cpu_ratio:.2f} "
                        f"(steadier than wall time when other processes share the cores)"
                    )
        if not dev_sum["ratio_ours_over_reference"]:
            print(f"{device.upper()}: no reference ratio (reference skipped or failed)")
        for v in variants:
            ours = [a for k, a in agg.items() if k[0] == "datswinlstm_memory" and k[1].startswith("mem-") and k[2] == v]
            ref = [a for k, a in agg.items() if k[0].startswith("reference DATSwin") and k[2] == v]
            if not (ours and ref and "error" not in ours[0] and "error" not in ref[0]):
                continue
            o, r = ours[0], ref[0]
            mem_key = "peak_cuda_mib" if device == "cuda" else "peak_rss_rise_mib"
            ratios = dict(
                time=o["median_s"] / r["median_s"],
                cpu_time=o["median_cpu_s"] / r["median_cpu_s"],
                peak_memory=o[mem_key] / r[mem_key] if r[mem_key] else float("nan"),
            )
            dev_sum.setdefault("memory_model_ours_over_reference", {})[v] = ratios
            print(
                f"{device.upper()} {v}: our DATSwinLSTM-D-Memory / reference: time {ratios['time']:.2f}, "
                f"peak memory {ratios['peak_memory']:.2f} (targets <= 1.0: "
                f"{'MET' if ratios['time'] <= 1.0 and ratios['peak_memory'] <= 1.0 else 'NOT MET'})"
                f"   [ours {o['median_s'] * 1e3:.0f} ms {o[mem_key]:.0f} MiB, reference {r['median_s'] * 1e3:.0f} ms "
                f"{r[mem_key]:.0f} MiB per phase-1 step at {o['size']}x{o['size']}, T_in {o['in_len']} -> T_out "
                f"{o['out_len']}, batch {o['batch']}; params ours {o['params']:,}, reference {r['params']:,}; "
                f"by process CPU time {ratios['cpu_time']:.2f}]"
            )
        if device == "cuda":
            for k, a in agg.items():
                if k[2] == "fp32" or "error" in a:
                    continue
                fp32 = agg.get((k[0], k[1], "fp32"))
                if fp32 and "error" not in fp32:
                    dev_sum.setdefault("speedup_vs_fp32", {})[" | ".join(k)] = fp32["median_s"] / a["median_s"]
        summary[device] = dev_sum
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
