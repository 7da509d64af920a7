"""The frozen image trunk's feature maps kept on disk, shared by every process that runs the same trunk.

A frozen ImageNet trunk is a fixed function of the image: within a run `EfficientNetTokens` computes each
image's map once and keeps it in memory. Runs that follow one another (an ablation's seeds, notebooks
04-06 after README command 1, a resumed run) would compute the same maps again; at 128 px that is most of
a short run's time. With the environment variable ``CODIS_TRUNK_CACHE_DIR`` set to a folder, the maps are
also written there and read back by later processes:

    CODIS_TRUNK_CACHE_DIR=~/.cache/codis/trunk codis-pretrain

- Maps live under ``<folder>/<trunk digest>/``: the digest covers the trunk's weights and batch-norm
  statistics, its input size and its stages, so another trunk never reads them.
- Each map is keyed by the digest of the image tensor's bytes (as in memory), written in chunk files
  (``chunk-<pid>-<n>.pt``, through a temporary file and a rename) and read with ``weights_only=True``. A
  chunk that cannot be read is skipped with one warning naming it; its maps are computed again.
- Several processes may write at once (torchrun, an ablation's parallel runs): each writes its own chunks.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
from pathlib import Path

import torch

__all__ = ["TRUNK_CACHE_ENV", "TrunkStore", "trunk_digest", "store_from_environment"]

TRUNK_CACHE_ENV = "CODIS_TRUNK_CACHE_DIR"
_CHUNK_SIZE = 512  # maps per chunk file (about 10 MB at 128 px and 320 channels)
_log = logging.getLogger("codis")


def trunk_digest(modules: list[torch.nn.Module], *settings: object) -> str:
    """Return a digest of the modules' tensors (parameters and buffers, in order) and the settings given."""
    digest = hashlib.sha256(repr(settings).encode())
    for module in modules:
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


class TrunkStore:
    """Feature maps on disk under one trunk digest: `load` what is there, `add` new ones, `flush` them."""

    def __init__(self, folder: str | os.PathLike, digest: str):
        self.folder = Path(folder).expanduser() / digest
        self._pending_keys: list[bytes] = []
        self._pending_values: list[torch.Tensor] = []
        self._written = 0

    def load(self) -> dict[bytes, torch.Tensor]:
        """Return every readable map of this trunk (a chunk that cannot be read: one warning, skipped)."""
        found: dict[bytes, torch.Tensor] = {}
        for chunk in sorted(self.folder.glob("chunk-*.pt")):
            try:
                saved = torch.load(chunk, map_location="cpu", weights_only=True)
                keys, values = saved["keys"], saved["values"]
                if keys.shape[0] != values.shape[0] or keys.shape[1:] != (16,):
                    raise ValueError("keys and maps do not pair up")
            except Exception as error:  # noqa: BLE001 (any damage: the maps are computed again)
                _log.warning("%s: trunk cache chunk not readable (%s); skipped", chunk, str(error).splitlines()[0])
                continue
            for key, value in zip(keys, values):
                found[bytes(key.tolist())] = value
        return found

    def add(self, key: bytes, value: torch.Tensor) -> None:
        """Queue one map for writing; a full chunk is written at once."""
        self._pending_keys.append(key)
        self._pending_values.append(value.detach().cpu())
        if len(self._pending_keys) >= _CHUNK_SIZE:
            self.flush()

    def flush(self) -> None:
        """Write the queued maps as one chunk file (temporary file, then rename); nothing queued: nothing."""
        if not self._pending_keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = torch.tensor([list(key) for key in self._pending_keys], dtype=torch.uint8)
        values = torch.stack(self._pending_values)
        self._pending_keys, self._pending_values = [], []
        path = self.folder / f"chunk-{os.getpid()}-{self._written}.pt"
        temporary = path.with_suffix(".tmp")
        try:
            torch.save({"keys": keys, "values": values}, temporary)
            os.replace(temporary, path)
            self._written += 1
        except OSError as error:  # a full or read-only disk costs only the saving
            temporary.unlink(missing_ok=True)
            _log.warning("%s: trunk cache not written (%s)", path, error)


def store_from_environment(digest: str) -> TrunkStore | None:
    """Return the store under $CODIS_TRUNK_CACHE_DIR for this digest (flushed at exit), or None when unset."""
    folder = os.environ.get(TRUNK_CACHE_ENV)
    if not folder:
        return None
    store = TrunkStore(folder, digest)
    atexit.register(store.flush)
    return store
