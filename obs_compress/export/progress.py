"""A resumable run's in-progress folder and its manifest.

A streaming run writes into ``.<out>.in-progress`` beside ``out`` (a stable name: a resumed
run finds it; the clean-up of dead runs' ``.partial-`` folders never touches it). After every
block it records in ``progress.json`` what is on disk: the shard files written (each with its
sha256), the tensors already in place in the shards being filled (``<shard>.partial``, each
tensor's sha256) and the staging files holding a compressed shard's tensors until it is
complete (each with its sha256), the hidden states entering the next block
(``inputs-<block>.safetensors``), the per-layer statistics so far, and the run's identity
(tool version, model, recipe, calibration digest and the settings that change the bytes).
The manifest is replaced atomically (written beside, flushed, renamed), after the files it
names are on disk, so a SIGKILL at any moment leaves either the previous record or the new one,
and at most the block in flight is lost. Files the record does not name (the block in flight's)
are deleted on resume; files and tensors it names are checked against their sha256 first (a
tensor of the block in flight half-written into a ``.partial`` file is not named, and is
written again). The folder only becomes ``out`` by a rename once complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, InvalidArgument, OutputExistsError
from .shards import PARTIAL_SUFFIX, file_sha256, first_differing_tensor

logger = logging.getLogger(__name__)

IN_PROGRESS_SUFFIX = ".in-progress"
MANIFEST_NAME = "progress.json"
MANIFEST_FORMAT = "obs_compress progress 2"


class ResumeRefused(InvalidArgument):
    """``--resume`` found a run it cannot continue (another recipe, model, calibration...)."""


def in_progress_folder(out: Path) -> Path:
    return out.parent / f".{out.name}{IN_PROGRESS_SUFFIX}"


@dataclass
class Progress:
    """What a run has finished, as recorded in its manifest."""

    identity: dict[str, Any]
    n_blocks: int
    blocks_done: int = 0
    shards: dict[str, str] = field(default_factory=dict)  # file -> sha256
    staged: dict[str, dict] = field(default_factory=dict)  # file -> {"names", "sha256"}
    filling: dict[str, dict[str, str]] = field(default_factory=dict)  # shard -> {tensor: sha256}
    inputs: dict[str, str] | None = None  # {"file", "sha256"}: inputs of block blocks_done
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # time spent by the runs before this one
    pid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "identity": self.identity, "n_blocks": self.n_blocks,
                "blocks_done": self.blocks_done, "shards": self.shards, "staged": self.staged,
                "filling": self.filling, "inputs": self.inputs, "layers": self.layers,
                "seconds": self.seconds, "pid": self.pid}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        if data.get("format") != MANIFEST_FORMAT:
            raise ResumeRefused(f"progress record format {data.get('format')!r} is not "
                                f"{MANIFEST_FORMAT!r} (written by another version of the tool)")
        fields = ("identity", "n_blocks", "blocks_done", "shards", "staged", "filling", "inputs",
                  "layers", "seconds", "pid")
        return cls(**{name: data[name] for name in fields})


def write_manifest(folder: Path, progress: Progress) -> None:
    """Replace the manifest atomically: written beside it, flushed to disk, renamed."""
    partial = folder / (MANIFEST_NAME + ".tmp")
    with partial.open("w", encoding="utf-8") as handle:
        json.dump(progress.to_dict(), handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(folder / MANIFEST_NAME)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself survives a power cut
    finally:
        os.close(descriptor)


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two run identities (empty: the same run)."""
    differences = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            inner = [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
            details = "; ".join(f"{name}: {json.dumps(old.get(name))} there, "
                                f"{json.dumps(new.get(name))} now" for name in inner[:4])
            differences.append(f"{key} ({details})")
        else:
            differences.append(f"{key} ({json.dumps(old)} there, {json.dumps(new)} now)")
    return differences


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_progress(out: Path, identity: dict[str, Any], n_blocks: int, *, resume: bool,
                  overwrite: bool) -> tuple[Path, Progress]:
    """The in-progress folder of ``out`` and what it holds: a fresh record, or (``resume``)
    the recorded one once the identity and every recorded file's sha256 check out."""
    folder = in_progress_folder(out)
    manifest = folder / MANIFEST_NAME
    if folder.exists():
        recorded = None
        if manifest.is_file():
            recorded = Progress.from_dict(json.loads(manifest.read_text(encoding="utf-8")))
            if _pid_alive(recorded.pid):
                raise OutputExistsError(f"{folder} is being written by another run (process "
                                        f"{recorded.pid}); wait for it or stop it first")
        if not resume:
            if not overwrite:
                where = (f"at block {recorded.blocks_done}/{recorded.n_blocks}" if recorded
                         else "with no progress record")
                raise OutputExistsError(
                    f"an interrupted run of --out {out} stopped {where} ({folder}); pass "
                    "--resume (resume=True) to continue it, or --overwrite to discard it")
            shutil.rmtree(folder)
        elif recorded is None:
            raise ResumeRefused(f"{folder} holds no progress record (a run was killed while "
                                "finishing or starting); remove it and run again")
        else:
            differences = identity_differences(recorded.identity, identity)
            if differences:
                raise ResumeRefused(
                    f"cannot resume into {out}: the interrupted run differs in "
                    f"{', '.join(differences)}; run with the same settings, or pass --overwrite "
                    "without --resume to start over")
            _check_recorded_files(folder, recorded)
            recorded.pid = os.getpid()
            write_manifest(folder, recorded)
            logger.info("resuming %s at block %d/%d", out, recorded.blocks_done,
                        recorded.n_blocks)
            return folder, recorded
    elif resume:
        logger.warning("--resume: no interrupted run of %s found (%s); starting from block 0",
                       out, folder)
    folder.mkdir(parents=True)
    progress = Progress(identity=identity, n_blocks=n_blocks, pid=os.getpid())
    write_manifest(folder, progress)
    return folder, progress


def _differs(path: Path) -> ResumeRefused:
    return ResumeRefused(f"{path} is missing or differs from what the progress record holds "
                         "(was the folder modified?); remove the folder and start over")


def _check_recorded_files(folder: Path, progress: Progress) -> None:
    """Every file the record names has its recorded bytes; files it does not name (those of
    the block in flight when the run died) are removed."""
    expected = {**progress.shards, **{part: r["sha256"] for part, r in progress.staged.items()}}
    if progress.inputs is not None:
        expected[progress.inputs["file"]] = progress.inputs["sha256"]
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise _differs(path)
    for shard, digests in progress.filling.items():
        partial = folder / (shard + PARTIAL_SUFFIX)
        if not partial.exists() and (folder / shard).is_file():
            # killed between completing the shard and recording it: the block that completed
            # it runs again and writes its tensors again, in place
            (folder / shard).replace(partial)
        try:
            intact = partial.is_file() and first_differing_tensor(partial, digests) is None
        except CheckpointFormatError:  # its header or size no longer checks out
            intact = False
        if not intact:
            raise _differs(partial)
        expected[shard + PARTIAL_SUFFIX] = None
    for path in sorted(folder.rglob("*"), reverse=True):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in expected and relative != MANIFEST_NAME:
            path.unlink()


__all__ = ["IN_PROGRESS_SUFFIX", "MANIFEST_NAME", "Progress", "ResumeRefused",
           "identity_differences", "in_progress_folder", "open_progress", "write_manifest"]
