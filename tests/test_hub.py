"""HubUploader: background, ordered, retried, never blocking training and never touching the local files.

Most tests drive a small fake of the three ``HfApi`` methods the uploader calls, so they are fast and can
fail on purpose; two use the real ``huggingface_hub.HfApi`` (offline mode, and a refused local port) to
check that its real exceptions are classified as the fake's are. Nothing here reaches the network.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from picomaml.lit import hub
from picomaml.lit.hub import HubUploader, backoff_delay

LOGGER = "picomaml.lit.hub"


def http_error(status: int) -> HfHubHTTPError:
    """An HfHubHTTPError as the Hub client raises it; only ``status_code`` matters to the uploader."""
    return HfHubHTTPError(
        f"{status} error", response=SimpleNamespace(status_code=status, headers={}, request=None)
    )


class FakeHub:
    """Records calls; ``fail(step, attempt)`` returns an exception to raise, ``block`` holds uploads."""

    def __init__(self, fail=None, block: threading.Event | None = None) -> None:
        self.fail = fail or (lambda step, attempt: None)
        self.block = block
        self.started = threading.Event()
        self.calls: list[str] = []
        self.attempts: dict[int, list[float]] = {}  # step -> monotonic time of each upload attempt
        self.commits: list[tuple[str, str, dict[str, bytes]]] = []  # (branch, message, files read)

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, token=None):
        self.calls.append(f"create_repo {repo_id} private={private} exist_ok={exist_ok} type={repo_type}")

    def create_branch(self, repo_id, *, branch, exist_ok=False, token=None):
        self.calls.append(f"create_branch {repo_id} {branch} exist_ok={exist_ok}")

    def upload_folder(self, *, repo_id, folder_path, revision, commit_message, token=None):
        step = int(commit_message.split()[-1])
        self.calls.append(f"upload {repo_id}@{revision} {commit_message}")
        self.attempts.setdefault(step, []).append(time.monotonic())
        self.started.set()
        if self.block is not None:
            self.block.wait()
        exc = self.fail(step, len(self.attempts[step]) - 1)
        if exc is not None:
            raise exc
        self.commits.append((revision, commit_message, snapshot(Path(folder_path))))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stat_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Contents and mtimes: 'unchanged' means not rewritten either."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"step_{step}"
    (folder / "fabric_state").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes([step % 256]) * 64)
    (folder / "config.json").write_text(f'{{"step": {step}}}')
    (folder / "fabric_state" / "checkpoint.pt").write_bytes(b"state" * step)
    return folder


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest sets HF_HUB_OFFLINE=1; the fake-API tests model an online Hub unless they say otherwise."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def test_submit_returns_at_once_while_an_upload_blocks(tmp_path: Path) -> None:
    release = threading.Event()
    api = FakeHub(block=release)
    up = HubUploader("org/pico", "run-a", api=api, backoff_s=0.001)
    a, b = make_checkpoint(tmp_path, 1), make_checkpoint(tmp_path, 2)
    try:
        t0 = time.monotonic()
        up.submit(a, 1)
        assert api.started.wait(5), "the worker never started the upload"
        up.submit(b, 2)  # the first upload is still held: this must not wait for it
        assert time.monotonic() - t0 < 1.0
        assert up.uploaded == []
        assert up.is_pending(a) and up.is_pending(b)
    finally:
        release.set()
    up.close(timeout=5)
    assert up.uploaded == [1, 2]
    assert not up.is_pending(a) and not up.is_pending(b)


def test_one_commit_per_step_on_the_run_branch_in_order(tmp_path: Path) -> None:
    api = FakeHub()
    up = HubUploader("org/pico", "run-a", api=api, private=True)
    steps = [0, 1, 2, 4, 8, 1000]
    folders = [make_checkpoint(tmp_path, s) for s in steps]
    for folder, step in zip(folders, steps, strict=True):
        up.submit(folder, step)
    up.close(timeout=10)

    assert up.uploaded == steps and up.failed == [] and up.skipped == []
    assert [(branch, msg) for branch, msg, _ in api.commits] == [("run-a", f"step {s}") for s in steps]
    assert [files for _, _, files in api.commits] == [snapshot(f) for f in folders]
    # the repo and the branch are created once, before the first commit, and tolerate existing ones
    assert api.calls[:2] == [
        "create_repo org/pico private=True exist_ok=True type=model",
        "create_branch org/pico run-a exist_ok=True",
    ]
    assert sum(c.startswith("create_") for c in api.calls) == 2


@pytest.mark.parametrize("outcome", ["uploaded", "gave up"])
def test_local_checkpoint_is_never_modified(tmp_path: Path, outcome: str) -> None:
    fail = (lambda step, attempt: ConnectionError("down")) if outcome == "gave up" else None
    up = HubUploader("org/pico", "run-a", api=FakeHub(fail=fail), max_attempts=2, backoff_s=0.001)
    folder = make_checkpoint(tmp_path, 3)
    before = stat_snapshot(folder)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    up.submit(folder, 3)
    up.close(timeout=10)
    assert (up.uploaded, up.failed) == (([3], []) if outcome == "uploaded" else ([], [3]))
    assert stat_snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing


def test_transient_failures_are_retried_with_exponential_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    errors = [ConnectionError("reset"), http_error(503), TimeoutError("slow")]
    api = FakeHub(fail=lambda step, attempt: errors[attempt] if attempt < len(errors) else None)
    up = HubUploader("org/pico", "run-a", api=api, max_attempts=5, backoff_s=0.02, max_backoff_s=10)
    up.submit(make_checkpoint(tmp_path, 7), 7)
    up.close(timeout=10)

    assert up.uploaded == [7] and up.failed == []
    times = api.attempts[7]
    assert len(times) == 4  # three failures, then the commit
    gaps = [b - a for a, b in pairwise(times)]
    for gap, expected in zip(gaps, [0.02, 0.04, 0.08], strict=True):
        assert gap >= expected * 0.95, (gaps, "waits must double from backoff_s")
    assert len([m for m in warnings_from(caplog) if "unreachable" in m]) == 1


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_delay(a, 2.0, 60.0) for a in range(7)] == [2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(0, 0.0, 60.0) == 0


def test_gives_up_after_max_attempts_and_moves_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeHub(fail=lambda step, attempt: ConnectionError("down") if step == 1 else None)
    up = HubUploader("org/pico", "run-a", api=api, max_attempts=3, backoff_s=0.001)
    bad = make_checkpoint(tmp_path, 1)
    up.submit(bad, 1)
    up.submit(make_checkpoint(tmp_path, 2), 2)
    up.close(timeout=10)

    assert len(api.attempts[1]) == 3
    assert up.failed == [1] and up.uploaded == [2]
    assert [msg for _, msg, _ in api.commits] == ["step 2"]
    gave_up = [m for m in warnings_from(caplog) if "gave up" in m]
    assert len(gave_up) == 1 and "step 1" in gave_up[0] and str(bad) in gave_up[0]


def test_a_permanent_client_error_is_not_retried(tmp_path: Path) -> None:
    api = FakeHub(fail=lambda step, attempt: http_error(400) if step == 1 else None)
    up = HubUploader("org/pico", "run-a", api=api, max_attempts=5, backoff_s=0.001)
    up.submit(make_checkpoint(tmp_path, 1), 1)
    up.submit(tmp_path / "deleted_before_upload", 2)
    up.submit(make_checkpoint(tmp_path, 3), 3)
    up.close(timeout=10)
    assert len(api.attempts[1]) == 1 and 2 not in api.attempts
    assert up.failed == [1, 2] and up.uploaded == [3]


@pytest.mark.parametrize("status", [401, 403])
def test_bad_credentials_warn_once_and_stop_uploading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    api = FakeHub(fail=lambda step, attempt: http_error(status))
    up = HubUploader("org/pico", "run-a", api=api, max_attempts=5, backoff_s=0.001)
    for step in range(4):
        up.submit(make_checkpoint(tmp_path, step), step)
    up.close(timeout=10)

    assert sum(len(t) for t in api.attempts.values()) == 1  # no retries, no later attempts
    assert up.skipped == [0, 1, 2, 3] and up.uploaded == []
    warned = warnings_from(caplog)
    assert len(warned) == 1 and "credentials" in warned[0] and "HF_TOKEN" in warned[0]


def test_close_with_timeout_returns_when_the_worker_is_stuck(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    api = FakeHub(block=release)
    up = HubUploader("org/pico", "run-a", api=api, backoff_s=0.001)
    try:
        up.submit(make_checkpoint(tmp_path, 1), 1)
        up.submit(make_checkpoint(tmp_path, 2), 2)
        assert api.started.wait(5)
        closer = threading.Thread(target=up.close, kwargs={"timeout": 0.2}, daemon=True)
        closer.start()  # on a thread of its own, so a close that hangs fails the test instead of hanging it
        closer.join(3)
        assert not closer.is_alive(), "close(timeout=0.2) waited for a stuck upload"
        assert any("did not finish" in m and "[1, 2]" in m for m in warnings_from(caplog))
        assert up._thread is not None and up._thread.daemon  # cannot keep the process alive
    finally:
        release.set()
    up._thread.join(5)
    assert up.uploaded == [1] and up.skipped == [2]  # the held upload ends; the queued one is dropped
    up.submit(make_checkpoint(tmp_path, 3), 3)  # after close: dropped, not raised
    assert up.skipped == [2, 3]


def closed_port() -> int:
    """A local port nothing listens on, so a connection is refused at once (no network involved)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("seen_by", ["submit", "HfApi"])
def test_real_hfapi_offline_warns_once_never_raises_keeps_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, seen_by: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    if seen_by == "HfApi":  # let submits through, so the real client raises OfflineModeIsEnabled itself
        monkeypatch.setattr(hub, "_offline_mode", lambda: False)
    up = HubUploader("org/pico", "run-a", backoff_s=0.001)  # api=None: the real HfApi
    assert isinstance(up._api, HfApi)
    folders = [make_checkpoint(tmp_path, s) for s in range(3)]
    before = [stat_snapshot(f) for f in folders]
    for step, folder in enumerate(folders):
        up.submit(folder, step)
    up.close(timeout=10)

    warned = warnings_from(caplog)
    assert len(warned) == 1 and "offline" in warned[0].lower(), warned
    # at submit the flag stops the checkpoint before any request; otherwise the client's own error does
    assert (OfflineModeIsEnabled.__name__ in warned[0]) == (seen_by == "HfApi")
    assert up.uploaded == [] and up.skipped == [0, 1, 2]
    assert [stat_snapshot(f) for f in folders] == before


def test_real_hfapi_refused_connection_is_retried_then_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = HfApi(endpoint=f"http://127.0.0.1:{closed_port()}", token="hf_test")
    up = HubUploader("org/pico", "run-a", api=api, max_attempts=2, backoff_s=0.001)
    folders = [make_checkpoint(tmp_path, s) for s in (10, 20)]
    before = [stat_snapshot(f) for f in folders]
    up.submit(folders[0], 10)
    up.submit(folders[1], 20)
    up.close(timeout=30)

    assert up.failed == [10, 20] and up.uploaded == []
    warned = warnings_from(caplog)
    assert len([m for m in warned if "unreachable" in m]) == 1, warned
    assert len([m for m in warned if "gave up after 2 attempts" in m]) == 2, warned
    assert [stat_snapshot(f) for f in folders] == before


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "has space/x", "org/-x", "org//x", "org/x.git", "o--rg/x"])
def test_bad_repo_id_names_the_config_key(repo_id: str) -> None:
    with pytest.raises(ValueError, match=r"checkpointing\.hub_repo_id.*namespace/name"):
        HubUploader(repo_id, "run-a", api=FakeHub())


@pytest.mark.parametrize("repo_id", ["org/pico", "pico", "my-org/pico_decoder.v1"])
def test_good_repo_ids_are_accepted(repo_id: str) -> None:
    assert HubUploader(repo_id, "run-a", api=FakeHub()).repo_id == repo_id
