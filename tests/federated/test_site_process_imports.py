"""What a Flower site process imports (issue 18). Flower 1.42 starts a fresh ClientApp process for every
message to every site, so each import is paid per message. A site reads tissue masks (the first message
of a HistoFL site, which extracts its features; every FedMix message); through ``dask.array``, which imported
``distributed`` too, that cost each such process 0.3-0.6 s of CPU. Now neither is imported.

The site's first message is run here as Flower runs it, in a fresh Python: import the ClientApp module and
answer a ``train`` message (HistoFL: the site extracts its features first, reading each slide's tissue mask
through dask)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import save_file

SITE = r"""
import json, sys
from napari_wsimil.federated import flower_apps as fa
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

settings, arrays, source, workdir = sys.argv[1:5]
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as in the server's process
msg = Message(RecordDict({"arrays": fa.to_record(load_file(arrays)), "config": ConfigRecord(
    {"method": "histofl", "settings": settings, "round": 1})}), dst_node_id=1, message_type="train")
ctx = Context(run_id=1, node_id=1, node_config={"source": source, "workdir": workdir, "name": "s0"},
              state=RecordDict(), run_config={})
reply = fa._site_reply(msg, ctx, "train")
print(json.dumps({"reply": sorted(reply.content), "site": dict(reply.content["site"]),
                  "tissue": "napari_wsimil.slide.tissue" in sys.modules,
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))}))
"""


@pytest.mark.slow
def test_a_site_process_answers_its_first_message_without_importing_dask(site_csvs, tmp_path):
    from napari_wsimil.federated.deploy import federation_config
    from napari_wsimil.federated.flower_apps import make_config

    method, config = federation_config("histofl", {"classes": ["0", "1"], "mil": {"hidden": 16, "attn_hidden": 8}}, 1)
    arrays = tmp_path / "global.safetensors"
    save_file(method.initial_arrays(make_config(method, config)), str(arrays))
    (tmp_path / "work").mkdir()
    out = subprocess.run([sys.executable, "-c", SITE, json.dumps(config), str(arrays), str(site_csvs[0]),
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["reply"] == ["arrays", "metrics", "site"] and res["site"] == {"name": "s0"}  # it trained
    assert res["tissue"]  # it read its slides' tissue masks (to extract its features)...
    assert res["modules"] == []  # ...without dask.array or distributed
