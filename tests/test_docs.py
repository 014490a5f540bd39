"""Docs that must not drift from the code: metrics and config keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec

from rtserver.config import Config
from rtserver.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name Prometheus sees, labelled or not."""
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in SUFFIXES[family.type]
    }


def test_every_metric_is_in_operations_md() -> None:
    """docs/operations.md describes every exported metric family."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    for family in Metrics().registry.collect():
        documented = family.name in doc or f"{family.name}_total" in doc
        assert documented, f"{family.name} is not documented"


def test_grafana_dashboard_uses_only_real_metrics() -> None:
    """Every metric a dashboard panel queries is one rtserver exports."""
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    known = exported_names()
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"rtserver_[a-z_]+", target["expr"]))
    assert used
    assert used <= known, used - known


def test_security_md_names_real_limit_keys() -> None:
    """Every limits.* key docs/security.md mentions exists in the config."""
    doc = (ROOT / "docs" / "security.md").read_text()
    keys = {f.name for f in msgspec.structs.fields(Config().limits)}
    mentioned = set(re.findall(r"limits\.([a-z_]+)", doc))
    assert mentioned and mentioned <= keys, mentioned - keys
