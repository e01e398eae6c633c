"""The --backup-* flags: parsed into the configuration; a target without a usable key, or
without credentials, refused at start-up in one line (exit 2) that never shows a secret."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from driver import cli

SPEC = "main=s3://bucket/pfx?endpoint=http://127.0.0.1:9"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_backup_flags_reach_the_configuration() -> None:
    cfg = cli.parse([
        "--backup-target", SPEC, "--backup-target", "second=s3://other?endpoint=https://s3.x",
        "--backup-key-file", "/k", "--backup-cluster-id", "prod-1", "--backup-workers", "8",
        "--backup-max-concurrent", "3", "--backup-rate-limit", "50Mi",
    ])
    assert cfg.backup_targets == (SPEC, "second=s3://other?endpoint=https://s3.x")
    assert (cfg.backup_key_file, cfg.backup_cluster_id) == ("/k", "prod-1")
    assert (cfg.backup_workers, cfg.backup_max_concurrent) == (8, 3)
    assert cfg.backup_rate_limit == 50 << 20
    assert cli.parse([]).backup_targets == ()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--backup-target", SPEC], "need --backup-key-file"),
        (["--backup-target", "Main=s3://bucket?endpoint=http://h"], "NAME must be"),
        (["--backup-target", "m=s3://bucket"], "endpoint=URL is required"),
        (["--backup-target", SPEC, "--backup-target", SPEC, "--backup-key-file", "/k"],
         "given twice"),
        (["--backup-rate-limit", "fast"], "--backup-rate-limit"),
        (["--backup-workers", "0"], "at least 1"),
        (["--backup-cluster-id", "a b"], "--backup-cluster-id"),
    ],
)
def test_bad_backup_flags_are_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def _start(tmp_path: object, key_text: str | None, env: dict[str, str]) -> tuple[int, str]:
    key = os.path.join(str(tmp_path), "backup.key")
    if key_text is not None:
        with open(key, "w", encoding="ascii") as fh:
            fh.write(key_text)
    r = subprocess.run(
        [sys.executable, "-m", "driver", "--backup-target", SPEC, "--backup-key-file", key,
         "--pool-dir", os.path.join(str(tmp_path), "nowhere"),
         "--endpoint", "unix://" + os.path.join(str(tmp_path), "s.sock")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env,
    )
    return r.returncode, r.stdout + r.stderr


CREDS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "hush-hush-secret"}


def test_unusable_key_or_credentials_refuse_start_up_without_secrets(tmp_path: object) -> None:
    code, out = _start(tmp_path, None, CREDS)
    assert code == 2 and "does not exist" in out and out.count("\n") == 1, out
    code, out = _start(tmp_path, "not-a-key-but-a-secret-phrase\n", CREDS)
    assert code == 2 and "must hold 32 random bytes" in out and out.count("\n") == 1, out
    assert "secret-phrase" not in out
    code, out = _start(tmp_path, "ab" * 32, {})
    assert code == 2 and "AWS_ACCESS_KEY_ID" in out and out.count("\n") == 1, out
    code, out = _start(tmp_path, "ab" * 32, CREDS)
    assert code == 1, out  # past the backup checks: the missing pool stops it
    assert "hush-hush-secret" not in out and "ab" * 32 not in out
