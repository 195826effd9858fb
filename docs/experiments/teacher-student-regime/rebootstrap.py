"""gamma*'s bootstrap interval of every point of regime.json, recomputed with the current plugin
(`gainguard._native.bootstrap_gamma`, the seed bootstrap, 2000 resamples, generator seed 23 as the map's) from the
per-seed sigma_max its log prints (4 decimals). Where the map's binary computed the same thing the two agree to
about 1e-4; the map's binary left out resamples whose line was not significantly sloped, which the current code
keeps. Run with the project's .venv/bin/python from the repository root."""

import json
import re

from gainguard import _native

for p in sorted(json.load(open("docs/experiments/teacher-student-regime/regime.json")), key=lambda p: (p["horizon"], p["batch"], p["lr_wd"])):
    points, seeds = [], []
    for line in p["log"].splitlines():
        m = re.match(r"gamma=(\S+)\s+(\d+)\s+\S+\s+\d+\s+\S+\s+(\S+) (\S+) (\S+)\s+\S+", line)
        if m:
            for s in range(3):
                points.append(("hidden.weight", float(m.group(1)), float(m.group(2)), float(m.group(3 + s))))
                seeds.append(s)
    try:
        lo, hi, method, failed = _native.bootstrap_gamma(points, seeds, 2000, 0.95, 23)
        now = f"[{lo:.3f}, {hi:.3f}] ({failed} without a crossing)"
    except ValueError as e:
        now = f"none ({e})"
    was = p["gamma"]["interval"]
    was = "none" if was is None else f"[{was[0]:.3f}, {was[1]:.3f}] ({p['gamma']['failed']} left out)"
    print(f"H {p['horizon']:g}, batch {p['batch']}, lr·wd {p['lr_wd']}: map {was}; current code {now}")
