"""stowagectl: operate a Stowage driver through its CSI socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import grpc
from google.protobuf import json_format

from driver.ctl import demo, local, pool
from driver.ctl.client import Client, capability
from driver.quantity import parse_bytes


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


def _print(msg: object) -> None:
    if hasattr(msg, "DESCRIPTOR"):
        print(json_format.MessageToJson(msg, indent=2))  # type: ignore[arg-type]
    else:
        print(json.dumps(msg, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stowagectl", description=__doc__)
    p.add_argument(
        "--endpoint", default=os.environ.get("STOWAGE_ENDPOINT", "unix:///run/stowage/csi.sock")
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

    ck = sub.add_parser(
        "check", help="report every inconsistency between metadata, images, loops and mounts"
    )
    ck.add_argument("--pool-dir", required=True)
    ck.add_argument("--json", action="store_true")
    gc = sub.add_parser("gc", help="reclaim trash older than a grace period")
    gc.add_argument("--pool-dir", required=True)
    gc.add_argument("--older-than", type=local.duration, default=local.duration("7d"))
    gc.add_argument("--dry-run", action="store_true")

    pl = sub.add_parser("pool", help="a development pool on an image file").add_subparsers(
        dest="action", required=True
    )
    pc = pl.add_parser("create")
    pc.add_argument("--image", required=True)
    pc.add_argument("--mount", required=True)
    pc.add_argument("--size", type=size, default="16Gi")
    pc.add_argument("--fs", default="xfs", choices=sorted(pool.POOL_MKFS))
    pd = pl.add_parser("destroy")
    pd.add_argument("--image", required=True)
    pd.add_argument("--mount", required=True)
    pd.add_argument("--remove-image", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    if args.cmd == "check":
        return local.check_main(args.pool_dir, args.json)
    if args.cmd == "gc":
        return local.gc_main(args.pool_dir, args.older_than, args.dry_run)
    if args.cmd == "pool":
        if args.action == "create":
            made = pool.create(args.image, args.mount, args.size, args.fs)
            print(f"pool {made.mount} ({made.fs_type} on {made.image})")
        else:
            for line in pool.destroy(args.image, args.mount, remove_image=args.remove_image):
                print(line)
        return 0

    client = Client(args.endpoint)
    try:
        return _run_client(client, args)
    finally:
        client.close()


def _run_client(client: Client, args: argparse.Namespace) -> int:
    from csi_proto import csi_pb2

    if args.cmd == "wait":
        client.wait_ready()
        print("ready")
    elif args.cmd == "info":
        _print(client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()))
        _print(client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()))
        _print(client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()))
        _print(client.controller.GetCapacity(csi_pb2.GetCapacityRequest()))
    elif args.cmd == "volume":
        if args.action == "create":
            cap = capability(args.block, args.fs)
            _print(
                client.create_volume(
                    args.name, args.size, cap, args.from_snapshot, args.from_volume
                )
            )
        elif args.action == "list":
            for entry in client.list_volumes():
                _print(entry)
        elif args.action == "delete":
            client.delete_volume(args.volume_id)
        else:
            print(
                client.node_expand(
                    args.volume_id, args.path, client.expand_volume(args.volume_id, args.size)
                )
            )
    elif args.cmd == "snapshot":
        if args.action == "create":
            _print(client.create_snapshot(args.name, args.volume))
        elif args.action == "list":
            for sentry in client.list_snapshots():
                _print(sentry)
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
        _print(client.stats(args.volume_id, args.path))
    elif args.cmd == "demo":
        demo.run(client, os.path.abspath(args.workdir), fs_type=args.fs, data_mib=args.data_mib)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except grpc.RpcError as exc:
        print(f"stowagectl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a CLI reports and exits non-zero
        print(f"stowagectl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
