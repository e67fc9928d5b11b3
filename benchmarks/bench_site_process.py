"""CPU seconds of one Flower site process (issue 18): what a ClientApp process costs for one message.

Flower 1.42 starts a fresh ClientApp process for every message to every site, so each pays Python's start-up,
the imports of ``federated/flower_apps.py`` and of the method's site trainer, then the site's work. This
runs exactly that in a fresh ``python`` (the ``--child`` mode): import the ClientApp module, answer one
``train`` message built from the method's initial weights (``flower_apps._site_reply``, what Flower calls),
then a second process answers the ``evaluate`` message with the site's caches warm. It prints the child's CPU
seconds (user + system), the seconds spent importing the ClientApp module, and whether the heavy optional
modules (``torch._dynamo``, ``distributed``, ``dask``, ``scipy.stats``) were loaded.

    PYTHONPATH=src python benchmarks/bench_site_process.py [--method histofl|fedmix] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch._dynamo", "torch._inductor", "distributed", "dask", "dask.array", "scipy.stats", "sympy")
HISTOFL = {"classes": ["0", "1"], "mil": {"hidden": 16, "attn_hidden": 8}}
FEDMIX = {"mpp": 4.0, "patch": 32, "width": 8, "depth": 2, "batch_size": 8, "patches_per_round": 16,
          "val_patches": 4, "read_workers": 1, "device": "cpu", "seed": 3}


def child(method_name: str, settings: str, arrays_file: str, source: str, workdir: str, kind: str) -> None:
    """One site process: import the ClientApp module, answer one message, report as JSON on stdout."""
    t0 = time.perf_counter()
    from napari_wsimil.federated import flower_apps as fa
    t_import = time.perf_counter() - t0
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from safetensors.numpy import load_file

    arrays = load_file(arrays_file)
    content = RecordDict({"arrays": fa.to_record(arrays),
                          "config": ConfigRecord({"method": method_name, "settings": settings, "round": 1})})
    # the message as the server's ServerApp makes it (Flower sets the sender's identity in that process)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    msg = Message(content, dst_node_id=1, message_type=kind)
    context = Context(run_id=1, node_id=1, node_config={"source": source, "workdir": workdir, "name": "s0"},
                      state=RecordDict(), run_config={})
    reply = fa._site_reply(msg, context, kind)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "import_s": t_import,
                      "failed": "failed" in reply.content["site"],
                      "loaded": [m for m in HEAVY if m in sys.modules]}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--method", default="histofl", choices=["histofl", "fedmix"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from safetensors.numpy import save_file

    from napari_wsimil.federated.deploy import federation_config
    from napari_wsimil.federated.fedmix_sites import make_sites
    from napari_wsimil.slide.synthetic import synthesize_cohort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "federated"))
    from conftest import split_sites

    root = Path(tempfile.mkdtemp(prefix="bench-site-"))
    cohort = Path(synthesize_cohort(root / "cohort", 12, seed=0, size=1024, workers=1))
    source = (make_sites(cohort, root / "sites")[0] if args.method == "fedmix" else split_sites(cohort)[0])
    method, config = federation_config(args.method, HISTOFL if args.method == "histofl" else FEDMIX, 1)
    arrays_file = root / "global.safetensors"
    save_file(method.initial_arrays(_config(method, config)), str(arrays_file))
    rows = []
    for r in range(args.repeat):
        work = root / f"work{r}"
        work.mkdir()
        for kind in ("train", "evaluate"):
            res = run_child(args.method, json.dumps(config), str(arrays_file), str(source), str(work), kind)
            assert not res["failed"], res
            rows.append((kind, res))
            print(f"{args.method} {kind:8s} cpu {res['cpu_s']:.2f} s, importing flower_apps {res['import_s']:.2f} s, "
                  f"heavy modules: {', '.join(res['loaded']) or 'none'}", flush=True)
    for kind in ("train", "evaluate"):
        cpu = sorted(res["cpu_s"] for k, res in rows if k == kind)
        print(f"{args.method} {kind}: median CPU {cpu[len(cpu) // 2]:.2f} s per site process "
              f"(load {os.getloadavg()[0]:.1f})")


def _config(method, values: dict):
    from napari_wsimil.federated.flower_apps import make_config

    return make_config(method, values)


if __name__ == "__main__":
    main()
