"""Mirror checkpoints to the Hugging Face Hub from a background thread, as pico-train does.

Each checkpoint directory becomes one commit (``"step N"``) on a per-run branch of one model repo, so a
repo holds many runs side by side and a branch's history is that run's training trajectory: checking
out commit ``step 2000`` of branch ``my-run`` gives exactly the local ``step_2000`` folder.

Design, and why:

* **The local checkpoint is the source of truth; the Hub is a mirror.** This code only ever *reads* a
  checkpoint folder (``upload_folder`` reads the files when the upload runs). It never moves, rewrites
  or deletes it, whatever happens to the upload. A caller that rotates old checkpoints asks
  :meth:`HubUploader.is_pending` first, so it does not delete a folder that is still being read.
* **Training never waits for the network.** :meth:`HubUploader.submit` only puts ``(folder, step)`` on a
  queue; one daemon thread does the uploads. Nothing raised by an upload reaches the training thread:
  every outcome is logged (``logging``, logger ``picomaml.lit.hub``) and recorded in
  :attr:`HubUploader.uploaded` / :attr:`~HubUploader.failed` / :attr:`~HubUploader.skipped`.
* **One worker, so commits land in step order.** Two concurrent commits to one branch race for the same
  parent commit; a single FIFO worker makes the branch history the submission order. (This is also why
  we do not use ``upload_folder(run_as_future=True)``: it gives neither ordering nor retries.)
* **Failures are sorted by whether waiting can help** (see :func:`_classify`):

  - *offline mode* (``HF_HUB_OFFLINE=1``, i.e. ``huggingface_hub.constants.HF_HUB_OFFLINE``, seen at
    ``submit`` or as ``OfflineModeIsEnabled`` from the API): the user asked for no network, which will
    not change during the run. One warning, then every later checkpoint is *skipped* (not queued, no
    retries): they stay local and can be pushed later with ``hf upload``.
  - *authentication* (HTTP 401/403, or no token found): retrying with the same credentials cannot
    succeed. One clear warning, then the uploader turns itself off like offline mode.
  - *network* (connection refused/reset, timeouts, HTTP 408/429/5xx, and anything unexpected): maybe
    transient, so it is retried with exponential backoff, ``backoff_s * 2**attempt`` capped at
    ``max_backoff_s``, up to ``max_attempts`` attempts per checkpoint. The first network failure logs one
    "Hub unreachable" warning; a checkpoint that exhausts its attempts logs a warning naming its step
    and folder, and the worker moves on to the next one (a dead network still costs every checkpoint
    its attempts, so a later recovery uploads the later checkpoints).
  - *this checkpoint is bad* (its folder is gone, other HTTP 4xx, ``ValueError``): the same request
    would fail again, so it fails at once with a warning and the worker moves on.

* **A run's end is bounded.** :meth:`HubUploader.close` waits for the queue to drain for at most
  ``timeout`` seconds; after that it stops the worker between attempts, logs which steps were not
  uploaded, and returns. An upload stuck inside ``huggingface_hub`` cannot be interrupted, but the
  thread is a daemon, so it does not keep the process alive.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

log = logging.getLogger(__name__)

# The Hub's own rule (huggingface_hub.utils.validate_repo_id), restated so the error can name the config
# key: "name" or "namespace/name", letters, digits, "-", "_", ".", at most 96 characters.
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_RETRYABLE_STATUS = {408, 429}  # timeout, rate limit: client errors that waiting does fix
_AUTH_STATUS = {401, 403}
_STOP = object()  # queue sentinel: no more checkpoints


def validate_repo_id(repo_id: str) -> str:
    """Fail at construction, not at the first upload hours later, when the repo id cannot be valid."""
    ok = (
        isinstance(repo_id, str)
        and len(repo_id) <= 96
        and _REPO_ID.match(repo_id) is not None
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith(".git")
        and not any(part.startswith(("-", ".")) or part.endswith(("-", ".")) for part in repo_id.split("/"))
    )
    if not ok:
        raise ValueError(
            f"checkpointing.hub_repo_id={repo_id!r} is not a Hugging Face repo id: expected "
            "'namespace/name' (or 'name' for your own namespace), letters, digits, '-', '_' and '.', "
            "e.g. 'my-org/pico-decoder-tiny'"
        )
    return repo_id


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based): doubling, so a brief outage
    costs little, capped, so a long one does not leave the worker asleep for hours."""
    return min(backoff_s * 2**attempt, max_backoff_s)


def _offline_mode() -> bool:
    """huggingface_hub reads ``HF_HUB_OFFLINE`` once at import; read its constant, not the environment, so
    we agree with what the library itself will do."""
    return bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _classify(exc: BaseException) -> str:
    """One of ``offline``, ``auth``, ``network`` (retry), ``permanent`` (give up on this checkpoint)."""
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return "offline"
    if isinstance(exc, hf_errors.LocalTokenNotFoundError):
        return "auth"
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = _status(exc)
        if status in _AUTH_STATUS:
            return "auth"
        if status is not None and 400 <= status < 500 and status not in _RETRYABLE_STATUS:
            return "permanent"
        return "network"
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, NotADirectoryError)):
        return "permanent"
    return "network"  # connection errors, timeouts, the HTTP client's transport errors, the unknown


class HubUploader:
    """Uploads checkpoint folders as commits ``"step N"`` on branch ``branch`` of model repo ``repo_id``.

    ``token`` is passed to every call (``None``: the API's own token, ``HF_TOKEN`` or ``hf auth login``).
    ``api`` defaults to ``huggingface_hub.HfApi()``; tests pass a double with ``create_repo``,
    ``create_branch`` and ``upload_folder``. The repo (``private`` when created) and the branch are
    created on the first attempt, with ``exist_ok`` so a resumed run appends to its branch.
    See the module docstring for how failures are handled.
    """

    def __init__(
        self,
        repo_id: str,
        branch: str,
        *,
        token: str | None = None,
        private: bool = True,
        max_attempts: int = 5,
        backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
        api: HfApi | None = None,
    ) -> None:
        self.repo_id = validate_repo_id(repo_id)
        if not isinstance(branch, str) or not branch.strip():
            raise ValueError(f"HubUploader branch must be a non-empty string (the run name), got {branch!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"backoff_s and max_backoff_s must be >= 0, got {backoff_s}, {max_backoff_s}")
        self.branch = branch
        self.private = private
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._token = token
        self._api: Any = HfApi() if api is None else api

        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # set by close() on timeout: abandon what is left
        self._thread: threading.Thread | None = None
        self._closed = False
        self._disabled: str | None = None  # "offline" / "auth": no more uploads this run
        self._repo_ready = False
        self._warned: set[str] = set()
        self._pending: dict[Path, list[int]] = {}  # folder -> steps queued or in flight from it
        self._uploaded: list[int] = []
        self._failed: list[int] = []
        self._skipped: list[int] = []

    # -- what happened, for logs and tests (copies, so a reader never sees a list being appended to) --

    @property
    def uploaded(self) -> list[int]:
        """Steps committed to the branch, in commit order."""
        with self._lock:
            return list(self._uploaded)

    @property
    def failed(self) -> list[int]:
        """Steps attempted and given up on (attempts exhausted, or a permanent error)."""
        with self._lock:
            return list(self._failed)

    @property
    def skipped(self) -> list[int]:
        """Steps never attempted: offline, bad credentials, submitted after close, or left at close."""
        with self._lock:
            return list(self._skipped)

    def is_pending(self, folder: Path) -> bool:
        """Whether ``folder`` is queued or being uploaded: checkpoint rotation must not delete it yet."""
        with self._lock:
            return Path(folder) in self._pending

    # -- training thread side --

    def submit(self, folder: Path, step: int) -> None:
        """Queue ``folder`` as the commit for ``step`` and return at once. Never raises."""
        folder = Path(folder)
        with self._lock:
            reason = "closed" if self._closed else self._disabled
            if reason is None and _offline_mode():
                self._disabled = reason = "offline"
            if reason is not None:
                self._skipped.append(step)
            else:
                self._pending.setdefault(folder, []).append(step)
                self._queue.put((folder, step))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="hub-uploader", daemon=True)
                    self._thread.start()
        if reason is not None:
            self._warn_skip(reason, folder, step)

    def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (``None``: no limit) for queued uploads, then stop the worker.

        Idempotent. Steps still queued when the time is up are recorded in :attr:`skipped` and logged;
        their folders are on disk as always.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout)
        if thread.is_alive():
            self._stop.set()  # the worker abandons the queue at its next check
            with self._lock:
                left = sorted(step for steps in self._pending.values() for step in steps)
            log.warning(
                "Hub upload to %s@%s did not finish within %.1fs; steps %s stay local only "
                "(push them later with `hf upload`).",
                self.repo_id,
                self.branch,
                timeout,
                left,
            )

    # -- worker thread side --

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            folder, step = item
            try:
                if self._stop.is_set() or self._disabled is not None:
                    with self._lock:
                        self._skipped.append(step)
                    continue
                self._upload_with_retries(folder, step)
            except Exception:  # a bug here must not kill the worker and strand the queue
                log.exception("Hub uploader: unexpected error on step %d (%s)", step, folder)
                with self._lock:
                    self._failed.append(step)
            finally:
                with self._lock:
                    self._pending[folder].remove(step)
                    if not self._pending[folder]:
                        del self._pending[folder]

    def _upload_with_retries(self, folder: Path, step: int) -> None:
        for attempt in range(self.max_attempts):
            try:
                if not folder.is_dir():
                    raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
                self._upload_once(folder, step)
            except Exception as exc:
                kind = _classify(exc)
                if kind in ("offline", "auth"):
                    with self._lock:
                        self._disabled = kind
                        self._skipped.append(step)
                    self._warn_skip(kind, folder, step, exc)
                    return
                if kind == "permanent":
                    log.warning(
                        "Hub upload of step %d (%s) failed and will not be retried: %s: %s. "
                        "The checkpoint stays local.",
                        step,
                        folder,
                        type(exc).__name__,
                        exc,
                    )
                    break
                self._warn_once(
                    "network",
                    "Hugging Face Hub unreachable (%s: %s); checkpoints stay local and uploads are retried "
                    "up to %d times with backoff.",
                    type(exc).__name__,
                    exc,
                    self.max_attempts,
                )
                if attempt + 1 == self.max_attempts:
                    log.warning(
                        "Hub upload of step %d (%s) gave up after %d attempts (last error %s: %s). "
                        "The checkpoint stays local.",
                        step,
                        folder,
                        self.max_attempts,
                        type(exc).__name__,
                        exc,
                    )
                    break
                log.info("Hub upload of step %d failed (%s); retry %d", step, exc, attempt + 1)
                if self._stop.wait(backoff_delay(attempt, self.backoff_s, self.max_backoff_s)):
                    with self._lock:
                        self._skipped.append(step)
                    return  # close() has logged the steps left
            else:
                with self._lock:
                    self._uploaded.append(step)
                log.info("Uploaded step %d to %s@%s", step, self.repo_id, self.branch)
                return
        with self._lock:
            self._failed.append(step)

    def _upload_once(self, folder: Path, step: int) -> None:
        if not self._repo_ready:
            self._api.create_repo(
                self.repo_id, token=self._token, private=self.private, exist_ok=True, repo_type="model"
            )
            self._api.create_branch(self.repo_id, branch=self.branch, token=self._token, exist_ok=True)
            self._repo_ready = True
        self._api.upload_folder(
            repo_id=self.repo_id,
            folder_path=folder,
            revision=self.branch,
            commit_message=f"step {step}",
            token=self._token,
        )

    # -- warnings: once per uploader and reason, so a 100-checkpoint offline run logs one line --

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(msg, *args)

    def _warn_skip(self, reason: str, folder: Path, step: int, exc: BaseException | None = None) -> None:
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        if reason == "offline":
            self._warn_once(
                "offline",
                "Hugging Face Hub offline mode (HF_HUB_OFFLINE)%s: checkpoints stay local and are not "
                "uploaded to %s this run (first: step %d, %s). Push them later with `hf upload`.",
                detail,
                self.repo_id,
                step,
                folder,
            )
        elif reason == "auth":
            if self._token is None and getattr(self._api, "token", None) is None and get_token() is None:
                detail += " (no token found)"
            self._warn_once(
                "auth",
                "Hugging Face Hub rejected the credentials for %s%s: set HF_TOKEN or run `hf auth login` "
                "with a token that can write to it. Checkpoints stay local; no further uploads this run "
                "(first not uploaded: step %d, %s).",
                self.repo_id,
                detail,
                step,
                folder,
            )
        else:
            self._warn_once(
                "closed", "HubUploader.submit after close: step %d (%s) stays local.", step, folder
            )
