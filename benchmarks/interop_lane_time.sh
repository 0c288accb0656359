#!/usr/bin/env bash
# Times the interop lane of .ci/run step by step (the same commands), from the repository root:
#     bash benchmarks/interop_lane_time.sh
# Creates .venv-interop (about 6 GB) like CI does; remove it afterwards if you do not keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
now() { date +%s.%N; }
t0=$(now)
python3 -m venv .venv-interop
.venv-interop/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
t1=$(now)
.venv-interop/bin/pip install --quiet timm
t2=$(now)
.venv-interop/bin/pip install --quiet -e ".[dev]"
t3=$(now)
.venv-interop/bin/python -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
ZOOTUNE_REQUIRE_INTEROP=1 .venv-interop/bin/python -m pytest -q -m interop tests/interop | tail -1
t4=$(now)
python3 - "$t0" "$t1" "$t2" "$t3" "$t4" <<'PY'
import sys
t = [float(v) for v in sys.argv[1:]]
steps = ["venv + torch/torchvision", "timm", "zootune[dev]", "lane tests"]
print("; ".join(f"{name}: {b - a:.1f} s" for name, a, b in zip(steps, t, t[1:])) + f"; total {t[-1] - t[0]:.1f} s")
PY
du -sh .venv-interop
