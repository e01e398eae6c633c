"""stowagectl as an operator meets it: clear one-line errors with distinct exit codes, tables by
default and JSON/YAML on request, and the in-cluster default endpoint."""

from __future__ import annotations

import json
import os
import socket

import pytest
import yaml

from driver.ctl import main as ctl
from driver.ctl import output
from driver.metrics import Metrics, PoolSample
from harness import REPO


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_socket_is_exit_2_naming_the_endpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: os.PathLike[str]
) -> None:
    sock = os.path.join(str(tmp_path), "nope.sock")
    code, _, err = run(capsys, "--endpoint", "unix://" + sock, "volume", "list")
    assert code == 2
    assert f"no driver is listening at unix://{sock}" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("endpoint", ["/run/csi.sock", "unix://relative", "http://x:1"])
def test_wrong_endpoint_form_is_exit_2(capsys: pytest.CaptureFixture[str], endpoint: str) -> None:
    code, _, err = run(capsys, "--endpoint", endpoint, "info")
    assert code == 2 and "endpoint" in err and len(err.strip().splitlines()) == 1


def test_a_socket_nobody_serves_is_no_driver(
    capsys: pytest.CaptureFixture[str], tmp_path: os.PathLike[str]
) -> None:
    path = os.path.join(str(tmp_path), "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: what a killed driver leaves
    try:
        code, _, err = run(capsys, "--endpoint", "unix://" + path, "--timeout", "5s", "info")
    finally:
        s.close()
    assert code == 2
    assert "no driver is listening" in err and "Connection refused" in err


def test_a_driver_that_never_answers_times_out(
    capsys: pytest.CaptureFixture[str], tmp_path: os.PathLike[str]
) -> None:
    path = os.path.join(str(tmp_path), "mute.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(8)  # accepts connections (the kernel does), never speaks HTTP/2
    try:
        code, _, err = run(capsys, "--endpoint", "unix://" + path, "--timeout", "1s", "info")
    finally:
        s.close()
    assert code == 2
    assert "no answer from" in err and "within 1 s (--timeout)" in err


def test_bad_timeout_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ctl.build_parser().parse_args(["--timeout", "soon", "info"])
    assert exc.value.code == 2
    assert "not a duration" in capsys.readouterr().err


def test_default_endpoint_in_a_pod_is_the_charts() -> None:
    assert ctl.default_endpoint({}) == "unix:///run/stowage/csi.sock"
    assert ctl.default_endpoint({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "unix:///csi/csi.sock"
    assert ctl.default_endpoint({"STOWAGE_ENDPOINT": "tcp://h:1"}) == "tcp://h:1"
    chart = os.path.join(REPO, "charts", "stowage", "templates")
    with open(os.path.join(chart, "_helpers.tpl"), encoding="utf-8") as fh:
        assert '"stowage.endpoint" -}}' + ctl.IN_CLUSTER_ENDPOINT in fh.read()


def test_output_formats() -> None:
    rows = [{"id": "v-1", "size": output.size(3 << 30), "fs": ""}, {"id": "v-22", "size": "1Mi"}]
    table = output.emit("table", rows, rows=rows, columns=("id", "size", "fs"))
    assert table.splitlines() == ["ID    SIZE  FS", "v-1   3Gi   -", "v-22  1Mi   -"]
    assert json.loads(output.emit("json", rows)) == rows
    assert yaml.safe_load(output.emit("yaml", rows)) == rows
    assert output.emit("table", [], rows=[], columns=("id",)) == "(none)"
    assert output.size(1536 << 20) == "1.5Gi" and output.size(512) == "512"


def test_pool_metrics_are_exported() -> None:
    m = Metrics()
    m.watch_pool(
        lambda: PoolSample(
            100,
            50,
            2,
            1,
            1,
            0,
            provisioned_bytes=300,
            allocated_bytes=40,
            reflink=True,
            trash_items=3,
            trash_bytes=7,
            reconcile_findings={"adopted": 2},
            pool_uuid="u",
        )
    )
    value = m.registry.get_sample_value
    assert value("stowage_pool_provisioned_bytes") == 300
    assert value("stowage_pool_allocated_bytes") == 40
    assert value("stowage_pool_shares_extents") == 1
    assert value("stowage_trash_items") == 3 and value("stowage_trash_bytes") == 7
    assert value("stowage_reconcile_findings", {"kind": "adopted"}) == 2
    assert value("stowage_pool_info", {"pool_uuid": "u"}) == 1
    assert (
        value(
            "stowage_build_info",
            {"version": __import__("driver").__version__, "driver": "stowage.csi.io"},
        )
        == 1
    )
