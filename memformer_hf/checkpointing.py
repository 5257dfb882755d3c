"""Atomic checkpoints for a `transformers.Trainer`: `AtomicCheckpointMixin`.

The Trainer's own `_save_checkpoint` writes into `checkpoint-N` file by file, so a crash during a save leaves a
folder that `resume_from_checkpoint=True` would pick up. With the mixin, everything is written into
`<run>/_tmp-checkpoint-N/checkpoint-N` (the Trainer's `_get_output_dir` is redirected there while it saves), fsynced,
and renamed to `<run>/checkpoint-N` only once every rank is done; the Hub push and the `save_total_limit` rotation
then run on the complete folder. A crash leaves only the staging folder, which `get_last_checkpoint` and rotation
never consider (and `push_to_hub` skips `_tmp-*`); the next save removes it.

Use it before `Trainer` in the bases (`class MyTrainer(AtomicCheckpointMixin, Trainer)`); a subclass adds its own
files to each checkpoint in `_save_checkpoint_extras`.
"""

from __future__ import annotations

import os
import shutil

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_PREFIX = "_tmp-"


class AtomicCheckpointMixin:
    """Stage, fsync and rename every checkpoint (see the module docstring). Mix in before `transformers.Trainer`."""

    _staging_dir: str | None = None  # set while `_save_checkpoint` writes a staged checkpoint
    _push_pending: bool = False

    def _save_checkpoint_extras(self, folder: str) -> None:
        """Write this rank's own files into the staged checkpoint `folder` (every rank calls it; default: none)."""

    def _get_output_dir(self, trial) -> str:
        """The run folder; while a checkpoint is being written, its staging folder (see `_save_checkpoint`)."""
        return self._staging_dir or super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Save an atomic checkpoint: the Trainer's `_save_checkpoint` writes everything (model, optimizer, scheduler,
        scaler, RNG and trainer state, and `_save_checkpoint_extras`) into `<run>/_tmp-checkpoint-N/checkpoint-N`,
        which is fsynced and renamed to `<run>/checkpoint-N` only once every rank is done; then the Hub push and
        `save_total_limit` rotation run on the complete folder."""
        acc = self.accelerator
        run_dir = super()._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, f"{STAGING_PREFIX}{name}"), os.path.join(run_dir, name)
        staged = os.path.join(staging, name)
        if acc.is_local_main_process and os.path.isdir(run_dir):  # leftovers of an interrupted save
            for stale in os.listdir(run_dir):
                if stale.startswith(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-"):
                    shutil.rmtree(os.path.join(run_dir, stale), ignore_errors=True)
        acc.wait_for_everyone()
        self._staging_dir, self._push_pending = staging, False
        try:
            super()._save_checkpoint(model, trial)  # its rotation sees only the staging folder: a no-op
            if self.state.best_model_checkpoint == staged:  # the Trainer found the best checkpoint among the staged
                self.state.best_model_checkpoint = final
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            self._save_checkpoint_extras(staged)
        finally:
            self._staging_dir = None
        acc.wait_for_everyone()
        for first in (True, False):  # the main process; then other nodes' local mains (when not on a shared disk)
            mine = acc.is_main_process if first else acc.is_local_main_process and not acc.is_main_process
            if mine and os.path.isdir(staged):
                commit_checkpoint(staged, final)
            acc.wait_for_everyone()
        if self._push_pending:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Deferred while a checkpoint is staged: the push runs from the complete, renamed folder."""
        if self._staging_dir is not None:
            self._push_pending = True
            return
        super()._push_from_checkpoint(checkpoint_folder)


def commit_checkpoint(staged: str, final: str) -> None:
    """Flush a complete checkpoint folder to disk and rename it to `final` (an existing `final`, from an earlier
    save of the same step, is moved aside first and deleted after); then remove the staging parent."""
    for root, _, files in os.walk(staged):
        for name in files:
            fsync(os.path.join(root, name))
    fsync(staged)
    staging = os.path.dirname(staged)
    if os.path.exists(final):
        os.replace(final, os.path.join(staging, "replaced"))
    os.replace(staged, final)
    fsync(os.path.dirname(final))
    shutil.rmtree(staging, ignore_errors=True)


def fsync(path: str) -> None:
    """fsync a file or a folder (where the platform allows folders to be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync on folders
        pass
    finally:
        os.close(fd)


__all__ = ["AtomicCheckpointMixin", "commit_checkpoint", "fsync"]
