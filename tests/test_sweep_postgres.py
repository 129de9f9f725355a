"""Two worker processes share one grid study on a real PostgreSQL server: together they complete
every cell, none twice; the study then gains a seed and two workers run only the new runs. The server (Debian's postgresql 15) runs as the ``postgres`` user in a
temporary directory on 127.0.0.1 and a free port, and is stopped at the end."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from sweep_helpers import TINY_KEYS, cli, free_port, trials, write_tiny

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture
def postgres_url():
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (Debian package postgresql-15)")
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("initdb refuses root and this test needs root to run it as the postgres user (runuser)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (dev extra psycopg2-binary)")
    base = Path(tempfile.mkdtemp(prefix="vtok-pg-", dir="/tmp"))
    base.chmod(0o755)
    shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", free_port()
    run = lambda *c: subprocess.run(c, check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run(*_as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"))
        run(*_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                          "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"))
        run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "vtok")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/vtok"
    finally:
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
                       capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def _two_workers(path, tmp_path, *overrides):
    procs = [cli([str(path), *overrides], tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    return outs, Counter(f"{cell}#seed={seed}" for o in outs for cell, seed in re.findall(r"trial \d+ cell (\S+) seed (\d+)", o))


def test_two_workers_share_one_postgres_study_and_run_no_cell_twice(tmp_path, postgres_url):
    path = write_tiny(tmp_path, **{"train.steps": 20, "sweep.storage": postgres_url, "tracking.enabled": False})
    seed0 = {k for k in TINY_KEYS if k.endswith("seed=0")}
    outs, ran = _two_workers(path, tmp_path, "sweep.seeds=[0]")
    assert set(ran) == seed0 and max(ran.values()) == 1, ran  # every cell trained exactly once
    first = {t.record.key: t.number for t in trials(path) if t.state == "COMPLETE"}
    assert set(first) == seed0
    print("cells per worker:", [len(re.findall(r"trial \d+ cell", o)) for o in outs])

    outs, ran = _two_workers(path, tmp_path)  # the file's seeds [0, 1]: the same study gains seed 1
    assert set(ran) == TINY_KEYS - seed0 and max(ran.values()) == 1, ran  # only the new seed's runs
    final = trials(path)
    complete = Counter(t.record.key for t in final if t.state == "COMPLETE")
    assert set(complete) == TINY_KEYS and max(complete.values()) == 1
    assert all(t.number == first[t.record.key] for t in final if t.record.key in first)
    assert not [t for t in final if t.state in ("RUNNING", "WAITING")]


def test_two_workers_adaptive_sweep_on_postgres(tmp_path, postgres_url):
    """A seed range on shared storage: two workers run the minimum, then only the added seeds of the
    open claim's pair, no (cell, seed) twice."""
    from test_sweep_adaptive import check_real, write_real

    path = write_real(tmp_path, **{"sweep.storage": postgres_url, "sweep.workers": 2})
    p = cli([str(path)], tmp_path)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    ran = Counter(f"{cell}#seed={seed}" for cell, seed in re.findall(r"trial \d+ cell (\S+) seed (\d+)", out))
    assert max(ran.values()) == 1 and len(ran) == 3 + 4 + 4, ran
    check_real(path)
