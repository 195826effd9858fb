"""The search's table: per try and width, how many of the 14 hidden matrices pass each check, the worst of each,
and (with 2 seeds) the seed-to-seed difference of sigma_max that the init check is up against. Reads each try's
measurements.json and the CPU time /usr/bin/time appended to its log. Run: python table.py [TRY ...]"""

import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu(name):
    text = open(os.path.join(HERE, f"{name}.log")).read()
    m = re.findall(r"cpu_user_s=([\d.]+) cpu_sys_s=([\d.]+)", text)
    return float(m[-1][0]) + float(m[-1][1]) if m else float("nan")


def command(name):
    text = open(os.path.join(HERE, name, "report.md")).read()
    return re.search(r"Command: `(.*?)`", text).group(1)


def rows(name):
    ms = json.load(open(os.path.join(HERE, name, "measurements.json")))
    by = {}
    for m in ms:
        by.setdefault(m["width"], {}).setdefault(m["param"], {})[m["seed"]] = m
    out = []
    for w, params in sorted(by.items()):
        init = [p[0]["checks"]["small_init"] for p in params.values()]
        drift = [p[0]["checks"]["drift"] for p in params.values()]
        seed = [p[1]["sigma_max"] / p[0]["sigma_max"] - 1 for p in params.values() if 1 in p]
        worst = lambda v: max(v, key=abs)
        out.append((int(w), len(params), sum(abs(x) < 0.05 for x in init), worst(init), sum(abs(x) < 0.03 for x in drift), worst(drift),
                    statistics.median(abs(x) for x in seed) if seed else None, statistics.median(abs(x) for x in init)))
    return out


print("| try | command flags | CPU s | d | init/10 pass (worst) | drift pass (worst) | median \\|init/10 − 1\\| | median \\|seed 1 / seed 0 − 1\\| |")
print("|---|---|---|---|---|---|---|---|")
for name in sys.argv[1:]:
    flags = command(name).split("width_transfer -- ")[1]
    flags = re.sub(r"--out \S+ ", "", flags)
    for i, (w, n, ip, iw, dp, dw, seed, imed) in enumerate(rows(name)):
        head = f"| {name} | `{flags}` | {cpu(name):.0f} " if i == 0 else "| | | "
        print(f"{head}| {w} | {ip}/{n} ({iw:+.1%}) | {dp}/{n} ({dw:+.1%}) | {imed:.1%} | {'—' if seed is None else f'{seed:.1%}'} |")
