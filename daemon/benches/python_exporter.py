"""Baseline for daemon_bench: a prometheus_client exporter serving the same series as a gainguardd body.

Usage: python_exporter.py BODY_FILE PORT
Every sample line of BODY_FILE becomes one labelled child of a prometheus_client Gauge (the way a Python
trainer-side exporter would hold them); it then serves them on 127.0.0.1:PORT until killed.
"""
import re
import sys
import time

from prometheus_client import CollectorRegistry, Gauge, start_http_server

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def main():
    body_path, port = sys.argv[1], int(sys.argv[2])
    registry = CollectorRegistry()
    families = {}
    count = 0
    with open(body_path) as f:
        for line in f:
            if line.startswith('#') or not line.strip():
                continue
            m = LINE.match(line.strip())
            name, labels, value = m.group(1), m.group(2) or '', float(m.group(3))
            pairs = LABEL.findall(labels)
            names = tuple(k for k, _ in pairs)
            key = (name, names)
            if key not in families:
                # One family per (name, label names); a suffix keeps families unique for prometheus_client.
                fam_name = 'py_' + name + ('_' + str(len(families)) if any(k[0] == name for k in families) else '')
                families[key] = Gauge(fam_name, 'baseline', names, registry=registry)
            g = families[key]
            (g.labels(*[v for _, v in pairs]) if names else g).set(value)
            count += 1
    start_http_server(port, addr='127.0.0.1', registry=registry)
    print(f'ready {count}', flush=True)
    while True:
        time.sleep(3600)


if __name__ == '__main__':
    main()
