"""stowagectl: operate a Stowage driver through its CSI socket, or a node's pool directly.

Exit status: 0 done (check: consistent), 1 the driver refused or check found problems, 2 bad
usage or nothing could be done (no driver at the endpoint, a timeout, check could not read the
pool)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc

from driver import flags
from driver.ctl import backup, demo, local, output, pool
from driver.ctl.client import Client, capability, probe_ready
from driver.errors import StowageError
from driver.host.exec import SubprocessRunner
from driver.host.loop import LoopManager
from driver.host.system import SystemHost
from driver.quantity import parse_bytes

# The chart mounts the node plugin's socket directory at /csi in its pods; elsewhere the
# driver's own default applies.
IN_CLUSTER_ENDPOINT = "unix:///csi/csi.sock"
HOST_ENDPOINT = "unix:///run/stowage/csi.sock"


def default_endpoint(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if env.get("STOWAGE_ENDPOINT"):
        return env["STOWAGE_ENDPOINT"]
    return IN_CLUSTER_ENDPOINT if env.get("KUBERNETES_SERVICE_HOST") else HOST_ENDPOINT


class Unreachable(Exception):
    """No driver answers at the endpoint (exit status 2)."""


def size(text: str) -> int:
    """argparse type for `--size`: a Kubernetes quantity (`1Gi`, `512Mi`, `10G` = 10^9 bytes)."""
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (`stowagectl: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _duration(text: str) -> float:
    try:
        return flags.duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="stowagectl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--endpoint",
        default=default_endpoint(),
        help="unix:///path/csi.sock or tcp://host:port (default: $STOWAGE_ENDPOINT; in a pod "
        f"{IN_CLUSTER_ENDPOINT}, the chart's; else {HOST_ENDPOINT})",
    )
    p.add_argument(
        "--timeout",
        type=_duration,
        default=120.0,
        help="give up on a call after this long (90s, 2m; default 2m)",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=output.FORMATS,
        default="table",
        help="table (default) for people, json or yaml for scripts",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("info", help="plugin info, capabilities, node and capacity")
    sub.add_parser("wait", help="wait until Probe reports ready")

    vol = sub.add_parser("volume").add_subparsers(dest="action", required=True)
    c = vol.add_parser("create")
    c.add_argument("name")
    c.add_argument("--size", type=size, default="1Gi")
    c.add_argument("--fs", default="")
    c.add_argument("--block", action="store_true")
    c.add_argument("--from-snapshot", default="")
    c.add_argument("--from-volume", default="")
    vol.add_parser("list")
    d = vol.add_parser("delete")
    d.add_argument("volume_id")
    e = vol.add_parser(
        "expand",
        help="ControllerExpandVolume, then NodeExpandVolume at --path (growth is the node's)",
    )
    e.add_argument("volume_id")
    e.add_argument("--size", type=size, required=True)
    e.add_argument("--path", required=True, help="staging or publish path of the staged volume")

    snap = sub.add_parser("snapshot").add_subparsers(dest="action", required=True)
    sc = snap.add_parser("create")
    sc.add_argument("name")
    sc.add_argument("--volume", required=True)
    snap.add_parser("list")
    sd = snap.add_parser("delete")
    sd.add_argument("snapshot_id")

    for name in ("stage", "unstage"):
        s = sub.add_parser(name)
        s.add_argument("volume_id")
        s.add_argument("--staging-path", required=True)
        if name == "stage":
            s.add_argument("--block", action="store_true")
            s.add_argument("--fs", default="")
    for name in ("publish", "unpublish"):
        s = sub.add_parser(name)
        s.add_argument("volume_id")
        s.add_argument("--target", required=True)
        if name == "publish":
            s.add_argument("--staging-path", required=True)
            s.add_argument("--block", action="store_true")
            s.add_argument("--readonly", action="store_true")
    st = sub.add_parser("stats")
    st.add_argument("volume_id")
    st.add_argument("--path", required=True)

    dm = sub.add_parser("demo", help="one volume's life end to end, timed")
    dm.add_argument("--workdir", required=True)
    dm.add_argument("--fs", default="ext4")
    dm.add_argument("--data-mib", type=int, default=64)
    dm.add_argument("--backup-target", default="",
                    help="then back a volume up to this target and restore it on the second node")
    dm.add_argument("--second-endpoint", default="",
                    help="the CSI endpoint of another node-mode driver (with the same target)")

    ck = sub.add_parser(
        "check", help="report every inconsistency between metadata, images, loops and mounts"
    )
    ck.add_argument("--pool-dir", required=True)
    ck.add_argument("--json", action="store_true", help="the same as -o json")
    gc = sub.add_parser("gc", help="reclaim trash older than a grace period")
    gc.add_argument("--pool-dir", required=True)
    gc.add_argument("--older-than", type=_duration, default=flags.duration("7d"))
    gc.add_argument("--dry-run", action="store_true")

    backup.add_parser(sub, _duration)

    pl = sub.add_parser(
        "pool", help="rebuild a pool's metadata; a development pool on an image file"
    ).add_subparsers(dest="action", required=True)
    pr = pl.add_parser(
        "rebuild",
        help="rebuild meta.db from the images' own records (driver stopped); the old file is "
        "moved aside, never deleted",
    )
    pr.add_argument("--pool-dir", required=True)
    pc = pl.add_parser("create")
    pc.add_argument("--image", required=True)
    pc.add_argument("--mount", required=True)
    pc.add_argument("--size", type=size, default="16Gi")
    pc.add_argument("--fs", default="xfs", choices=sorted(pool.POOL_MKFS))
    pd = pl.add_parser("destroy")
    pd.add_argument("--image", required=True)
    pd.add_argument("--mount", required=True)
    pd.add_argument("--remove-image", action="store_true")
    pd.add_argument(
        "--dry-run", action="store_true", help="print what would be unmounted and detached"
    )
    return p


def run(args: argparse.Namespace) -> int:
    fmt = "json" if getattr(args, "json", False) else args.output
    if args.cmd == "backup":
        return backup.main(
            args,
            lambda data, rows, cols: print(output.emit(fmt, data, rows=rows, columns=cols)),
        )
    if args.cmd == "check":
        return local.check_main(
            args.pool_dir, fmt, SystemHost(), LoopManager(SubprocessRunner())
        )
    if args.cmd == "gc":
        return local.gc_main(args.pool_dir, args.older_than, args.dry_run)
    if args.cmd == "pool":
        if args.action == "rebuild":
            return local.rebuild_main(args.pool_dir, fmt)
        if args.action == "create":
            made = pool.create(args.image, args.mount, args.size, args.fs)
            print(f"pool {made.mount} ({made.fs_type} on {made.image})")
        else:
            steps = pool.destroy(
                args.image, args.mount, remove_image=args.remove_image, dry_run=args.dry_run
            )
            for line in steps:
                print(("would " if args.dry_run else "") + line)
        return 0

    try:
        kind, where = flags.endpoint(args.endpoint)
    except ValueError as exc:
        raise Unreachable(str(exc)) from None
    if kind == "unix" and args.cmd != "wait":  # `wait` waits for the socket to appear
        try:
            if not stat.S_ISSOCK(os.stat(where).st_mode):
                raise Unreachable(f"{where} is not a socket: no driver is listening there")
        except FileNotFoundError:
            raise Unreachable(
                f"no driver is listening at {args.endpoint} ({where} does not exist); is "
                "stowage-csi running? (--endpoint or $STOWAGE_ENDPOINT)"
            ) from None
    client = Client(args.endpoint, timeout=args.timeout)
    try:
        return _run_client(client, args, fmt)
    finally:
        client.close()


def _volume_row(v: Any, condition: Any = None) -> dict[str, Any]:
    d = output.message(v)
    ctx = d.get("volume_context", {})
    src = d.get("content_source", {})
    source = src.get("snapshot", {}).get("snapshot_id") or src.get("volume", {}).get("volume_id")
    row = {
        "id": d.get("volume_id", ""),
        "size": output.size(d.get("capacity_bytes")),
        "access": ctx.get("stowage.csi.io/access-type", ""),
        "fs": ctx.get("stowage.csi.io/fs-type", ""),
        "source": source or "",
        "node": ctx.get("stowage.csi.io/node", ""),
    }
    if condition is not None:
        row["condition"] = "abnormal: " + condition.message if condition.abnormal else "ok"
    return row


def _snapshot_row(s: Any) -> dict[str, Any]:
    d = output.message(s)
    return {
        "id": d.get("snapshot_id", ""),
        "source": d.get("source_volume_id", ""),
        "size": output.size(d.get("size_bytes")),
        "ready": "yes" if d.get("ready_to_use") else "no",
        "created": d.get("creation_time", ""),
    }


def _capability_name(c: Any) -> str:
    from csi_proto import csi_pb2

    if c.HasField("service"):
        return str(csi_pb2.PluginCapability.Service.Type.Name(c.service.type))
    return "EXPANSION_" + str(
        csi_pb2.PluginCapability.VolumeExpansion.Type.Name(c.volume_expansion.type)
    )


def _run_client(client: Client, args: argparse.Namespace, fmt: str) -> int:
    from csi_proto import csi_pb2

    def show(data: Any, rows: list[dict[str, Any]] | None = None, cols: Sequence[str] = ()) -> None:
        print(output.emit(fmt, data, rows=rows, columns=cols))

    vol_cols = ("id", "size", "access", "fs", "source", "node")
    snap_cols = ("id", "source", "size", "ready", "created")
    t = args.timeout
    if args.cmd == "wait":
        client.wait_ready(deadline=t)
        print("ready")
    elif args.cmd == "info":
        info = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=t)
        node = client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=t)
        capacity = client.controller.GetCapacity(csi_pb2.GetCapacityRequest(), timeout=t)
        ready = probe_ready(client.identity.Probe(csi_pb2.ProbeRequest(), timeout=t))
        plugin_caps = client.identity.GetPluginCapabilities(
            csi_pb2.GetPluginCapabilitiesRequest(), timeout=t
        )
        data = {
            "driver": info.name,
            "version": info.vendor_version,
            "ready": ready,
            "node": node.node_id,
            "max_volumes_per_node": node.max_volumes_per_node,
            "available": capacity.available_capacity,
            "maximum_volume_size": capacity.maximum_volume_size.value,
            "plugin_capabilities": [output.message(c) for c in plugin_caps.capabilities],
        }
        if fmt == "table":
            data = {
                **data,
                "available": output.size(capacity.available_capacity),
                "maximum_volume_size": output.size(capacity.maximum_volume_size.value),
                "plugin_capabilities": [_capability_name(c) for c in plugin_caps.capabilities],
            }
        show(data)
    elif args.cmd == "volume":
        if args.action == "create":
            cap = capability(args.block, args.fs)
            vol = client.create_volume(
                args.name, args.size, cap, args.from_snapshot, args.from_volume
            )
            show(output.message(vol), [_volume_row(vol)], vol_cols)
        elif args.action == "list":
            entries = client.list_volumes()
            show(
                [output.message(e) for e in entries],
                [_volume_row(e.volume, e.status.volume_condition) for e in entries],
                (*vol_cols, "condition"),
            )
        elif args.action == "delete":
            client.delete_volume(args.volume_id)
        else:
            grown = client.expand_volume(args.volume_id, args.size)
            size = client.node_expand(args.volume_id, args.path, grown)
            show({"volume_id": args.volume_id, "capacity_bytes": size})
    elif args.cmd == "snapshot":
        if args.action == "create":
            snap = client.create_snapshot(args.name, args.volume)
            show(output.message(snap), [_snapshot_row(snap)], snap_cols)
        elif args.action == "list":
            sentries = client.list_snapshots()
            show(
                [output.message(e) for e in sentries],
                [_snapshot_row(e.snapshot) for e in sentries],
                snap_cols,
            )
        else:
            client.delete_snapshot(args.snapshot_id)
    elif args.cmd == "stage":
        client.stage(args.volume_id, args.staging_path, capability(args.block, args.fs))
    elif args.cmd == "unstage":
        client.unstage(args.volume_id, args.staging_path)
    elif args.cmd == "publish":
        cap = capability(args.block, "", args.readonly)
        client.publish(args.volume_id, args.staging_path, args.target, cap, args.readonly)
    elif args.cmd == "unpublish":
        client.unpublish(args.volume_id, args.target)
    elif args.cmd == "stats":
        st = output.message(client.stats(args.volume_id, args.path))
        if fmt == "table":
            rows = [
                {
                    "unit": u.get("unit", "").lower(),
                    "total": u.get("total", 0),
                    "used": u.get("used", 0),
                    "available": u.get("available", 0),
                }
                for u in st.get("usage", [])
            ]
            cond = st.get("volume_condition", {})
            print(output.table(rows, ("unit", "total", "used", "available")))
            print(
                "condition: "
                + ("abnormal: " if cond.get("abnormal") else "ok ")
                + cond.get("message", "")
            )
        else:
            show(st)
    elif args.cmd == "demo":
        if args.backup_target and not args.second_endpoint:
            print("stowagectl: demo --backup-target needs --second-endpoint", file=sys.stderr)
            return 2
        demo.run(client, os.path.abspath(args.workdir), fs_type=args.fs, data_mib=args.data_mib)
        if args.backup_target:
            other = Client(args.second_endpoint, timeout=args.timeout)
            try:
                demo.run_backup(client, other, os.path.abspath(args.workdir), args.backup_target,
                                fs_type=args.fs, data_mib=args.data_mib)
            finally:
                other.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Unreachable as exc:
        print(f"stowagectl: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            print(
                f"stowagectl: no answer from {args.endpoint} within {args.timeout:g} s (--timeout)",
                file=sys.stderr,
            )
            return 2
        if code is grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            print(
                f"stowagectl: no driver is listening at {args.endpoint}: {exc.details()}",
                file=sys.stderr,
            )
            return 2
        print(f"stowagectl: {code.name}: {exc.details()}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"stowagectl: {exc}", file=sys.stderr)
        return 2
    except StowageError as exc:
        print(f"stowagectl: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a CLI reports and exits non-zero
        print(f"stowagectl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
