#!/usr/bin/env bash
# GPU check in one call of at most 8 minutes on one CUDA GPU (sized for an H200): the CUDA paths of the
# tests, bf16 + torch.compile training throughput of the three models at the reference preset, the
# automatic batch-size search, and evaluation throughput. Prints samples/s (windows/s) and peak memory.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root (or anywhere: it cd's there)
#   DATSWIN_REF=/path/to/datswinlstm_memory bash benchmarks/gpu_check.sh   # + ratio against the public model
#
# Parts, each under its own `timeout` (seconds, overridable by env; none runs past GPU_CHECK_TOTAL=465 s
# from the start), so the whole stays under 8 min:
#   0. Python (T_SETUP=60): .venv/bin/python when it exists and sees CUDA; otherwise a venv in
#      $GPU_VENV (/tmp/gpu-venv) on the machine's own python3 (which holds a CUDA build of torch: a
#      .pth file makes its site-packages visible, so torch, triton and CUDA are never installed), plus
#      the requirements.lock pins whose package that python lacks, installed with --no-deps: from
#      carried wheels in .whl/ (--no-index) when that folder exists, else from the package index.
#      torch itself is never taken from the lock (its pin is the CPU build of this repo's machines).
#   a. tests (T_TESTS=90): the tests that skip without CUDA (files whose skip marks name cuda),
#      plus every test whose name says cuda / bf16 / fp16 / precision / compile / auto batch (no test
#      skips without CUDA at present, and the selected ones run on CPU: parts b-d are the CUDA work).
#   b. training throughput (T_MODELS=200, two calls): benchmarks/bench_models.py --device cuda at the
#      reference preset (presets/reference_sevir.yaml merged over params.yaml: 384 x 384, patch 4,
#      embed 128, 12 -> 24 frames), the three models, bf16 autocast eager, then torch.compile + bf16;
#      with DATSWIN_REF also the public DATSwinLSTM-D-Memory (--memory-reference, --memory-config
#      reference; phase-1 step) and the ours / reference ratios of time and peak memory.
#   c. auto batch size (T_BATCH=75): train.batch_size auto at the reference preset on a generated
#      384 x 384 sample (pipeline.training.loop.Trainer: doubling then bisection of real bf16 steps,
#      capped by AUTO_MAX_BATCH=64); prints the size found, the sizes tried and the peak memory.
#   d. evaluation (T_EVAL=45): benchmarks/bench_eval.py --device cuda at the reference preset's frame
#      size, 64 windows, batch 16, no optical flow (CPU per window).
# Output: $OUT (the device tool's folder) or /tmp/gpu_check: models_bf16.json, models_compile.json,
# the logs. Exit status: 0; each part prints its own status line (timeout = 124).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RES=${OUT:-/tmp/gpu_check}
mkdir -p "$RES"
START=$(date +%s)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
T_SETUP=${T_SETUP:-60} T_TESTS=${T_TESTS:-90} T_MODELS=${T_MODELS:-200} T_BATCH=${T_BATCH:-75} T_EVAL=${T_EVAL:-45}
TOTAL=${GPU_CHECK_TOTAL:-465}  # seconds for everything; a part gets at most what is left of it
part() { echo; echo "=== $1 ($(($(date +%s) - START)) s in)"; }
status() { echo "--- $1: exit $2$([ "$2" = 124 ] && echo ' (timed out)')"; }
# a part's timeout: its own, or what is left of TOTAL when that is less (at least 1 s)
budget() { local left=$((TOTAL - ($(date +%s) - START))); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }

# ---------------------------------------------------------------------------------------- 0. Python
part "0. Python environment"
PY=""
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=.venv/bin/python
else
  BASE=$(command -v python3)
  GPU_VENV=${GPU_VENV:-/tmp/gpu-venv}
  timeout "$(budget "$T_SETUP")" bash -c '
    set -e
    BASE=$1 VENV=$2
    [ -x "$VENV/bin/python" ] || "$BASE" -m venv "$VENV"
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")
    "$BASE" -c "import site, sys; print(\"\n\".join(p for p in site.getsitepackages() + [site.getusersitepackages()]))" > "$SITE/_base_site.pth"
    # the lock pins whose distribution the base python lacks (torch and its CUDA stack stay the base one)
    "$VENV/bin/python" - requirements.lock > /tmp/gpu-missing.txt <<"EOF"
import importlib.metadata as md, re, sys
keep = ("torch", "triton", "torchvision", "torchaudio")
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line or line.startswith("-"):
        continue
    name = re.split(r"[=<>!~\[; ]", line)[0]
    low = name.lower().replace("_", "-")
    if low in keep or low.startswith(("nvidia-", "cuda-")):
        continue
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(line)
EOF
    echo "lock pins missing from $BASE: $(wc -l < /tmp/gpu-missing.txt)"
    if [ -s /tmp/gpu-missing.txt ]; then
      if [ -d .whl ]; then SRC="--no-index --find-links .whl"; else SRC=""; fi
      "$VENV/bin/python" -m pip install -q --no-deps --disable-pip-version-check $SRC -r /tmp/gpu-missing.txt \
        || { echo "pip could not install all of them (no index here? carry wheels in .whl/); installing one by one";
             while read -r req; do "$VENV/bin/python" -m pip install -q --no-deps --disable-pip-version-check $SRC "$req" >/dev/null 2>&1 || echo "  missing: $req"; done < /tmp/gpu-missing.txt; }
    fi
  ' _ "$BASE" "$GPU_VENV"
  status "python setup" $?
  PY=$GPU_VENV/bin/python
fi
$PY -c "import torch; print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
REF_PARAMS=$RES/reference_params.yaml
$PY -m pipeline.preset presets/reference_sevir.yaml --format yaml > "$REF_PARAMS" || echo "pipeline.preset failed: parts b-d need it"

# ------------------------------------------------------------------------------------------ a. tests
part "a. CUDA paths of the tests"
CUDA_FILES=$(grep -lE "skipif\(.*cuda|requires_cuda|cuda\.is_available\(\)" tests/*.py 2>/dev/null | tr '\n' ' ')
echo "files with CUDA skips or checks: ${CUDA_FILES:-none}"
timeout "$(budget "$T_TESTS")" $PY -m pytest -q -rs -p no:cacheprovider --timeout 80 -k "cuda or bf16 or fp16 or precision or compile or auto_batch" tests/ 2>&1 | tee "$RES/tests.log" | tail -25
status "tests" "${PIPESTATUS[0]}"

# ------------------------------------------------------------------------------- b. training throughput
part "b. bf16 and torch.compile + bf16 training throughput, reference preset (384 x 384, patch 4)"
MEM_ARGS=()
MODELS=convlstm,swinlstm,datswinlstm_memory
if [ -n "${DATSWIN_REF:-}" ] && [ -d "$DATSWIN_REF" ]; then
  MEM_ARGS=(--memory-reference "$DATSWIN_REF" --memory-config reference)
  MODELS=$MODELS,memory-reference
  echo "public DATSwinLSTM-D-Memory: $DATSWIN_REF (an equal-config phase-1 step; the zzcd1 original needs the CUDA"
  echo "extension spatial_correlation_sampler, the lankerr fork runs without it)"
fi
BM=(benchmarks/bench_models.py --device cuda --params "$REF_PARAMS" --size 384 --in-len 12 --out-len 24 --batch 4
    --warmup 3 --steps 10 --models "$MODELS" "${MEM_ARGS[@]}")
timeout "$(budget $((T_MODELS * 2 / 5)))" $PY "${BM[@]}" --variants bf16 --timeout 60 --json "$RES/models_bf16.json" 2>&1 | tee "$RES/models_bf16.log"
status "bench_models bf16" "${PIPESTATUS[0]}"
timeout "$(budget $((T_MODELS * 3 / 5)))" $PY "${BM[@]}" --variants compile-bf16 --timeout 110 --json "$RES/models_compile.json" 2>&1 | tee "$RES/models_compile.log"
status "bench_models compile-bf16" "${PIPESTATUS[0]}"

# ------------------------------------------------------------------------------- c. auto batch size
part "c. train.batch_size auto at the reference preset"
timeout "$(budget "$T_BATCH")" $PY - "$REF_PARAMS" "${AUTO_MAX_BATCH:-64}" "${GPU_CHECK_DEVICE:-cuda}" "${GPU_CHECK_SIZE:-384}" <<'EOF' 2>&1 | tee "$RES/auto_batch.log"
import logging, sys, tempfile, time
from pathlib import Path
import torch, yaml
sys.path.insert(0, ".")
from pipeline import config
from pipeline.sevir.synthetic import generate
from pipeline.sevir.windows import write_windows
from pipeline.training.loop import Trainer

params, cap, device, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
logging.basicConfig(level=logging.INFO, format="%(message)s")
for name in ("pipeline.sevir", "pipeline.chunk", "pipeline.fetch"):
    logging.getLogger(name).setLevel(logging.WARNING)
raw = yaml.safe_load(Path(params).read_text())
with tempfile.TemporaryDirectory() as tmp:
    raw["data"].update(root=f"{tmp}/raw", source="synthetic")
    # two 36-frame windows per 49-frame event, ~3/4 of the events in the train split (the search is capped by
    # its size), a few in val (the trainer needs some)
    n_events = -(-cap * 2 // 3) + 4
    raw["data"]["synthetic"].update(n_events=n_events, size=size, events_per_file=n_events, first_day="2019-06-01",
                                    last_day="2019-12-31")
    raw["data"]["split"].update(train_end="2019-11-15 00:00:00", val_end="2019-12-15 00:00:00")
    raw["windows"]["root"] = f"{tmp}/windows"
    raw["train"].update(device=device, precision="bf16" if device == "cuda" else "fp32", batch_size="auto",
                        max_batch_size=cap, checkpoint_dir=f"{tmp}/artifacts")
    raw["tracking"]["enabled"] = False
    cfg = config.from_dict(raw, source="gpu_check")
    generate(cfg.data.root, cfg.data.synthetic, seed=0, progress=False)
    write_windows(cfg.data.root, cfg.windows, cfg.data.split, stats_path=Path(tmp) / "stats.json")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, 1, Path(tmp) / "artifacts" / "phase1", progress=False)
    took = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"auto batch size: {trainer.batch_size} (cap {cap}, {cfg.model.name} phase 1 + alignment, "
          f"{size}x{size}, {cfg.windows.in_len} -> {cfg.windows.out_len}), search + set-up {took:.1f} s, "
          f"peak {peak:.1f} of {total:.0f} GiB")
    trainer.close()
EOF
status "auto batch size" "${PIPESTATUS[0]}"

# ------------------------------------------------------------------------------------- d. evaluation
part "d. evaluation throughput"
timeout "$(budget "$T_EVAL")" $PY benchmarks/bench_eval.py --device cuda --params "$REF_PARAMS" --size 384 --windows 64 --batch 16 \
  --repeat 2 --no-optical-flow 2>&1 | tee "$RES/eval.log"
status "bench_eval" "${PIPESTATUS[0]}"

# ---------------------------------------------------------------------------------------- summary
part "summary"
$PY - "$RES" <<'EOF'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
for name in ("models_bf16.json", "models_compile.json"):
    path = res / name
    if not path.exists():
        print(f"{name}: none (part b failed or timed out)")
        continue
    doc = json.loads(path.read_text())
    rows = doc.get("results", doc) if isinstance(doc, dict) else doc
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict) and r.get("samples_per_s"):
            print(f"{r.get('case', r.get('name', '?')):<22} {r.get('variant', ''):<14} {r['samples_per_s']:8.2f} samples/s  "
                  f"peak {r.get('peak_cuda_mib', float('nan')):8.0f} MiB")
EOF
echo "total $(($(date +%s) - START)) s; files in $RES"
exit 0
