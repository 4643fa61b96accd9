#!/usr/bin/env bash
# One prepared check of metanmt on a GPU machine, meant to finish in under 10 minutes:
#   1. the test suite's device-marked tests (pytest -m gpu; they skip without CUDA),
#   2. a short meta-train of each algorithm (maml, fomaml, reptile, multitask) on the l10n corpus,
#   3. a fine-tune of the fomaml run on Finnish 4k and a decode of the Finnish test set with it,
#   4. the meta-step benchmark's translation cases and the LoRA-vs-full meta-step benchmark on the GPU,
#   5. a whole study on the device (studies/quick.yaml cut to 40 updates, Finnish 0/1k, one seed): the
#      same study file as on a CPU, every stage in its own process, the report written.
# Every part's exit status, wall time and last output lines go to bench/results/gpu_check.json
# (with the device, torch and CUDA versions).
#
#   bench/gpu_check.sh                        # on the GPU machine, from the repository root
#   bench/gpu_check.sh --data-root PATH       # the l10n corpus elsewhere (default ../shared/data/l10n)
#   bench/gpu_check.sh --dry-run              # the same plumbing on the CPU in about a minute: the
#       embedded CLDR corpus instead of l10n, a tiny model, 2 steps, the tiny LoRA timing, and the
#       output in the run's temporary folder (never bench/results/)
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
DATA=../shared/data/l10n
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --data-root) DATA="$2"; shift ;;
    *) echo "usage: bench/gpu_check.sh [--dry-run] [--data-root PATH]" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$WORK/parts.jsonl"
OUT=bench/results/gpu_check.json
[ "$DRY" = 1 ] && OUT="$WORK/gpu_check.dry-run.json"  # plumbing only: never next to the results
export METANMT_PROGRESS=0  # the vocabulary cache ($METANMT_CACHE) is the usual one: a cached l10n vocabulary is reused
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, not an installed copy

# part NAME COMMAND...: run it, record status, seconds and the output's tail
part() {
  local name="$1"; shift
  echo "== $name: $*" >&2
  local start end status
  start=$(date +%s.%N)
  "$@" >"$WORK/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  tail -n 15 "$WORK/$name.log" >&2
  "$PY" - "$name" "$status" "$start" "$end" "$WORK/$name.log" "$*" >>"$LOG" <<'EOF'
import json, sys
name, status, start, end, path, cmd = sys.argv[1:]
tail = open(path, encoding="utf-8", errors="replace").read().splitlines()[-15:]
print(json.dumps({"part": name, "command": cmd, "status": int(status),
                  "seconds": round(float(end) - float(start), 1), "tail": tail}))
EOF
}

if [ "$DRY" = 1 ]; then
  CONFIG_META=configs/quickstart.yaml
  CONFIG_MULTI=configs/quickstart.yaml
  SETS=(--set model.d_model=32 --set model.encoder_layers=1 --set model.decoder_layers=1 --set model.attention_heads=2
        --set model.ffn_dim=64 --set "task.train_languages=[de, fr, es]" --set task.vocab_size=500
        --set task.support_tokens=150 --set task.query_tokens=150 --set train.steps=2 --set train.eval_every=0
        --set train.save_every=2 --set train.meta_batch_size=2 --set "train.trackers=[]")
  DEVICE=(--cpu)
else
  if [ ! -d "$DATA/meta_train" ]; then
    echo "bench/gpu_check.sh: no l10n corpus at $DATA (pass --data-root PATH)" >&2; exit 2
  fi
  CONFIG_META=configs/l10n_fomaml.yaml
  CONFIG_MULTI=configs/l10n_multitask.yaml
  SETS=(--set "data.root=$DATA" --set train.steps=20 --set train.eval_every=0 --set train.save_every=20
        --set train.log_every=10 --set "train.trackers=[]")
  DEVICE=()
fi

# 1. device-marked tests (skipped, not failed, without CUDA)
part gpu_tests "$PY" -m pytest -q -m gpu tests/

# 2. a short meta-train of each algorithm
for algo in maml fomaml reptile multitask; do
  config=$CONFIG_META
  extra=()
  [ "$algo" = multitask ] && config=$CONFIG_MULTI
  [ "$algo" = reptile ] && extra=(--set optim.name=sgd --set optim.lr=1.0 --set algorithm.inner_steps=2)
  [ "$algo" = maml ] && extra=(--set algorithm.inner_lr=0.1)
  extra+=(--set "algorithm.name=$algo")
  part "meta_train_$algo" "$PY" -m metanmt meta-train "$config" --output-dir "$WORK/runs/$algo" --overwrite \
    "${SETS[@]}" "${extra[@]}"
done

# 3. a fine-tune and a decode
if [ "$DRY" = 1 ]; then
  "$PY" - "$WORK" <<'EOF'
import gzip, sys
from metanmt.data.cldr import cldr_pairs
pairs = cldr_pairs("ro")[0][:60]
text = "lang\tsrc\ten\torigin\n" + "".join(f"ro\t{p.src}\t{p.en}\tcldr\n" for p in pairs)
for name in ("train", "test"):
    with gzip.open(f"{sys.argv[1]}/ro.{name}.tsv.gz", "wt", encoding="utf-8") as f:
        f.write(text)
EOF
  FT_TRAIN="$WORK/ro.train.tsv.gz"; FT_TEST="$WORK/ro.test.tsv.gz"; FT_DEV="$WORK/ro.test.tsv.gz"
  FT_SETS=(--max-steps 2 --max-tokens 200 --dev-segments 8)
else
  FT_TRAIN="$DATA/finetune/fi.4k.tsv.gz"; FT_TEST="$DATA/test/fi.tsv.gz"; FT_DEV="$DATA/dev/ro.tsv.gz"
  FT_SETS=(--max-steps 60)
fi
part finetune "$PY" -m metanmt finetune "$WORK/runs/fomaml" --train "$FT_TRAIN" --dev "$FT_DEV" \
  --output-dir "$WORK/ft" --overwrite "${FT_SETS[@]}" "${DEVICE[@]}"
part decode "$PY" -m metanmt evaluate "$WORK/ft" --test "$FT_TEST" --beam 4 --json "${DEVICE[@]}"

# 4. meta-step benchmarks on the device
if [ "$DRY" = 1 ]; then
  part bench_lora_meta_step "$PY" bench/lora_meta_step.py timing --tiny --steps 1 --warmup 0 --out "$WORK/lora_meta_step.json"
else
  part bench_meta_step "$PY" bench/meta_step.py --family translation --impl metanmt --impl plain --steps 5 --warmup 2 \
    --out "$WORK/meta_step.json"
  part bench_lora_meta_step "$PY" bench/lora_meta_step.py timing --steps 5 --warmup 2 --out "$WORK/lora_meta_step.json"
fi

# 5. a whole study where Accelerate puts it (about 8 minutes on a busy 2-core CPU, mostly the 8,000-piece
#    vocabulary, which the meta-train parts above have cached); the dry run has no l10n corpus
if [ "$DRY" = 1 ]; then
  echo "== study: skipped in the dry run (it needs the l10n corpus)" >&2
else
  part study "$PY" -m metanmt study studies/quick.yaml --data-root "$DATA" --out "$WORK/study" --langs fi --jobs 2 \
    --set "inits.multi.set=[train.steps=40, train.eval_every=0, train.save_every=20]" \
    --set "inits.meta.set=[train.steps=10, train.save_every=10]" --set "inits.meta.warm_start={init: multi, update: 30}" \
    --set "budgets=[0, 1k]" --set seeds=1 --set scratch_seeds=1 --set "curve={points: [0, 10], seeds: 1}" \
    --set finetune.max_steps=10 --set "decoding={beam: 1, test_segments: 40}"
  [ -f "$WORK/study/report/report.html" ] && cp "$WORK/study/report/results.md" "$WORK/study_results.md"
fi

"$PY" - "$LOG" "$OUT" "$WORK" "$DRY" <<'EOF'
import json, platform, sys
from pathlib import Path
import torch
log, out, work, dry = sys.argv[1:]
parts = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
machine = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}
benches = {}
for name in ("meta_step", "lora_meta_step"):
    path = Path(work) / f"{name}.json"
    if path.is_file():
        benches[name] = json.loads(path.read_text())
result = {"dry_run": dry == "1", "machine": machine, "ok": all(p["status"] == 0 for p in parts),
          "total_seconds": round(sum(p["seconds"] for p in parts), 1), "parts": parts, "benchmarks": benches}
study = Path(work) / "study_results.md"
if study.is_file():  # the study's table of cells, as its report wrote it on the device
    result["study_results_md"] = study.read_text(encoding="utf-8")
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out}: {'all parts passed' if result['ok'] else 'FAILED: ' + ', '.join(p['part'] for p in parts if p['status'])}"
      f" in {result['total_seconds']} s")
sys.exit(0 if result["ok"] else 1)
EOF
