"""The sites' Flower app, ``client`` (in each SuperNode's ClientApp process). Messages carry records only:

- coordinator -> site: ``arrays`` (the global parameters of the travelling part) and ``config`` (the
  phase, the phase's rounds, local epochs, class list, training options, the backbone's SHA-256, Flower's
  ``server-round`` and FedProx's ``proximal-mu``);
- site -> coordinator, train: ``arrays`` (the same names and shapes) and ``metrics``: ``num-examples``,
  ``train-loss``, ``train-accuracy``, ``round``; evaluate: ``metrics``: ``num-examples``, ``loss-sum``,
  ``confusion`` (the val confusion matrix, row-major), ``round``; query: ``classes`` (class folder
  names); every reply also carries ``site`` (its ``name`` from the SuperNode's node config). With secure
  aggregation a train exchange is SecAgg+'s four stages instead (``secagg.py``).

No image, feature or file name is ever put in a reply; the ``audit`` mod writes what each reply holds
to the file the node config's ``audit`` names, for a site to check. Flower starts a fresh ClientApp
process for every message, so torch and the models (``site.py``) are imported only by the handlers that
train or measure: SecAgg+'s key-exchange stages do not pay for them.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import secagg


def _site():
    from . import site

    return site


def audit(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: appends one JSON line per reply to the node config's ``audit`` file: every
    record's kind, its arrays' names, shapes and dtypes, and its metric and config values."""
    reply = call_next(msg, context)
    path = context.node_config.get("audit")
    if path:
        with open(str(path), "a", encoding="utf-8") as file:
            file.write(json.dumps(describe(reply)) + "\n")
    return reply


def describe(reply: Message) -> dict:
    entry: dict = {"type": reply.metadata.message_type, "error": reply.has_error(), "records": {}}
    if reply.has_error():
        return entry
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            value = {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()}
        else:
            value = {k: _plain(v) for k, v in record.items()}
        entry["records"][name] = {"kind": type(record).__name__, "items": value}
    return entry


def _plain(value):
    """Bytes (SecAgg+'s keys, shares and masked vectors) as their length: the audit stays JSON."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return [_plain(v) for v in value] if isinstance(value, list) else value


client = ClientApp(mods=[audit, secagg.client_mod])


def _site_name(context: Context) -> ConfigRecord:
    return ConfigRecord({"name": str(context.node_config.get("name", f"node-{context.node_id}"))})


def _data(context: Context) -> str:
    return str(context.node_config["data"])


def _setup(msg: Message, context: Context):
    config = msg.content["config"]
    options = json.loads(str(config["options"]))
    for key, section in (("cache-dir", "data"), ("device", "train")):
        if key in context.node_config:  # the site's own cache folder and device, not the coordinator's
            options.setdefault(section, {})[key.replace("-", "_")] = str(context.node_config[key])
    setup = _site().open_site(_data(context), options, [str(c) for c in config["classes"]])
    if _site().body_digest(setup.built.model) != str(config["body-sha256"]):
        raise RuntimeError("this site's backbone weights differ from the coordinator's (a different weights "
                           "package or version): install the same imgtune and weights at every party")
    return setup, config


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in msg.content["arrays"].items()}


@client.query()
def query(msg: Message, context: Context) -> Message:
    """``classes``: the class folder names; ``train-images``: the number of training images (asked by a
    secure federation whose --secagg-max-weight is automatic)."""
    if str(msg.content["config"].get("ask", "classes")) == "train-images":
        count = MetricRecord({"train-images": _site().train_images(_data(context))})
        return Message(RecordDict({"counts": count, "site": _site_name(context)}), reply_to=msg)
    names = _site().class_names(_data(context))
    return Message(RecordDict({"classes": ConfigRecord({"classes": names}), "site": _site_name(context)}),
                   reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    setup, config = _setup(msg, context)
    plan = _site().RoundPlan(str(config["phase"]), int(config["local-epochs"]), float(config.get("proximal-mu", 0.0)),
                          int(config["server-round"]), int(config.get("phase-rounds", 0)))
    arrays, scalars = _site().train_round(setup, _arrays(msg), plan)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    metrics = MetricRecord(scalars | {"round": int(config["server-round"])} | _unit_weight(config))
    return Message(RecordDict({"arrays": record, "metrics": metrics, "site": _site_name(context)}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    setup, config = _setup(msg, context)
    found = _site().evaluate_round(setup, _arrays(msg), str(config["phase"]))
    metrics = MetricRecord({"num-examples": found["num-examples"], "loss-sum": found["loss-sum"],
                            "confusion": [int(v) for v in found["matrix"].ravel()],
                            "round": int(config["server-round"])} | _unit_weight(config))
    return Message(RecordDict({"metrics": metrics, "site": _site_name(context)}), reply_to=msg)


def _unit_weight(config) -> dict:
    """With --dp-noise every site weighs the same (``unit-weight``: 1), as Flower's accounting requires."""
    return {"unit-weight": 1} if bool(config.get("unit-weight", False)) else {}
