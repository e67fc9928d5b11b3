"""What the server accepts from a site, on Flower's own Message objects: weights, numbers and the site's name;
a record or key beyond that is refused with the reason (the real federations' audit is in test_flower_rounds)."""

from __future__ import annotations

import numpy as np
import pytest

flwr_app = pytest.importorskip("flwr.app")
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from napari_wsimil.federated.flower_apps import describe_message, parse_reply  # noqa: E402


@pytest.fixture
def request_msg(monkeypatch):
    # Messages are normally made inside a Flower app process, which sets these identities.
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 7)
    return Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=7, message_type="train")


def _reply(request_msg, **records):
    return Message(RecordDict(records), reply_to=request_msg)


def test_weights_numbers_and_a_name_are_accepted(request_msg):
    reply = _reply(request_msg, arrays=ArrayRecord({"w": Array(np.ones((2, 3), np.float32))}),
                   metrics=MetricRecord({"num-examples": 3, "train_loss": 0.5}), site=ConfigRecord({"name": "lyon"}))
    name, update, error = parse_reply(reply)
    assert (name, error, update.num_examples, update.metrics) == ("lyon", None, 3, {"train_loss": 0.5})
    assert describe_message(reply) == {"arrays": {"kind": "arrays", "keys": {"w": [[2, 3], "float32"]}},
                                       "metrics": {"kind": "metrics", "keys": ["num-examples", "train_loss"]},
                                       "site": {"kind": "config", "keys": ["name"]}}


@pytest.mark.parametrize("records, words", [
    ({"features": ArrayRecord({"f": Array(np.ones(4, np.float32))})}, "records the protocol does not allow"),
    ({"metrics": ConfigRecord({"slides": "s1,s2"})}, "records the protocol does not allow"),
    ({"site": ConfigRecord({"name": "lyon", "labels": "0,1,1"})}, "more than its name"),
    ({"metrics": MetricRecord({"num-examples": 3, "per_slide": [0.1, 0.9]})}, "not single numbers"),
])
def test_anything_else_is_refused(request_msg, records, words):
    name, update, error = parse_reply(_reply(request_msg, site=ConfigRecord({"name": "lyon"}), **records)
                                      if "site" not in records else _reply(request_msg, **records))
    assert update is None and words in error


def test_a_failed_site_says_only_its_error_class(request_msg):
    _, update, error = parse_reply(_reply(request_msg, site=ConfigRecord({"name": "lyon", "failed": "CohortError"})))
    assert update is None and "CohortError" in error and "site's own log" in error


def test_fedmix_validation_counts_travel_as_single_numbers(request_msg):
    """A FedMix site's measure of the global model: counts per map level (numbers, named by level only) and its
    validation loss are accepted; the same counts as one list are not."""
    from napari_wsimil.federated.fedmix_validation import histogram_numbers, summarise

    counts = {**histogram_numbers("val_tumour", np.arange(256)), **histogram_numbers("val_normal", np.ones(256)),
              **histogram_numbers("benign", np.r_[np.full(250, 10), np.zeros(6)]), "val_loss": 0.4, "n_val": 2.0,
              "benign_slides": 1.0}
    reply = _reply(request_msg, metrics=MetricRecord({"num-examples": 1, **counts}), site=ConfigRecord({"name": "lyon"}))
    name, update, error = parse_reply(reply)
    assert error is None and update.metrics == counts
    assert set(describe_message(reply)["metrics"]["keys"]) == {"num-examples", *counts}  # keys, never values
    summary = summarise([update.metrics, update.metrics], operating_fpr=0.01)  # the server sums two such sites
    assert summary["val_slides"] == 4 and summary["benign_pixels"] == 2 * 2500
    listed = _reply(request_msg, metrics=MetricRecord({"num-examples": 1, "benign": [10.0] * 256}),
                    site=ConfigRecord({"name": "lyon"}))
    assert parse_reply(listed)[1] is None and "not single numbers" in parse_reply(listed)[2]


def test_a_site_flower_lost_is_told_apart_from_a_site_that_failed(request_msg):
    """The SuperLink answers for a SuperNode whose heartbeats stopped (Flower's own error reply): the server
    stops waiting for it and counts it as gone, not as a refused update; any other error is the site's."""
    from flwr.app import Error
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from napari_wsimil.federated.flower_apps import node_left

    gone = create_message_error_unavailable_res_message(request_msg.metadata, "node_unavail")
    assert node_left(gone) and gone.metadata.reply_to_message_id == request_msg.metadata.message_id
    assert not node_left(create_message_error_unavailable_res_message(request_msg.metadata, "msg_unavail"))
    assert not node_left(Message(Error(code=0, reason="ClientApp exception"), reply_to=request_msg))
    assert not node_left(_reply(request_msg, site=ConfigRecord({"name": "lyon"})))
