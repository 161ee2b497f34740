"""Checkpoints written atomically in their own folder: a full disk or a kill mid-save never leaves a truncated file
under a checkpoint's name, and the previous version stays until the new one is complete.

Lightning's own save (`_atomic_save`, an fsspec transaction) stages the file in the system's temporary folder and
moves it into place; across filesystems that move is a copy, which a full disk or a kill can cut short under the final
name (last.ckpt included). Here the file is written next to its final name (`.NAME.PID.tmp`), flushed to disk, then
renamed over it (`os.replace`, atomic within one filesystem). Remote paths (s3://, ...) keep Lightning's behaviour.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from tl.errors import NO_SPACE, TLError, os_error


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are write-to-temporary, fsync, rename (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        checkpoint["tl_saved_ns"] = time.time_ns()  # which state is the latest: ckpt_path=auto (tl.train)
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(local)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            cause = os_error(e)  # torch.save on a full disk raises a RuntimeError while handling the OSError
            if cause is not None and cause.errno in NO_SPACE:
                raise TLError(f"no space left writing {str(path)!r} ({cause.strerror}): the checkpoints written before "
                              "are intact; free space, then resume with the same hydra.run.dir and ckpt_path=auto"
                              ) from e
            if cause is not None:
                raise TLError(f"could not write {str(path)!r} ({cause.strerror or cause}): fix permissions there; the "
                              "checkpoints written before are intact; resume with the same hydra.run.dir and "
                              "ckpt_path=auto") from e
            raise
        return None
