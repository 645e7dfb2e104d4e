"""Checkpoint directories as the Hugging Face hub cache stores them.

``huggingface_hub`` keeps a repo as ``models--<org>--<name>/`` holding ``refs/main`` (a
commit hash), ``snapshots/<hash>/<file>`` (relative symlinks) and ``blobs/<sha256 or
etag>`` (the contents, no extension). Every reader of a checkpoint directory (load_draft,
load_target, the converters, eval) goes through this module, so a snapshot directory, or
the repo root, works wherever a plain directory does: names come from the links (what
``.safetensors`` / ``config.json`` filters look at), contents from the blobs, and copies
are regular files (a copied relative link would dangle in the destination). A link whose
blob is gone (an interrupted download or a pruned cache) is an error naming both, never a
silently skipped file.
"""

from __future__ import annotations

import os
import shutil

from deepspec_jax.errors import CheckpointError, ConfigError

REF = "main"


def _repo_id(path: str) -> str | None:
    """``org/name`` of the ``models--org--name`` directory ``path`` lies in, if any."""
    for part in reversed(os.path.abspath(path).split(os.sep)):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


def dangling_error(path: str) -> CheckpointError:
    repo = _repo_id(path)
    how = f"`huggingface-cli download {repo}`" if repo else "the download or copy that made it"
    return CheckpointError(
        f"{path}: symlink to {os.path.realpath(path)}, which does not exist (the blob is missing: "
        f"an interrupted or partial download, or a pruned cache); re-download the checkpoint "
        f"({how}).")


def checked_file(path: str) -> str:
    """``path`` unchanged, after making sure a symlink there leads to a file that exists."""
    if os.path.islink(path) and not os.path.exists(path):
        raise dangling_error(path)
    return path


def is_repo_cache(path: str) -> bool:
    """A hub cache repo root (``models--org--name``): snapshots/ plus refs/ or blobs/."""
    return os.path.isdir(os.path.join(path, "snapshots")) and (
        os.path.isdir(os.path.join(path, "refs")) or os.path.isdir(os.path.join(path, "blobs")))


def _snapshot_of(repo: str) -> str:
    snaps_dir = os.path.join(repo, "snapshots")
    snaps = [os.path.join(snaps_dir, d) for d in sorted(os.listdir(snaps_dir))
             if os.path.isdir(os.path.join(snaps_dir, d))]
    ref = os.path.join(repo, "refs", REF)
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
        snap = os.path.join(snaps_dir, commit)
        if not os.path.isdir(snap):
            raise CheckpointError(
                f"{ref}: names commit {commit!r}, but {snap} does not exist (snapshots present: "
                f"{snaps or 'none'}); re-download the checkpoint, or pass a snapshot directory.")
        return snap
    if len(snaps) == 1:
        return snaps[0]
    if not snaps:
        raise CheckpointError(f"{repo}: hub cache without snapshots (nothing downloaded yet); "
                              "download the checkpoint first.")
    raise ConfigError(
        f"{repo}: hub cache with {len(snaps)} snapshots and no refs/{REF} to choose one: "
        f"{snaps}; pass the snapshot directory itself.")


def _check_links(root: str) -> None:
    for d, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            checked_file(os.path.join(d, name))


def resolve_checkpoint_path(path: str) -> str:
    """A user's checkpoint path -> the path to read: a hub cache repo root becomes the
    snapshot ``refs/main`` names (or its only snapshot); a directory is checked for links
    to missing blobs up front (before any partial load); anything else is returned as is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_repo_cache(path):
            path = _snapshot_of(path)
        _check_links(path)
    return checked_file(path)


def copy_file(src: str, dst: str) -> None:
    """Copy the contents behind ``src`` (a link is followed, never copied) to ``dst`` as a
    regular file, atomically."""
    shutil.copyfile(checked_file(src), dst + ".part", follow_symlinks=True)
    os.replace(dst + ".part", dst)
