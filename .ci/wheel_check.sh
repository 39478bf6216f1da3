#!/usr/bin/env bash
# The package works as a wheel, outside the checkout: build it, install it into a fresh venv, and from
# a directory that is not the checkout run a short training, `evaluate` on it and a 2-job multirun.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/picomaml-wheel.XXXXXX)"
trap 'rm -rf "$work"' EXIT

python3 -m pip wheel -q --no-deps --wheel-dir "$work/dist" "$repo"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned by the package and so installs in this same pip call (the local CPU wheel)
python -m pip install -q "$work"/dist/picomaml-*.whl

cd "$work"
mkdir run && cd run
python - <<'PY'
import pathlib, picomaml
where = pathlib.Path(picomaml.__file__).resolve()
assert "site-packages" in where.parts, f"picomaml imported from {where}, not from the installed wheel"
assert (where.parent / "conf" / "train.yaml").is_file(), "the wheel has no configs"
print(f"picomaml from {where.parent}")
PY
export WANDB_MODE=disabled HF_HUB_OFFLINE=1
small="model=tiny data.seq_len=32 data.batch_size=4 trainer.max_steps=2 trainer.val_check_interval=2"
small="$small trainer.enable_progress_bar=false callbacks.model_checkpoint.hf_export=false"
# shellcheck disable=SC2086
python -m picomaml.train $small meta=5way4shot meta.buffer_tokens=200000 meta.window_len=32 run_name=wheel
python -m picomaml.evaluate ckpt_path=outputs/train/runs/wheel episodes=4 max_docs=8
# shellcheck disable=SC2086
python -m picomaml.train -m $small data=synthetic seed=1,2
test "$(find outputs/train/multirun -name result.json | xargs grep -l '"completed"' | wc -l)" -eq 2
echo "wheel check passed"
