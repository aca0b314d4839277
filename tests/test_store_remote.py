"""A stage store shared by hosts: QUANTMILL_HOME=s3://..., on a real S3 server (moto in server
mode on loopback), and building an entry once (`Store.exclusive`) from real processes.

"Two hosts" are two processes with different read-through caches (QUANTMILL_CACHE): they share
nothing but the bucket, so only the S3 lease can keep them apart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantmill.tasks.lease import LeaseError
from quantmill.tasks.store import MANIFEST, Store, default_root, stage_key
from quantmill.tasks.store_remote import FILES, RemoteStoreError, cache_root
from tests.served import free_port, stop, wait_http
from tests.tiny import make_tiny_llama

REPO = Path(__file__).resolve().parent.parent
STAGE = "collect_stats"
KEY = stage_key(STAGE, {"batch_size": 8}, {"model": "m" * 64, "calibration": "c" * 64})


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`moto_server` on a free loopback port, the AWS variables pointing at it; yields (endpoint,
    request log): every request it answers is one line of that log."""
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    try:
        wait_http(endpoint, proc, log, 30)
        yield endpoint, log
    finally:
        stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def url(s3_server, tmp_path, monkeypatch) -> str:
    """A fresh bucket; QUANTMILL_HOME points into it, this process's cache is under tmp_path."""
    import boto3

    bucket = f"qm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server[0]).create_bucket(Bucket=bucket)
    home = f"s3://{bucket}/team"
    monkeypatch.setenv("QUANTMILL_HOME", home)
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache-here"))
    return home


def _objects(url: str) -> dict[str, int]:
    """{key under the store: size} of what the bucket holds."""
    import boto3

    bucket, prefix = url[len("s3://") :].split("/", 1)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o["Size"] for o in listing.get("Contents", [])}


def _commit(store: Store, run: int, key: str = KEY) -> object:
    with store.build(STAGE, key) as tmp:
        (tmp / "stats.safetensors").write_bytes(b"s" * 1000 + bytes([run]))
        (tmp / "report").mkdir()
        (tmp / "report" / "outliers.parquet").write_bytes(b"o" * 300)
        return store.commit(tmp, STAGE, key, {"run": run})


def _gets(log: Path, url: str, rel: str) -> int:
    """How many times the S3 server answered a GET of one of the entry's files."""
    path = "/" + url[len("s3://") :] + f"/{STAGE}/{KEY}/{rel}"
    return sum(1 for line in log.read_text().splitlines() if re.search(rf'"GET {re.escape(path)} HTTP', line))


# --------------------------------------------------------------------------- the shared store


def test_a_remote_home_keeps_the_local_state_in_its_cache(url, tmp_path) -> None:
    store = Store()
    assert store.remote is not None and store.location == url
    assert store.root == default_root() == cache_root(url)
    assert store.root.parent == tmp_path / "cache-here"
    assert Store(f"file://{tmp_path}/plain").root == tmp_path / "plain" and Store(f"file://{tmp_path}/plain").remote is None


def test_a_commit_uploads_the_entry_with_its_manifest_and_another_host_reads_it(url, tmp_path, monkeypatch) -> None:
    entry = _commit(Store(), run=1)
    assert entry.path == Store().path(STAGE, KEY) and entry.path.is_relative_to(tmp_path / "cache-here")
    objects = _objects(url)
    files = {"stats.safetensors": 1001, "report/outliers.parquet": 300}
    assert {k: v for k, v in objects.items() if not k.endswith(MANIFEST)} == {f"{STAGE}/{KEY}/{rel}": size for rel, size in files.items()}
    assert entry.manifest[FILES] == files and entry.manifest["run"] == 1

    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache-other-host"))
    other = Store()
    got = other.get(STAGE, KEY)
    assert got is not None and got.path.is_relative_to(tmp_path / "cache-other-host")
    assert got.manifest == entry.manifest
    assert (got.path / "stats.safetensors").read_bytes() == b"s" * 1000 + bytes([1])
    assert (got.path / "report" / "outliers.parquet").read_bytes() == b"o" * 300
    assert sorted(p.name for p in got.path.parent.iterdir()) == [KEY]  # no download folder left
    assert other.get(STAGE, "f" * 64) is None


def test_a_worker_downloads_an_entry_once(url, s3_server, tmp_path, monkeypatch) -> None:
    _commit(Store(), run=1)
    log = s3_server[1]
    assert _gets(log, url, "stats.safetensors") == 0  # the committing host has it already
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache-worker"))
    assert Store().get(STAGE, KEY) is not None
    assert _gets(log, url, "stats.safetensors") == 1 and _gets(log, url, "report/outliers.parquet") == 1
    again = Store()  # a later run on the same worker
    assert again.get(STAGE, KEY) is not None and again.get(STAGE, KEY) is not None
    assert _gets(log, url, "stats.safetensors") == 1 and _gets(log, url, "report/outliers.parquet") == 1
    assert _gets(log, url, MANIFEST) == 1  # a cached entry costs no request at all


def test_a_download_that_does_not_match_the_manifest_is_refused_and_leaves_nothing(url, tmp_path, monkeypatch) -> None:
    import boto3

    _commit(Store(), run=1)
    bucket, prefix = url[len("s3://") :].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{STAGE}/{KEY}/stats.safetensors", Body=b"short")
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache-worker"))
    store = Store()
    with pytest.raises(RemoteStoreError, match=r"stats.safetensors has 5 bytes, its manifest says 1001: delete the entry and re-run$"):
        store.get(STAGE, KEY)
    assert list((store.root / STAGE).iterdir()) == []


_KILLED_UPLOAD = r"""
import os, signal, sys
from quantmill.tasks import store_remote
from quantmill.tasks.store import Store
def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the files went up, before the manifest
store_remote.RemoteStore.put_manifest = die
store = Store()
with store.build(sys.argv[1], sys.argv[2]) as tmp:
    (tmp / "stats.safetensors").write_bytes(b"half")
    store.commit(tmp, sys.argv[1], sys.argv[2], {})
"""


def test_an_upload_killed_before_its_manifest_leaves_no_entry(url, tmp_path, monkeypatch) -> None:
    done = subprocess.run([sys.executable, "-c", _KILLED_UPLOAD, STAGE, KEY], cwd=REPO, env=os.environ.copy(), timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert _objects(url) == {f"{STAGE}/{KEY}/stats.safetensors": 4}  # the data went up, no manifest
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache-fresh"))
    assert Store().get(STAGE, KEY) is None
    entry = _commit(Store(), run=2)  # the next run commits over the leftover
    assert entry.manifest["run"] == 2 and _objects(url)[f"{STAGE}/{KEY}/stats.safetensors"] == 1001


def test_a_commit_keeps_the_entry_another_host_published_first(url, tmp_path, monkeypatch) -> None:
    first = _commit(Store(), run=1)
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache-slower-host"))
    slower = Store()
    got = _commit(slower, run=2)
    assert got.manifest == first.manifest and got.manifest["run"] == 1
    assert (got.path / "stats.safetensors").read_bytes()[-1] == 1  # its cache holds the first entry's files
    assert json.loads((slower.path(STAGE, KEY) / MANIFEST).read_text())["run"] == 1
    assert not list((slower.root / STAGE).glob(".tmp-*"))


def test_a_writer_that_missed_the_first_entry_cannot_replace_its_manifest(url, tmp_path, monkeypatch) -> None:
    """Two hosts past the "is it there?" check at once: S3's If-None-Match keeps the first manifest."""
    first = _commit(Store(), run=1)
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache-racer"))
    racer = Store()
    real = type(racer.remote).manifest
    looks = iter([None])  # its first look saw no entry yet
    monkeypatch.setattr(racer.remote, "manifest", lambda stage, key: next(looks, None) or real(racer.remote, stage, key))
    got = _commit(racer, run=2)  # its files went up before its manifest was refused (why callers take exclusive())
    assert got.manifest == first.manifest
    assert json.loads(Store().remote.manifest(STAGE, KEY))["run"] == 1
    with pytest.raises(FileExistsError):
        racer.remote.put_manifest(STAGE, KEY, b"{}")


def test_a_store_url_other_than_s3_is_one_line(tmp_path) -> None:
    with pytest.raises(RemoteStoreError, match=r"^QUANTMILL_HOME gs://b/p: a remote store must be s3://BUCKET\[/PREFIX\] \(or use a local or mounted shared path\)$"):
        Store("gs://b/p")


def test_a_missing_bucket_is_one_line_before_anything_is_computed(s3_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache"))
    store = Store("s3://no-such-bucket/team")
    with pytest.raises(RemoteStoreError, match=r"^the store s3://no-such-bucket/team: bucket no-such-bucket cannot be used \(.*\): create it, or check the credentials$"):
        store.get(STAGE, KEY)
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "store", "ls"], cwd=REPO, env={**os.environ, "QUANTMILL_HOME": "s3://no-such-bucket/team"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert re.fullmatch(r"error: the store s3://no-such-bucket/team: bucket no-such-bucket cannot be used \(.*\): create it, or check the credentials\n", done.stderr)
    with pytest.raises(LeaseError, match=r"^the lease no-such-bucket/team/.leases/collect_stats/[0-9a-f]{64}.json cannot be written: "):
        with store.exclusive(STAGE, KEY):
            pass
    # `quantmill quantize` says it before the first task: nothing is computed for a store it cannot write
    model = make_tiny_llama(tmp_path / "tiny")
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "quantize", "--model", str(model), "--recipe", "w8a16-rtn"], cwd=REPO,
                          env={**os.environ, "QUANTMILL_HOME": "s3://no-such-bucket/team"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Beginning flow run" not in done.stderr + done.stdout
    assert re.fullmatch(r"error: the store s3://no-such-bucket/team: bucket no-such-bucket cannot be used \(.*\): create it, or check the credentials\n", done.stderr), done.stderr


def test_store_ls_lists_a_remote_store(url, tmp_path) -> None:
    _commit(Store(), run=1)
    env = {**os.environ, "QUANTMILL_CACHE": str(tmp_path / "cache-laptop")}
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "store", "ls", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert listing["root"] == url
    assert [(r["stage"], r["kind"], r["key"], r["size_bytes"], r["cached"]) for r in listing["rows"]] == [(STAGE, "entry", KEY, 1301 + _objects(url)[f"{STAGE}/{KEY}/{MANIFEST}"], False)]
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "store", "ls"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == f"1 entries, 0 partials in {url}"
    assert done.stdout.splitlines()[1].split()[:3] == [STAGE, "entry", KEY[:16]] and "cached here" not in done.stdout
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "store", "ls"], cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[1].endswith("cached here")  # the committing host's cache has it


# --------------------------------------------------------------------------- building an entry once

_WORKER = r"""
import json, os, sys, time
from quantmill.tasks.store import Store
stage, key, mode, lease_s, arg, log = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
store = Store()
def say(event, **kw):
    print(json.dumps({"event": event, "t": time.time(), **kw}), flush=True)
if mode == "hold":  # hold the right to build for `arg` seconds (or until killed)
    with store.exclusive(stage, key, lease_s=lease_s):
        say("held")
        time.sleep(arg)
        say("releasing")
elif mode == "claim":  # the same pattern through Store.claim, started at time `arg`
    while time.time() < arg:
        time.sleep(0.001)
    with store.claim(stage, key, lease_s=lease_s, on_wait=lambda line: say("told", line=line)) as entry:
        if entry is None:
            with store.build(stage, key) as tmp:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\n")
                time.sleep(1.5)
                (tmp / "stats.safetensors").write_text(str(os.getpid()))
                entry = store.commit(tmp, stage, key, {"writer": os.getpid()})
    say("done", writer=entry.manifest["writer"], file=(entry.path / "stats.safetensors").read_text())
else:  # the caller pattern of a stage, started at time `arg`
    while time.time() < arg:
        time.sleep(0.001)
    entry = store.get(stage, key)
    if entry is None:
        say("waiting")
        with store.exclusive(stage, key, lease_s=lease_s):
            say("acquired")
            entry = store.get(stage, key)
            if entry is None:
                with store.build(stage, key) as tmp:
                    with open(log, "a") as f:
                        f.write(f"{os.getpid()}\n")
                    time.sleep(1.5)
                    (tmp / "stats.safetensors").write_text(str(os.getpid()))
                    entry = store.commit(tmp, stage, key, {"writer": os.getpid()})
    say("done", writer=entry.manifest["writer"], file=(entry.path / "stats.safetensors").read_text())
"""


def _worker(mode: str, lease_s: float, arg: float, log: Path, cache: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, **({"QUANTMILL_CACHE": str(cache)} if cache else {})}
    return subprocess.Popen([sys.executable, "-c", _WORKER, STAGE, KEY, mode, str(lease_s), str(arg), str(log)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def _events(proc: subprocess.Popen, timeout: float = 60) -> dict[str, dict]:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0
    return {e["event"]: e for e in map(json.loads, out.splitlines())}


def _next_event(proc: subprocess.Popen) -> dict:
    return json.loads(proc.stdout.readline())


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, monkeypatch) -> str:
    """The same tests on a local store (one host, the flock) and on S3 from two hosts (the lease)."""
    if request.param == "s3":
        return request.getfixturevalue("url")
    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "home"))
    return request.param


def _cache(where: str, tmp_path: Path, host: str) -> Path | None:
    return tmp_path / f"cache-{host}" if where != "local" else None


@pytest.mark.parametrize("mode", ["build", "claim"])
def test_two_runs_that_need_one_entry_at_once_compute_it_once(where, mode, tmp_path) -> None:
    log, start = tmp_path / "computed.log", time.time() + 3.0  # all three are up by then: none finds the entry made
    procs = [_worker(mode, 5.0, start, log, _cache(where, tmp_path, host)) for host in ("a", "b", "c")]
    results = [_events(p) for p in procs]
    computed = log.read_text().split()
    assert len(computed) == 1  # one computed it ...
    assert all(r["done"]["writer"] == int(computed[0]) and r["done"]["file"] == computed[0] for r in results)  # ... all got it
    if mode == "build":
        assert all("waiting" in r for r in results)  # all started before the entry existed: two really waited
    else:  # the two that waited were told why, in one line
        told = sorted(r["told"]["line"] for r in results if "told" in r)
        where = "on this host" if where == "local" else "on another host: lease 5 s"
        assert told == [f"waiting for the run that is building {STAGE} {KEY[:12]} ({where})"] * 2, told
    assert Store().get(STAGE, KEY).manifest["writer"] == int(computed[0])


def test_a_killed_holder_blocks_the_other_run_for_at_most_the_lease(where, tmp_path) -> None:
    lease_s, log = 3.0, tmp_path / "computed.log"
    holder = _worker("hold", lease_s, 600, log, _cache(where, tmp_path, "a"))
    try:
        assert _next_event(holder)["event"] == "held"
        waiter = _worker("build", lease_s, 0, log, _cache(where, tmp_path, "b"))
        assert _next_event(waiter)["event"] == "waiting"
        time.sleep(lease_s + 0.5)  # a live holder keeps it past its lease: it renews
        assert waiter.poll() is None and not log.exists()
        holder.send_signal(signal.SIGKILL)
        killed_at = time.time()
    finally:
        holder.kill()
        holder.wait()
    events = _events(waiter)
    waited = events["acquired"]["t"] - killed_at
    print(f"\n{where}: the waiter got the right {waited:.2f} s after the holder's SIGKILL (lease {lease_s} s)")
    if where == "local":
        assert waited < 1.0  # the kernel released the flock at once
    else:
        assert lease_s / 3 < waited < lease_s + 2.5  # the lease ran out: no renewal since the kill (+ polls, a loaded machine)
    assert events["done"]["writer"] == int(log.read_text()) == waiter.pid


def test_a_live_holder_is_never_taken_over(where, tmp_path) -> None:
    lease_s, log = 2.0, tmp_path / "computed.log"
    holder = _worker("hold", lease_s, 3 * lease_s, log, _cache(where, tmp_path, "a"))
    assert _next_event(holder)["event"] == "held"
    waiter = _worker("build", lease_s, 0, log, _cache(where, tmp_path, "b"))
    releasing = _events(holder)["releasing"]["t"]
    assert _events(waiter)["acquired"]["t"] >= releasing  # waited out three leases' worth


def test_gc_removes_a_killed_download_and_keeps_a_running_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "cache-as-home"))
    store = Store()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = store.root / STAGE / f".dl-{KEY}-123-{dead.pid}"
    running = store.root / STAGE / f".dl-{KEY}-456-{os.getpid()}"
    for folder in (killed, running):
        (folder / "report").mkdir(parents=True)
        (folder / "stats.safetensors").write_bytes(b"half")
    store.collect(older_than_s=0)
    assert not killed.exists() and running.is_dir()
